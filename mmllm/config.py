"""Typed configs for every command: one dataclass per command, one line of help per field.

The CLI is generated from these fields (see `cli.py`), a `--config FILE.yaml|json` provides the same
keys, flags override the file, and `validate` reports every problem at once, naming the flag.
This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm import modalities, tasks
from mmllm.modalities import flag  # an option name as its flag (config.flag to the CLI and the model card)
from mmllm.errors import UserError, read_json, utf8_text

MAX_AUGMENT = 100  # augmented variants per training record
AUGMENT_BASE = ("Augmented copies added per training record (ids ID~augN; validation and test untouched, text "
                "unchanged).")  # then each modality's augment_help
MAX_CONFIG_BYTES = 1 << 20
# finetune options a --resume may change: they are applied from the resumed step on; all others are refused
# prepare options that build a dataset: fixed when each shard was prepared, so --merge refuses them
# (and each modality's column, model and options: merge_ignores())
MERGE_IGNORES = ("text_column", "label_column", "target_column", "split_column", "id_column", "text_model",
                 "max_text_tokens",
                 "sequence_features", "sentence_embedding", "text_trunk_layers", "val_fraction", "test_fraction",
                 "augment", "on_error",
                 "cache", "batch_size", "num_workers", "shard_index", "num_shards", "seed", "trust_remote_code",
                 "precision", "transcribe", "transcribe_model", "transcript_reference_column", "engine",
                 "ray_address")
RESUMABLE = ("epochs", "budget_steps", "max_steps", "patience", "min_steps", "min_delta", "min_rel_delta", "lr",
             "backbone_lr", "weight_decay", "grad_clip", "warmup_ratio", "max_warmup_steps", "schedule", "device",
             "num_workers", "output", "overwrite", "report_to", "resume")
# options whose default the task resolves when the model is built (a vision-language --decoder: LoRA rank 8), so
# finetune_config.json holds the resolved value: on --resume, the option left at its default takes it back
RESOLVED_AT_BUILD = ("lora_r",)


def opt(default: Any = None, help: str = "", argument: bool = False, choices: tuple = (), panel: str = "") -> Any:
    """A config field: default, help line, whether it is a positional CLI argument, allowed values, help panel."""
    meta = {"help": help, "argument": argument, "choices": choices, "panel": panel}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PrepareConfig:
    """Manifest or folder -> prepared Arrow dataset with precomputed features."""

    input: list = opt([], "Manifest (CSV/JSONL/Parquet), folder of class subfolders, or a save_to_disk folder; "
                          "with --merge: the shard folders to join.", argument=True, panel="Data")
    output: str = opt(None, "Output folder for the prepared dataset (written atomically).", panel="Output")
    overwrite: bool = opt(False, "Replace an existing prepared dataset written by mmllm (never anything else).",
                          panel="Output")
    text_column: str = opt(None, "Column with the text (auto-detected: text, sentence, caption, prompt, ...).",
                           panel="Data")
    label_column: str = opt(None, "Column with the class label (auto-detected: label, class, category, intent, topic, "
                                  "sentiment, emotion, genre, ...).", panel="Data")
    target_column: str = opt(None, "Column with the target text for generation (auto-detected: target, ...).",
                             panel="Data")
    split_column: str = opt(None, "Column with train/validation/test (auto-detected: split).", panel="Data")
    id_column: str = opt(None, "Column with a record id (auto-detected: id); default: the row number.", panel="Data")
    text_model: str = opt("minilm", "Text model: alias, local Hugging Face folder or hub id.", panel="Model")
    max_text_tokens: int = opt(128, "Truncate text to this many tokens.", panel="Model")
    sequence_features: bool = opt(False, "Also store the media's token sequences (for attention fusion).",
                                  panel="Model")
    sentence_embedding: bool = opt(False, "Also store a frozen sentence embedding of the text.", panel="Model")
    keep_media: bool = opt(False, "Also store each medium's file bytes (image_bytes, ...): a vision-language "
                                  "--decoder reads the images with its own processor and encodes them itself.",
                           panel="Model")
    text_trunk_layers: int = opt(0, "Also store the text model's token states after layer L-K (its real tokens; "
                                    "bf16 when the encoders run bf16), so that finetune --train-text-layers K trains "
                                    "its top K layers without running the rest (0: off).", panel="Model")
    transcribe: bool = opt(None, "Transcribe the audio (speech recognition) and give the transcript to the text "
                                 "model as a second segment after the text (or as the text when there is none). "
                                 "Default: on when the data has audio and --audio-model is the embedded "
                                 "whisper-tiny.en (+11 accuracy points on the quality suite's spoken digits).",
                           panel="Model")
    transcribe_model: str = opt("whisper-tiny.en", "Whisper model for --transcribe: alias, local folder or hub id.",
                                panel="Model")
    transcript_reference_column: str = opt(None, "Column with the true transcript: prepare reports the WER of "
                                                 "--transcribe against it (auto-detected: transcript_reference, "
                                                 "reference).", panel="Data")
    val_fraction: float = opt(0.1, "Validation fraction when there is no split column (stratified).", panel="Data")
    test_fraction: float = opt(0.1, "Test fraction when there is no split column (stratified).", panel="Data")
    augment: int = opt(0, AUGMENT_BASE, panel="Data")  # the modalities' sentences are added by _modality_options
    on_error: str = opt("skip", "What a bad record does: skip it (reported) or fail the run.",
                        choices=("skip", "fail"), panel="Data")
    cache: bool = opt(True, "Reuse features cached by content hash + encoder identity + preprocessing.",
                      panel="Runtime")
    batch_size: int = opt(32, "Encoder batch size.", panel="Runtime")
    precision: str = opt("auto", "Frozen encoders: bf16 autocast (+ channels_last for conv nets) or fp32; auto: "
                                 "bf16 where the CPU has native bf16 (AMX, AVX-512 bf16) or on a GPU.",
                         choices=("auto", "fp32", "bf16"), panel="Runtime")
    num_workers: int = opt(0, "Threads that decode media while the encoders run.", panel="Runtime")
    engine: str = opt("local", "Where records are decoded and encoded: local (this process) or ray (encoder actors "
                               "on a Ray cluster, one per CPU, each loading the encoders once; needs pip install "
                               "'mmllm[ray]'). Both write the same prepared data.", choices=("local", "ray"),
                      panel="Runtime")
    ray_address: str = opt(None, "--engine ray: the cluster to use; auto: the running one (ray start), HOST:PORT or "
                                 "ray://HOST:10001: that one. Default: the running one on this machine, else a new "
                                 "local cluster.", panel="Runtime")
    shard_index: int = opt(0, "Which shard of the input this run prepares (0-based).", panel="Data")
    num_shards: int = opt(1, "Split the input into this many disjoint shards (job arrays).", panel="Data")
    merge: bool = opt(False, "Join prepared shard folders (given as INPUT...) into --output.", panel="Data")
    seed: int = opt(0, "Seed for splits and augmentation.", panel="Runtime")
    trust_remote_code: bool = opt(False, "Allow Hugging Face models that run their own code.", panel="Model")
    max_file_mb: int = opt(512, "Largest media file read, in MB; larger ones (and pipes, devices) are refused.",
                           panel="Data")


@dataclass
class FinetuneConfig:
    """Prepared dataset -> fine-tuned checkpoint folder."""

    prepared: str = opt(None, "Prepared dataset folder (from mmllm prepare).", argument=True, panel="Data")
    output: str = opt(None, "Checkpoint folder to write.", panel="Output")
    overwrite: bool = opt(False, "Replace an existing checkpoint written by mmllm (never anything else).",
                          panel="Output")
    report_to: str = opt("none", "Also log metrics to TensorBoard event files in OUTPUT/tensorboard "
                                 "(needs pip install 'mmllm[tensorboard]').", choices=("none", "tensorboard"),
                         panel="Output")
    task: str = opt(tasks.DEFAULT, "", panel="Model")  # help and choices: from the task registry
    modalities: str = opt(",".join(modalities.roles()), "Comma-separated modalities the model may use (default: all "
                                                           "that were prepared).", panel="Model")
    hidden_size: int = opt(256, "Width of the shared projection space and the head.", panel="Model")
    dropout: float = opt(0.1, "Dropout in projections, fusion and head.", panel="Model")
    lora_r: int = opt(0, "LoRA rank for the pretrained text model / decoder (0: off).", panel="Model")
    epochs: int = opt(None, "Maximum number of epochs (default: from --budget-steps; 0: save the untrained "
                            "model, e.g. as a baseline).", panel="Training")
    budget_steps: int = opt(None, "Without --epochs: train for about this many optimizer steps (default: {}; "
                                  "epochs = budget / steps per epoch, between 2 and 200).", panel="Training")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0: no limit).", panel="Training")
    batch_size: int = opt(32, "Records per batch (per process).", panel="Training")
    grad_accum: int = opt(1, "Gradient accumulation steps.", panel="Training")
    lr: float = opt(1e-3, "Learning rate of the new layers (projections, fusion, head).", panel="Training")
    backbone_lr: float = opt(3e-5, "Learning rate of the pretrained text model / decoder.", panel="Training")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (not the L2 penalty).", panel="Training")
    l2: float = opt(0.0, "L2 penalty: adds l2 * sum ||W||^2 over weight matrices to the loss.", panel="Training")
    l1: float = opt(0.0, "L1 penalty: adds l1 * sum |W| over weight matrices to the loss.", panel="Training")
    warmup_ratio: float = opt(0.1, "Fraction of steps for linear warmup (at most --max-warmup-steps).",
                              panel="Training")
    max_warmup_steps: int = opt(100, "Upper bound of the warmup, in optimizer steps.", panel="Training")
    schedule: str = opt("cosine", "Learning-rate schedule after warmup.", choices=("cosine", "linear", "constant"),
                        panel="Training")
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0: off).", panel="Training")
    precision: str = opt("fp32", "Training precision: fp32; bf16 (autocast); fp16 (autocast with a gradient scaler, "
                               "CUDA only).", choices=("fp32", "bf16", "fp16"), panel="Runtime")
    monitor: str = opt("val_loss", "Early-stopping metric.", panel="Early stopping")  # choices: the tasks' metrics
    patience: int = opt(5, "Stop when this many epochs have passed since the best one (0: never stop early). "
                           "A run never stops before --min-steps and a falling training loss.",
                        panel="Early stopping")
    min_steps: int = opt(None, "Early stopping waits for this many optimizer steps and the warmup, or for 10 "
                               "epochs when that is sooner (default: {}).",
                         panel="Early stopping")
    min_delta: float = opt(0.0, "Smallest change that counts as an improvement.", panel="Early stopping")
    min_rel_delta: float = opt(None, "Smallest change, relative to the best value so far, that counts as an "
                                     "improvement (0.01: 1%; default: {}).",
                               panel="Early stopping")
    resume: bool = opt(False, "Continue from the last resumable checkpoint in --output.", panel="Training")
    seed: int = opt(0, "Random seed.", panel="Runtime")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel="Runtime")
    threads: int = opt(0, "CPU threads for training (0: chosen for the work: one for small models over stored "
                          "features, every core when a text model or decoder runs each step; OMP_NUM_THREADS "
                          "when set).", panel="Runtime")

    def __post_init__(self):
        """Options left at None take their --task's default (`Task.fill`): the config holds what runs."""
        tasks.get(self.task if tasks.known(self.task) else tasks.DEFAULT).fill(self)


