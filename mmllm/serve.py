"""`mmllm serve`: an HTTP JSON service over the same predictor as `mmllm predict`.

GET / (the playground page, `playground`), GET /health, GET /info, POST /predict (a JSON record, a JSON list of
records, or a multipart form with `text`/`id` fields and `image`/`audio` files; `?top_k=K`, `?reliance=1`: each
record also predicted with each modality masked). Media are base64 (`"image": "data:image/png;base64,..."` or
`"image_base64": "..."`) or uploaded files; a server-side path is read only when the server was started with
--media-root, and only a regular file under that folder (MediaRoot). Concurrent requests are
micro-batched: the first request of a batch waits up to --batch-wait-ms for others, and one worker thread runs
the model on at most --max-batch records at a time; a client that disconnects is not predicted. A bad record gets
HTTP 422 with the same one-line error as `predict`; a malformed request 400.

Every request is treated as hostile (`guard`, `read_body`, `protocol`): the Host header must name this server
(421) and a browser Origin too (403); only JSON and multipart bodies (415); bodies over --max-request-mb (counted
while they stream, chunked or not) and requests over --max-records 413; headers and body each within
--request-timeout; at most --max-connections at once (503); idle keep-alive connections closed after
--timeout-keep-alive. Errors never carry a traceback or a server path, and repeated log lines are counted, not
repeated (QuietRepeats).
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
    """Collects records from concurrent requests into model calls of at most `max_batch` records, run by one
    worker thread. A request whose client has gone (its future cancelled) is not predicted."""

    def __init__(self, predict: Any, max_batch: int, wait_s: float):
        self.predict = predict  # (list[dict], key) -> list[dict], same order
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="mmllm-model")
        self.batches = 0  # model calls
        self.records = 0  # records predicted

    async def submit(self, records: list[dict], key: Any) -> tuple[list[dict], int]:
        """Results for `records` (in order) and the size of the largest model call that served them. Records are
        batched only with records of the same `key` (the settings `predict` is called with)."""
        assert self.queue is not None
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((records, key, future))
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
            same_k = [i for i in items if i[1] == items[0][1]]  # one key (top_k, ...) per model call
            for extra in items[len(same_k):]:
                await self.queue.put(extra)
            await self._serve(same_k, loop)

    async def _serve(self, items: list, loop: asyncio.AbstractEventLoop) -> None:
        results: list[list[dict]] = [[] for _ in items]
        largest = [0] * len(items)
        todo = [(n, r) for n, (recs, _, _) in enumerate(items) for r in recs]
        while todo:
            todo = [(n, r) for n, r in todo if not items[n][2].done()]  # a client that left is not predicted
            chunk, todo = todo[:self.max_batch], todo[self.max_batch:]
            if not chunk:
                break
            try:
                out = await loop.run_in_executor(self.worker, self.predict, [r for _, r in chunk], items[0][1])
            except Exception as e:  # noqa: BLE001 - reported to each waiting request, the server stays up
                for n in {n for n, _ in chunk}:
                    if not items[n][2].done():
                        items[n][2].set_exception(e)
                continue
            self.batches += 1
            self.records += len(chunk)
            for (n, _), res in zip(chunk, out):
                results[n].append(res)
                largest[n] = max(largest[n], len(chunk))
            for n, (recs, _, fut) in enumerate(items):
                if len(results[n]) == len(recs) and not fut.done():
                    fut.set_result((results[n], largest[n]))


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
    """The FastAPI application, behind `guard` (separate from `run` so tests can mount it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect

    from mmllm.predict import error_line, predict_each

    def predict(records: list[dict], key: tuple[int, bool]) -> list[dict]:  # key: (top_k, reliance)
        top_k, reliance = key
        return predict_each(predictor, records, top_k, {"reliance": reliance,
                                                        **({"stop": cfg.stop} if predictor.generation else {})})

    batcher = Batcher(predict, cfg.max_batch, cfg.batch_wait_ms / 1000)
    media = MediaRoot(cfg.media_root)

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="mmllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    page, policy = playground()

    @app.get("/")
    async def playground_page() -> Any:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": policy, "x-content-type-options": "nosniff",
                                 "cache-control": "no-cache"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "batches": batcher.batches, "records": batcher.records}

    @app.get("/info")
    async def info() -> dict:
        c = predictor.config
        transcriber = predictor.encoders.get("transcript")  # the audio is transcribed as prepare did
        return {"task": c.get("task", "classify"), "labels": c.get("labels", []),
                "modalities": c["model"]["modalities"],
                "transcribes_audio": transcriber is not None,
                "transcriber": getattr(transcriber, "name", None),
                "encoders": {r: {k: e.get(k) for k in ("name", "identity", "license") if k in e}
                             for r, e in c.get("encoders", {}).items()},
                "max_batch": cfg.max_batch, "batch_wait_ms": cfg.batch_wait_ms, "max_records": cfg.max_records}

    @app.post("/predict")
    async def predict_route(request: Request) -> Any:
        closing = {"connection": "close"}  # a refused body is not read on: the connection ends with the answer
        try:
            single, objs = await read_body(request, cfg)
            top_k = int(request.query_params.get("top_k", cfg.top_k))
            if not 1 <= top_k <= 1000:
                raise ValueError("top_k: must be between 1 and 1000")
            reliance = request.query_params.get("reliance", "0").strip().lower()
            if reliance not in ("0", "1", "false", "true"):
                raise ValueError("reliance: 1 (each record also predicted with each modality masked) or 0")
        except ClientDisconnect:
            log("client disconnected before sending its whole request: dropped")
            return Response(status_code=400)
        except RequestRefused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=closing)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        if len(objs) > cfg.max_records:
            return JSONResponse({"error": f"{len(objs)} records in one request; at most {cfg.max_records} "
                                          "(--max-records): send them in several requests"}, status_code=413)
        items = to_records(objs, predictor.config, media)
        good = [it for it in items if not isinstance(it, tuple)]
        results, batch = ([], 0)
        if good:
            answer = await until_answered(batcher.submit(good, (top_k, reliance in ("1", "true"))), request.receive)
            if answer is None:
                log("client disconnected before its answer: its records were not predicted")
                return Response(status_code=400)
            results, batch = answer
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

    if predictor.generation:  # POST /v1/chat/completions, GET /v1/models (OpenAI-compatible)
        from mmllm import chat_routes

        chat_routes.add(app, predictor, cfg, media)
    guarded = guard(app, cfg, media)
    guarded.batcher = batcher  # type: ignore[attr-defined]  # its counts: /health, and serve's last line
    return guarded


