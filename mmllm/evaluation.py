"""`mmllm eval model`: metrics of a checkpoint on prepared or raw data, with modality reliance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmllm.config import EvalModelConfig, save_resolved
from mmllm.console import emit, log, show, warn
from mmllm.errors import UserError
from mmllm.metrics import classification, error_rates


# ---------------------------------------------------------------- eval model

def run_model(cfg: EvalModelConfig) -> int:
    from mmllm import checkpoint
    from mmllm.runtime import pick_device

    device = pick_device(cfg.device)
    config = checkpoint.read_config(cfg.checkpoint)
    if config.get("task") == "generate":
        result = eval_generation(cfg, config, device)
    else:
        result = eval_classification(cfg, device)
    print_table(result)
    if cfg.output:
        write_outputs(result, Path(cfg.output))
        save_resolved(cfg, Path(cfg.output).with_suffix(".config.json"))
    emit(result)
    return 0


def eval_classification(cfg: EvalModelConfig, device: Any) -> dict:
    import torch

    from mmllm import checkpoint
    from mmllm.batches import FeatureTable
    from mmllm.tasks.classify import predict_table

    model, config, tokenizer = checkpoint.load(cfg.checkpoint, device)
    labels = config["labels"]
    mods = model.cfg.modalities
    pad = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
    columns, source = eval_columns(cfg, config, mods)
    table = FeatureTable(columns, mods, {n: i for i, n in enumerate(labels)}, pad, model.cfg.sequence)
    unseen = sorted({lab for lab in table.label_names if lab is not None and lab not in labels})
    if unseen:
        warn(f"{sum(lab in unseen for lab in table.label_names)} records have labels unseen in training "
             f"({', '.join(unseen[:5])}): counted as errors")
    with torch.no_grad():
        probs, _, gates = predict_table(model, table, device, cfg.batch_size)
    # a label unseen in training can never be predicted: score it as a miss, not as absent
    names = labels + unseen
    gold = np.array([names.index(lab) if lab is not None else -100 for lab in table.label_names])
    if not (gold >= 0).any():
        raise UserError(f"{cfg.data}: no labelled records in split '{cfg.split}'")
    padded = np.concatenate([probs, np.zeros((len(probs), len(unseen)))], 1) if unseen else probs
    result: dict[str, Any] = {"task": "classify", "checkpoint": str(cfg.checkpoint), "data": source,
                              "split": cfg.split, **classification(gold, padded.argmax(1), names, padded)}
    if cfg.reliance:
        result["reliance"] = reliance(model, table, device, cfg.batch_size, names, gold, len(unseen), result, gates)
    return result


def eval_generation(cfg: EvalModelConfig, config: dict, device: Any) -> dict:
    from mmllm.tasks.generate import GenTable, bleu_of, load_checkpoint

    model, tokenizer = load_checkpoint(Path(cfg.checkpoint), config, device)
    mods = model.cfg.modalities
    columns, source = eval_columns(cfg, config, mods)
    table = GenTable(columns, mods, tokenizer, with_targets=False)
    if not any(table.targets):
        raise UserError(f"{cfg.data}: no target texts in split '{cfg.split}'")
    args = (tokenizer, cfg.batch_size, device, cfg.max_new_tokens, cfg.num_beams, cfg.bleu_tokenize)
    scored = bleu_of(model, table, *args)
    rates = error_rates(scored["hypotheses"], table.targets)
    result: dict[str, Any] = {"task": "generate", "checkpoint": str(cfg.checkpoint), "data": source,
                              "split": cfg.split, "n": len(table), "bleu": scored["val_bleu"],
                              "chrf": scored["val_chrf"], "bleu_signature": scored["bleu_signature"],
                              **{k: v for k, v in rates.items() if k != "n"},
                              "examples": [{"id": i, "generated": h, "target": t} for i, h, t in
                                           list(zip(table.ids, scored["hypotheses"], table.targets))[:5]]}
    if cfg.reliance and mods:
        masked = {"none": {"bleu": result["bleu"], "chrf": result["chrf"]}}
        for m in mods:
            b = bleu_of(model, table, *args, drop=frozenset({m}))
            masked[m] = {"bleu": b["val_bleu"], "chrf": b["val_chrf"], "bleu_drop": result["bleu"] - b["val_bleu"]}
        result["reliance"] = {"masked": masked}
    return result


def eval_columns(cfg: EvalModelConfig, config: dict, mods: list[str]) -> tuple[dict, str]:
    """Columns of the split: a prepared folder (encoders checked) or a raw manifest featurized on the fly."""
    from mmllm.features import META, load_prepared

    data = Path(cfg.data)
    if (data / META).is_file():
        ds, meta = load_prepared(data)
        for role in mods:
            mine, theirs = config["encoders"][role]["identity"], meta["encoders"].get(role, {}).get("identity")
            if mine != theirs:
                raise UserError(f"{data} was prepared with other encoders: {role} is {theirs}, the checkpoint "
                                f"was trained on {mine}; prepare it again with --{role}-model "
                                f"{config['encoders'][role]['name']}")
        if cfg.split not in ds:
            raise UserError(f"--split: {data} has no split '{cfg.split}' (has: {', '.join(ds)})")
        return ds[cfg.split].with_format("numpy")[:], str(data)
    from mmllm.records import raw_records
    from mmllm.features import config_from_checkpoint, encoders_for_checkpoint, featurize

    encoders = encoders_for_checkpoint(Path(cfg.checkpoint), config)
    records = []
    for item in raw_records(str(data), config):
        if isinstance(item, tuple):
            warn(f"skipped record {item[0]['id']}: {item[1].reason}")
        elif item.get("split") in (None, cfg.split):
            item["split"] = cfg.split
            records.append(item)
    rows, bad = featurize(records, encoders, config_from_checkpoint(config))
    for e in bad:
        warn(f"skipped record {e['id']}: {e['reason']}")
    if not rows:
        raise UserError(f"{data}: no usable records for split '{cfg.split}'")
    return {k: [r.get(k) for r in rows] for k in rows[0]}, str(data)


def reliance(model, table, device, batch_size: int, names: list[str], gold: np.ndarray, n_unseen: int,
             full: dict, gates: np.ndarray | None) -> dict:
    """Metrics with each modality masked in turn (and mean gate weights for gated fusion)."""
    from mmllm.tasks.classify import predict_table

    rows = {"none": {"accuracy": full["accuracy"], "macro_f1": full["macro_f1"]}}
    for m in model.cfg.modalities:
        probs, _, _ = predict_table(model, table, device, batch_size, drop=frozenset({m}))
        if n_unseen:
            probs = np.concatenate([probs, np.zeros((len(probs), n_unseen))], 1)
        r = classification(gold, probs.argmax(1), names)
        rows[m] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                   "accuracy_drop": full["accuracy"] - r["accuracy"]}
    out: dict[str, Any] = {"masked": rows}
    if gates is not None:
        out["mean_gate"] = {m: float(g) for m, g in zip(model.cfg.modalities, gates.mean(0))}
    return out


def print_table(result: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{result['split']}: {result['n']} records")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("accuracy", "macro_f1", "ece", "bleu", "chrf", "wer", "cer"):
        if k in result:
            t.add_row(k, f"{result[k]:.4f}")
    show(t)
    rel = result.get("reliance")
    if rel:
        r = Table(title="modality reliance (metrics with the modality masked)")
        keys = [k for k in next(iter(rel["masked"].values()))]
        for c in ["masked", *keys, "drop", "mean gate"]:
            r.add_column(c, justify="right" if c != "masked" else "left")
        for m, v in rel["masked"].items():
            gate = rel.get("mean_gate", {}).get(m)
            drop = v.get("accuracy_drop", v.get("bleu_drop", 0))
            r.add_row(m, *[f"{v[k]:.4f}" for k in keys], f"{drop:+.4f}", f"{gate:.3f}" if gate is not None else "-")
        show(r)


def write_outputs(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    cm = result.get("confusion_matrix")
    if cm:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m = np.array(cm["matrix"])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(m), 1 + 0.6 * len(m)))
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(m)), cm["labels"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(m)), cm["labels"], fontsize=7)
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        fig.tight_layout()
        fig.savefig(path.with_name(path.stem + "_confusion.png"), dpi=100)
        plt.close(fig)
    log(f"wrote {path}")
