"""`mmllm eval model`: metrics of a checkpoint on prepared or raw data, with modality reliance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmllm import outputs
from mmllm.config import EvalModelConfig, save_resolved
from mmllm.console import emit, log, show, warn
from mmllm.errors import UserError
from mmllm.metrics import classification, error_rates


# ---------------------------------------------------------------- eval model

def run_model(cfg: EvalModelConfig) -> int:
    from mmllm import checkpoint
    from mmllm.runtime import pick_device

    if cfg.output:
        check_outputs(cfg)
    device = pick_device(cfg.device)
    config = checkpoint.read_config(cfg.checkpoint)
    if config.get("task") == "generate":
        result = eval_generation(cfg, config, device)
    else:
        result = eval_classification(cfg, device)
    print_table(result)
    if cfg.output:
        write_outputs(result, Path(cfg.output))
        with outputs.atomic_file(outputs.config_path(cfg.output)) as tmp:
            save_resolved(cfg, tmp)
    emit(result)
    return 0


def check_outputs(cfg: EvalModelConfig) -> None:
    """Before any work: refuse an --output (or the config and plot written beside it) that is an input, or
    exists and is not mmllm's of the same kind, or is and --overwrite was not given (mmllm.outputs)."""
    out = Path(cfg.output)
    for path, kind in ((out, outputs.EVAL_RESULT), (outputs.config_path(out), outputs.RESOLVED_CONFIG),
                       (confusion_path(out), outputs.PLOT)):
        outputs.check(path, kind, [cfg.checkpoint, cfg.data], cfg.overwrite)


def confusion_path(out: Path) -> Path:
    return out.with_name(out.stem + "_confusion.png")


def eval_classification(cfg: EvalModelConfig, device: Any) -> dict:
    import torch

    from mmllm import checkpoint
    from mmllm.batches import FeatureTable
    from mmllm.tasks.classify import predict_table

    model, config, tokenizer = checkpoint.load(cfg.checkpoint, device)
    labels = config["labels"]
    mods = model.cfg.modalities
    pad = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
    columns, source, split = eval_columns(cfg, config, mods, model.cfg.cached_text)
    table = FeatureTable(columns, mods, {n: i for i, n in enumerate(labels)}, pad, model.cfg.sequence,
                         model.cfg.cached_text)
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
                              "split": split, **classification(gold, padded.argmax(1), names, padded)}
    if cfg.reliance is not False:
        result["reliance"] = reliance(model, table, device, cfg.batch_size, names, gold, len(unseen), result, gates)
    return result


def eval_generation(cfg: EvalModelConfig, config: dict, device: Any) -> dict:
    from mmllm.tasks.generate import GenTable, bleu_of, load_checkpoint

    model, tokenizer = load_checkpoint(Path(cfg.checkpoint), config, device)
    mods = model.cfg.modalities
    columns, source, split = eval_columns(cfg, config, mods, transcripts=model.reads_transcripts)
    table = GenTable(columns, mods, tokenizer, with_targets=False, kind=model.cfg.prompt_format,
                     sequences=tuple(model.cfg.sequenced()))
    if not any(table.targets):
        raise UserError(f"{cfg.data}: no target texts in split '{cfg.split}'")
    args = (tokenizer, cfg.batch_size, device, cfg.max_new_tokens, cfg.num_beams, cfg.bleu_tokenize, cfg.stop)
    scored = bleu_of(model, table, *args)
    rates = error_rates(scored["hypotheses"], table.targets)
    result: dict[str, Any] = {"task": "generate", "checkpoint": str(cfg.checkpoint), "data": source,
                              "split": split, "n": len(table), "bleu": scored["val_bleu"],
                              "chrf": scored["val_chrf"], "bleu_signature": scored["bleu_signature"],
                              **{k: v for k, v in rates.items() if k != "n"},
                              "examples": [{"id": i, "generated": h, "target": t} for i, h, t in
                                           list(zip(table.ids, scored["hypotheses"], table.targets))[:5]]}
    if cfg.reliance is None and mods:
        log("reliance: not computed for a generation checkpoint unless asked (it generates the split once more "
            "per modality): --reliance")
    if cfg.reliance and mods:
        masked = {"none": {"bleu": result["bleu"], "chrf": result["chrf"]}}
        for m in mods:
            b = bleu_of(model, table, *args, drop=frozenset({m}))
            masked[m] = {"bleu": b["val_bleu"], "chrf": b["val_chrf"], "bleu_drop": result["bleu"] - b["val_bleu"]}
        result["reliance"] = {"masked": masked}
    return result


