"""`--decoder` a vision-language model: a Hugging Face image-text-to-text backbone (SmolVLM / Idefics3, LLaVA,
Qwen2-VL, ...) fine-tuned through its own processor and chat template.

Such a backbone reads the pictures itself: its vision tower and connector encode each record's image from the
file's bytes that `prepare --keep-media` stored (the frozen encoders' features are not used). The picture stands
where the record's `<image>` placeholder stands in its turns (else before the first question), rendered with the
processor's chat template; the loss covers every assistant turn and nothing else. Trained with LoRA on the
language model's linear layers (the default, rank 8: the vision tower and the connector stay frozen, as in
LLaMA-Factory's defaults) or fully (`--train-decoder`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmllm import chat, modalities
from mmllm.console import log
from mmllm.errors import RecordError, UserError
from mmllm.tasks import Training
from mmllm.tasks.generate.core import context_length, say_left_out

KIND = "vision-language"
DEFAULT_LORA_R = 8


def pictured() -> str:
    """The medium a vision-language backbone reads: the registered modality whose features are a spatial grid."""
    return next(m for m in modalities.names() if modalities.get(m).grid)


def _part() -> str:
    from mmllm.conversations import PART_TYPES

    return PART_TYPES[pictured()]


def _parts(content: str, tag: str, picture: bool, first: bool) -> tuple[list[dict], bool]:
    """A turn's text as content parts: the picture at its placeholder `tag` (once, when `picture`), or before the
    text when `first` asks for it; other placeholders are taken out. Returns (parts, picture placed)."""
    from mmllm.conversations import without_placeholders

    pieces = content.split(tag) if picture else [content]
    parts: list[dict] = []
    placed = False
    for k, piece in enumerate(pieces):
        if k and not placed:
            parts.append({"type": _part()})
            placed = True
        text = " ".join(without_placeholders(piece.replace(tag, " ")).split())
        if text:
            parts.append({"type": "text", "text": text})
    if first and not placed:
        parts.insert(0, {"type": _part()})
        placed = True
    return parts, placed


def placed_at(messages: list[dict]) -> bool:
    """Whether the picture's placeholder stands in a question turn of the whole conversation (else the picture goes
    before the first question): decided once, so every prefix of the turns puts it where the whole does."""
    from mmllm.conversations import PLACEHOLDERS

    return any(PLACEHOLDERS[pictured()] in m["content"] for m in messages if m["role"] == "user")


def vision_messages(messages: list[dict], system: str | None, picture: bool, anywhere: bool) -> list[dict]:
    """A record's turns as the processor's chat template takes them (content as a list of parts); `anywhere`:
    placed_at of the whole conversation. Placeholders in the system text and in answers are taken out."""
    from mmllm.conversations import PLACEHOLDERS, without_placeholders

    tag = PLACEHOLDERS[pictured()]
    bare = lambda text: " ".join(without_placeholders(text.replace(tag, " ")).split())  # noqa: E731
    out = [{"role": "system", "content": [{"type": "text", "text": bare(system)}]}] if system else []
    anywhere = picture and anywhere
    placed = False
    for m in messages:
        if m["role"] == "assistant":
            out.append({"role": "assistant", "content": [{"type": "text", "text": bare(m["content"])}]})
            continue
        first = picture and not anywhere and not placed and m["role"] == "user"
        if m["role"] != "user":
            out.append({"role": m["role"], "content": [{"type": "text", "text": bare(m["content"])}]})
            continue
        parts, here = _parts(m["content"], tag, picture and not placed, first)
        placed = placed or here
        out.append({"role": m["role"], "content": parts})
    return out


def _picture(data: Any) -> Any:
    """The kept file as mmllm reads every image (EXIF orientation, 16-bit scaled, alpha on white), full size."""
    from mmllm.media import load_image

    return load_image(bytes(data))


class VisionTable:
    """Records for a vision-language backbone: each record's turns, its picture's bytes, and (with targets) the
    token spans of its assistant turns as the processor tokenizes them (found once, from the rendered prefixes)."""

    def __init__(self, columns: dict[str, Any], processor: Any, with_targets: bool, context: int | None = None):
        """`context`: the backbone's longest sequence; a record longer than that is never read in part: a training
        conversation is left out (named once), a prompt is that record's RecordError when its batch is made."""
        from mmllm.tasks.generate.core import answer_of, record_turns

        m = pictured()
        if f"{m}_bytes" not in columns:
            raise UserError(f"a vision-language decoder reads the {m}s' files, and these records do not hold them: "
                            "prepare the data again with --keep-media (or give a raw manifest)")
        self.processor = processor
        self.context = context
        self.ids = list(columns["id"])
        self.n = len(self.ids)
        none = [None] * self.n
        pick = {k: list(columns[k]) if columns.get(k) is not None else none
                for k in ("target", "text", "transcript", "conversation", f"has_{m}")}
        turns = [record_turns(t, s, g, c, chat.CHAT) for t, s, g, c in
                 zip(pick["text"], pick["transcript"], pick["target"], pick["conversation"])]
        self.targets = [answer_of(msgs) for msgs, _ in turns]
        self.turns = turns
        self._files = columns[f"{m}_bytes"]  # a list, or a prepared split's column read row by row (_Rows)
        self._has = pick[f"has_{m}"]
        self._rows = list(range(self.n))  # table index -> row of the columns (records left out are skipped)
        self.spans = None
        if with_targets:
            self.spans = [self._answer_spans(i) for i in range(self.n)]
            self._leave_out([i for i, (n, _) in enumerate(self.spans) if context and n > context])

    def _leave_out(self, out: list[int]) -> None:
        """Training conversations longer than the backbone reads are left out (as the core generator's GenTable
        does), said once with their ids: a part of one could hold none of its answer."""
        if not out:
            return
        say_left_out([self.ids[i] for i in out], self.context, "the vision-language decoder reads")
        kept = [i for i in range(self.n) if i not in set(out)]
        self.ids, self.turns, self.targets, self.spans, self._rows = (
            [xs[i] for i in kept] for xs in (self.ids, self.turns, self.targets, self.spans, self._rows))
        self.n = len(kept)

    def _fits(self, i: int, n: int, what: str) -> None:
        if self.context and n > self.context:
            said = (f"its {what} is {n} tokens{' with the picture' if self.picture(i) is not None else ''}, and "
                    f"the vision-language decoder reads at most {self.context}; shorten it")
            raise RecordError("text", said, record_id=self.ids[i])

    def __len__(self) -> int:
        return self.n

    def picture(self, i: int) -> Any:
        """Record i's kept file (bytes), or None when it has no picture."""
        row = self._rows[i]
        h = self._has[row]
        b = self._files[row] if h is None or bool(h) else None
        return b if b is not None and len(b) else None

    def _render(self, messages: list[dict], system: str | None, picture: bool, prompt: bool,
                whole: list[dict] | None = None) -> str:
        return chat.render(self.processor, vision_messages(messages, system, picture,
                                                           placed_at(whole if whole is not None else messages)), prompt)

    def _ids(self, text: str, image: Any) -> list[int]:
        """Token ids of a rendered text, `image` (decoded) given when the text holds its token."""
        tag_in = image is not None and self._has_image_token(text)
        enc = self.processor(text=[text], images=[[image]] if tag_in else None, return_tensors="pt")
        return enc["input_ids"][0].tolist()

    def _has_image_token(self, text: str) -> bool:
        token = getattr(self.processor, "image_token", None) or "<image>"
        return token in text

    def _answer_spans(self, i: int) -> tuple[int, list[tuple[int, int]]]:
        """(tokens of the whole conversation, [(start, end) of each assistant turn, its end of turn included])."""
        messages, system = self.turns[i]
        picture = self.picture(i)
        full = self._render(messages, system, picture is not None, False)
        image = _picture(picture) if picture is not None else None  # decoded once for every prefix
        ids = self._ids(full, image)

        def shared(text: str) -> int:  # tokens `text` has in common with the whole conversation, from its start (a
            # tokenizer's end marker, e.g. [SEP], or a merge across the cut is where they part)
            part = self._ids(text, image)
            n = 0
            while n < min(len(part), len(ids)) and part[n] == ids[n]:
                n += 1
            return n

        spans = []
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = self._render(messages[:k], system, picture is not None, True, messages)
            after = self._render(messages[:k + 1], system, picture is not None, False, messages)
            if not (full.startswith(before) and full.startswith(after) and after.startswith(before)):
                raise UserError(f"record {self.ids[i]}: the processor's chat template does not render the earlier "
                                "turns of a conversation as the start of it, so its answer tokens cannot be found")
            spans.append((shared(before), shared(after)))
        return len(ids), spans

    @property
    def lengths(self) -> list[int]:
        """Tokens per record (training batches group similar lengths); without targets, the prompt's characters."""
        if self.spans is None:
            return [len(json.dumps(t[0])) for t in self.turns]
        return [n for n, _ in self.spans]

    def prompt_messages(self, i: int) -> list[dict]:
        """What generation answers: the record's turns, a final assistant turn (its reference answer) left out."""
        messages = self.turns[i][0]
        return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages

    def batch(self, idx: Any, device: Any = "cpu", with_targets: bool | None = None,
              drop: frozenset = frozenset()) -> dict[str, torch.Tensor]:
        idx = list(map(int, idx))
        use_targets = self.spans is not None if with_targets is None else with_targets
        seen = [self.picture(i) if pictured() not in drop else None for i in idx]
        texts = [self._render(self.turns[i][0] if use_targets else self.prompt_messages(i), self.turns[i][1],
                              p is not None, not use_targets, self.turns[i][0]) for i, p in zip(idx, seen)]
        images = [[_picture(p)] if p is not None else [] for p in seen]
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right" if use_targets else "left"  # generation appends after every row's end
        enc = self.processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt")
        out = dict(enc)
        if not use_targets:  # room for at least one new token
            for j, i in enumerate(idx):
                self._fits(i, int(enc["attention_mask"][j].sum()) + 1, "prompt (and one answer token)")
        if use_targets:
            labels = torch.full_like(enc["input_ids"], -100)
            for j, i in enumerate(idx):
                n, spans = self.spans[i]
                if int(enc["attention_mask"][j].sum()) != n:
                    raise RuntimeError(f"record {self.ids[i]}: {int(enc['attention_mask'][j].sum())} tokens in a "
                                       f"batch, {n} alone")
                for a, b in spans:
                    labels[j, a:b] = enc["input_ids"][j, a:b]
            out["labels"] = labels
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


