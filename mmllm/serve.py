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
import contextlib
import json
from typing import Any

from mmllm.config import ServeConfig
from mmllm.console import log
from mmllm.errors import UserError
from mmllm.serve_io import Batcher, MediaRoot, RequestRefused, read_body, to_records, until_answered











def served(batchers: dict) -> dict:
    """Records answered, records answered with an error (`failed`) and model calls, in all and by route when there is
    more than one."""
    out = {"batches": sum(b.batches for b in batchers.values()), "records": sum(b.records for b in batchers.values()),
           "failed": sum(b.failed for b in batchers.values())}
    if len(batchers) > 1:
        out["routes"] = {name: {"batches": b.batches, "records": b.records, "failed": b.failed}
                         for name, b in batchers.items()}
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
    batchers = {"predict": batcher}  # each route's own batcher (chat completions add theirs)
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
        return {"status": "ok", **served(batchers)}

    @app.get("/info")
    async def info() -> dict:
        c = predictor.config
        transcriber = predictor.encoders.get("transcript")  # the audio is transcribed as prepare did
        return {"task": predictor.task.name, "labels": c.get("labels", []),
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
            raw_k = request.query_params.get("top_k", str(cfg.top_k)).strip()
            if not (raw_k.isascii() and raw_k.isdigit() and 1 <= int(raw_k) <= 1000):
                raise ValueError("top_k: a whole number between 1 and 1000")
            top_k = int(raw_k)
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

        batchers["chat_completions"] = chat_routes.add(app, predictor, cfg, media)
    guarded = guard(app, cfg, media)
    guarded.batchers = batchers  # type: ignore[attr-defined]  # their counts: /health, and serve's last line
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
    counts = served(app.batchers)
    n, calls, failed = counts["records"], counts["batches"], counts["failed"]
    log(f"serve stopped: {reason}, after {time.monotonic() - started:.0f} s; {n} record{'s' * (n != 1)} predicted in "
        f"{calls} model call{'s' * (calls != 1)}" + (f", {failed} answered with an error" if failed else ""))
    return code
