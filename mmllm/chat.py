"""Conversations as the decoder reads them: the decoder tokenizer's own chat template, or a plain fallback.

`encode` turns a conversation (role/content turns, optionally a system text) into token ids and a mask of the
tokens the loss covers: every assistant turn, its end-of-turn token included, and nothing else. `prompt_ids` is
the same rendering up to the generation prompt of the next assistant turn. `stop_ids` are the token ids that end
an answer (the tokenizer's EOS, the generation config's EOS ids, the template's end-of-turn token), and
`cut_at_stop` cuts a decoded answer at the first `--stop` string.

The template is applied to whole conversation prefixes (`apply_chat_template`), and each assistant turn is the
text one rendering adds over the previous one, so any template that renders turns in order works; a decoder
whose tokenizer has no template gets `User: ...\\nAssistant: ...` turns, said once on stderr.
"""

from __future__ import annotations

from typing import Any

from mmllm.console import warn
from mmllm.errors import UserError

CHAT = "chat"  # the tokenizer's chat template
PLAIN = "plain"  # `User: ...\nAssistant: ...` turns, for a decoder without a template
DESCRIBE = "describe"  # checkpoints from before conversations: "Describe the input. ...\nDescription:" + target
PLAIN_STOPS = ["\nUser:"]
_warned: set[str] = set()


def template_kind(tokenizer: Any, name: str = "") -> str:
    """CHAT when the tokenizer has a chat template, else PLAIN (said once per decoder on stderr)."""
    if getattr(tokenizer, "chat_template", None):
        return CHAT
    if name not in _warned:
        _warned.add(name)
        warn(f"decoder {name or '(given)'} has no chat template: conversations are rendered as plain "
             "'User: ... / Assistant: ...' turns")
    return PLAIN


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    """The conversation as the template writes it; a template that fails (its syntax, or a rule it raises on, such
    as roles that must alternate) is a UserError that says so, not a bare jinja error."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:
        where = getattr(getattr(tokenizer, "tokenizer", tokenizer), "name_or_path", "") or "the decoder"
        raise UserError(f"the chat template of {where} cannot render this conversation ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The turns with a system turn first; "" is an empty one (it replaces a template's default system prompt),
    None none (the template's default, if it has one)."""
    return ([{"role": "system", "content": system}] if system is not None else []) + list(messages)


def lean_system(tokenizer: Any, kind: str) -> tuple[str | None, int]:
    """("", tokens saved per record) when the chat template renders an empty system turn in fewer tokens than its
    default system prompt (SmolLM2's "You are a helpful AI assistant named SmolLM, ..." is 16 more tokens that
    every training step and every answer would run over); else (None, 0): the template as it is."""
    if kind != CHAT:
        return None, 0
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        plain = len(_ids(tokenizer, render(tokenizer, turns, False)))
        lean = len(_ids(tokenizer, render(tokenizer, _with_system(turns, ""), False)))
    except Exception:  # noqa: BLE001 - a template that refuses a system turn keeps its own form
        return None, 0
    return ("", plain - lean) if lean < plain else (None, 0)


def _ids(tokenizer: Any, text: str, slots: dict[str, int] | None = None) -> list[int]:
    """Token ids of `text`; each `slots` placeholder in it (e.g. "<image>") becomes its one (negative) id: the
    position the generator puts that medium's tokens in."""
    if not text:
        return []
    if not slots:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    import re

    out: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, slots)) + ")", text):
        if piece in slots:
            out.append(slots[piece])
        elif piece:
            out += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return out


def _special_strings(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    names |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
              if getattr(t, "special", False)}
    return sorted((n for n in names if n), key=len, reverse=True)


def _turn_end(answer: str, content: str, specials: list[str]) -> int:
    """Where the loss part of a rendered assistant turn ends: after the first special token that follows its
    content (the template's end of turn), or at its end when none does."""
    start = answer.find(content) + len(content) if content and content in answer else 0
    best = None
    for s in specials:
        i = answer.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best[1] if best else len(answer)


