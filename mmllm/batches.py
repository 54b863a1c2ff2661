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
    (`text_pooled`, (B, D)) instead of token ids, and the model never runs its text model."""

    def __init__(self, columns: dict[str, Any], modalities: list[str], label_to_id: dict[str, int] | None,
                 pad_id: int = 0, sequence: bool = False, cached_text: bool = False):
        self.ids = list(columns["id"])
        self.n = len(self.ids)
        self.modalities = modalities
        self.pad_id = pad_id
        text = "text" in modalities
        cached_text = cached_text and columns.get("text_pooled") is not None  # else the text model runs
        self.text_pooled = (torch.as_tensor(np.asarray(columns["text_pooled"], dtype=np.float32))
                            if text and cached_text else None)
        self.input_ids = ([np.asarray(x, dtype=np.int64) for x in columns["input_ids"]]
                          if text and self.text_pooled is None else None)
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
                   sequence: bool = False, cached_text: bool = False):
        cached_text = cached_text and "text_pooled" in ds.column_names
        wanted = ["id", "label"] + [f"has_{m}" for m in modalities]
        wanted += ([("text_pooled" if cached_text else "input_ids")] if "text" in modalities else [])
        wanted += [f"{m}_emb" for m in modalities if m != "text"]
        wanted += [f"{m}_seq" for m in modalities if m != "text" and sequence]
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            from mmllm.errors import UserError

            raise UserError(f"prepared data has no column {missing[0]} (prepared without that modality?)")
        from mmllm.features import label_strings

        columns = ds.select_columns(wanted).with_format("numpy")[:]
        columns["label"] = label_strings(ds)  # names (the prepared column is a ClassLabel of ids)
        return cls(columns, modalities, label_to_id, pad_id, sequence, cached_text)

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> list[int] | None:
        """Token count per record when the text model runs in each step (training groups records by it)."""
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
