"""`mmllm eval model`: metrics of a checkpoint on prepared or raw data, with modality reliance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmllm import outputs, tasks
from mmllm.config import EvalModelConfig, save_resolved
from mmllm.console import emit, log, show


# ---------------------------------------------------------------- eval model

def run_model(cfg: EvalModelConfig) -> int:
    from mmllm.runtime import pick_device

    if cfg.output:
        check_outputs(cfg)
    device = pick_device(cfg.device)
    config = tasks.read_config(cfg.checkpoint)
    result = tasks.of(config).evaluate(cfg, config, device)
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
