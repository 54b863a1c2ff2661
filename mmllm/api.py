"""The Python API: the same steps as the command line, returning what the CLI prints.

    import mmllm

    summary = mmllm.prepare("data.csv", "prepared", text_model="minilm")       # = mmllm prepare
    result = mmllm.finetune("prepared", "ckpt", epochs=5, fusion="gated")       # = mmllm finetune
    metrics = mmllm.evaluate("ckpt", "prepared", split="test")                  # = mmllm eval model
    model = mmllm.load("ckpt")
    model.predict([{"text": "a red car", "image": "img/1.png"}])               # = mmllm predict
    model.predict(df)                     # a DataFrame, a manifest path, numpy / PIL / (array, sr) media too

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmllm import config as C
from mmllm import modalities, tasks
from mmllm.console import as_json, capture, quieted
from mmllm.errors import UserError

STEPS = {C.PrepareConfig: "mmllm.preparation:run", C.FinetuneConfig: "mmllm.finetuning:run",
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


def _sign(func: Any, cls: type) -> None:
    """`func`'s signature shows its options: its own parameters, then each field of `cls` (keyword-only, with its
    default), so that `help(mmllm.prepare)` and `inspect.signature` list what the config accepts."""
    import inspect

    func.__dict__.pop("__signature__", None)  # signed before: start again from the function's own parameters
    own = inspect.signature(func).parameters
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                default=None if (d := C.default(cls, f.name)) is dataclasses.MISSING else d)
              for f in dataclasses.fields(cls) if f.name not in own]
    params = [p for p in own.values() if p.kind != inspect.Parameter.VAR_KEYWORD] + fields
    func.__signature__ = inspect.Signature(params, return_annotation=dict)


def _sign_all(*_: Any) -> None:
    for func, cls in ((prepare, C.PrepareConfig), (finetune, C.FinetuneConfig), (evaluate, C.EvalModelConfig)):
        _sign(func, cls)


_sign_all()
modalities.on_change(_sign_all)  # a modality or task registered later adds its options to the signatures too
tasks.on_change(_sign_all)


def load(checkpoint: str | Path, device: str = "auto", max_file_mb: int = 512, quiet: bool = False,
         warm: bool = True) -> Model:
    """A checkpoint with its encoders, ready to predict raw records (`Model.predict`); `quiet`: no notes on
    stderr (as --quiet), while loading and predicting. `warm`: run one synthetic record of every input the
    checkpoint reads through the encoders and the model, so that the first `predict` costs what the next ones do
    (lazy imports, first kernels, the tokenizer's and the resampler's first call are paid here)."""
    return Model(checkpoint, device, max_file_mb, quiet, warm)


ACCEPTED = ("a record (dict), a list of records, a pandas DataFrame (a record per row), a datasets.Dataset, or the "
            "path (str or Path) of a manifest or class folder")


def warm_up(predictor: Any) -> float:
    """Seconds spent predicting one synthetic record holding every input `predictor`'s checkpoint reads (a
    short text, a grey 64x64 image, 1 s of a quiet tone): what a first call pays once."""
    import time

    from mmllm.records import checkpoint_inputs, convert_rows

    start = time.perf_counter()
    raw: dict[str, Any] = {"id": "warm-up"}
    for key in checkpoint_inputs(predictor.config):
        raw[key] = "warm up" if key == modalities.TEXT else modalities.get(key).sample()
    items = list(convert_rows([(1, in_memory_media(raw, predictor.config, 1))], predictor.config, Path(".")))
    records = [it for it in items if not isinstance(it, tuple)]
    if records:
        from mmllm.predict import predict_each

        generation = {"max_new_tokens": 2} if predictor.generation else {}
        predict_each(predictor, records, 1, generation)
    return time.perf_counter() - start


def rows_of(records: Any) -> tuple[bool, Any, Path | None]:
    """(one record?, iterable of raw dicts (or (row, dict) pairs when read from a path), base folder of a path's
    relative media) of what `Model.predict` takes; TypeError for anything else, naming the type only."""
    if isinstance(records, dict):
        return True, [records], None
    if isinstance(records, (str, os.PathLike)):
        from mmllm.records import input_rows

        path = os.fspath(records)
        if not isinstance(path, str) or not path or path == "-" or not os.path.exists(path):
            raise TypeError(f"Model.predict takes {ACCEPTED}; a str is read as a path, and no file or folder has "
                            "that name (one text: {\"text\": ...})")
        rows, base = input_rows(path)
        return False, rows, base
    module = type(records).__module__.split(".")[0]
    if module == "pandas" and hasattr(records, "to_dict") and hasattr(records, "columns"):
        return False, (_python_values(r) for r in records.to_dict("records")), None
    if module == "datasets" and hasattr(records, "column_names"):
        return False, iter(records), None
    if isinstance(records, (list, tuple)) or (isinstance(records, Iterator) and not isinstance(records, (str, bytes))):
        return False, records, None
    raise TypeError(f"Model.predict takes {ACCEPTED}, not a {type(records).__name__}")


def _python_values(row: dict) -> dict:
    """A DataFrame row with numpy scalars as Python values (an int64 id stays a number)."""
    return {k: v.item() if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0
            else v for k, v in row.items()}


def in_memory_media(raw: dict, config: dict, n: int) -> dict:
    """`raw` with in-memory media as the bytes of a file the record reader takes: numpy images as PNG, numpy audio
    with its sampling rate as WAV (float32, lossless). Paths, bytes, PIL images and {"bytes", "path"} dicts are
    left as they are. TypeError / ValueError name the record (`n`, 1-based) and the key, never the data."""
    from mmllm.records import record_columns

    cols = record_columns(raw, config.get("columns") or {})
    out = raw
    for role in modalities.inputs():
        key = cols.get(role)
        if key is None or raw[key] is None:
            continue
        try:
            value = modalities.get(role).from_memory(raw[key])
        except (TypeError, ValueError) as e:
            raise type(e)(f"Model.predict: record {n}, key {key!r}: {e}") from None
        if value is not raw[key]:
            out = {**out, key: value}  # the caller's dict is untouched
    return out


class Model:
    """A loaded checkpoint: `predict(records)` gives what `mmllm predict` writes, one dict per record."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", max_file_mb: int = 512, quiet: bool = False,
                 warm: bool = True):
        from mmllm.predict import Predictor

        self.checkpoint = os.fspath(checkpoint)
        self.quiet = quiet
        with quieted(quiet):  # the encoders' precision note is a log line: silenced by quiet
            self.predictor = Predictor(self.checkpoint, device, max_file_mb)
            self.warm_s = warm_up(self.predictor) if warm else 0.0
        self.labels: list = self.predictor.labels

    def predict(self, records: Any, *, base: str | Path = ".", **options: Any) -> dict | list[dict]:
        """Predictions, in order, for: a record (dict: one dict back), a list of records, a pandas DataFrame (a
        record per row), a datasets.Dataset, or the path of a manifest or class folder (as `mmllm predict`
        reads it). A record's media: paths (relative to `base`), bytes, PIL images, numpy images (H x W [x C],
        uint8 or float in [0, 1]), audio as (array, sampling_rate) or {"array", "sampling_rate"}. Results:
        {"id", "prediction", "probability"[, "top_k"]} or {"id", "generated", "finish_reason"}; a record that cannot
        be used gets {"id", "error"}. Anything else raises TypeError naming the accepted types. Options: the fields of
        `PredictConfig` that shape predictions (top_k, batch_size, strict, max_new_tokens, num_beams, ...)."""
        from mmllm import predict
        from mmllm.records import convert_rows

        single, rows, path_base = rows_of(records)
        cfg = make_config(C.PredictConfig, checkpoint=self.checkpoint, **options)
        config = self.predictor.config

        def numbered() -> Iterator[tuple[int, Any]]:
            for i, r in (rows if path_base is not None else enumerate(rows, start=1)):
                if isinstance(r, dict):
                    r = in_memory_media(r, config, i)
                elif path_base is None:
                    raise TypeError(f"Model.predict: item {i} is a {type(r).__name__}; a list holds records "
                                    f"(dicts). Model.predict takes {ACCEPTED}")
                yield i, r

        items = convert_rows(numbered(), config, path_base if path_base is not None else Path(base))
        with quieted(self.quiet):  # this thread's notes only: another thread's predict is its own
            results = [as_json(res) for res in predict.stream(self.predictor, items, cfg)]
        return results[0] if single else results