def playground() -> tuple[bytes, str]:
    """The playground page shipped in the package (mmllm/playground.html: inline CSS and JS, nothing fetched but
    this server's own /info, /predict and /v1/chat/completions) and its Content-Security-Policy, which allows
    exactly its own inline script and style (by hash) and connections to this origin."""
    import hashlib
    import re
    from importlib.resources import files

    html = files("mmllm").joinpath("playground.html").read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert body, f"playground.html has no <{tag}>"
        return "'sha256-" + base64.b64encode(hashlib.sha256(body[1].encode()).digest()).decode() + "'"

    policy = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; img-src blob:; "
              "media-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), policy


async def until_answered(job: Any, receive: Any) -> Any:
    """The result of `job`, or None (and `job` cancelled) when the client disconnects first."""
    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work, left = asyncio.ensure_future(job), asyncio.ensure_future(gone())
    await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    left.cancel()
    if work.done():
        return work.result()
    work.cancel()
    return None


def allowed_hosts(cfg: ServeConfig) -> set[str] | None:
    """The host names a request's Host (and Origin) may carry; None: any (`--allow-host '*'`)."""
    if "*" in cfg.allow_host:
        return None
    names = {"localhost", "127.0.0.1", "::1", cfg.host.strip("[]").lower()}
    names |= {h.strip().strip("[]").lower().rstrip(".") for h in cfg.allow_host}
    return names


