"""`--task classify`: the multimodal classifier over prepared features, its validation and predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm import checkpoint
from mmllm.batches import FeatureTable
from mmllm.errors import UserError
from mmllm.metrics import classification
from mmllm.model import TOKEN_FUSIONS, ModelConfig, build_model
from mmllm.modelcard import data_summary
from mmllm.runtime import Dist, gather, shard
from mmllm.tasks import Task


def build(cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Task:
    if not meta["labels"]:
        raise UserError(f"{cfg.prepared} has no labels: use a label column for --task classify")
    labels = meta["labels"]
    label_to_id = {n: i for i, n in enumerate(labels)}
    tokenizer = text_config = text_model = None
    if "text" in modalities:
        from mmllm.encoders import TextEncoder

        text = TextEncoder(meta["encoders"]["text"]["name"])
        if text.identity != meta["encoders"]["text"]["identity"]:
            raise UserError(f"text model {text.name} is now {text.identity}, prepared with "
                            f"{meta['encoders']['text']['identity']}: prepare again")
        tokenizer, text_config, text_model = text.tokenizer, text.config, text.build_model()
    pad_id = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
    sequence = uses_sequences(cfg.fusion, meta, modalities)
    enc = meta["encoders"]
    mcfg = ModelConfig(modalities=modalities, num_labels=len(labels), hidden_size=cfg.hidden_size, fusion=cfg.fusion,
                       dropout=cfg.dropout, text_dim=enc.get("text", {}).get("dim"),
                       image_dim=enc.get("image", {}).get("dim"), audio_dim=enc.get("audio", {}).get("dim"),
                       share_projections=cfg.share_projections, modality_dropout=cfg.modality_dropout,
                       freeze_text=cfg.freeze_text, lora_r=cfg.lora_r,
                       text_model_type=getattr(text_config, "model_type", None), sequence=sequence)
    model = build_model(mcfg, text_model).to(dist.device)
    cached = uses_cached_text(mcfg, meta)
    train_table = FeatureTable.from_split(data["train"], modalities, label_to_id, pad_id, sequence, cached)
    val = FeatureTable.from_split(data["validation"], modalities, label_to_id, pad_id, sequence, cached)
    if cfg.class_weights == "auto":
        model.class_weights = auto_class_weights(train_table.labels, len(labels)).to(dist.device)

    def save(model_: torch.nn.Module, out: Path, metrics: dict) -> None:
        info = {"task": "classify", "labels": labels, "encoders": meta["encoders"], "columns": meta["columns"],
                "preprocessing": meta["preprocessing"], "prepared": str(Path(cfg.prepared).resolve()),
                "data": data_summary(meta), "metrics": metrics}
        checkpoint.save(model_, out, info, tokenizer, text_config)

    return Task(model, train_table, lambda m: validate(m, val, labels, dist.device, cfg.batch_size, dist), save)


def uses_sequences(fusion: str, meta: dict, modalities: list[str]) -> bool:
    """Whether the fusion reads the stored image/audio sequences; says so when it would but they were not stored."""
    if fusion not in TOKEN_FUSIONS or not {"image", "audio"} & set(modalities):
        return False
    if meta["preprocessing"].get("sequence_features"):
        return True
    from mmllm.console import log

    log(f"fusion {fusion}: the prepared data has no image/audio sequences, so each enters as one pooled token "
        "(prepare with --sequence-features for the image grid and audio frames)")
    return False


def uses_cached_text(mcfg: ModelConfig, meta: dict) -> bool:
    """Whether training reads the frozen text model's pooled states stored by prepare instead of running it."""
    if not mcfg.cached_text:
        return False
    from mmllm.console import log

    cached = "text_pooled" in meta["features"]
    log("text model frozen: training reads its pooled states from the prepared data (computed once)" if cached else
        "text model frozen, but the prepared data has no pooled text states (prepared by an older mmllm): it runs "
        "in every step; prepare again to compute them once")
    return cached


def auto_class_weights(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse class frequency, normalized to mean 1."""
    counts = torch.bincount(labels[labels >= 0], minlength=n).float().clamp(min=1)
    w = counts.sum() / (n * counts)
    return w / w.mean()


@torch.no_grad()
def predict_table(model, table: FeatureTable, device, batch_size: int, drop: frozenset = frozenset(),
                  dist: Dist | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(probabilities (N, C), gold ids (N,), gate weights (N, M) or None) over a table.

    Under DDP each rank predicts its contiguous shard of the rows; the shards are gathered in rank order,
    so every rank returns the same arrays, in table order, as a single process would."""
    model.eval()
    probs, golds, gates = [], [], []
    rows = shard(len(table), dist)
    for start in range(rows.start, rows.stop, batch_size):
        batch = table.batch(range(start, min(rows.stop, start + batch_size)), device)
        gold = batch.pop("labels", None)
        out = model(batch, drop=drop)
        probs.append(out["logits"].float().softmax(-1).cpu())
        if gold is not None:
            golds.append(gold.cpu())
        if out["gates"] is not None:
            gates.append(out["gates"].float().cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, model.cfg.num_labels), dtype=np.float32)
    g = torch.cat(golds).numpy() if golds else np.full(len(p), -100)
    parts = gather((p, g, torch.cat(gates).numpy() if gates else None), dist)  # [(p, g, gates)] per rank
    kept_gates = [x[2] for x in parts if x[2] is not None]
    return (np.concatenate([x[0] for x in parts]), np.concatenate([x[1] for x in parts]),
            np.concatenate(kept_gates) if kept_gates else None)


def validate(model, val: FeatureTable, labels: list[str], device, batch_size: int, dist: Dist | None = None
             ) -> dict:
    """Validation loss (class-weighted like training), accuracy and macro-F1; sharded over DDP ranks."""
    probs, gold, _ = predict_table(model, val, device, batch_size, dist=dist)
    keep = gold >= 0
    logp = np.log(np.clip(probs[keep], 1e-12, 1))
    cw = model.class_weights
    w = cw.cpu().numpy()[gold[keep]] if cw is not None else np.ones(keep.sum())
    loss = float(-(w * logp[np.arange(keep.sum()), gold[keep]]).sum() / max(w.sum(), 1e-12))
    m = classification(gold, probs.argmax(1), labels)
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_f1": m["macro_f1"]}