class VisionLanguageDecoder(nn.Module):
    """A Hugging Face image-text-to-text model and its processor, with the same contract as PrefixDecoder."""

    reads_transcripts = True  # the prompt says what was said (a record's audio is heard as prepare transcribed it)
    reads_features = False  # it encodes the kept files itself: raw records' media are decoded and kept, not encoded
    memory = None  # no --retrieve memory (mmllm's prompt hints are for the projector's decoder)

    def __init__(self, cfg: Any, decoder: nn.Module, processor: Any):
        super().__init__()
        self.cfg = cfg
        self.decoder = decoder
        self.processor = processor
        self.class_weights = None
        self.stop_ids: list[int] = chat.stop_ids(processor.tokenizer, decoder, chat.CHAT, processor)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.decoder.parameters() if p.requires_grad]

    def table(self, columns: dict[str, Any], tokenizer: Any, with_targets: bool) -> VisionTable:
        return VisionTable(columns, self.processor, with_targets, context_length(self.decoder))

    def forward(self, batch: dict) -> dict[str, Any]:
        """{"loss": the backbone's own causal-LM loss over the assistant tokens}."""
        if batch.get("labels") is None:
            return {}
        return {"loss": self.decoder(**batch).loss}

    @torch.no_grad()
    def generate(self, batch: dict, tokenizer: Any, max_new_tokens: int | None = None, num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 stop: list[str] | None = None, reasons: list | None = None) -> list[str]:
        """Every record of the batch at once (left-padded prompts, the backbone's generate with a KV cache); the new
        tokens only, each answer ended at the first stop token or stop string; `reasons` as in core's generate."""
        tok = self.processor.tokenizer
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        start = int(inputs["input_ids"].shape[1])
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        ends = self.stop_ids or [tok.eos_token_id]
        pad = tok.pad_token_id if tok.pad_token_id is not None else ends[0]
        stops = [s for s in dict.fromkeys([*self.cfg.stop, *(stop or [])]) if s]
        if stops:
            kwargs.update(stopping_criteria=[chat.stop_criteria(tok, stops, start=start)])
        room = (context_length(self.decoder) or 1 << 30) - start  # an answer ends at the context, as at the limit
        longest = max(1, min(room, max_new_tokens or self.cfg.max_new_tokens))
        ids = self.decoder.generate(**inputs, max_new_tokens=longest,
                                    num_beams=num_beams, pad_token_id=pad, eos_token_id=ends, **kwargs)
        texts = [tok.decode(row[start:], skip_special_tokens=True) for row in ids]
        if reasons is not None:
            reasons += chat.finish_reasons(ids[:, start:], texts, ends, stops)
        return [chat.cut_at_stop(text, stops).strip() for text in texts]

    def save_decoder(self, folder: Path, tokenizer: Any) -> None:
        """decoder/: the trained backbone (LoRA merged) and its processor, a folder AutoModelForImageTextToText and
        AutoProcessor load."""
        from mmllm.checkpoint import save_hf_model

        save_hf_model(self.decoder, folder)
        self.processor.save_pretrained(folder)


