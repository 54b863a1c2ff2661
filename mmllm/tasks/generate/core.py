"""`--task generate`: text generation by a pretrained decoder conditioned on image, audio (and text).

LLaVA-style conditioning: each modality's precomputed embedding is projected into `--prefix-tokens` vectors
in the decoder's embedding space (or each stored sequence vector into one, `--media-tokens sequence`); they
stand where the medium's placeholder (`<image>`, `<audio>`, `<video>`) stands in a conversation's turns, else
before the prompt (the record's text rendered with the decoder's chat template), which the target follows. The
loss covers only the target tokens. Trainable: the projector
(default), plus LoRA adapters (`--lora-r`) or the whole decoder (`--train-decoder`).

Speed (a frozen decoder is most of the compute): its weights are bf16 where the hardware runs bf16 natively
(`--decoder-precision auto`; the projector and the loss stay fp32), and the LM head runs only over the
positions that predict a target token, not the prefix and prompt.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmllm import chat
from mmllm.chat import DESCRIBE
from mmllm.console import log, warn
from mmllm.pooling import pool_tokens
from mmllm.errors import RecordError, UserError
from mmllm.runtime import Dist, gather, shard
from mmllm.tasks import Training, get, missing_column

PROMPT = "Describe the input.{context}\nDescription:"


@dataclass
class GenConfig:
    modalities: list[str]  # prefix modalities: image / audio / text (text only via a sentence embedding)
    dims: dict  # modality -> embedding dim
    prefix_tokens: int = 4
    hidden_size: int = 256
    dropout: float = 0.1
    lora_r: int = 0
    train_decoder: bool = False
    decoder: str = ""  # name as given (alias, folder or hub id)
    decoder_identity: str = ""
    precision: str = "fp32"  # the frozen decoder's weights as trained: fp32 or bf16 (--decoder-precision, resolved)
    prompt_format: str = DESCRIBE  # chat (the tokenizer's template), plain, or describe (checkpoints before chat)
    max_new_tokens: int = 32  # default longest answer: from the training answers' lengths (older checkpoints: 32)
    stop: list = field(default_factory=list)  # strings that end an answer by default (learned from the targets)
    media_tokens: str = "pooled"  # pooled: P tokens from each pooled vector; sequence: one token per stored vector
    seq_lens: dict = field(default_factory=dict)  # modality -> stored sequence length (media_tokens sequence)
    pool: dict = field(default_factory=dict)  # modality -> decoder tokens its stored sequence is pooled to
    # placeholder: a medium's tokens stand where its placeholder (<image>, ...) stands in the conversation, else
    # before the prompt; prefix: always before the prompt, placeholders dropped (checkpoints before placeholders)
    media_at: str = "prefix"
    # causal-lm: mmllm's projector feeds stored features to a causal LM (PrefixDecoder); vision-language: a Hugging
    # Face image-text-to-text backbone reads the pictures itself with its processor (vlm.VisionLanguageDecoder)
    decoder_kind: str = "causal-lm"
    # sequenced modalities whose stored sequences vary in length (zero rows after the end: prepare
    # --audio-tokens-per-second): each record feeds only its leading non-zero vectors
    ragged: list = field(default_factory=list)
    # the system text of a record that has none: "" an empty system turn (chat.lean_system: shorter than the
    # template's default system prompt), None the template's default (and checkpoints before this)
    system: str | None = None
    retrieve: int = 0  # --retrieve K: the answers of the K most similar training records in each prompt (retrieval)

    def sequenced(self) -> list[str]:
        """The modalities fed as their stored sequences (one decoder token per vector)."""
        return [m for m in self.modalities if m in self.seq_lens] if self.media_tokens == "sequence" else []

    def tokens(self, m: str) -> int:
        """Decoder tokens of a sequenced modality: its stored length, or what it is pooled to."""
        return int(self.pool.get(m) or self.seq_lens[m])

    def slots(self) -> dict[str, int]:
        """Placeholder -> the negative token id that marks it: -(1 + the modality's index in `modalities`)."""
        from mmllm.conversations import PLACEHOLDERS

        if self.media_at != "placeholder":
            return {}
        return {PLACEHOLDERS[m]: -1 - i for i, m in enumerate(self.modalities) if m in PLACEHOLDERS}


def prompt_text(text: str | None, transcript: str | None = None) -> str:
    """The decoder's prompt (DESCRIBE checkpoints): the record's text and what was said in its audio (prepare's
    transcript), when any."""
    return PROMPT.format(context=_context(text, transcript))


def _context(text: str | None, transcript: str | None) -> str:
    return (f" Context: {text}" if text else "") + (f" Speech: {transcript}" if transcript else "")


def record_turns(text: str | None, transcript: str | None, target: str | None, conversation: str | None,
                 kind: str, placeholders: bool = True, system: str | None = None, hint: str | None = None
                 ) -> tuple[list[dict], str | None]:
    """(messages, system) of a record: its `conversation` (JSON written by mmllm.conversations), else one user turn
    (the record's text and transcript) answered by its target. The transcript (and `hint`: retrieved answers,
    --retrieve) join the first user turn; without `placeholders` the media placeholders are taken out of the turns;
    `system`: the system text of a record that has none."""
    if conversation:
        from mmllm.conversations import without_placeholders

        talk = json.loads(conversation)
        messages = [dict(m) for m in talk["messages"]]
        if not placeholders:
            messages = [{**m, "content": without_placeholders(m["content"])} for m in messages]
        first = next((m for m in messages if m["role"] == "user"), None)
        if transcript and first is not None:
            first["content"] = (first["content"] + f" Speech: {transcript}").strip()
        if hint and first is not None:
            first["content"] = (first["content"] + hint).strip()
        return messages, talk.get("system") or system
    user = prompt_text(text, transcript) if kind == DESCRIBE else "Describe the input." + _context(text, transcript)
    user += hint or ""
    messages = [{"role": "user", "content": user}]
    if target is not None:
        messages.append({"role": "assistant", "content": target})
    return messages, system


def answer_of(messages: list[dict]) -> str:
    """The reference answer of a record: its last assistant turn ('' when it has none)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")


class PrefixDecoder(nn.Module):
    """Projector (per modality: LayerNorm -> Linear -> GELU -> Linear to P x d) + causal LM decoder."""

    reads_transcripts = True  # the prompt says what was said (prompt_text): raw records are transcribed as prepare did
    reads_features = True  # the media reach it as the frozen encoders' features

    def __init__(self, cfg: GenConfig, decoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.decoder = decoder
        d = decoder.get_input_embeddings().embedding_dim
        p = cfg.prefix_tokens
        seq = cfg.sequenced()
        width = {m: d if m in seq else p * d for m in cfg.modalities}  # a sequence: applied to each vector
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(cfg.dims[m]), nn.Linear(cfg.dims[m], cfg.hidden_size),
                                                    nn.GELU(), nn.Dropout(cfg.dropout),
                                                    nn.Linear(cfg.hidden_size, width[m])) for m in cfg.modalities})
        pooled = [m for m in cfg.modalities if m not in seq]
        self.placeholder = nn.Parameter(torch.zeros(len(pooled), p, d))  # for a missing (pooled) modality
        # a sequence's tokens: a learned position each (where in the grid / in time), and a stand-in when missing
        self.positions = nn.ParameterDict({m: nn.Parameter(torch.zeros(cfg.tokens(m), d)) for m in seq})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(cfg.tokens(m), d)) for m in seq})
        self.class_weights = None
        self.stop_ids: list[int] = []  # token ids that end an answer (chat.stop_ids), set with the tokenizer
        self.memory: Any = None  # --retrieve: the training records' keys and answers (retrieval.Memory)
        base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters  # LM head on a slice

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.decoder.parameters() if p.requires_grad]

    def table(self, columns: dict[str, Any], tokenizer: Any, with_targets: bool) -> GenTable:
        """Featurized rows (or a prepared split's columns) as this model reads them."""
        return GenTable(columns, self.cfg.modalities, tokenizer, with_targets=with_targets,
                        kind=self.cfg.prompt_format, sequences=tuple(self.cfg.sequenced()), slots=self.cfg.slots(),
                        system=self.cfg.system, room=text_room(self.cfg, self.decoder), memory=self.memory,
                        retrieve=self.cfg.retrieve)

    def save_decoder(self, folder: Path, tokenizer: Any) -> None:
        """decoder/: the trained decoder (LoRA merged) or, frozen, only its config; and its tokenizer."""
        from mmllm.checkpoint import save_hf_model

        if self.cfg.lora_r or self.cfg.train_decoder:
            save_hf_model(self.decoder, folder)
        else:
            decoder = self.decoder.get_base_model() if hasattr(self.decoder, "get_base_model") else self.decoder
            decoder.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def media(self, batch: dict) -> list[torch.Tensor]:
        """Each modality's tokens, (B, P, d) from its pooled vector or (B, T, d) from its stored sequence; a
        learned stand-in where a record lacks it."""
        parts = []
        p = self.cfg.prefix_tokens
        seq = self.cfg.sequenced()
        pooled = [m for m in self.cfg.modalities if m not in seq]
        for m in self.cfg.modalities:
            here = batch[f"has_{m}"].bool().view(-1, 1, 1)
            if m in seq:
                stored = pool_tokens(batch[f"{m}_seq"], self.cfg.tokens(m), grid=m in self.cfg.pool)  # pooled: a grid
                v = self.proj[m](stored) + self.positions[m]  # (B, T, d): one token per vector
                parts.append(torch.where(here, v, self.missing[m].expand_as(v)))
                continue
            feat = batch[f"{m}_emb"]  # (B, D_m)
            v = self.proj[m](feat).view(len(feat), p, -1)  # (B, P, d)
            parts.append(torch.where(here, v, self.placeholder[pooled.index(m)].expand_as(v)))
        return parts

    def lengths(self, batch: dict) -> list[torch.Tensor | None]:
        """Per modality (in `media`'s order): each record's number of tokens when they vary (a ragged stored
        sequence: its leading non-zero vectors; one stand-in token where the record lacks it), else None."""
        out: list[torch.Tensor | None] = []
        for m in self.cfg.modalities:
            if m not in self.cfg.ragged or m not in self.cfg.sequenced():
                out.append(None)
                continue
            real = (batch[f"{m}_seq"].abs().sum(-1) > 0).sum(1).clamp(min=1)
            out.append(torch.where(batch[f"has_{m}"].bool(), real, torch.ones_like(real)))
        return out

    def prefix(self, batch: dict) -> torch.Tensor:
        """(B, M * P, d) prefix embeddings."""
        parts = self.media(batch)
        return torch.cat(parts, 1) if parts else batch["input_ids"].new_zeros((len(batch["input_ids"]), 0, 0)).float()

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(embeddings, attention mask, labels) of the decoder's input: each medium's tokens where its placeholder
        id (GenConfig.slots) stands in a record's tokens, the others before them; the labels (when the batch has
        them) -100 on every medium token."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch.get("labels")
        tokens = self.decoder.get_input_embeddings()(ids.clamp(min=0))  # (B, T, d)
        if not self.cfg.modalities:
            return tokens, mask, labels
        counts = self.lengths(batch)
        if not bool((ids < 0).any()) and all(c is None for c in counts):
            pre = self.prefix(batch).to(tokens.dtype)
            if labels is not None:
                labels = torch.cat([labels.new_full(pre.shape[:2], -100), labels], 1)
            return torch.cat([pre, tokens], 1), torch.cat([mask.new_ones(pre.shape[:2]), mask], 1), labels
        return self._in_place([m.to(tokens.dtype) for m in self.media(batch)], tokens, ids, mask, labels, counts)

    @staticmethod
    def _in_place(media: list[torch.Tensor], tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor | None, counts: list[torch.Tensor | None] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        counts = counts or [None] * len(media)
        rows, row_labels = [], []
        for b in range(len(ids)):
            cut = [x[b] if c is None else x[b, :int(c[b])] for x, c in zip(media, counts)]  # each record's tokens
            n = int(mask[b].sum())  # right-padded: the record's tokens come first
            row = ids[b, :n].tolist()
            holes = [k for k, i in enumerate(row) if i < 0]
            first: dict[int, int] = {}  # modality index -> its placeholder's position (a second one is dropped)
            for k in holes:
                if -row[k] - 1 < len(media):
                    first.setdefault(-row[k] - 1, k)
            pieces = [cut[m] for m in range(len(media)) if m not in first]  # no placeholder: before it all
            lab = [labels.new_full((len(x),), -100) for x in pieces] if labels is not None else []
            start = 0
            for k in holes + [n]:
                pieces.append(tokens[b, start:k])
                if labels is not None:
                    lab.append(labels[b, start:k])
                if k < n:
                    m = -row[k] - 1
                    if first.get(m) == k:
                        pieces.append(cut[m])
                        if labels is not None:
                            lab.append(labels.new_full((len(cut[m]),), -100))
                start = k + 1
            rows.append(torch.cat(pieces))
            if labels is not None:
                row_labels.append(torch.cat(lab))
        width = max(len(r) for r in rows)
        out = tokens.new_zeros((len(rows), width, tokens.shape[-1]))
        packed = mask.new_zeros((len(rows), width))
        new_labels = labels.new_full((len(rows), width), -100) if labels is not None else None
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
            packed[b, :len(r)] = 1
            if new_labels is not None:
                new_labels[b, :len(r)] = row_labels[b]
        return out, packed, new_labels

    def forward(self, batch: dict) -> dict[str, Any]:
        """{"loss": mean cross-entropy over the target tokens} (the decoder's own causal-LM loss, computed from
        the logits of the last `keep` positions only: the LM head is the widest matmul, the prompt needs none)."""
        if batch.get("labels") is None:
            return {}
        inputs, mask, labels = self.embed(batch)  # labels: -100 but on the target tokens
        width = labels.shape[1]
        targets = (labels != -100).any(0).nonzero()
        first = int(targets[0]) if len(targets) and self.keeps_logits else 0
        keep = min(width, width - first + 1)  # from the position that predicts the first target token
        # positions as an index tensor, not a count: a count slices a strided view, which the LM head's linear
        # turns into a bmm over a batch-expanded copy of the (V, d) weight
        extra = {"logits_to_keep": torch.arange(width - keep, width, device=inputs.device)} if self.keeps_logits else {}
        logits = self.decoder(inputs_embeds=inputs, attention_mask=mask, **extra).logits  # (B, keep, V)
        shifted = labels[:, width - keep + 1:]  # (B, keep - 1): position t predicts token t + 1
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, batch: dict, tokenizer: Any, max_new_tokens: int | None = None, num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 stop: list[str] | None = None, reasons: list | None = None) -> list[str]:
        """Every record of the batch at once: prefix + prompt embeddings left-aligned (padding first, masked), then
        the decoder's own generate with a KV cache; it returns the new tokens only, each answer ended at the first
        stop token (EOS, end of turn: chat.stop_ids) or stop string (`stop`, plus the checkpoint's `cfg.stop`).
        `reasons`, when given, receives each answer's chat.finish_reasons ("stop" or "length")."""
        inputs, mask = left_align(*self.embed({k: v for k, v in batch.items() if k != "labels"})[:2])
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        ends = self.stop_ids or [tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
        stops = [s for s in dict.fromkeys([*self.cfg.stop, *(stop or [])]) if s]
        if stops:  # the decoder stops each row at a stop string; the string itself is cut off below
            kwargs.update(stopping_criteria=[chat.stop_criteria(tokenizer, stops)])
        room = (context_length(self.decoder) or 1 << 30) - inputs.shape[1]  # answers end at the context too
        ids = self.decoder.generate(inputs_embeds=inputs, attention_mask=mask,
                                    max_new_tokens=max(1, min(room, max_new_tokens or self.cfg.max_new_tokens)),
                                    num_beams=num_beams,
                                    pad_token_id=pad, eos_token_id=ends, **kwargs)
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        if reasons is not None:
            reasons += chat.finish_reasons(ids, texts, ends, stops)
        return [chat.cut_at_stop(text, stops).strip() for text in texts]


def left_align(inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) embeddings whose mask (B, T) has holes (the prefix, then right-padded prompts) -> the same
    positions packed to the right end of (B, W, d), W the longest record: generation appends after the last
    position of every row. A record with nothing at all keeps one masked-in zero position."""
    lengths = mask.sum(1)
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    out = inputs.new_zeros((len(inputs), width, inputs.shape[-1]))
    packed = mask.new_zeros((len(inputs), width))
    for i in range(len(inputs)):
        n = int(lengths[i])
        if n:
            out[i, width - n:] = inputs[i][mask[i].bool()]
        packed[i, width - max(n, 1):] = 1
    return out, packed


def _longest_part(text: Any, transcript: Any, conversation: Any) -> str:
    """Which of a record's prompt columns is the longest (the one to name when the prompt is too long)."""
    parts = {"conversation": conversation, "transcript": transcript, "text": text}
    return max(parts, key=lambda k: len(parts[k]) if isinstance(parts[k], str) else -1)


def say_left_out(ids: list, limit: int, reader: str) -> None:
    """The one warning for training records longer than `limit` tokens, left out (GenTable, vlm.VisionTable)."""
    if ids:
        named = ", ".join(map(str, ids[:3])) + (", ..." if len(ids) > 3 else "")
        warn(f"{len(ids)} record(s) longer than the {limit} tokens {reader} ({named}) are left out of training and "
             "validation: a part of a conversation could hold none of its answer")


def context_length(model: nn.Module) -> int | None:
    """The longest sequence a (vision-)language model reads (its max_position_embeddings: n_positions for GPT-2),
    if it says."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def text_room(cfg: Any, decoder: nn.Module) -> int | None:
    """Tokens of text a record may have: the decoder's context less its media tokens (each pooled modality's
    --prefix-tokens, each sequence's tokens) and one answer token; None when the decoder does not say."""
    n = context_length(decoder)
    if n is None:
        return None
    media = sum(cfg.tokens(m) if m in cfg.sequenced() else cfg.prefix_tokens for m in cfg.modalities)
    return max(1, n - media - 1)


class GenTable:
    """Each record's conversation as token ids (chat.encode: the loss covers its assistant turns) and its prompt
    up to the answer (chat.prompt_ids), with the precomputed modality embeddings. A record is one turn (its text
    and transcript, then its target) unless it carries a `conversation` (JSON: messages, system)."""

    def __init__(self, columns: dict[str, Any], modalities: list[str], tokenizer: Any, with_targets: bool,
                 max_tokens: int = 256, kind: str = DESCRIBE, sequences: tuple = (), slots: dict | None = None,
                 system: str | None = None, room: int | None = None, memory: Any = None, retrieve: int = 0,
                 own: bool = False):
        """`room`: the decoder's context less its media tokens and one answer token (text_room), when known;
        `memory` (retrieval.Memory) and `retrieve` K: each prompt carries its K nearest training answers (`own`: these
        records are the memory's, each skips itself)."""
        self.ids = list(columns["id"])
        self.n = len(self.ids)
        self.modalities = modalities
        self.tokenizer = tokenizer
        none = [None] * self.n
        targets = list(columns["target"]) if "target" in columns else none
        texts = list(columns["text"]) if "text" in columns else none
        said = list(columns["transcript"]) if columns.get("transcript") is not None else none
        talks = list(columns["conversation"]) if columns.get("conversation") is not None else none
        hints = memory.hints(columns, modalities, retrieve, own) if memory is not None and retrieve else none
        turns = [record_turns(t, s, g, c, kind, bool(slots), system, h)
                 for t, s, g, c, h in zip(texts, said, targets, talks, hints)]
        self.targets = [answer_of(m) for m, _ in turns]
        limit = min(4 * max_tokens, room) if room else 4 * max_tokens  # a whole conversation
        whole = 1 << 30
        self.prompts = [chat.prompt_ids(tokenizer, m, sys_, kind, whole, slots) for m, sys_ in turns]
        self.answers = None  # (ids, loss mask) of each whole conversation
        if with_targets:
            self.answers = [chat.encode(tokenizer, m, sys_, kind, whole, slots) for m, sys_ in turns]
        kept = self._bound(limit, [_longest_part(t, s, c) for t, s, c in zip(texts, said, talks)])
        self.has = {m: torch.as_tensor(np.asarray(columns[f"has_{m}"], dtype=bool)[kept]) for m in modalities}
        self.emb = {m: torch.as_tensor(np.asarray(columns[f"{m}_emb"], dtype=np.float32)[kept]) for m in modalities}
        self.seq = {m: torch.as_tensor(np.stack([np.asarray(columns[f"{m}_seq"][i], dtype=np.float32) for i in kept])
                                       if kept else np.zeros((0, 1, 1), np.float32)) for m in sequences}  # (N, T, D)

    def _bound(self, limit: int, columns: list[str]) -> list[int]:
        """The records kept (indices): none longer than `limit` tokens is ever read in part. A prompt to answer
        that is longer is refused (RecordError naming `columns[i]`, its longest part: predict and serve answer the
        others); a training conversation that is longer is left out of the table, said once with the ids."""
        long = [i for i, p in enumerate(self.prompts) if len(p) > limit]
        if self.answers is None and long:
            i = long[0]
            raise RecordError(columns[i], f"its prompt is {len(self.prompts[i])} tokens (its {columns[i]} is the "
                              f"longest part); the decoder is given prompts of at most {limit}: shorten it",
                              record_id=self.ids[i])
        out = set(long) | {i for i, (ids, _) in enumerate(self.answers or []) if len(ids) > limit}
        say_left_out([self.ids[i] for i in sorted(out)], limit, "the decoder is given")
        kept = [i for i in range(self.n) if i not in out]
        self.ids = [self.ids[i] for i in kept]
        self.targets = [self.targets[i] for i in kept]
        self.prompts = [self.prompts[i] for i in kept]
        self.answers = [self.answers[i] for i in kept] if self.answers is not None else None
        self.n = len(kept)
        return kept

    @classmethod
    def from_split(cls, ds: Any, modalities: list[str], tokenizer: Any, with_targets: bool, kind: str = DESCRIBE,
                   sequences: tuple = (), slots: dict | None = None, system: str | None = None,
                   room: int | None = None, memory: Any = None, retrieve: int = 0, own: bool = False):
        wanted = ["id", "text", "target"] + [f"has_{m}" for m in modalities if m != "text"] + \
                 [f"{m}_emb" for m in modalities] + [f"{m}_seq" for m in sequences]
        if "text" in modalities:
            wanted.append("has_text")
        wanted += [c for c in ("transcript", "conversation") if c in ds.column_names]  # read as part of the prompt
        return cls(ds.select_columns(wanted).with_format("numpy")[:], modalities, tokenizer, with_targets, kind=kind,
                   sequences=sequences, slots=slots, system=system, room=room, memory=memory, retrieve=retrieve,
                   own=own)

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> list[int]:
        """Prompt (+ target) tokens per record: training groups records of similar length into a batch."""
        if self.answers is None:
            return [len(p) for p in self.prompts]
        return [len(ids) for ids, _ in self.answers]

    def longest_answer(self) -> int:
        """Tokens of the longest assistant turn (its end-of-turn token included) of any record."""
        longest = 0
        for _, mask in self.answers or []:
            run = 0
            for t in mask:
                run = run + 1 if t else 0
                longest = max(longest, run)
        return longest

    def batch(self, idx: Any, device: Any = "cpu", with_targets: bool | None = None,
              drop: frozenset = frozenset()) -> dict[str, torch.Tensor]:
        idx = list(map(int, idx))
        use_targets = self.answers is not None if with_targets is None else with_targets
        seqs = [self.answers[i][0] if use_targets else self.prompts[i] for i in idx]
        width = max(1, max(len(s) for s in seqs))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(idx), width), pad, dtype=torch.long)  # right padding: (B, T)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for j, (i, s) in enumerate(zip(idx, seqs)):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
            if use_targets:
                keep = torch.tensor(self.answers[i][1], dtype=torch.bool)
                labels[j, :len(s)] = torch.where(keep, torch.tensor(s), -100)
        out = {"input_ids": ids, "attention_mask": mask}
        if use_targets:
            out["labels"] = labels
        t = torch.as_tensor(idx)
        for m in self.modalities:
            out[f"has_{m}"] = self.has[m][t] & (m not in drop)
            out[f"{m}_emb"] = self.emb[m][t]
            if m in self.seq:
                out[f"{m}_seq"] = self.seq[m][t]
        return {k: v.to(device) for k, v in out.items()}