@dataclass
class EvalModelConfig:
    """Metrics of a checkpoint on a prepared folder or a raw manifest."""

    checkpoint: str = opt(None, "Checkpoint folder (from mmllm finetune).", argument=True, panel="Data")
    data: str = opt(None, "Prepared folder, or raw data featurized with the checkpoint's encoders: a manifest, "
                          "a folder of class subfolders or a save_to_disk folder.", argument=True, panel="Data")
    split: str = opt("test", "Split to evaluate.", panel="Data")
    output: str = opt(None, "Also write the metrics JSON (and confusion matrix PNG) here.", panel="Output")
    overwrite: bool = opt(False, "Replace an existing eval result written by mmllm (never anything else).",
                          panel="Output")
    reliance: bool = opt(None, "Also evaluate with each modality masked in turn. Default: on for classification, "
                               "off for generation (each masked modality generates the split again).",
                         panel="Output")
    batch_size: int = opt(64, "Batch size.", panel="Runtime")
    bleu_tokenize: str = opt("13a", "sacreBLEU tokenizer for generated text.", panel="Generation")
    max_new_tokens: int = opt(None, "Longest generated text (generation checkpoints; default: the checkpoint's, "
                                    "from its training answers' lengths).", panel="Generation")
    stop: list = opt([], "Generation ends at this string (repeatable; the checkpoint's own stops, e.g. a newline "
                         "when no training answer had one, also apply).", panel="Generation")
    num_beams: int = opt(1, "Beam search width (generation checkpoints).", panel="Generation")
    precision: str = opt("checkpoint", "Frozen encoders on a raw manifest: as the checkpoint's data was prepared, "
                                       "or auto, fp32, bf16.", choices=("checkpoint", "auto", "fp32", "bf16"),
                         panel="Runtime")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel="Runtime")
    max_file_mb: int = opt(512, "Largest media file read, in MB; larger ones (and pipes, devices) are refused.",
                           panel="Data")