def language_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers of the backbone's language model (LoRA's targets: not the vision tower, not the
    connector, not the LM head)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    inside = {id(m) for m in decoder.modules()} if decoder is not None else set()
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def prepare_backbone(model: nn.Module, cfg: Any) -> nn.Module:
    """LoRA adapters on the language model's linear layers (cfg.lora_r), or the whole backbone trainable."""
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = language_linears(model)
        if not targets:
            raise UserError(f"{cfg.decoder}: no linear layer found in its language model for LoRA; use "
                            "--train-decoder")
        model.requires_grad_(False)
        with warnings.catch_warnings():  # peft asks transformers a deprecated name (is_gradient_checkpointing)
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                                                    target_modules=targets))
    return model.requires_grad_(True)


def build(fcfg: Any, data: Any, meta: dict, mods: list[str], dist: Any) -> Training:
    from mmllm.encoders import load_vision_language
    from mmllm.tasks.generate.core import GenConfig, answer_defaults, training

    m = pictured()
    if f"{m}_bytes" not in meta["features"]:
        raise UserError(f"--decoder {fcfg.decoder} is a vision-language model: it reads the {m}s' files itself, "
                        f"and {fcfg.prepared} does not hold them; prepare it again with --keep-media")
    unread = [x for x in mods if x not in (m, "text")]
    if unread:
        log(f"--decoder {fcfg.decoder} reads {m}s and text: {', '.join(unread)} not given to it as media (a "
            "vision-language backbone has no input for them); speech reaches it only as prepare's transcript in "
            "the prompt, when the data was transcribed")
    if unused := _unused_options(fcfg):
        raise UserError(f"{', '.join(unused)}: set{'s' if len(unused) == 1 else ''} mmllm's projector and frozen "
                        f"decoder, which the vision-language --decoder {fcfg.decoder} does not use (it encodes the "
                        f"{m}s itself and trains LoRA adapters, or all its weights with --train-decoder)")
    model, processor, identity = load_vision_language(fcfg.decoder)
    lora_r = fcfg.lora_r or (0 if fcfg.train_decoder else DEFAULT_LORA_R)
    default_rank = not fcfg.lora_r
    fcfg.lora_r = lora_r  # finetune_config.json says what ran (config.RESOLVED_AT_BUILD takes it back on --resume)
    cfg = GenConfig(modalities=[m], dims={}, lora_r=lora_r, train_decoder=fcfg.train_decoder, decoder=fcfg.decoder,
                    decoder_identity=identity, prompt_format=chat.CHAT, media_at="placeholder", decoder_kind=KIND)
    log(f"decoder: {fcfg.decoder} is a vision-language model ({type(model).__name__}): it encodes the {m}s itself "
        f"with its processor ({type(processor).__name__}), not with the frozen {m} features; "
        + (f"LoRA rank {lora_r} on its language model" + (" (the default)" if default_rank else "")
           if lora_r else "all its weights trained"))
    train, val = (VisionTable(_columns(data[s], m), processor, with_targets=True, context=context_length(model))
                  for s in ("train", "validation"))
    answer_defaults(cfg, _AnswerLengths(train))
    model = VisionLanguageDecoder(cfg, prepare_backbone(model, cfg), processor).to(dist.device)
    log(f"prompts: the processor's chat template; answers end at EOS"
        f"{' or ' + ', '.join(map(repr, cfg.stop)) if cfg.stop else ''}, at most {cfg.max_new_tokens} new tokens "
        "by default")

    return training(model, train, val, processor, fcfg, meta, dist)


