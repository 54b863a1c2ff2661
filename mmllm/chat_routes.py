"""`mmllm serve`'s OpenAI-compatible routes for generation checkpoints: POST /v1/chat/completions, GET /v1/models.

A chat request is one conversation record: its `messages` (text, `image_url` with a data: URI, or a path read only
under --media-root, and `input_audio` parts) go through the same reader as a conversation record in `predict`
(records.flat_record -> conversations.flatten), and the answer through the same predictor. Requests with the
same sampling settings are micro-batched together (their own serve_io.Batcher: --max-batch, --batch-wait-ms), behind
the same guard and body limits as /predict. `max_tokens` (or `max_completion_tokens`), `temperature` (0 or left
out: greedy, as `mmllm predict`; above 0: sampling with `top_p`), `stop` (a string or up to 4) and `n` (1 only)
are read; `stream: true` sends the answer as server-sent events (`chat.completion.chunk`s, then `[DONE]`) once
it is generated — the batch is generated together, not token by token.
"""

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

MAX_TOKENS = 4096  # most new tokens one request may ask for
MAX_MESSAGES = 512  # turns in one request


def parse(body: Any, default_max: int) -> tuple[list[dict], dict, bool]:
    """(messages, generation settings, stream?) of a chat request body; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object with 'messages'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"{len(messages)} messages; at most {MAX_MESSAGES}")
    if body.get("n", 1) != 1:
        raise ValueError("'n': only 1 is supported")
    most = body.get("max_completion_tokens", body.get("max_tokens"))
    if most is not None and (not isinstance(most, int) or isinstance(most, bool) or not 1 <= most <= MAX_TOKENS):
        raise ValueError(f"'max_tokens' must be an integer in [1, {MAX_TOKENS}]")
    temperature = body.get("temperature")
    top_p = body.get("top_p", 1.0)
    for name, v, lo, hi in (("temperature", temperature, 0.0, 2.0), ("top_p", top_p, 0.0, 1.0)):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
            raise ValueError(f"'{name}' must be a number in [{lo:g}, {hi:g}]")
    if top_p is not None and top_p <= 0:
        raise ValueError("'top_p' must be > 0")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("'stop' must be a string or a list of at most 4 non-empty strings")
    sample = bool(temperature)
    generation = {"max_new_tokens": most or default_max, "num_beams": 1, "do_sample": sample,
                  "temperature": float(temperature) if sample else 1.0,
                  "top_p": float(top_p if top_p is not None else 1.0) if sample else 1.0, "stop": stop}
    return messages, generation, bool(body.get("stream"))


def completion(text: str, model: str, finish: str, cid: str, created: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}]}


def chunks(text: str, model: str, finish: str, cid: str, created: int) -> list[str]:
    """The server-sent events of one answer: its role, its words, its finish reason, then [DONE]."""
    def event(delta: dict, reason: str | None = None) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    pieces = [p for p in text.split(" ")]
    words = [p if i == 0 else " " + p for i, p in enumerate(pieces)] if text else []
    return [event({"role": "assistant", "content": ""}), *(event({"content": w}) for w in words),
            event({}, finish), "data: [DONE]\n\n"]


def add(app: Any, predictor: Any, cfg: Any, media: Any) -> Any:
    """Mount the routes on `app` (build_app's FastAPI application) with their own batcher, which is returned (its
    counts are part of /health and of serve's last line)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect

    from mmllm.console import log
    from mmllm.predict import error_line, predict_each
    from mmllm.serve_io import Batcher, RequestRefused, read_body, to_records, until_answered

    model_id = Path(cfg.checkpoint).resolve().name or "mmllm"
    default_max = predictor.model.cfg.max_new_tokens
    created_at = int(time.time())

    def predict(records: list[dict], key: tuple) -> list[dict]:
        generation = dict(key)
        generation["stop"] = [*cfg.stop, *generation["stop"]]
        return predict_each(predictor, records, 1, generation)

    batcher = Batcher(predict, cfg.max_batch, cfg.batch_wait_ms / 1000)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any):
        task = asyncio.create_task(batcher.run())
        async with inner(app_) as state:
            yield state
        task.cancel()

    app.router.lifespan_context = lifespan

    def refuse(message: str, status: int = 400, **headers: str) -> Any:
        return JSONResponse({"error": {"message": media.hide(message), "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=status, headers=headers or None)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created_at,
                                            "owned_by": "mmllm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            single, objs = await read_body(request, cfg)
            if not single:
                raise ValueError("expected a JSON object with 'messages'")
            messages, generation, stream = parse(objs[0], default_max)
        except ClientDisconnect:
            log("client disconnected before sending its whole request: dropped")
            return Response(status_code=400)
        except RequestRefused as e:
            return refuse(str(e), e.status, connection="close")
        except ValueError as e:
            return refuse(str(e))
        item = to_records([{"id": "chat", "messages": messages}], predictor.config, media)[0]
        if isinstance(item, tuple):
            return refuse(error_line(item[0], item[1]))
        key = tuple(sorted({**generation, "stop": tuple(generation["stop"])}.items()))
        answer = await until_answered(batcher.submit([item], key), request.receive)
        if answer is None:
            log("client disconnected before its answer: its request was not predicted")
            return Response(status_code=400)
        result = answer[0][0]
        if "error" in result:
            return refuse(result["error"])
        text, finish = result["generated"], result["finish_reason"]  # "length": the limit or the context cut it
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {"X-MMLLM-Batch-Records": str(answer[1])}
        if stream:
            events = chunks(text, model_id, finish, cid, created)

            async def body() -> Any:
                for e in events:
                    yield e

            return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
        return JSONResponse(completion(text, model_id, finish, cid, created), headers=headers)

    return batcher