@dataclass
class BleuConfig:
    """Corpus BLEU and chrF exactly as sacreBLEU computes them."""

    hyp: str = opt("-", "Hypotheses: a text file (one per line), JSONL with --field, or - for stdin.", panel="Data")
    ref: list = opt([], "Reference file(s); repeat --ref for multiple references.", panel="Data")
    field: str = opt(None, "Field of each --hyp JSON line (default: the first of prediction, text, hypothesis, "
                           "generated).", panel="Data")
    ref_field: str = opt(None, "Field of each --ref JSON line (default: the first of target, reference, text, "
                               "ref).", panel="Data")
    tokenize: str = opt("13a", "sacreBLEU tokenizer (13a, intl, zh, ja-mecab, char, none, ...).", panel="Metric")
    lowercase: bool = opt(False, "Case-insensitive BLEU.", panel="Metric")


@dataclass
class WerConfig:
    """Word and character error rates (WER, CER) exactly as jiwer computes them."""

    hyp: str = opt("-", "Hypotheses: a text file (one per line), JSONL with --field, or - for stdin.", panel="Data")
    ref: str = opt(None, "References: a text file (one per line) or JSONL (see --ref-field).", panel="Data")
    field: str = opt(None, "Field of each --hyp JSON line (default: the first of prediction, text, hypothesis, "
                           "generated, transcript).", panel="Data")
    ref_field: str = opt(None, "Field of each --ref JSON line (default: the first of target, reference, text, ref, "
                               "transcript).", panel="Data")


