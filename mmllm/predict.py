"""`mmllm predict`: stream predictions for raw records as JSON lines, in input order.

Records are read lazily (stdin JSONL line by line, or a manifest), featurized in batches with the encoders
recorded in the checkpoint, and each batch's lines are written (and flushed) before the next is read.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmllm import outputs, tasks
from mmllm.config import PredictConfig, save_resolved
from mmllm.console import emit, warn
from mmllm.errors import UserError
from mmllm.records import RecordError, error_entry, raw_records
from mmllm.runtime import pick_device


class Predictor:
    """A checkpoint with its encoders: raw records in, prediction dicts out."""

    def __init__(self, folder: str, device: str = "auto", max_file_mb: int = 512, precision: str = "checkpoint"):
        from mmllm.features import FeatureStore, checkpoint_preprocessing, encoders_for_checkpoint

        self.device = pick_device(device)
        self.config = tasks.read_config(folder)
        self.task = tasks.of(self.config)
        self.generation = self.task.generates  # takes generation options (max_new_tokens, stop, ...)
        self.model, self.tokenizer = self.task.load(Path(folder), self.config, self.device)
        self.labels = self.config["labels"]
        flags = self.task.input_flags(self.model)
        media_features = flags.pop("media_features", True)
        self.encoders = encoders_for_checkpoint(Path(folder), self.config, precision=precision, **flags)
        self.prep = checkpoint_preprocessing(self.config, max_file_mb, media_features)
        self.store = FeatureStore(enabled=False, memo_bytes=64 << 20)
        # one batch at a time: the tokenizers ("Already borrowed") and the feature memo are not thread-safe
        self.lock = threading.Lock()

    def predict(self, records: list[dict], top_k: int = 1, reliance: bool = False, **generation: Any) -> list[dict]:
        """One result per record, in order, each with the record's id as given (`given_id`, else `id`). Threads
        that share a Predictor take turns. `reliance`: each result also says what the model answers with each of
        its modalities masked (the masking of `eval model`'s reliance table), under "reliance"."""
        with self.lock:
            return self._predict(records, top_k, reliance, **generation)

    @torch.no_grad()
    def _predict(self, records: list[dict], top_k: int = 1, reliance: bool = False, **generation: Any
                 ) -> list[dict]:
        from mmllm.features import featurize

        given = [r.get("given_id", r["id"]) for r in records]
        # records are looked up by position: ids may repeat, and are echoed untouched
        records = [{**r, "id": str(i), "split": r.get("split") or "test"} for i, r in enumerate(records)]
        rows, errors = featurize(records, self.encoders, self.prep, self.store)
        results = {e["id"]: {"error": _one_line(e)} for e in errors}
        mods = self.config["model"]["modalities"]
        for r in [r for r in rows if not self._reads(r, mods)]:  # e.g. a silent video for a soundtrack model
            results[r["id"]] = {"error": f"nothing this checkpoint reads ({', '.join(mods)}) is in the record"}
        rows = [r for r in rows if r["id"] not in results]
        if rows:
            results.update(self.task.predict(self, rows, top_k, reliance, generation))
        return [{"id": i, **results[r["id"]]} for i, r in zip(given, records)]

    def _reads(self, row: dict, mods: list[str]) -> bool:
        """Whether a featurized row holds anything the model reads (a generator always reads its prompt)."""
        return any(row.get(f"has_{m}") for m in mods) or (self.task.reads_prompt and bool(
            row.get("text") or row.get("conversation") or row.get("transcript")))


def _one_line(entry: dict) -> str:
    col = f"column {entry['column']}: " if entry.get("column") else ""
    return f"{col}{entry['reason']}"


def error_line(stub: dict, e: Exception) -> str:
    """The "error" text of a record that could not be read (stub: its id and row)."""
    return _one_line(error_entry(stub, e))


def run(cfg: PredictConfig) -> int:
    if cfg.output:
        check_outputs(cfg)
    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.max_file_mb, cfg.precision)
    tmp = outputs.beside(cfg.output) if cfg.output else None  # renamed onto --output when every line is written
    out = open(tmp, "w", encoding="utf-8") if tmp else sys.stdout
    failed = 0
    try:
        for res in stream(predictor, raw_records(cfg.input, predictor.config, cfg.max_line_mb), cfg):
            emit(res, out)
            failed += "error" in res
    except BaseException:
        if tmp:  # an existing --output stays as it was
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if cfg.output:
            out.close()
    if tmp:
        outputs.replace(tmp, cfg.output, outputs.PREDICTIONS)
        with outputs.atomic_file(outputs.config_path(cfg.output)) as config_tmp:
            save_resolved(cfg, config_tmp)
    if failed:
        warn(f"{failed} record(s) failed (lines with \"error\")")
        return 1
    return 0


def stream(predictor: Predictor, items: Iterable[dict | tuple[dict, Exception]], cfg: PredictConfig
           ) -> Iterator[dict]:
    """One result dict per record of `items` (records, or (stub, error) of unreadable ones: records.convert_rows),
    in input order, a batch of `cfg.batch_size` at a time; the results are returned, never shared (predict writes
    them, the Python API returns them). With `cfg.strict` the first error is yielded, then raised as a UserError."""
    generation = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                      temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop) if predictor.generation else {}
    batch: list[dict] = []

    def flush() -> Iterator[dict]:
        for res in predict_each(predictor, batch, cfg.top_k, generation) if batch else []:
            yield res
            if cfg.strict and "error" in res:
                raise UserError(f"record {res['id']}: {res['error']}")
        batch.clear()

    for item in items:
        if isinstance(item, tuple):  # unreadable record: reported in order, after the pending ones
            yield from flush()
            stub, e = item
            yield {"id": stub["id"], "error": error_line(stub, e)}
            if cfg.strict:
                raise UserError(f"record {stub['id']}: {getattr(e, 'reason', e)}")
            continue
        batch.append(item)
        if len(batch) >= cfg.batch_size:
            yield from flush()
    yield from flush()


def check_outputs(cfg: PredictConfig) -> None:
    """Before any work: refuse an --output (or the config written beside it) that is an input, or exists and
    is not mmllm's of the same kind, or is and --overwrite was not given (mmllm.outputs)."""
    for path, kind in ((Path(cfg.output), outputs.PREDICTIONS),
                       (outputs.config_path(cfg.output), outputs.RESOLVED_CONFIG)):
        outputs.check(path, kind, [cfg.input, cfg.checkpoint], cfg.overwrite)


def predict_each(predictor: Predictor, batch: list[dict], top_k: int, generation: dict) -> list[dict]:
    """Results of a batch; if the batch fails as a whole, each record alone, so that a failure is the error
    of the record that caused it and never of the run."""
    try:
        return predictor.predict(batch, top_k, **generation)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - isolated below
        if len(batch) == 1:
            said = e.reason if isinstance(e, RecordError) else f"{type(e).__name__}: {str(e)[:120]}"
            return [{"id": batch[0].get("given_id", batch[0]["id"]), "error": said}]
    return [res for r in batch for res in predict_each(predictor, [r], top_k, generation)]
