"""`mmllm serve`: an HTTP JSON service over the same predictor as `mmllm predict`.

GET /health, GET /info, POST /predict (a JSON record, a JSON list of records, or a multipart form with
`text`/`id` fields and `image`/`audio` files). Media are paths (read on the server, as `predict` does) or
base64 (`"image": "data:image/png;base64,..."` or `"image_base64": "..."`). Concurrent requests are
micro-batched: the first request of a batch waits up to --batch-wait-ms for others, up to --max-batch records,
and one worker thread runs the model. A bad record gets HTTP 422 with the same one-line error as `predict`;
a malformed request 400; an oversized one 413. Errors never carry a traceback.
"""


import asyncio
import base64
import binascii
import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmllm.config import ServeConfig
from mmllm.console import log
from mmllm.errors import UserError

MEDIA = ("image", "audio")


class Batcher:
    """Collects records from concurrent requests into batches for one model worker thread."""

    def __init__(self, predict: Any, max_batch: int, wait_s: float):
        self.predict = predict  # list[dict] -> list[dict], same order
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mmllm-model")
        self.batches = 0

    async def submit(self, records: list[dict], top_k: int) -> tuple[list[dict], int]:
        """Results for `records` (in order) and the size of the batch that served them."""
        assert self.queue is not None
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((records, top_k, future))
        return await future

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while sum(len(i[0]) for i in items) < self.max_batch and items[0][1] == items[-1][1]:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            same_k = [i for i in items if i[1] == items[0][1]]  # one top_k per model call
            for extra in items[len(same_k):]:
                await self.queue.put(extra)
            await self._serve(same_k, loop)

    async def _serve(self, items: list, loop: asyncio.AbstractEventLoop) -> None:
        flat = [r for recs, _, _ in items for r in recs]
        try:
            results = await loop.run_in_executor(self.worker, self.predict, flat, items[0][1])
        except Exception as e:  # noqa: BLE001 - reported to each waiting request, the server stays up
            for _, _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        self.batches += 1
        start = 0
        for recs, _, fut in items:
            if not fut.done():
                fut.set_result((results[start:start + len(recs)], len(flat)))
            start += len(recs)


def decode_media(obj: dict) -> dict:
    """Base64 media (`<m>_base64` keys or data: URIs) -> bytes, which the record reader takes as file content."""
    out = dict(obj)
    for m in MEDIA:
        value = out.pop(f"{m}_base64", None)
        if value is None and isinstance(out.get(m), str) and out[m].startswith("data:"):
            value = out[m].split(",", 1)[1] if "," in out[m] else ""
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"column {m}: base64 media must be a string")
        try:
            out[m] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"column {m}: not valid base64") from None
    return out


def to_records(objs: list, config: dict) -> list[dict | tuple[dict, Any]]:
    """JSON objects -> records (or (stub, error)), by the same code as `predict`'s input."""
    from mmllm.records import RecordError, convert_rows

    rows: list = []
    ids: dict[int, Any] = {}
    for i, obj in enumerate(objs, start=1):
        if not isinstance(obj, dict):
            rows.append((i, RecordError(None, f"expected a JSON object, got {type(obj).__name__}")))
            continue
        try:
            rows.append((i, decode_media(obj)))
        except ValueError as e:
            rows.append((i, RecordError(None, str(e))))
            ids[i] = obj.get("id")
    out = list(convert_rows(rows, config, Path.cwd()))
    for i, given in ids.items():  # a record refused before it was read still answers with the caller's id
        if isinstance(given, (str, int)) and not isinstance(given, bool):
            out[i - 1][0]["id"] = given
    return out


def build_app(predictor: Any, cfg: ServeConfig) -> Any:
    """The FastAPI application (separate from `run` so tests can mount it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from mmllm.predict import error_line, predict_each

    def predict(records: list[dict], top_k: int) -> list[dict]:
        return predict_each(predictor, records, top_k, {})

    batcher = Batcher(predict, cfg.max_batch, cfg.batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="mmllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "batches": batcher.batches}

    @app.get("/info")
    async def info() -> dict:
        c = predictor.config
        return {"task": c.get("task", "classify"), "labels": c.get("labels", []),
                "modalities": c["model"]["modalities"],
                "encoders": {r: {k: e.get(k) for k in ("name", "identity", "license") if k in e}
                             for r, e in c.get("encoders", {}).items()},
                "max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms}

    @app.post("/predict")
    async def predict_route(request: Request) -> Any:
        try:
            single, objs = await read_body(request, cfg.max_request_mb)
            top_k = int(request.query_params.get("top_k", cfg.top_k))
            if not 1 <= top_k <= 1000:
                raise ValueError("top_k: must be between 1 and 1000")
        except PayloadTooLarge as e:
            return JSONResponse({"error": str(e)}, status_code=413)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        items = to_records(objs, predictor.config)
        good = [it for it in items if not isinstance(it, tuple)]
        results, batch = await batcher.submit(good, top_k) if good else ([], 0)
        it_results = iter(results)
        out = [{"id": it[0]["id"], "error": error_line(it[0], it[1])} if isinstance(it, tuple) else next(it_results)
               for it in items]
        headers = {"X-MMLLM-Batch-Records": str(batch)}
        if single:
            return JSONResponse(out[0], status_code=422 if "error" in out[0] else 200, headers=headers)
        return JSONResponse(out, headers=headers)

    @app.exception_handler(Exception)
    async def no_traceback(request: Request, exc: Exception) -> Any:
        return JSONResponse({"error": f"{type(exc).__name__}: {str(exc)[:200]}"}, status_code=500)

    return app


class PayloadTooLarge(ValueError):
    pass


async def read_body(request: Any, max_mb: int) -> tuple[bool, list]:
    """(one record?, the JSON objects) of a JSON or multipart request; ValueError says what is wrong."""
    limit = max_mb << 20
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request larger than {max_mb} MB (--max-request-mb)")
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        obj: dict[str, Any] = {}
        for key, value in form.multi_items():
            obj[key] = await value.read() if hasattr(value, "read") else value
        return True, [obj]
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request larger than {max_mb} MB (--max-request-mb)")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"malformed JSON body ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(data, dict):
        return True, [data]
    if isinstance(data, list):
        return False, data
    raise ValueError(f"expected a JSON object or a list of objects, got {type(data).__name__}")


def run(cfg: ServeConfig) -> int:
    import socket

    import uvicorn

    from mmllm.predict import Predictor

    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.max_file_mb)
    app = build_app(predictor, cfg)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot listen ({e.strerror})") from None
    log(f"serving {cfg.checkpoint} on http://{cfg.host}:{sock.getsockname()[1]} (Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
