"""The model card (README.md) of a checkpoint: what it does, on what data, with which encoders, how well.

Written from the checkpoint's own config.json (task, labels, data counts, encoder identities, final validation
metrics) and the finetune_config.json beside it (the command line), so it says nothing the folder cannot back.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from mmllm import hub
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
         "metrics.json": "summary of the run (epochs, best epoch, final validation metrics)",
         "metrics.jsonl": "one line of metrics per epoch"}


def data_summary(meta: dict) -> dict:
    """What a checkpoint records of its prepared data (config.json "data"): inputs, counts per split, skipped."""
    return {"input": list(meta.get("input", [])), "counts": dict(meta.get("counts", {})),
            "skipped": len(meta.get("skipped", []))}


def write(folder: Path, config: dict) -> None:
    """Write `folder/README.md` for the checkpoint whose config.json holds `config`."""
    (folder / "README.md").write_text(render(folder, config), encoding="utf-8")


def render(folder: Path, config: dict) -> str:
    task = config.get("task", "classify")
    parts = [front_matter(config), f"# {folder.name.split('.tmp-')[0].lstrip('.')}\n",
             f"A multimodal {'classifier' if task == 'classify' else 'text generator'} fine-tuned with mmllm "
             f"(`--task {task}`) on {', '.join(modalities(config))}.\n",
             usage(config), labels_section(config), data_section(config), encoders_section(config),
             metrics_section(config), training_section(folder), files_section(config)]
    return "\n".join(p for p in parts if p)


def modalities(config: dict) -> list[str]:
    if config.get("task") == "generate":
        return list(config["generation"]["modalities"]) or ["text prompts"]
    return list(config["model"]["modalities"])


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
    if config.get("task") == "classify" and "text" in config["model"]["modalities"]:
        lines.append("pipeline_tag: text-classification")
    return "\n".join(lines + ["---", ""])


def usage(config: dict) -> str:
    lines = ["## Use", "", "```bash", "mmllm predict CHECKPOINT records.jsonl   # or a manifest, or a class folder",
             "mmllm eval model CHECKPOINT data", "```"]
    if config.get("task") == "classify" and "text" in config["model"]["modalities"]:
        lines += ["", "The fine-tuned text model alone is a Hugging Face folder (LoRA adapters merged):", "",
                  "```python", "from transformers import AutoModel, AutoTokenizer",
                  'model = AutoModel.from_pretrained("CHECKPOINT/text_model")',
                  'tokenizer = AutoTokenizer.from_pretrained("CHECKPOINT/text_model")', "```"]
    elif config.get("task") == "generate":
        lines += ["", "When the decoder was trained (LoRA, merged, or --train-decoder), `decoder/` is a Hugging "
                  "Face folder for `AutoModelForCausalLM`; the image/audio prefix projector stays in "
                  "model.safetensors."]
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
    gen = config.get("generation")
    if gen:
        rows.append(f"| decoder | `{md(gen['decoder'])}` | `{gen.get('decoder_identity', '')}` | "
                    f"{md(license_of(gen['decoder']))} | | |")
    if not rows:
        return ""
    note = ("The text model is fine-tuned (its weights are in text_model/); image and audio encoders are frozen "
            "and identified by a hash of their weights." if config.get("task") == "classify" else
            "Encoders are frozen and identified by a hash of their weights.")
    return "\n".join(["## Encoders", "", "| role | name | identity | license | dim | precision |",
                      "|---|---|---|---|---|---|", *rows, "", note, ""])


def metrics_section(config: dict) -> str:
    metrics = {k: v for k, v in (config.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if not metrics:
        return ""
    rows = [f"| {k} | {v:.4f} | {METRIC_DEFINITIONS.get(k, '')} |" for k, v in metrics.items()]
    return "\n".join(["## Metrics (validation split, final weights)", "", "| metric | value | definition |",
                      "|---|---|---|", *rows, "", "The whole run: [metrics.json](metrics.json); per epoch: "
                      "[metrics.jsonl](metrics.jsonl).", ""])


def training_section(folder: Path) -> str:
    lines = ["## Training", ""]
    command = command_line(folder / "finetune_config.json")
    if command:
        lines += ["Command line (from [finetune_config.json](finetune_config.json), options that differ from "
                  "the defaults):", "", "```bash", command, "```", ""]
    lines += ["![training curves](training_curves.png)", "",
              "[training_curves.png](training_curves.png): loss and validation metrics per epoch.", ""]
    return "\n".join(lines)


def command_line(path: Path) -> str | None:
    """`mmllm finetune ...` with the options of a resolved finetune_config.json that differ from the defaults."""
    import dataclasses

    from mmllm.config import FinetuneConfig, flag

    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    words = ["mmllm", "finetune", str(values.get("prepared", ""))]
    for f in dataclasses.fields(FinetuneConfig):
        if f.name == "prepared" or f.name not in values:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = values[f.name]
        if value == default:
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
    if config.get("task") == "classify":
        files["labels.json"] = "label name -> id, a copy of config.json's labels (those are used; the two must agree)"
    if config.get("task") == "classify" and "text" in config["model"]["modalities"]:
        files["text_model/"] = "the fine-tuned text model and its tokenizer (Hugging Face folder)"
    if config.get("task") == "generate":
        files["decoder/"] = "the decoder's tokenizer and config (and its weights when it was trained)"
    rows = [f"| [{name}]({name}) | {what} |" for name, what in files.items()]
    return "\n".join(["## Files", "", "| file | content |", "|---|---|", *rows, ""])


def md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