@dataclass
class FidConfig:
    """Frechet distance between the feature distributions of two image sets."""

    real: str = opt(None, "Folder or manifest of real images.", argument=True, panel="Data")
    generated: str = opt(None, "Folder or manifest of generated images.", argument=True, panel="Data")
    fid_model: str = opt(None, "NVIDIA's InceptionV3 TorchScript (inception-2015-12-05.pt; its 2048-d pool3 "
                               "features) for standard FID; default: the embedded image encoder, not comparable "
                               "to published FID.", panel="Model")
    image_model: str = opt("efficientnet-lite0", "Feature extractor when --fid-model is not given.", panel="Model")
    image_column: str = opt(None, "Image column when REAL/GENERATED are manifests.", panel="Data")
    batch_size: int = opt(32, "Batch size.", panel="Runtime")


@dataclass
class AccuracyConfig:
    """Accuracy, macro-F1 and confusion matrix of predictions made elsewhere."""

    pred: str = opt(None, "Predictions: .csv/.tsv/.parquet (column --pred-field; the header row names the "
                          "columns), JSONL (field --pred-field), or any other file: one label per line, every line "
                          "a label (no header).", panel="Data")
    gold: str = opt(None, "Gold labels: .csv/.tsv/.parquet (column --gold-field; the header row names the "
                          "columns), JSONL (field --gold-field), or any other file: one label per line, every line "
                          "a label (no header).", panel="Data")
    pred_field: str = opt("prediction", "Column (CSV/TSV/Parquet) or field (JSONL) of the predicted label.",
                          panel="Data")
    gold_field: str = opt("label", "Column (CSV/TSV/Parquet) or field (JSONL) of the gold label.", panel="Data")


@dataclass
class PredictConfig:
    """Stream predictions for raw records as JSON lines."""

    checkpoint: str = opt(None, "Checkpoint folder (from mmllm finetune).", argument=True, panel="Data")
    input: str = opt("-", "Manifest (CSV/JSONL/Parquet), folder of class subfolders, save_to_disk folder, or - for "
                         "JSONL on stdin.", argument=True, panel="Data")
    output: str = opt(None, "Write JSONL here instead of stdout.", panel="Output")
    overwrite: bool = opt(False, "Replace an existing predictions file written by mmllm (never anything else).",
                          panel="Output")
    top_k: int = opt(1, "Class probabilities per record (classification).", panel="Output")
    batch_size: int = opt(16, "Records per batch.", panel="Runtime")
    strict: bool = opt(False, "Stop at the first bad record.", panel="Data")
    max_new_tokens: int = opt(None, "Longest generated text (generation; default: the checkpoint's, from its "
                                    "training answers' lengths).", panel="Generation")
    stop: list = opt([], "Generation ends at this string (repeatable; the checkpoint's own stops, e.g. a newline "
                         "when no training answer had one, also apply).", panel="Generation")
    num_beams: int = opt(1, "Beam search width (generation).", panel="Generation")
    do_sample: bool = opt(False, "Sample instead of greedy/beam decoding (generation).", panel="Generation")
    temperature: float = opt(1.0, "Sampling temperature (generation).", panel="Generation")
    top_p: float = opt(1.0, "Nucleus sampling threshold (generation).", panel="Generation")
    precision: str = opt("checkpoint", "Frozen encoders: as the checkpoint's data was prepared, or auto, fp32, "
                                       "bf16.", choices=("checkpoint", "auto", "fp32", "bf16"), panel="Runtime")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel="Runtime")
    max_file_mb: int = opt(512, "Largest media file read, in MB; larger ones (and pipes, devices) are refused.",
                           panel="Data")
    max_line_mb: int = opt(16, "Longest JSON line read, in MB; longer lines get an error without being parsed.",
                           panel="Data")



