"""A checkpoint is a folder that describes itself.

    model.safetensors      all weights (text model included)
    config.json            model config, labels, encoder identities + preprocessing, task
    labels.json            label map (name -> id)
    text_model/            the text model's Hugging Face config + tokenizer files (no weights)
    metrics.jsonl, metrics.json, finetune_config.json, training_curves.png   (written by finetune)
Loading needs nothing else, reads only JSON and safetensors, and never runs remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmllm.errors import UserError
from mmllm.model import ModelConfig, MultimodalClassifier, build_model

FORMAT = "mmllm-checkpoint"
VERSION = 1


def save(model: MultimodalClassifier, folder: Path, info: dict, tokenizer: Any, text_config: Any) -> None:
    """Write weights + self-description into `folder` (which the caller renames into place)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(file_tensors(unwrap(model).state_dict()), str(folder / "model.safetensors"), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "model": unwrap(model).cfg.to_dict(), **info}
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps({n: i for i, n in enumerate(info.get("labels", []))}, indent=2,
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "text_model")
        text_config.save_pretrained(folder / "text_model")


def file_tensors(state: dict) -> dict:
    """Contiguous CPU tensors for safetensors; tied weights (shared storage) are written as separate copies."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def unwrap(model: torch.nn.Module) -> Any:
    return getattr(model, "module", model)


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not an mmllm checkpoint (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{folder} is not an mmllm checkpoint (config.json has no format '{FORMAT}')")
    return config


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[MultimodalClassifier, dict, Any]:
    """(model in eval mode, checkpoint config, tokenizer or None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    mcfg = ModelConfig(**config["model"])
    tokenizer = text_model = None
    if "text" in mcfg.modalities:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from mmllm.console import quiet_transformers

        quiet_transformers()
        tokenizer = AutoTokenizer.from_pretrained(folder / "text_model", trust_remote_code=False)
        text_model = AutoModel.from_config(AutoConfig.from_pretrained(folder / "text_model", trust_remote_code=False))
    model = build_model(mcfg, text_model)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder}: missing model.safetensors")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: not a valid safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:200]
        raise UserError(f"{folder}: config.json and model.safetensors disagree ({first.strip()})") from None
    return model.to(device).eval(), config, tokenizer