def resolve_decoder_precision(requested: str, trainable: bool, device: Any = "cpu") -> str:
    """auto -> bf16 for a frozen decoder where the hardware runs bf16 natively, else fp32 (a trained decoder
    stays fp32: its optimizer needs fp32 weights)."""
    from mmllm.encoders import native_bf16

    if requested == "auto":
        return "bf16" if not trainable and native_bf16(str(device)) else "fp32"
    return requested


def prepare_decoder(decoder: nn.Module, cfg: GenConfig) -> nn.Module:
    """Freeze the decoder (its weights in cfg.precision), or add LoRA adapters, or leave it trainable."""
    if cfg.precision == "bf16" and not (cfg.lora_r or cfg.train_decoder):
        decoder.to(torch.bfloat16)  # frozen: no optimizer state, bf16 matmuls (AMX) in forward and backward
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(decoder, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                                                  target_modules="all-linear"))
    if not cfg.train_decoder:
        decoder.requires_grad_(False)
    return decoder


def build(fcfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Training:
    from mmllm import modalities as registry
    from mmllm.encoders import load_decoder
    from mmllm.features import Preprocessing

    if not meta.get("has_target"):
        raise UserError(missing_column(fcfg.prepared, meta, get(fcfg.task)))
    prefix_mods = [m for m in modalities if m != "text"]
    if "text" in modalities and "text_emb" in meta["features"]:
        prefix_mods.append("text")  # a frozen sentence embedding of the context text, when prepared
    dims = {m: meta["encoders"][m]["dim"] for m in prefix_mods}
    trainable = bool(fcfg.lora_r or fcfg.train_decoder)
    if not prefix_mods and not trainable:
        raise UserError(f"nothing to train: --modalities {','.join(modalities)} gives the frozen decoder no prefix "
                        "(image, audio, or text prepared with --sentence-embedding), so no weight would change: "
                        "add --lora-r N or --train-decoder, or a modality")
    seq_lens = {}
    if fcfg.media_tokens == "sequence":
        media = [m for m in prefix_mods if m != "text"]
        lacking = [m for m in media if f"{m}_seq" not in meta["features"]]
        if not media or lacking:
            raise UserError(f"--media-tokens sequence: {fcfg.prepared} has no stored sequence for "
                            f"{', '.join(lacking) or 'any medium'}; prepare it again with --sequence-features")
        seq_lens = {m: int(meta["features"][f"{m}_seq"][0]) for m in media}
    recorded = Preprocessing.read(meta.get("preprocessing") or {})
    ragged = [m for m in seq_lens if registry.get(m).ragged(recorded)]
    pool = {}
    if fcfg.image_tokens:  # every modality whose stored sequence is a spatial grid (images)
        grids = [m for m in seq_lens if registry.get(m).grid]
        if not grids:
            raise UserError("--image-tokens: the model has no stored image grid (prepare --sequence-features, and "
                            "--modalities with the images)")
        for m in grids:
            if fcfg.image_tokens > seq_lens[m]:
                raise UserError(f"--image-tokens {fcfg.image_tokens}: the stored {m} grid has only {seq_lens[m]} "
                                "vectors")
            pool[m] = fcfg.image_tokens
    decoder, tokenizer, identity = load_decoder(fcfg.decoder)
    cfg = GenConfig(modalities=prefix_mods, dims=dims, prefix_tokens=fcfg.prefix_tokens, hidden_size=fcfg.hidden_size,
                    media_tokens=fcfg.media_tokens, seq_lens=seq_lens, pool=pool, media_at="placeholder", ragged=ragged,
                    dropout=fcfg.dropout, lora_r=fcfg.lora_r, train_decoder=fcfg.train_decoder, decoder=fcfg.decoder,
                    decoder_identity=identity, retrieve=fcfg.retrieve,
                    precision=resolve_decoder_precision(fcfg.decoder_precision, trainable, dist.device))
    log(f"decoder: {fcfg.decoder} frozen in {cfg.precision}" if not trainable else f"decoder: {fcfg.decoder} trained")
    if hasattr(decoder, "set_attn_implementation") and dist.device.type == "cpu":
        try:  # training on short sequences: eager attention's backward is ~2x faster than SDPA's on CPU
            decoder.set_attn_implementation("eager")
        except (ValueError, ImportError):
            pass
    cfg.prompt_format = chat.template_kind(tokenizer, fcfg.decoder)
    cfg.system, saved = chat.lean_system(tokenizer, cfg.prompt_format)
    if saved:
        log(f"prompts: an empty system turn stands for the template's default system prompt ({saved} tokens fewer "
            "per record, in training and in every answer; a record's own system text is kept)")
    memory = None
    if cfg.retrieve:
        from mmllm.tasks.generate.retrieval import Memory

        if not prefix_mods:
            raise UserError("--retrieve: retrieval compares the records' media features, and this model has none "
                            "(image, audio, video, or text prepared with --sentence-embedding)")
        memory = Memory.of_split(data["train"], prefix_mods)
        log(f"retrieval: each prompt carries the answers of its {cfg.retrieve} most similar training records (of "
            f"{len(memory)}, by the frozen {', '.join(prefix_mods)} features; a training record never retrieves "
            "itself)")
    train, val = (GenTable.from_split(data[s], prefix_mods, tokenizer, with_targets=True, kind=cfg.prompt_format,
                                      sequences=tuple(cfg.sequenced()), slots=cfg.slots(), system=cfg.system,
                                      room=text_room(cfg, decoder), memory=memory, retrieve=cfg.retrieve,
                                      own=s == "train")
                  for s in ("train", "validation"))
    placed = sum(any(i < 0 for i in ids) for ids, _ in train.answers)
    if placed:
        log(f"media placeholders: {placed} of {len(train)} training records put their media where their "
            "placeholder stands; the others before the prompt")
    if seq_lens:
        log("media tokens: " + ", ".join(f"{m} {cfg.tokens(m)} (its stored sequence of {n}"
                                         f"{', average-pooled' if m in pool else ''})" if m not in ragged else
                                         f"{m} up to {n} (as many as its clip's stored vectors)"
                                         for m, n in seq_lens.items()))
    answer_defaults(cfg, train)
    log(f"prompts: {'the decoder tokenizer chat template' if cfg.prompt_format == chat.CHAT else cfg.prompt_format}"
        f"; answers end at EOS{' or ' + ', '.join(map(repr, cfg.stop)) if cfg.stop else ''}, "
        f"at most {cfg.max_new_tokens} new tokens by default")
    model = PrefixDecoder(cfg, prepare_decoder(decoder, cfg)).to(dist.device)
    model.stop_ids = chat.stop_ids(tokenizer, decoder, cfg.prompt_format)
    model.memory = memory

    return training(model, train, val, tokenizer, fcfg, meta, dist)


def training(model: Any, train: Any, val: Any, tokenizer: Any, fcfg: Any, meta: dict, dist: Any) -> Training:
    """The generic loop's view of a generator (a PrefixDecoder or a vision-language one): validation loss, plus
    BLEU and chrF when --monitor val_bleu, and its checkpoint."""
    def validate(m: Any) -> dict:
        out = {"val_loss": validation_loss(m, val, fcfg.batch_size, dist.device, dist)}
        if fcfg.monitor == "val_bleu":
            b = bleu_of(m, val, tokenizer, fcfg.batch_size, dist.device,
                        fcfg.max_new_tokens or model.cfg.max_new_tokens, dist=dist)
            out.update(val_bleu=b["val_bleu"], val_chrf=b["val_chrf"])
        return out

    def save(m: Any, out: Path, metrics: dict) -> None:
        save_checkpoint(m, out, tokenizer, meta, metrics, str(Path(fcfg.prepared).resolve()))

    return Training(model, train, validate, save)


def answer_defaults(cfg: GenConfig, train: GenTable) -> None:
    """What the training answers teach about stopping: the default --max-new-tokens (the longest answer's tokens
    and a quarter more, at least 8) and default stop strings (a newline when no answer has one; the plain
    format's next 'User:' turn)."""
    cfg.max_new_tokens = max(8, math.ceil(1.25 * train.longest_answer()) + 2)
    multiline = any("\n" in t for t in train.targets)
    cfg.stop = ([] if multiline else ["\n"]) + (chat.PLAIN_STOPS if cfg.prompt_format == chat.PLAIN else [])


@torch.no_grad()
def validation_loss(model: PrefixDecoder, table: GenTable, batch_size: int, device: Any,
                    dist: Dist | None = None) -> float:
    """Mean target-token cross-entropy; under DDP each rank sums its shard and the sums are gathered."""
    model.eval()
    total, count = 0.0, 0
    rows = shard(len(table), dist)
    for start in range(rows.start, rows.stop, batch_size):
        batch = table.batch(range(start, min(rows.stop, start + batch_size)), device)
        n = int((batch["labels"][:, 1:] != -100).sum())  # tokens the loss averages over
        total += float(model(batch)["loss"]) * n
        count += n
    sums = gather((total, count), dist)  # [(total, count)] per rank
    return sum(t for t, _ in sums) / max(1, sum(c for _, c in sums))


def bleu_of(model: PrefixDecoder, table: GenTable, tokenizer: Any, batch_size: int, device: Any,
            max_new_tokens: int | None, num_beams: int = 1, tokenize: str = "13a", stop: list[str] | None = None,
            drop: frozenset = frozenset(), dist: Dist | None = None) -> dict:
    """Greedy/beam outputs streamed into sacreBLEU (only strings are kept, never logits); under DDP each
    rank generates for its shard and the hypotheses are gathered in table order."""
    from mmllm.metrics import bleu

    model.eval()
    hyps: list[str] = []
    rows = shard(len(table), dist)
    for start in range(rows.start, rows.stop, batch_size):
        batch = table.batch(range(start, min(rows.stop, start + batch_size)), device, with_targets=False, drop=drop)
        hyps += model.generate(batch, tokenizer, max_new_tokens, num_beams, stop=stop)
    hyps = [h for part in gather(hyps, dist) for h in part]
    m = bleu(hyps, [table.targets], tokenize)
    return {"val_bleu": m["bleu"], "val_chrf": m["chrf"], "hypotheses": hyps, "bleu_signature": m["bleu_signature"]}


# ---------------------------------------------------------------- checkpoint

def save_checkpoint(model: PrefixDecoder, out: Path, tokenizer: Any, meta: dict, metrics: dict,
                    prepared: str = "") -> None:
    """Projector weights in model.safetensors; decoder/ holds the decoder's tokenizer and config, and when the
    decoder was trained (LoRA adapters, merged, or --train-decoder) its weights: a Hugging Face folder that
    `AutoModelForCausalLM` loads. A frozen decoder is referenced by identity, never copied."""
    from mmllm import modelcard
    from mmllm.checkpoint import FORMAT, VERSION, file_tensors, save_weights, unwrap, write_marker

    model = unwrap(model)
    write_marker(out)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    save_weights(file_tensors(state), out / "model.safetensors")  # a vision-language model's: none (empty file)
    model.save_decoder(out / "decoder", tokenizer)
    if model.memory is not None:
        model.memory.save(out)
    config = {"format": FORMAT, "version": VERSION, "task": "generate", "generation": asdict(model.cfg),
              "model": {"modalities": model.cfg.modalities}, "encoders": meta["encoders"],
              "columns": meta["columns"], "preprocessing": meta["preprocessing"], "labels": [],
              "prepared": prepared, "data": modelcard.data_summary(meta),
              "metrics": {k: v for k, v in metrics.items() if k != "hypotheses"}}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    modelcard.write(out, config)


def load_checkpoint(folder: Path, config: dict, device: Any) -> tuple[PrefixDecoder, Any]:
    """(model in eval mode, tokenizer). The decoder: decoder/'s weights (trained, LoRA merged), the checkpoint's
    model.safetensors (older layout: trained weights under `decoder.`), or the frozen decoder by identity."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mmllm.checkpoint import load_hf_weights, read_weights
    from mmllm.encoders import load_decoder

    cfg = GenConfig(**config["generation"])
    # decoding is one token at a time: on a CPU, bf16 matrix-vector products are slower than fp32 ones (measured:
    # 6.0 s vs 4.4 s for two records), so a decoder trained in bf16 decodes in fp32 there; on a GPU as trained
    on_gpu = str(device).startswith("cuda")
    cfg.precision = resolve_decoder_precision("auto" if cfg.precision == "bf16" and on_gpu else "fp32", False, device)
    state = read_weights(folder / "model.safetensors")
    old_layout = any(k.startswith("decoder.") for k in state)
    tokenizer = AutoTokenizer.from_pretrained(folder / "decoder")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    trained = cfg.lora_r > 0 or cfg.train_decoder
    if trained and not old_layout:
        decoder = load_hf_weights(AutoModelForCausalLM, folder / "decoder").requires_grad_(False)
    elif cfg.train_decoder and old_layout:
        decoder = prepare_decoder(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder / "decoder")),
                                  cfg)
    else:
        decoder, _, identity = load_decoder(cfg.decoder)
        if identity != cfg.decoder_identity:
            raise UserError(f"decoder '{cfg.decoder}' is now {identity}, the checkpoint was trained on "
                            f"{cfg.decoder_identity}")
        decoder = prepare_decoder(decoder, cfg)
    model = PrefixDecoder(cfg, decoder)
    model.stop_ids = chat.stop_ids(tokenizer, decoder, cfg.prompt_format)
    if cfg.retrieve:
        from mmllm.tasks.generate.retrieval import Memory

        model.memory = Memory.load(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("decoder.") or old_layout]
    if missing or unexpected:
        raise UserError(f"{folder}: config.json and model.safetensors disagree (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]})")
    return model.to(device).eval(), tokenizer


def check_config(config: dict, folder: Path) -> list[str]:
    """The problems of a generator checkpoint's generation and model sections and its decoder/ folder."""
    from mmllm.checkpoint import GENERATION_RULES, MAX_WIDTH, check_encoders, check_modalities, check_section

    gen = config.get("generation")
    problems = check_section(gen, "generation", GENERATION_RULES)
    if problems:
        return problems
    problems += check_modalities(gen["modalities"], "generation.modalities")
    fed = gen.get("decoder_kind", "causal-lm") == "causal-lm"  # a vision-language backbone reads media itself
    problems += [f"generation.dims.{m} must be a positive size" for m in gen["modalities"]
                 if fed and not (isinstance(gen["dims"].get(m), int) and 0 < gen["dims"][m] <= MAX_WIDTH)]
    lens = gen.get("seq_lens") or {}
    problems += [f"generation.pool.{m} must be a whole number from 1 to its stored length" for m, n in
                 (gen.get("pool") or {}).items()
                 if not (isinstance(n, int) and not isinstance(n, bool) and isinstance(lens.get(m), int)
                         and 0 < n <= lens[m])]
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("modalities"), list):
        return problems + ["model.modalities must be a list"]
    problems += check_modalities(model["modalities"], "model.modalities")
    if not (folder / "decoder").is_dir():
        problems.append("decoder/ (tokenizer and decoder config) is missing")
    if gen.get("retrieve"):
        from mmllm.tasks.generate.retrieval import FILES

        problems += [f"{f} (the --retrieve memory) is missing" for f in FILES if not (folder / f).is_file()]
    return problems + (check_encoders(config, model["modalities"]) if not problems else [])


