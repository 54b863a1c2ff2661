"""Typed configs for every command: one dataclass per command, one line of help per field.

The CLI is generated from these fields (see `cli.py`), a `--config FILE.yaml|json` provides the same
keys, flags override the file, and `validate` reports every problem at once, naming the flag.
This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmllm.errors import UserError

ROLES = ("text", "image", "audio")


def opt(default: Any = None, help: str = "", argument: bool = False, choices: tuple = (),
        hidden: bool = False) -> Any:
    """A config field: default, help line, whether it is a positional CLI argument, allowed values."""
    meta = {"help": help, "argument": argument, "choices": choices, "hidden": hidden}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class PrepareConfig:
    """Manifest or folder -> prepared Arrow dataset with precomputed features."""

    input: list = opt([], "Manifest (CSV/JSONL/Parquet), folder of class subfolders, or a save_to_disk folder; "
                          "with --merge: the shard folders to join.", argument=True)
    output: str = opt(None, "Output folder for the prepared dataset (written atomically).")
    text_column: str = opt(None, "Column with the text (auto-detected: text, sentence, caption, prompt, ...).")
    image_column: str = opt(None, "Column with image paths (auto-detected: image, image_path, img, ...).")
    audio_column: str = opt(None, "Column with audio paths (auto-detected: audio, audio_path, wav, ...).")
    label_column: str = opt(None, "Column with the class label (auto-detected: label, class, category).")
    target_column: str = opt(None, "Column with the target text for generation (auto-detected: target, ...).")
    split_column: str = opt(None, "Column with train/validation/test (auto-detected: split).")
    id_column: str = opt(None, "Column with a record id (auto-detected: id); default: the row number.")
    text_model: str = opt("minilm", "Text model: alias, local Hugging Face folder or hub id.")
    image_model: str = opt("efficientnet-lite0", "Image encoder: alias, local folder or hub id.")
    audio_model: str = opt("whisper-tiny.en", "Audio encoder: alias (also logmel, mfcc), local folder or hub id.")
    max_text_tokens: int = opt(128, "Truncate text to this many tokens.")
    max_audio_seconds: float = opt(30.0, "Trim audio to this many seconds.")
    sequence_features: bool = opt(False, "Also store image/audio token sequences (for attention fusion).")
    sentence_embedding: bool = opt(False, "Also store a frozen sentence embedding of the text.")
    val_fraction: float = opt(0.1, "Validation fraction when there is no split column (stratified).")
    test_fraction: float = opt(0.1, "Test fraction when there is no split column (stratified).")
    augment: int = opt(0, "Augmented variants added per training record (images and audio).")
    on_error: str = opt("skip", "What a bad record does: skip it (reported) or fail the run.",
                        choices=("skip", "fail"))
    cache: bool = opt(True, "Reuse features cached by content hash + encoder identity + preprocessing.")
    batch_size: int = opt(32, "Encoder batch size.")
    num_workers: int = opt(0, "Threads that decode media while the encoders run.")
    shard_index: int = opt(0, "Which shard of the input this run prepares (0-based).")
    num_shards: int = opt(1, "Split the input into this many disjoint shards (job arrays).")
    merge: bool = opt(False, "Join prepared shard folders (given as INPUT...) into --output.")
    seed: int = opt(0, "Seed for splits and augmentation.")
    trust_remote_code: bool = opt(False, "Allow Hugging Face models that run their own code.")


@dataclass
class FinetuneConfig:
    """Prepared dataset -> fine-tuned checkpoint folder."""

    prepared: str = opt(None, "Prepared dataset folder (from mmllm prepare).", argument=True)
    output: str = opt(None, "Checkpoint folder to write.")
    task: str = opt("classify", "classify (label column) or generate (target column).",
                    choices=("classify", "generate"))
    modalities: str = opt("text,image,audio", "Comma-separated modalities the model may use.")
    fusion: str = opt("concat", "How modalities are fused.", choices=("concat", "gated", "attention"))
    hidden_size: int = opt(256, "Width of the shared projection space and the head.")
    dropout: float = opt(0.1, "Dropout in projections, fusion and head.")
    freeze_text: bool = opt(False, "Keep the pretrained text model frozen.")
    lora_r: int = opt(0, "LoRA rank for the pretrained text model / decoder (0: off).")
    share_projections: bool = opt(False, "One projection shared by image and audio (when dims match).")
    modality_dropout: float = opt(0.0, "Probability of dropping each modality of a training record.")
    epochs: int = opt(20, "Maximum number of epochs (0: save the untrained model, e.g. as a baseline).")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0: no limit).")
    batch_size: int = opt(32, "Records per batch (per process).")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    lr: float = opt(1e-3, "Learning rate of the new layers (projections, fusion, head).")
    backbone_lr: float = opt(3e-5, "Learning rate of the pretrained text model / decoder.")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (not the L2 penalty).")
    l2: float = opt(0.0, "L2 penalty: adds l2 * sum ||W||^2 over weight matrices to the loss.")
    l1: float = opt(0.0, "L1 penalty: adds l1 * sum |W| over weight matrices to the loss.")
    warmup_ratio: float = opt(0.1, "Fraction of steps for linear warmup.")
    schedule: str = opt("cosine", "Learning-rate schedule after warmup.", choices=("cosine", "linear", "constant"))
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0: off).")
    precision: str = opt("fp32", "Training precision.", choices=("fp32", "bf16"))
    monitor: str = opt("val_loss", "Early-stopping metric.", choices=("val_loss", "val_accuracy", "val_f1",
                                                                      "val_bleu"))
    patience: int = opt(3, "Epochs without improvement before stopping (0: never stop early).")
    min_delta: float = opt(0.0, "Smallest change that counts as an improvement.")
    class_weights: str = opt("none", "Loss weights per class.", choices=("none", "auto"))
    decoder: str = opt("smollm2-135m", "Causal LM for --task generate: alias, local folder or hub id.")
    prefix_tokens: int = opt(4, "Prefix tokens per modality fed to the decoder (--task generate).")
    train_decoder: bool = opt(False, "Fine-tune the whole decoder, not only the projector (--task generate).")
    max_new_tokens: int = opt(32, "Longest generated text during validation (--task generate).")
    resume: bool = opt(False, "Continue from the last resumable checkpoint in --output.")
    seed: int = opt(0, "Random seed.")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")
    num_workers: int = opt(0, "DataLoader worker processes.")
    trust_remote_code: bool = opt(False, "Allow Hugging Face models that run their own code.")


@dataclass
class EvalModelConfig:
    """Metrics of a checkpoint on a prepared folder or a raw manifest."""

    checkpoint: str = opt(None, "Checkpoint folder (from mmllm finetune).", argument=True)
    data: str = opt(None, "Prepared folder, or a raw manifest featurized with the checkpoint's encoders.",
                    argument=True)
    split: str = opt("test", "Split to evaluate.")
    output: str = opt(None, "Also write the metrics JSON (and confusion matrix PNG) here.")
    reliance: bool = opt(True, "Also evaluate with each modality masked in turn.")
    batch_size: int = opt(64, "Batch size.")
    bleu_tokenize: str = opt("13a", "sacreBLEU tokenizer for generated text.")
    max_new_tokens: int = opt(32, "Longest generated text (generation checkpoints).")
    num_beams: int = opt(1, "Beam search width (generation checkpoints).")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")


@dataclass
class BleuConfig:
    """Corpus BLEU and chrF exactly as sacreBLEU computes them."""

    hyp: str = opt("-", "Hypotheses: a text file (one per line), JSONL with --field, or - for stdin.")
    ref: list = opt([], "Reference file(s); repeat --ref for multiple references.")
    field: str = opt(None, "Field to read when a file is JSONL (default: text / prediction / target).")
    tokenize: str = opt("13a", "sacreBLEU tokenizer (13a, intl, zh, ja-mecab, char, none, ...).")
    lowercase: bool = opt(False, "Case-insensitive BLEU.")


@dataclass
class FidConfig:
    """Frechet distance between the feature distributions of two image sets."""

    real: str = opt(None, "Folder or manifest of real images.", argument=True)
    generated: str = opt(None, "Folder or manifest of generated images.", argument=True)
    fid_model: str = opt(None, "InceptionV3 TorchScript (inception-2015-12-05.pt) for standard FID; "
                               "default: the embedded image encoder.")
    image_model: str = opt("efficientnet-lite0", "Feature extractor when --fid-model is not given.")
    image_column: str = opt(None, "Image column when REAL/GENERATED are manifests.")
    batch_size: int = opt(32, "Batch size.")


@dataclass
class AccuracyConfig:
    """Accuracy, macro-F1 and confusion matrix of predictions made elsewhere."""

    pred: str = opt(None, "Predictions: JSONL (field `prediction`) or one label per line.")
    gold: str = opt(None, "Gold labels: JSONL/CSV (field `label`) or one label per line.")
    pred_field: str = opt("prediction", "Field with the predicted label in JSONL/CSV.")
    gold_field: str = opt("label", "Field with the gold label in JSONL/CSV.")


@dataclass
class PredictConfig:
    """Stream predictions for raw records as JSON lines."""

    checkpoint: str = opt(None, "Checkpoint folder (from mmllm finetune).", argument=True)
    input: str = opt("-", "Manifest (CSV/JSONL/Parquet), or - for JSONL on stdin.", argument=True)
    output: str = opt(None, "Write JSONL here instead of stdout.")
    top_k: int = opt(1, "Class probabilities per record (classification).")
    batch_size: int = opt(16, "Records per batch.")
    strict: bool = opt(False, "Stop at the first bad record.")
    max_new_tokens: int = opt(32, "Longest generated text (generation).")
    num_beams: int = opt(1, "Beam search width (generation).")
    do_sample: bool = opt(False, "Sample instead of greedy/beam decoding (generation).")
    temperature: float = opt(1.0, "Sampling temperature (generation).")
    top_p: float = opt(1.0, "Nucleus sampling threshold (generation).")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")


def read_config_file(path: str | Path) -> dict:
    """Keys of a YAML or JSON config file (the command's option names, with - or _)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: file not found: {p}")
    text = p.read_text(encoding="utf-8-sig")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"--config: cannot parse {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {p} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build(cls: type, file_values: dict, cli_values: dict) -> Any:
    """Defaults <- config file <- explicit flags; then validate everything at once."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    problems = [f"--config: unknown option '{k}'" for k in unknown]
    values = {k: v for k, v in file_values.items() if k in names}
    values.update(cli_values)
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            v = values[f.name]
            if isinstance(f.default, float) and isinstance(v, int) and not isinstance(v, bool):
                values[f.name] = float(v)
        is_list = f.default_factory is not dataclasses.MISSING  # list fields (opt([...])) are the only factories
        if f.name in values and is_list and isinstance(values[f.name], str):
            values[f.name] = [values[f.name]]
    cfg = cls(**values)
    problems += validate(cfg)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def validate(cfg: Any) -> list[str]:
    """Every problem with a config, each naming its flag."""
    problems = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("choices") and v not in f.metadata["choices"]:
            problems.append(f"{flag(f.name)}: '{v}' is not one of {', '.join(f.metadata['choices'])}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            problems.append(f"{flag(f.name)}: must be >= 0 (got {v})")
    for name in ("val_fraction", "test_fraction", "modality_dropout", "dropout", "warmup_ratio"):
        v = getattr(cfg, name, None)
        if v is not None and not 0 <= v < 1:
            problems.append(f"{flag(name)}: must be in [0, 1) (got {v})")
    for name in ("batch_size", "grad_accum", "num_shards", "hidden_size", "top_k", "num_beams",
                 "max_text_tokens", "max_new_tokens"):
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
    if isinstance(cfg, FinetuneConfig):
        if not cfg.prepared:
            problems.append("PREPARED: required")
        if not cfg.output:
            problems.append("--output: required")
        mods = [m.strip() for m in cfg.modalities.split(",") if m.strip()]
        bad = [m for m in mods if m not in ROLES]
        if bad or not mods:
            problems.append(f"--modalities: use a comma-separated subset of {','.join(ROLES)} (got '{cfg.modalities}')")
    if isinstance(cfg, EvalModelConfig) and (not cfg.checkpoint or not cfg.data):
        problems.append("CHECKPOINT and DATA: both required")
    if isinstance(cfg, BleuConfig) and not cfg.ref:
        problems.append("--ref: give at least one reference file")
    if isinstance(cfg, AccuracyConfig) and (not cfg.pred or not cfg.gold):
        problems.append("--pred and --gold: both required")
    if isinstance(cfg, FidConfig) and (not cfg.real or not cfg.generated):
        problems.append("REAL and GENERATED: both required")
    if isinstance(cfg, PredictConfig) and not cfg.checkpoint:
        problems.append("CHECKPOINT: required")
    return problems


def save_resolved(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as JSON."""
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n", encoding="utf-8")