def eval_columns(cfg: EvalModelConfig, config: dict, mods: list[str], text_states: bool = False,
                 transcripts: bool | None = None) -> tuple[dict, str, str]:
    """(columns, source, split name) of the split: a prepared folder (encoders checked) or a raw manifest
    featurized on the fly."""
    from mmllm.features import META, label_strings, load_prepared

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
        part = ds[cfg.split]
        if "text_trunk" in part.column_names:  # the checkpoint holds the whole text model: it runs on the token ids
            part = part.remove_columns("text_trunk")
        columns = part.with_format("numpy")[:]
        columns["label"] = label_strings(ds[cfg.split])  # names (the prepared column is a ClassLabel of ids)
        return columns, str(data), cfg.split
    from mmllm.records import raw_records
    from mmllm.features import checkpoint_preprocessing, encoders_for_checkpoint, featurize

    encoders = encoders_for_checkpoint(Path(cfg.checkpoint), config, precision=cfg.precision, text_states=text_states,
                                       transcripts=transcripts)
    records = []
    for item in raw_records(str(data), config):
        if isinstance(item, tuple):
            warn(f"skipped record {item[0]['id']}: {item[1].reason}")
        else:
            records.append(item)
    records, split = raw_split(records, cfg.split, data)
    rows, bad = featurize(records, encoders, checkpoint_preprocessing(config, cfg.max_file_mb))
    for e in bad:
        warn(f"skipped record {e['id']}: {e['reason']}")
    if not rows:
        raise UserError(f"{data}: no usable records for split '{split}'")
    return {k: [r.get(k) for r in rows] for k in rows[0]}, str(data), split


def raw_split(records: list[dict], wanted: str, data: Path) -> tuple[list[dict], str]:
    """The records of split `wanted` of a raw manifest, and the split's name. Without split values every record
    is used, under the name "all"; a split the manifest does not have is an error."""
    from mmllm.records import SPLIT_NAMES

    present = sorted({r["split"] for r in records if r.get("split")})
    if not present:
        warn(f"{data} has no split column: evaluating all {len(records)} records (reported as split 'all')")
        return [dict(r, split="all") for r in records], "all"
    name = SPLIT_NAMES.get(wanted.strip().lower(), wanted.strip().lower())
    if name not in present:
        raise UserError(f"--split: {data} has no split '{wanted}' (has: {', '.join(present)})")
    unsplit = sum(not r.get("split") for r in records)
    if unsplit:
        warn(f"{unsplit} records of {data} have no split value: not evaluated")
    return [r for r in records if r.get("split") == name], name


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
    """The result JSON and (classification) the confusion matrix PNG, each written beside and renamed."""
    with outputs.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cm = result.get("confusion_matrix")
    if cm:
        import matplotlib.pyplot as plt

        fig = confusion_figure(cm["matrix"], cm["labels"])
        with outputs.atomic_file(confusion_path(path)) as tmp:
            fig.savefig(tmp, dpi=100, format="png", metadata=outputs.PNG_INFO)
        plt.close(fig)
    log(f"wrote {path}")


# past this many classes the image shows those with the most gold records (the JSON has all): at most 60 x 60 counts
PLOT_CLASSES = 60


def confusion_figure(matrix: list[list[int]], labels: list[str], top: int = PLOT_CLASSES):
    """The confusion matrix as a figure: cells ~0.5 inch each (the image grows with the classes), every count
    written in its cell, white on dark cells and black on light ones, font sized to the cell.

    Past `top` classes only the `top` with the most gold records are drawn (their rows and columns, titled so):
    memory and time stay bounded whatever the number of classes (600 classes once took 10 GB, one text per cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    total = len(m)
    title = None
    if total > top:
        keep = np.sort(np.argsort(-m.sum(1), kind="stable")[:top])  # most gold records; ties: the first labels
        m, labels = m[np.ix_(keep, keep)], [labels[i] for i in keep]
        title = f"the {top} of {total} classes with the most gold records (all {total} in the JSON)"
    n = len(m)
    cell = 0.5 if n <= 40 else max(0.25, 20 / n)  # inches per class: huge label sets stay under ~20-25 inches
    side = 2.5 + cell * n  # room for the tick labels
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())) if m.size else 1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    digits = len(str(int(m.max()))) if m.size else 1
    font = max(4.0, min(11.0, 36 * cell, 100 * cell / digits))  # points (1/72 inch): the count fits its cell
    tick_font = max(5.0, min(10.0, cell * 72 * 0.5))
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=tick_font)
    ax.set_yticks(range(n), labels, fontsize=tick_font)
    threshold = m.max() / 2 if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=font,
                    color="white" if m[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