@dataclass
class ServeConfig:
    """An HTTP JSON service over the same predictor as `mmllm predict`, with micro-batching."""

    checkpoint: str = opt(None, "Checkpoint folder (from mmllm finetune).", argument=True, panel="Data")
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0: every interface).", panel="Runtime")
    port: int = opt(8000, "TCP port (0: any free port, printed on stderr).", panel="Runtime")
    max_batch: int = opt(32, "Most records predicted together; concurrent requests share a batch.", panel="Runtime")
    batch_wait_ms: float = opt(5.0, "How long the first request of a batch waits for others to join.",
                               panel="Runtime")
    top_k: int = opt(1, "Default class probabilities per record (a request may pass ?top_k=N).", panel="Output")
    stop: list = opt([], "Generation ends at this string (repeatable), for every request, besides the checkpoint's "
                         "own stops and a request's `stop`.", panel="Output")
    max_request_mb: int = opt(64, "Largest request body, in MB (413 beyond).", panel="Data")
    max_file_mb: int = opt(512, "Largest media file read, in MB; larger ones (and pipes, devices) are refused.",
                           panel="Data")
    media_root: str = opt(None, "Folder whose regular files requests may name as media paths (relative to it; "
                                "symlinks and .. may not leave it). Without it every server-side path is refused: "
                                "send media as base64, a data: URI or a multipart upload.", panel="Data")
    allow_host: list = opt([], "A Host header name accepted besides localhost, 127.0.0.1, ::1 and --host "
                               "(repeatable; * accepts any): the names clients use, e.g. behind a proxy. Other "
                               "names get 421 and other web origins 403 (DNS rebinding, cross-site posts).",
                           panel="Runtime")
    max_records: int = opt(256, "Most records in one request (413 beyond).", panel="Data")
    max_connections: int = opt(64, "Most open connections and requests at once; beyond, 503.", panel="Runtime")
    request_timeout: float = opt(30.0, "Seconds a client has to send a request's headers, and again its body "
                                       "(the connection is closed / 408 beyond).", panel="Runtime")
    timeout_keep_alive: float = opt(5.0, "Seconds an idle keep-alive connection stays open.", panel="Runtime")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.", panel="Runtime")

def read_config_file(path: str | Path) -> dict:
    """Keys of a YAML or JSON config file (the command's option names, with - or _).

    YAML is read safely and without aliases (`*name`): a few hundred bytes of nested aliases expand to
    gigabytes. Values are converted to each option's type later, in `build`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: file not found: {p}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"--config: {p} is larger than {MAX_CONFIG_BYTES >> 20} MB: not a config file")
    text = utf8_text(p.read_bytes(), f"--config: {p}")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader()) or {}  # noqa: S506 - a SafeLoader subclass
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        first = " ".join(str(e).split())
        raise UserError(f"--config: cannot parse {p}: {first[:300]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {p} must hold a mapping of option names to values")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise UserError(f"--config: {p}: option names must be text (got {bad[0]!r})")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _yaml_loader() -> type:
    """yaml.SafeLoader that refuses aliases (anchors alone are harmless)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*name) are not allowed; write the value out")
            return super().compose_node(parent, index)

    return NoAliasLoader