# ---------------------------------------------------------------- inference

@torch.no_grad()
def predict_rows(predictor: Any, rows: list[dict], reliance: bool, generation: dict) -> dict:
    """{row id: {"generated": text}} for featurized rows; with `reliance` also the text with each modality
    masked."""
    model, tokenizer = predictor.model, predictor.tokenizer
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    table = model.table(columns, tokenizer, with_targets=False)

    def answers(drop: frozenset = frozenset(), reasons: list | None = None) -> list[str]:
        batch = table.batch(range(len(rows)), predictor.device, with_targets=False, drop=drop)
        return model.generate(batch, tokenizer, **generation, reasons=reasons)

    finish: list[str] = []
    texts = answers(reasons=finish)
    masked = {m: answers(frozenset({m})) for m in model.cfg.modalities} if reliance else {}
    results = {}
    for n, (row, text) in enumerate(zip(rows, texts)):
        results[row["id"]] = {"generated": text, "finish_reason": finish[n]}
        if reliance:
            results[row["id"]]["reliance"] = {m: {"generated": t[n]} for m, t in masked.items()}
    return results


# ---------------------------------------------------------------- eval model

def evaluate(cfg: Any, config: dict, device: Any, loaded: tuple | None = None) -> dict:
    """`eval model` of a generator: sacreBLEU, chrF, WER/CER and examples (modality reliance when asked)."""
    from mmllm.features import split_columns
    from mmllm.metrics import collapse, collapse_warning, error_rates

    model, tokenizer = loaded or load_checkpoint(Path(cfg.checkpoint), config, device)  # the task's load
    mods = model.cfg.modalities
    columns, source, split = split_columns(cfg, config, mods, transcripts=model.reads_transcripts,
                                           media_features=model.reads_features)
    table = model.table(columns, tokenizer, with_targets=False)
    if not any(table.targets):
        raise UserError(f"{cfg.data}: no target texts in split '{cfg.split}'")
    args = (tokenizer, cfg.batch_size, device, cfg.max_new_tokens, cfg.num_beams, cfg.bleu_tokenize, cfg.stop)
    scored = bleu_of(model, table, *args)
    rates = error_rates(scored["hypotheses"], table.targets)
    result: dict[str, Any] = {"task": "generate", "checkpoint": str(cfg.checkpoint), "data": source,
                              "split": split, "n": len(table), "bleu": scored["val_bleu"],
                              "chrf": scored["val_chrf"], "bleu_signature": scored["bleu_signature"],
                              **{k: v for k, v in rates.items() if k != "n"},
                              "examples": [{"id": i, "generated": h, "target": t} for i, h, t in
                                           list(zip(table.ids, scored["hypotheses"], table.targets))[:5]]}
    found = collapse(scored["hypotheses"], table.targets)
    if found:
        result["collapsed"] = found
        warn(collapse_warning(found))
    if cfg.reliance is None and mods:
        log("reliance: not computed for a generation checkpoint unless asked (it generates the split once more "
            "per modality): --reliance")
    if cfg.reliance and mods:
        masked = {"none": {"bleu": result["bleu"], "chrf": result["chrf"]}}
        for m in mods:
            b = bleu_of(model, table, *args, drop=frozenset({m}))
            masked[m] = {"bleu": b["val_bleu"], "chrf": b["val_chrf"], "bleu_drop": result["bleu"] - b["val_bleu"]}
        result["reliance"] = {"masked": masked}
    return result
