"""`--retrieve K`: retrieval-augmented generation. Each prompt also carries the answers of the K training records
most similar to its input, by the same frozen features the projector reads (the idea of SmallCap, Ramos et al.
2023: a small trained part conditioned on retrieved captions, instead of naming everything from its features).

Similarity is the mean of the per-modality cosines of the pooled features (`{m}_emb`, a missing modality counts
0). A training record never retrieves itself. The memory (the training records' normalised features and answers)
is stored in the checkpoint: retrieval.safetensors (keys, fp16) and retrieval.json (answers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HINT = " Answers to similar inputs: {}."
MAX_CHARS = 200  # of each retrieved answer in a prompt: a long answer must not crowd out the record's own text
FILES = ("retrieval.safetensors", "retrieval.json")
CHUNK = 1024  # queries scored at once (bounded memory: CHUNK x memory size similarities)


def keys_of(columns: dict[str, Any], modalities: list[str]) -> torch.Tensor:
    """(N, sum of dims) float32: each modality's pooled features L2-normalised (zeros where it is missing), scaled so
    that a dot product is the mean of the per-modality cosines."""
    blocks = []
    for m in modalities:
        e = F.normalize(torch.as_tensor(np.asarray(columns[f"{m}_emb"], dtype=np.float32)), dim=1)
        has = columns.get(f"has_{m}")
        if has is not None:
            e = e * torch.as_tensor(np.asarray(has, dtype=bool), dtype=torch.float32)[:, None]
        blocks.append(e)
    return torch.cat(blocks, 1) / max(1, len(modalities)) ** 0.5


class Memory:
    """The training records' keys (keys_of) and answers."""

    def __init__(self, keys: torch.Tensor, answers: list[str]):
        self.keys, self.answers = keys.float(), [str(a or "") for a in answers]
        self.empty = torch.as_tensor([not a.strip() for a in self.answers], dtype=torch.bool)  # never retrieved

    @classmethod
    def of_split(cls, split: Any, modalities: list[str]) -> Memory:
        """The memory of a prepared training split, a row per record in order (hints(own=True) relies on it; a record
        without a target is never retrieved)."""
        wanted = ["target", *(f"{m}_emb" for m in modalities),
                  *(f"has_{m}" for m in modalities if f"has_{m}" in split.column_names)]
        columns = split.select_columns(wanted).with_format("numpy")[:]
        return cls(keys_of(columns, modalities), list(columns["target"]))

    def __len__(self) -> int:
        return len(self.answers)

    def hints(self, columns: dict[str, Any], modalities: list[str], k: int, own: bool = False) -> list[str]:
        """Per record of `columns`: HINT with the answers of its k most similar memory records (distinct answers,
        most similar first). `own`: `columns` are the memory's own records, in order: each skips itself."""
        queries = keys_of(columns, modalities)
        out = []
        for start in range(0, len(queries), CHUNK):
            sim = queries[start:start + CHUNK] @ self.keys.T  # (c, N)
            if own:
                rows = torch.arange(sim.shape[0])
                sim[rows, rows + start] = -float("inf")
            sim[:, self.empty] = -float("inf")
            top = sim.topk(min(k + int(own), len(self)), dim=1).indices.tolist()
            for row in top:
                picked = [a for a in dict.fromkeys(self.answers[j][:MAX_CHARS].strip() for j in row) if a][:k]
                out.append(HINT.format("; ".join(picked)))
        return out

    def save(self, folder: Path) -> None:
        from mmllm.checkpoint import save_weights

        save_weights({"keys": self.keys.half().contiguous()}, folder / FILES[0])
        (folder / FILES[1]).write_text(json.dumps({"answers": self.answers}, ensure_ascii=False) + "\n",
                                       encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Memory:
        from mmllm.checkpoint import read_weights
        from mmllm.errors import UserError, read_json

        keys = read_weights(folder / FILES[0]).get("keys")
        answers = (read_json(folder / FILES[1]) or {}).get("answers")
        if keys is None or keys.ndim != 2 or not isinstance(answers, list) or len(answers) != keys.shape[0]:
            raise UserError(f"{folder}: {FILES[0]} and {FILES[1]} do not hold one key per answer")
        return cls(keys, answers)
