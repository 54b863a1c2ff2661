"""The Python API: the same steps as the command line, returning what the CLI prints.

    import mmllm

    summary = mmllm.prepare("data.csv", "prepared", text_model="minilm")       # = mmllm prepare
    result = mmllm.finetune("prepared", "ckpt", epochs=5, fusion="gated")       # = mmllm finetune
    metrics = mmllm.evaluate("ckpt", "prepared", split="test")                  # = mmllm eval model
    model = mmllm.load("ckpt")
    model.predict([{"text": "a red car", "image": "img/1.png"}])               # = mmllm predict

Options are the fields of the typed configs in `mmllm.config` (PrepareConfig, FinetuneConfig, ...), one per
command, validated by the same `config.build`; a config object can be passed whole (`config=`). Each step is
the function the CLI calls (`run_step`); results are the JSON documents the CLI writes on stdout, as dicts.
Errors raise `mmllm.errors.UserError` with the CLI's one-line message. Nothing heavy is imported until a step
runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

from mmllm import config as C
from mmllm.console import as_json, capture, quieted
from mmllm.errors import UserError

STEPS = {C.PrepareConfig: "mmllm.prepare:run", C.FinetuneConfig: "mmllm.finetune:run",
         C.EvalModelConfig: "mmllm.evaluation:run_model", C.PredictConfig: "mmllm.predict:run"}


def run_step(target: str, cfg: Any) -> Any:
    """Run one step, "module:function", on a validated config (what the CLI does after parsing flags)."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(cfg)


def make_config(cls: type, config: Any = None, **options: Any) -> Any:
    """A validated config of `cls`: the fields of `config` (if given), then `options`; paths may be Path objects."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UserError("; ".join(f"{cls.__name__}: {C.unknown_option(k, names)}" for k in unknown))
    values = dataclasses.asdict(config) if config is not None else {}
    values.update({k: _plain(v) for k, v in options.items() if v is not None})
    return C.build(cls, {}, values)


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _run(cls: type, config: Any, quiet: bool, options: dict) -> dict:
    cfg = make_config(cls, config, **options)
    with capture(quiet) as emitted:
        code = run_step(STEPS[cls], cfg)
    if code == 130:
        raise KeyboardInterrupt
    return emitted[-1] if emitted else {}


def prepare(input: Any = None, output: str | Path | None = None, *, config: C.PrepareConfig | None = None,
            quiet: bool = False, **options: Any) -> dict:
    """`mmllm prepare`: a manifest, class folder or saved dataset -> a prepared dataset folder. Returns the summary
    (output, counts, modalities, ...). Options: the fields of `PrepareConfig`."""
    return _run(C.PrepareConfig, config, quiet, {"input": input, "output": output, **options})


def finetune(prepared: str | Path | None = None, output: str | Path | None = None, *,
             config: C.FinetuneConfig | None = None, quiet: bool = False, **options: Any) -> dict:
    """`mmllm finetune`: a prepared dataset -> a checkpoint folder. Returns the summary (best epoch, final
    validation metrics, ...). Options: the fields of `FinetuneConfig`."""
    return _run(C.FinetuneConfig, config, quiet, {"prepared": prepared, "output": output, **options})


def evaluate(checkpoint: str | Path | None = None, data: str | Path | None = None, *,
             config: C.EvalModelConfig | None = None, quiet: bool = False, **options: Any) -> dict:
    """`mmllm eval model`: metrics of a checkpoint on a prepared folder or raw manifest. Options: the fields
    of `EvalModelConfig`."""
    return _run(C.EvalModelConfig, config, quiet, {"checkpoint": checkpoint, "data": data, **options})


def load(checkpoint: str | Path, device: str = "auto", max_file_mb: int = 512, quiet: bool = False) -> Model:
    """A checkpoint with its encoders, ready to predict raw records (`Model.predict`); `quiet`: no notes on
    stderr (as --quiet), while loading and predicting."""
    return Model(checkpoint, device, max_file_mb, quiet)


class Model:
    """A loaded checkpoint: `predict(records)` gives what `mmllm predict` writes, one dict per record."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", max_file_mb: int = 512, quiet: bool = False):
        from mmllm.predict import Predictor

        self.checkpoint = os.fspath(checkpoint)
        self.quiet = quiet
        with quieted(quiet):  # the encoders' precision note is a log line: silenced by quiet
            self.predictor = Predictor(self.checkpoint, device, max_file_mb)
        self.labels: list = self.predictor.labels

    def predict(self, records: dict | list[dict], *, base: str | Path = ".", **options: Any) -> dict | list[dict]:
        """Records as `mmllm predict` reads them (text / image / audio paths, relative to `base`, or bytes, PIL
        images), in order -> {"id", "prediction", "probability"[, "top_k"]} or {"id", "generated"}; a record
        that cannot be used gets {"id", "error"}. One dict in, one dict out. Options: the fields of
        `PredictConfig` that shape predictions (top_k, batch_size, strict, max_new_tokens, num_beams, ...)."""
        from mmllm import predict
        from mmllm.records import RecordError, convert_rows

        single = isinstance(records, dict)
        if not single and not isinstance(records, (list, tuple)):  # a str would be read as records of characters
            raise TypeError(f"Model.predict takes a record (a dict) or a list of records (dicts), not a "
                            f"{type(records).__name__}")
        cfg = make_config(C.PredictConfig, checkpoint=self.checkpoint, **options)
        rows = enumerate([records] if single else records, start=1)
        items = convert_rows(((i, r if isinstance(r, dict) else RecordError(None, "expected a dict"))
                              for i, r in rows), self.predictor.config, Path(base))
        with quieted(self.quiet):  # this thread's notes only: another thread's predict is its own
            results = [as_json(res) for res in predict.stream(self.predictor, items, cfg)]
        return results[0] if single else results