def encode(tokenizer: Any, messages: list[dict], system: str | None, kind: str, max_tokens: int = 1024,
           slots: dict[str, int] | None = None) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask) of a whole conversation; the mask is True on every assistant turn's tokens. The
    `slots` placeholders of the other turns are one negative id each (see `_ids`)."""
    ids: list[int] = []
    mask: list[bool] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def add(part: list[int], target: bool) -> None:
        ids.extend(part)
        mask.extend([target] * len(part))

    if kind == DESCRIBE:  # one turn: the record's prompt, then " target" + EOS
        user = next((m["content"] for m in messages if m["role"] == "user"), "")
        answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        add(_ids(tokenizer, user, slots)[:256], False)
        add(_ids(tokenizer, " " + answer)[:256] + eos, True)
        return ids, mask
    if kind == PLAIN:
        if system:
            add(_ids(tokenizer, f"System: {system}\n\n", slots), False)
        for n, m in enumerate(messages):
            sep = "\n" if n else ""
            if m["role"] == "assistant":
                add(_ids(tokenizer, f"{sep}Assistant:"), False)
                add(_ids(tokenizer, " " + m["content"]) + eos, True)
            else:
                add(_ids(tokenizer, f"{sep}User: {m['content']}", slots), False)
        return ids[:max_tokens], mask[:max_tokens]
    full = _with_system(messages, system)
    specials = _special_strings(tokenizer)
    done = ""
    for k, m in enumerate(full):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, full[:k], True)
        after = render(tokenizer, full[:k + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError("the decoder's chat template does not render turns in order: cannot mark assistant "
                             "turns")
        add(_ids(tokenizer, before[len(done):], slots), False)
        answer = after[len(before):]
        end = _turn_end(answer, m["content"], specials)
        add(_ids(tokenizer, answer[:end]) + ([] if end < len(answer) or any(answer.endswith(s) for s in specials)
                                            else eos), True)
        add(_ids(tokenizer, answer[end:]), False)
        done = after
    return ids[:max_tokens], mask[:max_tokens]


def prompt_ids(tokenizer: Any, messages: list[dict], system: str | None, kind: str, max_tokens: int = 1024,
               slots: dict[str, int] | None = None) -> list[int]:
    """Token ids of a conversation up to the start of the next assistant answer (its last assistant turn, if it
    ends with one, left out); `slots` as in `encode`."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if kind == DESCRIBE:
        user = next((m["content"] for m in messages if m["role"] == "user"), "")
        return _ids(tokenizer, user, slots)[:256]
    if kind == PLAIN:
        ids, _ = encode(tokenizer, messages, system, PLAIN, 1 << 30, slots)
        ids += _ids(tokenizer, "\nAssistant:" if messages else "Assistant:")
    else:
        ids = _ids(tokenizer, render(tokenizer, _with_system(messages, system), True), slots)
    return ids[-max_tokens:]  # the end of a long conversation is what the answer follows


def stop_ids(tokenizer: Any, decoder: Any, kind: str, processor: Any = None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the decoder's generation-config EOS ids, and the chat
    template's end-of-turn token (the first token after an assistant turn's content, when it is special). With a
    `processor` (a vision-language model's), its template renders the turns, their contents as lists of parts."""
    out: list[int] = []

    def add(v: Any) -> None:
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(i, int) and i not in out:
                out.append(i)

    add(tokenizer.eos_token_id)
    gen = getattr(decoder, "generation_config", None)
    add(getattr(gen, "eos_token_id", None))
    if kind == CHAT:
        try:
            turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            if processor is not None:
                turns = [{**t, "content": [{"type": "text", "text": t["content"]}]} for t in turns]
            text = render(processor or tokenizer, turns, False)
        except Exception:  # noqa: BLE001 - a template that cannot render this is caught when it is used
            return out
        tail = text[text.rfind("y") + 1:]
        first = _ids(tokenizer, tail)[:1]
        if first and first[0] in set(getattr(tokenizer, "all_special_ids", []) or []):
            add(first[0])
    return out


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (the stop string itself left out)."""
    cut = len(text)
    for s in stops:
        i = text.find(s) if s else -1
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def finish_reasons(rows: Any, texts: list[str], ends: list[int], stops: list[str]) -> list[str]:
    """Why each generated row (its new token ids, and their decoded text) ended, as OpenAI names it: "stop" at an
    end token or a stop string, "length" where the token limit (or the decoder's context) cut it."""
    return ["stop" if any(int(t) in ends for t in row) or any(s in text for s in stops) else "length"
            for row, text in zip(rows, texts)]


def stop_criteria(tokenizer: Any, stops: list[str], start: int = 0) -> Any:
    """A transformers StoppingCriteria that ends each row once its new text holds a stop string (the tail of each
    row is decoded every step: any tokenizer works, unlike transformers' `stop_strings` that some vocabularies
    break). `start`: the prompt's length when the rows hold their prompts (only the new tokens are read)."""
    import torch
    from transformers import StoppingCriteria

    window = 8 + max(len(s) for s in stops)  # tokens: a stop string is never longer than its characters

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tails = tokenizer.batch_decode(input_ids[:, max(start, input_ids.shape[1] - window):],
                                           skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in tails], device=input_ids.device)

    return StopOnText()
