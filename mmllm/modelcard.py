"""The model card (README.md) of a checkpoint: what it does, on what data, with which encoders, how well.

Written from the checkpoint's own config.json (task, labels, data counts, encoder identities, what was trained,
validation metrics), the finetune_config.json beside it (the command line) and metrics.json (which epoch's weights
were kept), so every sentence says only what the folder backs.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from mmllm import hub, tasks
from mmllm.metrics import F1_DEFINITION

METRIC_DEFINITIONS = {
    "val_loss": "validation loss: mean cross-entropy of the gold label (classification, class-weighted as in "
                "training) or of the target tokens (generation)",
    "val_accuracy": "share of validation records whose most probable label is the gold label",
    "val_f1": f"macro-F1 on the validation split: {F1_DEFINITION}",
    "val_bleu": "corpus BLEU of greedy outputs against the validation targets (sacreBLEU, 13a tokenization)",
    "val_chrf": "corpus chrF of greedy outputs against the validation targets (sacreBLEU)",
}
FILES = {"config.json": "model config, labels, encoder identities and preprocessing",
         "model.safetensors": "weights outside the Hugging Face folders (projections, fusion, head)",
         "finetune_config.json": "every option of the run that wrote this checkpoint",
         "metrics.json": "summary of the run (epochs, best epoch, validation metrics of the saved weights)",
         "metrics.jsonl": "one line of metrics per epoch"}


def data_summary(meta: dict) -> dict:
    """What a checkpoint records of its prepared data (config.json "data"): inputs, counts per split, skipped."""
    return {"input": list(meta.get("input", [])), "counts": dict(meta.get("counts", {})),
            "skipped": len(meta.get("skipped", []))}


def write(folder: Path, config: dict) -> None:
    """Write `folder/README.md` for the checkpoint whose config.json holds `config`."""
    (folder / "README.md").write_text(render(folder, config), encoding="utf-8")


def render(folder: Path, config: dict) -> str:
    task = tasks.of(config)
    mods = modalities(config)
    parts = [front_matter(config), f"# {folder.name.split('.tmp-')[0].lstrip('.')}\n",
             f"A {'multimodal ' if len(mods) > 1 else ''}{task.kind} trained with mmllm (`--task {task.name}`) on "
             f"{', '.join(mods)}.\n",
             usage(config), labels_section(config), data_section(config), encoders_section(config),
             metrics_section(config, run_summary(folder)), training_section(folder), files_section(config)]
    return "\n".join(p for p in parts if p)


def run_summary(folder: Path) -> dict:
    """metrics.json of the run (best epoch, schedule), or {} when absent or unreadable."""
    try:
        summary = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def modalities(config: dict) -> list[str]:
    return tasks.of(config).card_modalities(config)


def license_of(name: str) -> str:
    """The license of a built-in alias; for a folder, the `license:` of its own model card, when it has one."""
    if name in hub.ALIASES:
        return hub.ALIASES[name].license
    card = Path(name).expanduser() / "README.md"
    try:
        for line in card.read_text(encoding="utf-8").splitlines()[:40]:
            if line.lower().startswith("license:"):
                return line.split(":", 1)[1].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return "not recorded (see the model's own card)"


def front_matter(config: dict) -> str:
    tags = ["mmllm", "multimodal", *modalities(config)]
    lines = ["---", "library_name: mmllm", "tags:", *[f"- {t.replace(' ', '-')}" for t in tags]]
    lines += tasks.of(config).card_tags(config)
    return "\n".join(lines + ["---", ""])


def usage(config: dict) -> str:
    lines = ["## Use", "", "```bash", "mmllm predict CHECKPOINT records.jsonl   # or a manifest, or a class folder",
             "mmllm eval model CHECKPOINT data", "```"]
    lines += tasks.of(config).card_usage(config)
    return "\n".join(lines) + "\n"


def labels_section(config: dict) -> str:
    labels = config.get("labels") or []
    if not labels:
        return ""
    rows = [f"| {i} | {md(n)} |" for i, n in enumerate(labels)]
    return "\n".join([f"## Labels ({len(labels)})", "", "| id | label |", "|---|---|", *rows, ""])


def data_section(config: dict) -> str:
    data = config.get("data") or {}
    lines = ["## Data", ""]
    if config.get("prepared"):
        source = f" (from {', '.join(f'`{p}`' for p in data['input'])})" if data.get("input") else ""
        lines.append(f"Prepared dataset: `{config['prepared']}`{source}.")
    counts = data.get("counts")
    if counts:
        lines += ["", "| split | records |", "|---|---|", *[f"| {s} | {n} |" for s, n in counts.items()],
                  f"| skipped by prepare | {data.get('skipped', 0)} |"]
    else:
        lines.append("Record counts were not recorded in this checkpoint.")
    columns = {k: v for k, v in (config.get("columns") or {}).items() if v}
    if columns:
        lines += ["", "Columns: " + ", ".join(f"{k} <- `{v}`" for k, v in columns.items()) + "."]
    return "\n".join(lines) + "\n"


def encoders_section(config: dict) -> str:
    rows = []
    for role, enc in (config.get("encoders") or {}).items():
        name = str(enc.get("name", ""))
        rows.append(f"| {role} | `{md(name)}` | `{enc.get('identity', '')}` | {md(license_of(name))} | "
                    f"{enc.get('dim', '')} | {enc.get('precision', 'fp32')} |")
    rows += tasks.of(config).card_encoder_rows(config, license_of, md)
    if not rows:
        return ""
    return "\n".join(["## Encoders", "", "| role | name | identity | license | dim | precision |",
                      "|---|---|---|---|---|---|", *rows, "", *encoder_notes(config), ""])


def encoder_notes(config: dict) -> list[str]:
    """One sentence per kind of encoder: trained how (the task says), or frozen and identified by its weights'
    hash."""
    return tasks.of(config).card_notes(config, frozen_note)


def frozen_note(roles: list[str]) -> list[str]:
    """The sentence for the frozen encoders `roles` ([] without any)."""
    if not roles:
        return []
    verb = "is" if len(roles) == 1 else "are"
    return [f"The {' and '.join(roles)} encoder{'s' if len(roles) > 1 else ''} {verb} frozen and identified by a "
            f"hash of {'its' if len(roles) == 1 else 'their'} weights."]


def metrics_section(config: dict, summary: dict | None = None) -> str:
    metrics = {k: v for k, v in (config.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        return ""
    rows = [f"| {k} | {v:.4f} | {METRIC_DEFINITIONS.get(k, '')} |" for k, v in metrics.items()]
    return "\n".join(["## Metrics", "", f"Measured on the validation split with {weights_sentence(summary or {})}", "",
                      "| metric | value | definition |", "|---|---|---|", *rows, "", *selection_lines(config),
                      "The whole run: [metrics.json](metrics.json); per epoch: [metrics.jsonl](metrics.jsonl).", ""])


def selection_lines(config: dict) -> list[str]:
    """--fusion auto: which candidate this checkpoint is, why, and every candidate's validation metrics."""
    sel = config.get("selection")
    if not isinstance(sel, dict) or not isinstance(sel.get("candidates"), dict):
        return []
    rows = [f"| {md(name)}{' (kept)' if name == sel.get('kept') else ''} | "
            + " | ".join(f"{c.get(k):.4f}" if isinstance(c.get(k), (int, float)) else "-"
                         for k in ("val_loss", "val_accuracy", "val_f1", "seconds")) + " |"
            for name, c in sel["candidates"].items() if isinstance(c, dict)]
    return [f"Chosen by `--fusion auto`: {md(sel.get('kept'))}, {md(sel.get('why', ''))}. Candidates (linear: a "
            "logistic regression on the stored features; seconds: a probe's fit, a fusion model's training forward "
            "passes):", "", "| candidate | val_loss | val_accuracy | val_f1 | seconds |", "|---|---|---|---|---|",
            *rows, ""]


