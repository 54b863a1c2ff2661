"""`mmllm serve`: an HTTP JSON service over the same predictor as `mmllm predict`.

GET /health, GET /info, POST /predict (a JSON record, a JSON list of records, or a multipart form with
`text`/`id` fields and `image`/`audio` files). Media are base64 (`"image": "data:image/png;base64,..."` or
`"image_base64": "..."`) or uploaded files; a server-side path is read only when the server was started with
--media-root, and only a regular file under that folder (MediaRoot). Concurrent requests are
micro-batched: the first request of a batch waits up to --batch-wait-ms for others, up to --max-batch records,
and one worker thread runs the model. A bad record gets HTTP 422 with the same one-line error as `predict`;
a malformed request 400; an oversized one 413. Errors never carry a traceback.
"""


import asyncio
import base64
import binascii
import contextlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmllm.config import ServeConfig
from mmllm.console import log
from mmllm.errors import UserError

MEDIA = ("image", "audio")


class MediaRoot:
    """The media paths a request may name: none (no --media-root), or regular files under --media-root after
    resolving `..` and symlinks. A path is the folder's, never the server's cwd's or a user's (`~` is a name).
    Refusals never show a server path; `hide` removes the folder and the cwd from any other error text."""

    def __init__(self, folder: str | None):
        self.folder = os.path.realpath(folder) if folder else None

    def __call__(self, value: str, base: Path) -> str:
        from mmllm.records import RecordError

        if self.folder is None:
            raise RecordError(None, "server-side paths are refused (the server runs without --media-root): send the "
                                    "file itself (base64, a data: URI or a multipart upload)")
        lexical = os.path.normpath(os.path.join(self.folder, value)) if "\0" not in value else ""
        if not self._inside(lexical) or not self._inside(real := os.path.realpath(lexical)):
            raise RecordError(None, "path outside --media-root: refused")
        try:
            mode = os.stat(real).st_mode
        except OSError:
            raise RecordError(None, "file not found under --media-root") from None
        if not stat.S_ISREG(mode):
            raise RecordError(None, "not a regular file under --media-root")
        return real

    def _inside(self, path: str) -> bool:
        return bool(path) and os.path.commonpath([self.folder, path]) == self.folder

    def hide(self, text: str) -> str:
        """Error text with the media folder and the server's cwd replaced by placeholders."""
        if self.folder:
            text = text.replace(self.folder, "<media-root>")
        return text.replace(os.getcwd(), "<server>")


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


def decode_media(obj: dict, config: dict) -> dict:
    """Base64 media (`<m>_base64` keys, or data: URIs in any key the record reader takes as media) -> bytes,
    which the record reader takes as file content."""
    from mmllm.records import record_columns

    out = dict(obj)
    cols = record_columns(out, config.get("columns") or {})
    for m in MEDIA:
        key = cols[m] or m
        value = out.pop(f"{m}_base64", None)
        if value is None and isinstance(out.get(key), str) and out[key].startswith("data:"):
            value = out[key].split(",", 1)[1] if "," in out[key] else ""
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"column {m}: base64 media must be a string")
        try:
            out[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"column {m}: not valid base64") from None
    return out


def to_records(objs: list, config: dict, media: MediaRoot) -> list[dict | tuple[dict, Any]]:
    """JSON objects -> records (or (stub, error)), by the same code as `predict`'s input; media paths by
    `media`'s rule."""
    from mmllm.records import RecordError, convert_rows

    rows: list = []
    ids: dict[int, Any] = {}
    for i, obj in enumerate(objs, start=1):
        if not isinstance(obj, dict):
            rows.append((i, RecordError(None, f"expected a JSON object, got {type(obj).__name__}")))
            continue
        try:
            rows.append((i, decode_media(obj, config)))
        except ValueError as e:
            rows.append((i, RecordError(None, str(e))))
            ids[i] = obj.get("id")
    out = list(convert_rows(rows, config, Path(media.folder or "."), media))
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
    media = MediaRoot(cfg.media_root)

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
        items = to_records(objs, predictor.config, media)
        good = [it for it in items if not isinstance(it, tuple)]
        results, batch = await batcher.submit(good, top_k) if good else ([], 0)
        it_results = iter(results)
        out = [{"id": it[0]["id"], "error": error_line(it[0], it[1])} if isinstance(it, tuple) else next(it_results)
               for it in items]
        for res in out:
            if "error" in res:
                res["error"] = media.hide(res["error"])
        headers = {"X-MMLLM-Batch-Records": str(batch)}
        if single:
            return JSONResponse(out[0], status_code=422 if "error" in out[0] else 200, headers=headers)
        return JSONResponse(out, headers=headers)

    @app.exception_handler(Exception)
    async def no_traceback(request: Request, exc: Exception) -> Any:
        return JSONResponse({"error": media.hide(f"{type(exc).__name__}: {str(exc)[:200]}")}, status_code=500)

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