def build(cls: type, file_values: dict, cli_values: dict, source: str | Path | None = None) -> Any:
    """Defaults <- config file <- explicit flags, each converted to its option's type; then validate
    everything at once (for `finetune --resume`, also against the interrupted run's options)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"--config {source}" if source else "--config"
    problems = [f"{where}: {unknown_option(k, fields)}" for k in sorted(set(file_values) - set(fields))]
    values = {}
    for given, name_of in ((file_values, lambda k: f"{where}: {k}"), (cli_values, flag)):
        for k, v in given.items():
            if k not in fields:
                continue
            try:
                values[k] = coerce(fields[k], v)
            except ValueError as e:
                problems.append(f"{name_of(k)}: {e}")
    cfg = cls(**values)
    problems += validate(cfg)
    if not problems and isinstance(cfg, FinetuneConfig) and cfg.resume:
        check_resume(cfg)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def unknown_option(name: str, known: Any) -> str:
    """The message for an unknown option `name`: its close matches among the names `known` (difflib), else all."""
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"options: {', '.join(sorted(known))}"
    return f"unknown option '{name}' ({hint})"


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` as the type of field `f` (str, int, float, bool, list); ValueError says what was expected.

    Strings that spell a number are numbers (YAML 1.1 reads `1e-3` as a string); numbers given for a
    text option become text; anything else that does not fit is refused."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if value is None:
        if f.default is None:
            return None
        raise ValueError("no value given (remove the key, or give a value)")
    if kind == "bool":
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if isinstance(value, bool) or word in _TRUE + _FALSE:
            return value if isinstance(value, bool) else word in _TRUE
        raise ValueError(f"expected true or false (got {_shown(value)})")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value, "a whole number")
        if number != int(number):
            raise ValueError(f"expected a whole number (got {_shown(value)})")
        return int(number)
    if kind == "float":
        return float(_number(value, "a number"))
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        hint = f", written as '{','.join(map(str, value))}'" if isinstance(value, list) and all(
            isinstance(v, (str, int, float)) for v in value) else ""
        raise ValueError(f"expected text{hint} (got {_shown(value)})")
    if kind == "list":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise ValueError(f"expected a list of text values (got {_shown(value)})")
        return [str(v) for v in items]
    return value


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _number(value: Any, expected: str) -> float | int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"expected {expected} (got {_shown(value)})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {expected} (got {_shown(value)})")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number (got {value})")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__} {json.dumps(value, default=str)[:60]}"
    return repr(value)[:60]


def validate(cfg: Any) -> list[str]:
    """Every problem with a config, each naming its flag."""
    problems = []
    ranged = {o.name for _, o in modalities.options() if o.low is not None}  # their rule says the whole range
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("choices") and v not in f.metadata["choices"]:
            problems.append(f"{flag(f.name)}: '{v}' is not one of {', '.join(f.metadata['choices'])}")
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{flag(f.name)}: must be a finite number (got {v})")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 and f.name not in ranged:
            problems.append(f"{flag(f.name)}: must be >= 0 (got {v})")
    for name in ("val_fraction", "test_fraction", "modality_dropout", "dropout", "warmup_ratio"):
        v = getattr(cfg, name, None)
        if v is not None and not 0 <= v < 1:
            problems.append(f"{flag(name)}: must be in [0, 1) (got {v})")
    for name in ("batch_size", "grad_accum", "num_shards", "hidden_size", "top_k", "num_beams",
                 "max_text_tokens", "max_new_tokens", "max_file_mb", "max_line_mb"):
        v = getattr(cfg, name, None)
        if v is not None and v < 1:
            problems.append(f"{flag(name)}: must be >= 1 (got {v})")
    if isinstance(cfg, PrepareConfig):
        if not cfg.input:
            problems.append("INPUT: give a manifest, a folder, or (with --merge) shard folders")
        elif len(cfg.input) > 1 and not cfg.merge:
            problems.append("INPUT: give one input (several only with --merge)")
        if not cfg.output:
            problems.append("--output: required")
        if cfg.shard_index >= cfg.num_shards:
            problems.append(f"--shard-index: must be < --num-shards ({cfg.num_shards})")
        if cfg.val_fraction + cfg.test_fraction >= 1:
            problems.append("--val-fraction + --test-fraction: must be < 1")
        problems += prepare_rules(cfg)
    if isinstance(cfg, FinetuneConfig):
        if not cfg.prepared:
            problems.append("PREPARED: required")
        if not cfg.output:
            problems.append("--output: required")
        mods = [m.strip() for m in cfg.modalities.split(",") if m.strip()]
        bad = [m for m in mods if m not in modalities.roles()]
        if bad or not mods:
            problems.append(f"--modalities: use a comma-separated subset of {','.join(modalities.roles())} (got "
                            f"'{cfg.modalities}')")
        problems += finetune_rules(cfg)
    if isinstance(cfg, EvalModelConfig) and (not cfg.checkpoint or not cfg.data):
        problems.append("CHECKPOINT and DATA: both required")
    if isinstance(cfg, BleuConfig) and not cfg.ref:
        problems.append("--ref: give at least one reference file")
    if isinstance(cfg, WerConfig) and not cfg.ref:
        problems.append("--ref: give the reference file")
    if isinstance(cfg, AccuracyConfig) and (not cfg.pred or not cfg.gold):
        problems.append("--pred and --gold: both required")
    if isinstance(cfg, FidConfig) and (not cfg.real or not cfg.generated):
        problems.append("REAL and GENERATED: both required")
    if isinstance(cfg, PredictConfig) and not cfg.checkpoint:
        problems.append("CHECKPOINT: required")
    if isinstance(cfg, PredictConfig):
        problems += sampling_rules(cfg)
    if isinstance(cfg, ServeConfig):
        problems += serve_rules(cfg)
    problems += device_rules(cfg)
    return problems


def default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def prepare_rules(cfg: PrepareConfig) -> list[str]:
    """Bounds and cross-option rules of `prepare`."""
    problems = []
    if cfg.augment > MAX_AUGMENT:
        problems.append(f"--augment: at most {MAX_AUGMENT} variants per record (got {cfg.augment})")
    if cfg.text_trunk_layers < 0:
        problems.append(f"--text-trunk-layers: must be >= 0 (got {cfg.text_trunk_layers})")
    for _, o in modalities.options():
        v = getattr(cfg, o.name)
        if (o.low is not None and not v > o.low) or (o.high is not None and not v <= o.high):
            problems.append(f"{flag(o.name)}: must be in ({o.low:g}, {o.high:g}] (got {v})")
    if cfg.ray_address is not None and cfg.engine != "ray" and not cfg.merge:
        problems.append("--ray-address: only used with --engine ray")
    if cfg.transcribe is False:
        problems += [f"{flag(n)}: only used with --transcribe" for n in ("transcribe_model",
                     "transcript_reference_column") if getattr(cfg, n) != default(PrepareConfig, n)]
    if cfg.merge:  # merging joins finished shards: the options that build a dataset were fixed back then
        ignored = [flag(n) for n in merge_ignores() if getattr(cfg, n, None) != default(PrepareConfig, n)]
        if ignored:
            problems.append(f"--merge: {', '.join(ignored)} do not apply when joining prepared shards "
                            "(they were fixed when each shard was prepared)")
    return problems


def finetune_rules(cfg: FinetuneConfig) -> list[str]:
    """Cross-option rules of `finetune`: what the task reads, what it produces, what excludes what."""
    problems = []
    task = tasks.get(cfg.task if tasks.known(cfg.task) else tasks.DEFAULT)
    if cfg.monitor not in task.metrics:
        problems.append(f"--monitor: --task {task.name} produces {', '.join(task.metrics)} (got {cfg.monitor})")
    for other in tasks.all():
        problems += [f"{flag(o.name)}: only used by --task {other.name} (this is --task {task.name})"
                     for o in other.options if other is not task and getattr(cfg, o.name) != o.default]
    mods = [m.strip() for m in cfg.modalities.split(",") if m.strip()]
    explicit = cfg.modalities != default(FinetuneConfig, "modalities")
    if len(set(mods)) != len(mods):
        problems.append(f"--modalities: each modality once (got '{cfg.modalities}')")
    problems += task.rules(cfg, mods, explicit)
    if cfg.max_steps and cfg.epochs == 0:
        problems.append("--max-steps: with --epochs 0 nothing is trained; give --epochs >= 1")
    if problem := fp16_rule(cfg.precision, cfg.device):
        problems.append(problem)
    return problems


def sampling_rules(cfg: PredictConfig) -> list[str]:
    """--temperature and --top-p shape sampling only: without --do-sample they would be ignored."""
    problems = []
    if cfg.temperature <= 0:
        problems.append(f"--temperature: must be > 0 (got {cfg.temperature})")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top-p: must be in (0, 1] (got {cfg.top_p})")
    if not cfg.do_sample:
        problems += [f"{flag(n)}: only used with --do-sample" for n in ("temperature", "top_p")
                     if getattr(cfg, n) != default(PredictConfig, n)]
    return problems


def serve_rules(cfg: ServeConfig) -> list[str]:
    """What `serve` needs before the model loads: a checkpoint, a media root that is a folder, a port, limits."""
    problems = []
    if not cfg.checkpoint:
        problems.append("CHECKPOINT: required")
    if cfg.media_root is not None and not Path(cfg.media_root).is_dir():
        problems.append(f"--media-root: not a folder: {cfg.media_root}")
    if not 0 <= cfg.port <= 65535:
        problems.append(f"--port: must be in 0..65535 (got {cfg.port})")
    for name in ("max_batch", "max_records", "max_request_mb", "max_connections"):
        if getattr(cfg, name) < 1:
            problems.append(f"{flag(name)}: must be >= 1 (got {getattr(cfg, name)})")
    for name in ("request_timeout", "timeout_keep_alive"):
        if not getattr(cfg, name) > 0:
            problems.append(f"{flag(name)}: must be > 0 seconds (got {getattr(cfg, name)})")
    bad = [h for h in cfg.allow_host if not h.strip() or any(c in h for c in " /@")]
    if bad:
        problems.append(f"--allow-host: a host name or address, without port or scheme (got {bad[0]!r})")
    return problems


def fp16_rule(precision: str, device: str) -> str | None:
    """The one statement of the fp16 rule: autocast with a gradient scaler needs CUDA. `device` is the option
    (auto passes until it is resolved) or the resolved device's type."""
    if precision == "fp16" and device.split(":")[0] not in ("auto", "cuda"):
        return f"--precision fp16: needs a CUDA GPU (this run is on {device}); use --precision bf16 or fp32"
    return None