def weights_sentence(summary: dict) -> str:
    """Which weights the checkpoint holds (and the metrics measure), from the run's metrics.json."""
    best, epochs, monitor = summary.get("best_epoch"), summary.get("epochs"), summary.get("monitor")
    if not best or not epochs:
        return ("the weights saved here (the run's metrics.json is missing: which epoch they come from is not "
                "recorded)." if not summary else f"the weights saved here: those after {epochs or 0} epochs.")
    last = " (the last)" if best == epochs else f" of {epochs}"
    return f"the weights saved here: those of epoch {best}{last}, the best by `{monitor}`."


def training_section(folder: Path) -> str:
    lines = ["## Training", ""]
    command = command_line(folder / "finetune_config.json")
    if command:
        lines += ["Command line (from [finetune_config.json](finetune_config.json), options that differ from "
                  "the defaults; the file lists every option):", "", "```bash", command, "```", ""]
    lines += ["![training curves](training_curves.png)", "",
              "[training_curves.png](training_curves.png): loss and validation metrics per epoch.", ""]
    return "\n".join(lines)


DEFAULTS_DEPEND_ON = ("task", "lora_r", "modalities")  # FinetuneConfig resolves other defaults from these


def command_line(path: Path) -> str | None:
    """`mmllm finetune ...` with the options of a resolved finetune_config.json that differ from the defaults.

    The defaults are resolved as `FinetuneConfig` resolves them for the same --task, --lora-r and --modalities
    (--min-steps, --budget-steps, --freeze-text), and --epochs is left out when metrics.json says the run took
    its epochs from --budget-steps: an option shows only if the run had it other than by default."""
    import dataclasses

    from mmllm.config import FinetuneConfig, flag

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        # what a run given only the options other defaults depend on would hold; those options against the plain ones
        defaults = {**dataclasses.asdict(FinetuneConfig(**{k: values[k] for k in DEFAULTS_DEPEND_ON if k in values})),
                    **{k: v for k, v in dataclasses.asdict(FinetuneConfig()).items() if k in DEFAULTS_DEPEND_ON}}
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    schedule = run_summary(path.parent).get("schedule") or {}
    if schedule.get("epochs_from") == "--budget-steps":
        defaults["epochs"] = values.get("epochs")
    words = ["mmllm", "finetune", str(values.get("prepared", ""))]
    for f in dataclasses.fields(FinetuneConfig):
        if f.name == "prepared" or f.name not in values:
            continue
        value = values[f.name]
        if value == defaults[f.name]:
            continue
        if isinstance(value, bool):
            words.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif isinstance(value, list):
            words += [w for v in value for w in (flag(f.name), str(v))]
        elif value is not None:
            words += [flag(f.name), str(value)]
    return shlex.join(words)


def files_section(config: dict) -> str:
    files = dict(FILES)
    files.update(tasks.of(config).card_files(config))
    rows = [f"| [{name}]({name}) | {what} |" for name, what in files.items()]
    return "\n".join(["## Files", "", "| file | content |", "|---|---|", *rows, ""])


def md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
