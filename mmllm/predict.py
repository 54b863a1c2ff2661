"""`mmllm predict`: stream predictions for raw records as JSON lines, in input order.

Records are read lazily (stdin JSONL line by line, or a manifest), featurized in batches with the encoders
recorded in the checkpoint, and each batch's lines are written (and flushed) before the next is read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm import checkpoint
from mmllm.config import PredictConfig, save_resolved
from mmllm.console import emit, warn
from mmllm.errors import UserError
from mmllm.records import error_entry, raw_records
from mmllm.runtime import pick_device


class Predictor:
    """A checkpoint with its encoders: raw records in, prediction dicts out."""

    def __init__(self, folder: str, device: str = "auto"):
        from mmllm.features import FeatureStore, config_from_checkpoint, encoders_for_checkpoint

        self.device = pick_device(device)
        self.config = checkpoint.read_config(folder)
        self.generation = self.config.get("task") == "generate"
        if self.generation:
            from mmllm.tasks.generate import load_checkpoint

            self.model, self.tokenizer = load_checkpoint(Path(folder), self.config, self.device)
        else:
            self.model, self.config, self.tokenizer = checkpoint.load(folder, self.device)
        self.labels = self.config["labels"]
        self.encoders = encoders_for_checkpoint(Path(folder), self.config)
        self.prep = config_from_checkpoint(self.config)
        self.store = FeatureStore(enabled=False, memo_bytes=64 << 20)

    @torch.no_grad()
    def predict(self, records: list[dict], top_k: int = 1, **generation: Any) -> list[dict]:
        from mmllm.batches import FeatureTable
        from mmllm.features import featurize

        for r in records:
            r.setdefault("split", "test")
        rows, errors = featurize(records, self.encoders, self.prep, self.store)
        results = {e["id"]: {"id": e["id"], "error": _one_line(e)} for e in errors}
        if rows and self.generation:
            from mmllm.tasks.generate import GenTable

            columns = {k: [r.get(k) for r in rows] for k in rows[0]}
            table = GenTable(columns, self.model.cfg.modalities, self.tokenizer, with_targets=False)
            texts = self.model.generate(table.batch(range(len(rows)), self.device, with_targets=False),
                                        self.tokenizer, **generation)
            for row, text in zip(rows, texts):
                results[row["id"]] = {"id": row["id"], "generated": text}
        elif rows:
            mods = self.model.cfg.modalities
            columns = {k: [r.get(k) for r in rows] for k in rows[0]}
            pad = self.tokenizer.pad_token_id or 0 if self.tokenizer is not None else 0
            table = FeatureTable(columns, mods, None, pad, self.model.cfg.sequence)
            batch = table.batch(range(len(rows)), self.device)
            out = self.model(batch)
            probs = out["logits"].float().softmax(-1).cpu().numpy()  # (B, C)
            k = min(top_k, len(self.labels))
            for row, p in zip(rows, probs):
                best = np.argsort(-p)[:k]
                res: dict[str, Any] = {"id": row["id"], "prediction": self.labels[int(best[0])],
                                       "probability": float(p[best[0]])}
                if top_k > 1:
                    res["top_k"] = [{"label": self.labels[int(i)], "probability": float(p[i])} for i in best]
                results[row["id"]] = res
        return [results[r["id"]] for r in records]


def _one_line(entry: dict) -> str:
    col = f"column {entry['column']}: " if entry.get("column") else ""
    return f"{col}{entry['reason']}"


def run(cfg: PredictConfig) -> int:
    predictor = Predictor(cfg.checkpoint, cfg.device)
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout
    if cfg.output:
        save_resolved(cfg, Path(cfg.output).with_suffix(".config.json"))
    failed = 0
    try:
        batch: list[dict] = []
        for item in raw_records(cfg.input, predictor.config):
            if isinstance(item, tuple):  # unreadable record: report in order, after pending ones
                failed += flush(predictor, batch, cfg, out)
                batch = []
                stub, e = item
                emit({"id": stub["id"], "error": _one_line(error_entry(stub, e))}, out)
                failed += 1
                if cfg.strict:
                    raise UserError(f"record {stub['id']}: {e.reason}")
                continue
            batch.append(item)
            if len(batch) >= cfg.batch_size:
                failed += flush(predictor, batch, cfg, out)
                batch = []
        failed += flush(predictor, batch, cfg, out)
    finally:
        if cfg.output:
            out.close()
    if failed:
        warn(f"{failed} record(s) failed (lines with \"error\")")
        return 1
    return 0


def flush(predictor: Predictor, batch: list[dict], cfg: PredictConfig, out) -> int:
    if not batch:
        return 0
    failed = 0
    seen: set = set()
    for r in batch:  # duplicate ids inside a batch would collide: make them unique for the lookup
        if r["id"] in seen:
            r["id"] = f"{r['id']}#row{r['row']}"
        seen.add(r["id"])
    generation = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                      temperature=cfg.temperature, top_p=cfg.top_p) if predictor.generation else {}
    for res in predictor.predict(batch, cfg.top_k, **generation):
        emit(res, out)
        if "error" in res:
            failed += 1
            if cfg.strict:
                raise UserError(f"record {res['id']}: {res['error']}")
    return failed
