"""The ecosystem's conversation data, read as it is, into mmllm's flat records.

Formats (detected per record by `detect`):
- llava: `conversations: [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]` and `image`;
- sharegpt (LLaMA-Factory): `messages` or `conversations` with role/content (or from/value) turns, `images`,
  `audios`, `videos` lists (one placeholder `<image>` / `<audio>` / `<video>` per item) and `system`;
- alpaca: `instruction`, `input`, `output` (+ `system`, `history: [[question, answer], ...]`, media lists);
- openai: `messages` whose content is a list of parts: `text`, `image_url` (`{"url": path or data: URI}`),
  `input_audio` (`{"data": base64, "format": "wav"}`).

`flatten` turns a record into mmllm's keys: `text` (its first user turn, placeholders removed), `image`,
`audio`, `video` (a path or the decoded bytes), `target` (its last assistant turn), the record's other keys as they are
(a `label`, the user's own columns; one that the turns give too is the record's error), and `conversation`: the
turns as JSON (`{"system": ..., "messages": [{"role", "content"}]}`), which generation renders with the decoder's
chat template, the loss over every assistant turn. The placeholders stay in the questions of `conversation` (an
OpenAI image_url / input_audio part becomes one where it stands): generation puts each medium's tokens there.
Each record's problem (a placeholder count that does not match its media, an empty assistant turn, a URL to
fetch, a second image) is a ValueError with one line; `column` names the key.

The generator (tasks/generate/) carries one image, one audio and one video per record, so a record with
more is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system", "observation": "user", "function": "user", "tool": "user"}
PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
LISTS = {"image": "images", "audio": "audios", "video": "videos"}
PART_TYPES = {"image": "image", "audio": "audio", "video": "video"}  # a medium's content part in a Hugging Face
# processor's chat template: {"type": "image"}
# the keys each format reads (besides id, split and system); a record's other keys are carried to the flat record
READS = {"llava": ("conversations", "image"), "sharegpt": ("messages", "conversations", *LISTS.values()),
         "alpaca": ("instruction", "input", "output", "history", *LISTS.values()), "openai": ("messages",)}
DERIVED = ("text", *PLACEHOLDERS, "target", "conversation")  # the flat keys the turns give
NAMES = {"llava": "LLaVA JSON", "sharegpt": "ShareGPT / LLaMA-Factory messages", "alpaca": "alpaca",
         "openai": "OpenAI chat messages"}


class FormatError(ValueError):
    """One record's problem: the key (column) and why."""

    def __init__(self, column: str | None, reason: str):
        super().__init__(reason)
        self.column, self.reason = column, reason


def detect(raw: Any) -> str | None:
    """The conversation format of one raw record, or None for a flat record."""
    if not isinstance(raw, dict):
        return None
    turns = raw.get("messages", raw.get("conversations"))
    if isinstance(turns, list):
        if any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
            return "openai"
        if "image" in raw and "conversations" in raw and not any(k in raw for k in LISTS.values()):
            return "llava"
        return "sharegpt"
    if "instruction" in raw and "output" in raw:
        return "alpaca"
    return None


def flatten(raw: dict, fmt: str) -> dict:
    """mmllm's flat record of a conversation record (see the module doc); FormatError for its problem."""
    media: dict[str, list] = {m: [] for m in PLACEHOLDERS}
    if fmt == "alpaca":
        messages, system = _alpaca(raw)
    else:
        key = "messages" if "messages" in raw else "conversations"
        messages, system = _turns(raw[key], key, media if fmt == "openai" else None)
    system = raw.get("system", system)
    if system is not None and not isinstance(system, str):
        raise FormatError("system", f"expected text, got {type(system).__name__}")
    if fmt == "llava":
        if raw.get("image") not in (None, ""):
            media["image"].append(raw["image"])
    elif fmt != "openai":
        for m, name in LISTS.items():
            items = raw.get(name)
            if items is None:
                continue
            if not isinstance(items, list):
                items = [items]
            media[m] += items
    if fmt != "openai":
        for m, tag in PLACEHOLDERS.items():
            count = sum(t["content"].count(tag) for t in messages)
            if count != len(media[m]):
                where = "image" if fmt == "llava" else LISTS[m]
                raise FormatError(where, f"{count} {tag} placeholder(s) in the turns but {len(media[m])} "
                                         f"{m} item(s) in '{where}': give one placeholder per item")
    for m in PLACEHOLDERS:
        if len(media[m]) > 1:
            raise FormatError(LISTS[m], f"{len(media[m])} {m}s: a record carries at most one {m} (the modality "
                                        "prefix holds one)")
    for t in messages:  # placeholders stay where they stand in the questions (the media go there), not in answers
        for tag in PLACEHOLDERS.values():
            t["content"] = t["content"].replace(tag, " " if t["role"] == "assistant" else f" {tag} ")
        t["content"] = " ".join(t["content"].split()) if t["role"] != "assistant" else t["content"].strip()
    for n, t in enumerate(messages, start=1):
        if t["role"] == "assistant" and not t["content"]:
            raise FormatError(None, f"turn {n}: empty assistant turn")
    if not messages:
        raise FormatError(None, "no turns")
    flat = _carried(raw, fmt)
    question = next((t["content"] for t in messages if t["role"] == "user"), None)
    flat["text"] = without_placeholders(question) if question is not None else None
    flat.update({m: items[0] if items else None for m, items in media.items() if items or m != "video"})
    flat["target"] = next((t["content"] for t in reversed(messages) if t["role"] == "assistant"), None)
    flat["conversation"] = json.dumps({"system": system, "messages": messages}, ensure_ascii=False)
    return flat


