"""What both of `mmllm serve`'s route sets share (serve.py's /predict and chat_routes.py's OpenAI routes): reading a
hostile request body within its limits (`read_body`, `RequestRefused`), media paths only under --media-root
(`MediaRoot`) and base64 media (`decode_media`), records through `predict`'s reader (`to_records`), micro-batching
(`Batcher`) and dropping a request whose client went away (`until_answered`)."""

import asyncio
import base64
import binascii
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmllm import modalities
from mmllm.config import ServeConfig


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
        self.records = 0  # records answered
        self.failed = 0  # records whose answer is an error (nothing readable, too long, ...)

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
            bad = sum(1 for res in out if isinstance(res, dict) and "error" in res)
            self.records += len(chunk) - bad
            self.failed += bad
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
    for m in modalities.inputs():
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