def host_name(value: str) -> str | None:
    """The host of a Host header or an Origin (`name[:port]`, `[v6]:port`, `scheme://...`), lower case."""
    from urllib.parse import urlsplit

    try:
        name = urlsplit(value if "://" in value else "//" + value).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def host_ok(name: str | None, allowed: set[str] | None, wildcard: bool) -> bool:
    """An allowed name; on a wildcard bind (0.0.0.0, ::) also any IP address (a rebound DNS name never is one)."""
    import ipaddress

    if allowed is None:
        return True
    if name is None:
        return False
    if name in allowed:
        return True
    if wildcard:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True
    return False


def guard(app: Any, cfg: ServeConfig, media: MediaRoot) -> Any:
    """ASGI wrapper for every endpoint: Host must name this server (421), a browser's Origin must be one of
    those names (403), and an error is one line on stderr, never a traceback."""
    allowed = allowed_hosts(cfg)
    wildcard = cfg.host in ("0.0.0.0", "::", "")

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = None
            if not host_ok(host_name(headers.get(b"host", "")), allowed, wildcard):
                refusal = (421, "Host header does not name this server (start it with --allow-host NAME to accept "
                                "that name)")
            elif b"origin" in headers and not host_ok(host_name(headers[b"origin"]), allowed, wildcard):
                refusal = (403, "requests from other web origins are refused (--allow-host NAME accepts one)")
            if refusal:
                body = json.dumps({"error": refusal[1]}).encode()
                await send({"type": "http.response.start", "status": refusal[0],
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        try:
            await app(scope, receive, send)
        except Exception as e:  # noqa: BLE001 - the answer (500) is sent; the log gets one line
            log(media.hide(f"error: {type(e).__name__}: {str(e)[:200]}"))

    return guarded


class RequestRefused(ValueError):
    """A request refused before it is read whole: the message, and its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def body_receive(receive: Any, limit: int, max_mb: int, timeout_s: float) -> Any:
    """`receive` that refuses a body past `limit` bytes (413) or not sent within `timeout_s` (408), counted as
    it streams in, whatever the framing (Content-Length or chunked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    size = 0

    async def limited() -> dict:
        nonlocal size
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise RequestRefused(408, f"request body not received within {timeout_s:g} s (--request-timeout)") from None
        size += len(message.get("body", b""))
        if size > limit:
            raise RequestRefused(413, f"request larger than {max_mb} MB (--max-request-mb)")
        return message

    return limited


async def read_body(request: Any, cfg: ServeConfig) -> tuple[bool, list]:
    """(one record?, the JSON objects) of a JSON or multipart request; ValueError says what is wrong."""
    from starlette.requests import Request

    limit = cfg.max_request_mb << 20
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/json", "multipart/form-data"):
        raise RequestRefused(415, f"content-type {kind[:60] or '(none)'!r}: send application/json or "
                                  "multipart/form-data")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, f"request larger than {cfg.max_request_mb} MB (--max-request-mb)")
    request = Request(request.scope, body_receive(request.receive, limit, cfg.max_request_mb, cfg.request_timeout))
    if kind == "multipart/form-data":
        form = await request.form()
        obj: dict[str, Any] = {}
        for key, value in form.multi_items():
            obj[key] = await value.read() if hasattr(value, "read") else value
        return True, [obj]
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"malformed JSON body ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(data, dict):
        return True, [data]
    if isinstance(data, list):
        return False, data
    raise ValueError(f"expected a JSON object or a list of objects, got {type(data).__name__}")


def protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers: uvicorn has none, so a socket that sends
    nothing (or a byte a minute) would hold a connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        headers_due: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.headers_due:
                self.headers_due.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self.headers_due:
                self.headers_due.cancel()
            self.headers_due = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request started in time

    return TimedH11


class QuietRepeats:
    """stderr for a long-running server: a line already written in the last `window` seconds is counted, not
    written again (its count comes with its next appearance), and at most `most` lines a window are written."""

    def __init__(self, stream: Any, window: float = 60.0, most: int = 200):
        import time

        self.stream, self.window, self.most, self.clock = stream, window, most, time.monotonic
        self.seen: dict[str, list] = {}  # line -> [time written, repeats since]
        self.start, self.written, self.dropped = self.clock(), 0, 0
        self.partial = ""

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        if len(self.partial) > 1 << 16:
            lines, self.partial = [*lines, self.partial], ""
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        now = self.clock()
        if now - self.start > self.window:
            if self.dropped:
                self.stream.write(f"({self.dropped} more log lines in the last {self.window:g} s not shown)\n")
            self.start, self.written, self.dropped = now, 0, 0
        last = self.seen.get(line)
        if last and now - last[0] < self.window:
            last[1] += 1
            return
        if self.written >= self.most:
            self.dropped += 1
            return
        if len(self.seen) > 1000:
            self.seen.clear()
        again = f" (and {last[1]} more time(s) before)" if last and last[1] else ""
        self.stream.write(line + again + "\n")
        self.stream.flush()
        self.seen[line] = [now, 0]
        self.written += 1

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Stopped(Exception):
    """A stop signal that reached the process after uvicorn's graceful shutdown (uvicorn raises it again)."""

    def __init__(self, sig: int):
        super().__init__(sig)
        self.sig = sig


def signal_name(sig: int) -> str:
    import signal

    return {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}.get(sig, f"signal {sig}")


def server_class() -> type:
    """uvicorn's Server that says on stderr when a stop signal arrives, once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                log(f"serve: {signal_name(sig)} received: finishing the open requests, then stopping")
            super().handle_exit(sig, frame)

    return Server


def run(cfg: ServeConfig) -> int:
    """Serve until a stop signal or an error, then say on stderr why it stopped. Exit status: 128 + the signal
    after a signal's graceful shutdown (130 Ctrl-C, 143 SIGTERM), as a shell reports it; 1 after an error."""
    import errno
    import signal
    import socket
    import sys
    import threading
    import time

    import uvicorn

    from mmllm.predict import Predictor

    try:  # before the model loads: a port in use is said at once
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        why = " (another server is listening there: choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"--host {cfg.host} --port {cfg.port}: cannot listen ({e.strerror}){why}") from None
    try:
        predictor = Predictor(cfg.checkpoint, cfg.device, cfg.max_file_mb)
    except BaseException:
        sock.close()
        raise
    app = build_app(predictor, cfg)
    log(f"serving {cfg.checkpoint} on http://{cfg.host}:{sock.getsockname()[1]} (Ctrl-C stops)")

    def stopped_by(sig: int, frame: Any) -> None:  # uvicorn raises the signal it shut down for: it lands here
        raise Stopped(sig)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stopped_by) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    saved, sys.stderr = sys.stderr, QuietRepeats(sys.stderr)  # before uvicorn's log handlers take sys.stderr
    started, code = time.monotonic(), 0
    try:
        server = server_class()(uvicorn.Config(
            app, log_level="warning", access_log=False, http=protocol(cfg.request_timeout),
            limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.timeout_keep_alive))
        server.run(sockets=[sock])
        reason = "the server shut down"
    except Stopped as e:
        reason, code = signal_name(e.sig), 128 + e.sig
    except KeyboardInterrupt:
        reason, code = signal_name(signal.SIGINT), 130
    except SystemExit as e:  # uvicorn's own exit (its start-up failed)
        reason, code = f"uvicorn exited with status {e.code}", e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - the reason is the last line on stderr
        reason, code = f"error: {type(e).__name__}: {str(e)[:200]}", 1
    finally:
        sys.stderr = saved
        for s, handler in previous.items():
            signal.signal(s, handler)
    n, calls = app.batcher.records, app.batcher.batches
    log(f"serve stopped: {reason}, after {time.monotonic() - started:.0f} s; {n} record{'s' * (n != 1)} predicted in "
        f"{calls} model call{'s' * (calls != 1)}")
    return code