def _carried(raw: dict, fmt: str) -> dict:
    """The record's keys that its format does not read (id, split, a label, the user's own columns), as they are; a
    key that the turns give too (`text`, `image`, `target`, ...) is the record's FormatError, not dropped."""
    if "messages" in raw and "conversations" in raw:
        raise FormatError("conversations", "both 'messages' and 'conversations' hold turns: give one of them")
    out = {}
    for k, v in raw.items():
        if k in READS[fmt] or k == "system":
            continue
        if k in DERIVED and v not in (None, ""):
            if k in PLACEHOLDERS:
                where = ("an image_url or input_audio part of a user turn" if fmt == "openai" else
                         f"'{LISTS[k]}', with a {PLACEHOLDERS[k]} placeholder in its turn")
                raise FormatError(k, f"'{k}' beside the {NAMES[fmt]} turns, where it is not read: give it in {where}")
            raise FormatError(k, f"'{k}' beside the {NAMES[fmt]} turns, which give the record's {k}: keep one of "
                                 "them")
        if k not in DERIVED:
            out[k] = v
    return out


def without_placeholders(text: str) -> str:
    """`text` with its media placeholders taken out (whitespace collapsed): what a text model reads."""
    for tag in PLACEHOLDERS.values():
        text = text.replace(tag, " ")
    return " ".join(text.split())


def _turns(turns: list, key: str, media: dict | None) -> tuple[list[dict], str | None]:
    """role/content turns (system turns taken out); with `media`, OpenAI content parts are read into it."""
    out, system = [], None
    for n, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            raise FormatError(key, f"turn {n}: expected an object, got {type(t).__name__}")
        who = t.get("role", t.get("from"))
        role = ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise FormatError(key, f"turn {n}: role {str(who)[:40]!r} is not user, assistant or system")
        content = t.get("content", t.get("value"))
        if isinstance(content, list):
            if media is None:
                raise FormatError(key, f"turn {n}: content parts are OpenAI's form: give every turn as text")
            if role == "assistant" and any(isinstance(p, dict) and p.get("type") in ("image_url", "input_audio")
                                           for p in content):
                raise FormatError(key, f"turn {n}: an assistant turn is text only (image_url and input_audio parts "
                                       "belong in a user turn)")
            content = _parts(content, n, media)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise FormatError(key, f"turn {n}: content must be text, got {type(content).__name__}")
        if role == "system":
            system = content
        else:
            out.append({"role": role, "content": content})
    return out, system


def _parts(parts: list, n: int, media: dict) -> str:
    """The text of an OpenAI content list; its image_url / input_audio parts appended to `media`."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text") or ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            media["image"].append(_image_url(url, n))
            texts.append(PLACEHOLDERS["image"])  # where the part stands
        elif kind == "input_audio":
            media["audio"].append(_input_audio(part.get("input_audio"), n))
            texts.append(PLACEHOLDERS["audio"])
        else:
            raise FormatError("messages", f"turn {n}: content part of type {str(kind)[:40]!r}: expected text, "
                                          "image_url or input_audio")
    return " ".join(t for t in texts if t)


def _image_url(url: Any, n: int) -> Any:
    if not isinstance(url, str) or not url:
        raise FormatError("messages", f"turn {n}: image_url needs a url (a path or a data: URI)")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise FormatError("messages", f"turn {n}: image_url data: URI must be base64")
        return _b64(data, n, "image_url")
    if url.split(":", 1)[0].lower() in ("http", "https", "ftp"):
        raise FormatError("messages", f"turn {n}: image_url {url.split(':', 1)[0]} URLs are not fetched: send a path "
                                      "or a data: URI")
    return url.removeprefix("file://")


def _input_audio(value: Any, n: int) -> bytes:
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise FormatError("messages", f"turn {n}: input_audio needs base64 'data' and a 'format'")
    return _b64(value["data"], n, "input_audio")


def _b64(data: str, n: int, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("messages", f"turn {n}: {what} is not valid base64") from None


def _alpaca(raw: dict) -> tuple[list[dict], str | None]:
    messages = []
    history = raw.get("history") or []
    if not isinstance(history, list):
        raise FormatError("history", "expected a list of [question, answer] pairs")
    for n, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise FormatError("history", f"entry {n}: expected [question, answer] texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    for k in ("instruction", "input", "output"):
        if raw.get(k) is not None and not isinstance(raw[k], str):
            raise FormatError(k, f"expected text, got {type(raw[k]).__name__}")
    question = "\n".join(x for x in (raw.get("instruction"), raw.get("input")) if x)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": raw.get("output") or ""}]
    return messages, None


def summary(counts: dict[str, int], turns: int, records: int) -> str:
    """The one line `prepare` says about the conversations it read."""
    kinds = ", ".join(f"{NAMES[k]} ({n})" for k, n in counts.items())
    return (f"conversations: {records} record(s) read as {kinds}; {turns} assistant turn(s), each in the loss, "
            "rendered with the decoder's chat template")
