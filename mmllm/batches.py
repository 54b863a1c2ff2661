"""Prepared features in memory as tensors, and the batches the model consumes.

Used alike by finetune (prepared splits), eval and predict (rows featurized on the fly).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class FeatureTable:
    """Columns of one split: padded-on-demand token ids, precomputed embeddings, presence flags, labels.

    With `cached_text` (a frozen text model), batches carry the text model's pooled states computed by prepare
    (`text_pooled`, (B, D)) instead of token ids, and the model never runs its text model. With `text_trunk`
    (--train-text-layers: every record's stored trunk states as one (sum n_i, D) tensor and the (N + 1,) offsets
    of the records in it), batches carry `text_trunk` (B, T, D) float32 and its mask instead of token ids."""

    def __init__(self, columns: dict[str, Any], modalities: list[str], label_to_id: dict[str, int] | None,
                 pad_id: int = 0, sequence: bool = False, cached_text: bool = False,
                 text_trunk: tuple[torch.Tensor, np.ndarray] | None = None):
        self.ids = list(columns["id"])
        self.n = len(self.ids)
        self.modalities = modalities
        self.pad_id = pad_id
        text = "text" in modalities
        cached_text = cached_text and columns.get("text_pooled") is not None  # else the text model runs
        self.text_pooled = (torch.as_tensor(np.asarray(columns["text_pooled"], dtype=np.float32))
                            if text and cached_text else None)
        self.text_trunk = text_trunk if text and self.text_pooled is None else None
        self.input_ids = ([np.asarray(x, dtype=np.int64) for x in columns["input_ids"]]
                          if text and self.text_pooled is None and self.text_trunk is None else None)
        self.has = {m: torch.as_tensor(np.asarray(columns[f"has_{m}"], dtype=bool)) for m in modalities}
        self.emb = {m: torch.as_tensor(np.asarray(columns[f"{m}_emb"], dtype=np.float32))
                    for m in modalities if m != "text"}
        self.seq = {m: torch.as_tensor(np.asarray(columns[f"{m}_seq"], dtype=np.float32))  # (N, S, D)
                    for m in modalities if sequence and m != "text"}
        self.label_names = list(columns["label"]) if columns.get("label") is not None else [None] * self.n
        self.labels = None
        if label_to_id is not None:
            self.labels = torch.tensor([label_to_id.get(lab, -100) if lab is not None else -100
                                        for lab in self.label_names], dtype=torch.long)

    @classmethod
    def from_split(cls, ds: Any, modalities: list[str], label_to_id: dict[str, int] | None, pad_id: int = 0,
                   sequence: bool = False, cached_text: bool = False, trunk: bool = False):
        cached_text = cached_text and "text_pooled" in ds.column_names
        trunk = trunk and "text" in modalities and not cached_text
        text_column = "text_pooled" if cached_text else "text_trunk" if trunk else "input_ids"
        wanted = ["id", "label"] + [f"has_{m}" for m in modalities]
        wanted += [text_column] if "text" in modalities else []
        wanted += [f"{m}_emb" for m in modalities if m != "text"]
        wanted += [f"{m}_seq" for m in modalities if m != "text" and sequence]
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            from mmllm.errors import UserError

            raise UserError(f"prepared data has no column {missing[0]} (prepared without that modality?)")
        from mmllm.features import label_strings

        columns = ds.select_columns([c for c in wanted if c != "text_trunk"]).with_format("numpy")[:]
        columns["label"] = label_strings(ds)  # names (the prepared column is a ClassLabel of ids)
        return cls(columns, modalities, label_to_id, pad_id, sequence, cached_text,
                   trunk_column(ds) if trunk else None)

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> list[int] | None:
        """Token count per record when the text model runs in each step (training groups records by it)."""
        if self.text_trunk is not None:
            return np.diff(self.text_trunk[1]).tolist()
        return [len(x) for x in self.input_ids] if self.input_ids is not None else None

    def batch(self, idx: list[int] | np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        idx = list(map(int, idx))
        out: dict[str, torch.Tensor] = {}
        t = torch.as_tensor(idx)
        if self.input_ids is not None:
            from mmllm.encoders import pad_token_ids

            out["input_ids"], out["attention_mask"] = pad_token_ids([self.input_ids[i] for i in idx], self.pad_id)
        if self.text_pooled is not None:
            out["text_pooled"] = self.text_pooled[t]
        if self.text_trunk is not None:
            out["text_trunk"], out["attention_mask"] = pad_states(*self.text_trunk, idx)
        for m in self.modalities:
            out[f"has_{m}"] = self.has[m][t]
            if m != "text":
                out[f"{m}_emb"] = self.emb[m][t]
            if m in self.seq:
                out[f"{m}_seq"] = self.seq[m][t]
        if self.labels is not None:
            out["labels"] = self.labels[t]
        return {k: v.to(device) for k, v in out.items()}

    def batches(self, batch_size: int, device: Any = "cpu"):
        for start in range(0, self.n, batch_size):
            yield self.batch(range(start, min(self.n, start + batch_size)), device)


def trunk_column(ds: Any) -> tuple[torch.Tensor, np.ndarray]:
    """A prepared split's `text_trunk` column as (values (sum n_i, D): float32, or bfloat16 from the stored bit
    patterns, offsets (N + 1,)): record i's states are values[offsets[i]:offsets[i + 1]]."""
    import pyarrow.compute as pc

    from mmllm.text_layers import from_storage

    column = ds.select_columns(["text_trunk"]).with_format("arrow")[:]["text_trunk"]  # list<fixed_size_list<D>>
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    dim = column.type.value_type.list_size
    flat = pc.list_flatten(pc.list_flatten(column)).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return from_storage(flat.reshape(-1, dim)), offsets


def pad_states(values: torch.Tensor, offsets: np.ndarray, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Records `idx` of stored states -> right-padded float32 states (B, T, D) and their mask (B, T)."""
    lengths = [int(offsets[i + 1] - offsets[i]) for i in idx]
    states = torch.zeros((len(idx), max(lengths, default=1), values.shape[1]), dtype=torch.float32)
    mask = torch.zeros(states.shape[:2], dtype=torch.long)
    for j, (i, n) in enumerate(zip(idx, lengths)):
        states[j, :n] = values[int(offsets[i]):int(offsets[i]) + n]
        mask[j, :n] = 1
    return states, mask