def device_rules(cfg: Any) -> list[str]:
    """--device names a device kind this tool knows (whether it exists is checked by runtime.pick_device)."""
    device = getattr(cfg, "device", None)
    problem = device_grammar(str(device)) if device is not None else None
    return [problem] if problem else []


def device_grammar(device: str) -> str | None:
    """The one statement of what --device may say: auto, cpu, cuda, cuda:N or mps (None when it is one)."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        return f"--device: use auto, cpu, cuda, cuda:N or mps (got '{device}')"
    return None


def check_resume(cfg: FinetuneConfig) -> dict[str, tuple[Any, Any]]:
    """On --resume: refuse options that change the model or data, naming every key that differs from the
    interrupted run (its finetune_config.json); return the changed options that are applied {name: (old, new)}."""
    out = Path(cfg.output)
    saved_path = out / "finetune_config.json"
    if not (out / "resume").is_dir():
        return {}  # nothing to resume: the training loop says so
    try:
        saved = read_json(saved_path)
    except UserError:
        raise UserError(f"--resume: {saved_path} is missing or unreadable, so the interrupted run's options "
                        "are unknown; start a new --output") from None
    changed = {}
    for f in dataclasses.fields(cfg):
        old, new = saved.get(f.name, default(FinetuneConfig, f.name)), getattr(cfg, f.name)
        if f.name == "resume" or _same(f.name, old, new):
            continue
        if f.name in RESOLVED_AT_BUILD and new == default(FinetuneConfig, f.name):
            setattr(cfg, f.name, old)  # the value the interrupted run resolved from this same default
            continue
        changed[f.name] = (old, new)
    refused = [f"{k} ({old} -> {new})" for k, (old, new) in changed.items() if k not in RESUMABLE]
    if refused:
        raise UserError(f"--resume: {out} was trained with other values of options that change the model or "
                        f"data: {', '.join(refused)}; resume with the same values, or start a new --output")
    return changed


def _same(name: str, old: Any, new: Any) -> bool:
    if name in ("prepared", "output") and isinstance(old, str) and isinstance(new, str):
        return old == new or os.path.realpath(old) == os.path.realpath(new)
    if name == "modalities" and isinstance(old, str) and isinstance(new, str):
        return old.replace(" ", "") == new.replace(" ", "")
    return old == new


def save_resolved(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as JSON."""
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", encoding="utf-8")