# options of mmllm's own projector and frozen decoder, which a vision-language backbone has no use for
_PROJECTOR_OPTIONS = ("media_tokens", "image_tokens", "prefix_tokens", "hidden_size", "dropout", "decoder_precision",
                      "retrieve")


def _unused_options(fcfg: Any) -> list[str]:
    """The flags of _PROJECTOR_OPTIONS given a value other than their default (refused: they would do nothing)."""
    defaults = {f.name: f.default for f in dataclasses.fields(fcfg)}
    return [f"{modalities.flag(n)} {getattr(fcfg, n)}" for n in _PROJECTOR_OPTIONS
            if n in defaults and getattr(fcfg, n) != defaults[n]]


class _Rows:
    """One column of a prepared split, read a row at a time: the kept files stay in the Arrow file (memory-mapped)
    until a batch needs them, where reading the column whole held every file in memory at once."""

    def __init__(self, split: Any, column: str):
        self.split, self.column = split.select_columns([column]), column

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Any:
        return self.split[int(i)][self.column]


def _columns(split: Any, m: str) -> dict:
    wanted = [c for c in ("id", "text", "target", "transcript", "conversation", f"has_{m}")
              if c in split.column_names]
    out = split.select_columns(wanted)[:]
    if f"{m}_bytes" in split.column_names:
        out[f"{m}_bytes"] = _Rows(split, f"{m}_bytes")
    return out


class _AnswerLengths:
    """What answer_defaults reads of a table: its targets and its longest assistant turn in tokens."""

    def __init__(self, table: VisionTable):
        self.targets = table.targets
        self._longest = max((b - a for _, spans in table.spans or [] for a, b in spans), default=0)

    def longest_answer(self) -> int:
        return self._longest


def load(folder: Path, cfg: Any, device: Any) -> tuple[VisionLanguageDecoder, Any]:
    """(model in eval mode, processor) of a vision-language checkpoint: decoder/ holds the trained backbone."""
    from mmllm.encoders import load_vision_language

    model, processor, _ = load_vision_language(str(folder / "decoder"))
    net = VisionLanguageDecoder(cfg, model.requires_grad_(False), processor)
    return net.to(device).eval(), processor