def merge_ignores() -> tuple[str, ...]:
    """Prepare options fixed when each shard was prepared (--merge refuses them): MERGE_IGNORES and each
    modality's column, model and options."""
    return (*MERGE_IGNORES, *(n for m in modalities.inputs() for n in (f"{m}_column", f"{m}_model")),
            *(o.name for _, o in modalities.options()))


def _reshape(cls: type, added: dict[str, tuple[str, Any]], replaced: dict[str, Any], after: str = "") -> None:
    """Re-make dataclass `cls` in place with the fields `added` ({name: (type name, opt(...))}, placed after the
    field `after`, else last) in place of those added before, and the fields in `replaced` given new opt(...)s:
    every module holding `cls` sees the new shape."""
    current = {f.name: f for f in dataclasses.fields(cls)}
    annotations = cls.__dict__["__annotations__"]
    for name in getattr(cls, "_plugin_fields", ()):
        current.pop(name, None)
        annotations.pop(name, None)
        if name in cls.__dict__:
            delattr(cls, name)
    order = list(annotations)
    at = order.index(after) + 1 if after in order else len(order)
    order[at:at] = list(added)
    kinds = {**annotations, **{name: kind for name, (kind, _) in added.items()}}
    annotations.clear()
    annotations.update({name: kinds[name] for name in order})
    for name, f in current.items():
        setattr(cls, name, replaced.get(name, f))
    for name, (_, f) in added.items():
        setattr(cls, name, f)
    for attr in ("__init__", "__repr__", "__eq__", "__match_args__"):
        if attr in cls.__dict__:
            delattr(cls, attr)
    cls._plugin_fields = tuple(added)
    dataclass(cls)


def _field(o: Any) -> tuple[str, Any]:
    """A plug-in's Option as a config field."""
    return o.type_name(), opt(o.default, o.help, choices=o.choices, panel=o.panel)


def _per_task(name: str) -> str:
    """"1500 for classify, 80 for generate": the value each task gives a shared option left at None."""
    return ", ".join(f"{t.defaults[name]} for {t.name}" for t in tasks.all() if name in t.defaults) or "none"


def _plugin_options(*_: Any) -> None:
    """Keep the configs in step with the registries (at import, and on every (un)registration): prepare gets
    `--<m>-column`, `--<m>-model` and each modality's options, --augment's help its sentences; finetune gets each
    task's options, --task its choices, --monitor the tasks' metrics, the options whose default depends on the
    task their per-task defaults, and --modalities defaults to every input."""
    added: dict[str, tuple[str, Any]] = {}
    for m in modalities.all():
        if not m.carried_by:  # a part-only modality has no column, and shares the model of its encoder_of
            added[f"{m.name}_column"] = ("str", opt(None, m.column_help(), panel="Data"))
            added[f"{m.name}_model"] = ("str", opt(m.default_model, m.model_help, panel="Model"))
        for o in m.options:
            added[o.name] = _field(o)
    augment = " ".join([AUGMENT_BASE, *(m.augment_help for m in modalities.all() if m.augment_help)])
    _reshape(PrepareConfig, added, {"augment": opt(0, augment, panel="Data")})
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    replaced = {"modalities": opt(",".join(modalities.roles()), fields["modalities"].metadata["help"], panel="Model"),
                "task": opt(tasks.DEFAULT, " or ".join(t.help for t in tasks.all()) + ".", choices=tasks.names(),
                            panel="Model"),
                "monitor": opt("val_loss", fields["monitor"].metadata["help"],
                               choices=tuple(dict.fromkeys(m for t in tasks.all() for m in t.metrics)),
                               panel="Early stopping")}
    for name in ("budget_steps", "min_steps", "min_rel_delta"):
        f = fields[name]
        template = FinetuneConfig.__dict__.get("_templates", {}).get(name, f.metadata["help"])
        replaced[name] = opt(None, template.replace("{}", _per_task(name)), panel=f.metadata["panel"])
        FinetuneConfig._templates = {**FinetuneConfig.__dict__.get("_templates", {}), name: template}
    _reshape(FinetuneConfig, {o.name: _field(o) for t in tasks.all() for o in t.options}, replaced,
             after="modalities")


_plugin_options()
modalities.on_change(_plugin_options)
tasks.on_change(_plugin_options)
