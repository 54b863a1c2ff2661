"""`--task classify`: the multimodal classifier over prepared features, its validation and predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm import checkpoint
from mmllm.batches import FeatureTable
from mmllm.errors import UserError
from mmllm.tasks.classify import AUTO_FUSIONS
from mmllm.console import log, warn
from mmllm.metrics import classification, collapse, collapse_warning
from mmllm.model import TOKEN_FUSIONS, ModelConfig, build_model
from mmllm import modelcard
from mmllm.modelcard import data_summary
from mmllm.runtime import Dist, gather, shard
from mmllm.tasks import Training, get, missing_column
from mmllm.tasks.candidates import CandidateSet, better, choose, fit_probe


def build(cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Training:
    if not meta["labels"]:
        raise UserError(missing_column(cfg.prepared, meta, get(cfg.task)))
    labels = meta["labels"]
    label_to_id = {n: i for i, n in enumerate(labels)}
    tokenizer = text_config = text_model = None
    if "text" in modalities:
        from mmllm.encoders import TextEncoder

        text = TextEncoder(meta["encoders"]["text"]["name"])
        if text.identity != meta["encoders"]["text"]["identity"]:
            raise UserError(f"text model {text.name} is now {text.identity}, prepared with "
                            f"{meta['encoders']['text']['identity']}: prepare again")
        tokenizer, text_config = text.tokenizer, text.config
        text_model = top_layers(cfg, meta, text) if cfg.train_text_layers else text.build_model()
    elif cfg.train_text_layers:
        raise UserError(f"--train-text-layers {cfg.train_text_layers}: needs the text modality (training uses "
                        f"{', '.join(modalities)})")
    pad_id = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
    enc = meta["encoders"]
    fusions = candidate_fusions(cfg, modalities)
    sequence = any(uses_sequences(f, meta, modalities) for f in fusions)

    def model_config(fusion: str, mods: list[str]) -> ModelConfig:
        return ModelConfig(modalities=mods, num_labels=len(labels), hidden_size=cfg.hidden_size, fusion=fusion,
                           dropout=cfg.dropout, text_dim=enc.get("text", {}).get("dim"),
                           dims={m: enc[m]["dim"] for m in mods if m != "text"},
                           share_projections=cfg.share_projections, modality_dropout=cfg.modality_dropout,
                           freeze_text=cfg.freeze_text, lora_r=cfg.lora_r,
                           train_text_layers=cfg.train_text_layers if "text" in mods else 0,
                           text_model_type=getattr(text_config, "model_type", None),
                           sequence=sequence and fusion in TOKEN_FUSIONS, positions=True)

    members = {f: build_model(model_config(f, modalities), text_model).to(dist.device) for f in fusions}
    cached = uses_cached_text(next(iter(members.values())).cfg, meta)
    trunk = bool(cfg.train_text_layers)
    train_table = FeatureTable.from_split(data["train"], modalities, label_to_id, pad_id, sequence, cached, trunk)
    val = FeatureTable.from_split(data["validation"], modalities, label_to_id, pad_id, sequence, cached, trunk)
    weights = auto_class_weights(train_table.labels, len(labels)).to(dist.device) if cfg.class_weights == "auto" \
        else None
    for member in members.values():
        member.class_weights = weights
    probes = fit_probes(cfg, data, meta, modalities, label_to_id, model_config, labels, weights, dist,
                        text_model if len(fusions) > 1 else None)
    if len(fusions) > 1:  # --fusion auto: fusion models and fitted probes are the candidates
        members.update({name: probe for name, (probe, _) in probes.items()})
        model: torch.nn.Module = CandidateSet(members)
    else:
        model = members[fusions[0]]
    reported = {name: info for name, (_, info) in probes.items()}

    def run_validation(m: torch.nn.Module) -> dict:
        if not isinstance(m, CandidateSet):
            return {**validate(m, val, labels, dist.device, cfg.batch_size, dist), **reference(reported)}
        results = {name: validate(member, val, labels, dist.device, cfg.batch_size, dist)
                   for name, member in m.members.items()}
        kept = choose(results, cfg.monitor)
        return {**results[kept], "kept": kept, "candidates": {
            name: {**r, "seconds": reported[name]["seconds"] if name in reported
                   else round(m.forward_seconds[name], 3), **({"C": reported[name]["C"]} if name in reported else {})}
            for name, r in results.items()}}

    def save(model_: torch.nn.Module, out: Path, metrics: dict) -> None:
        info = {"task": cfg.task, "labels": labels, "encoders": meta["encoders"], "columns": meta["columns"],
                "preprocessing": meta["preprocessing"], "prepared": str(Path(cfg.prepared).resolve()),
                "data": data_summary(meta), "metrics": metrics}
        chosen = model_
        if isinstance(model_, CandidateSet):
            chosen = model_.members[metrics["kept"]]
            info["selection"] = selection_summary(metrics, cfg.monitor)
            log(f"--fusion auto kept {metrics['kept']}: {info['selection']['why']}")
        elif "linear_probe" in metrics and better(cfg.monitor, metrics["linear_probe"][cfg.monitor],
                                                  metrics[cfg.monitor]):
            warn(f"this {cfg.fusion} model's {cfg.monitor} {metrics[cfg.monitor]:.4f} is worse than a linear probe's "
                 f"{metrics['linear_probe'][cfg.monitor]:.4f} on the same stored features (--fusion auto would keep "
                 "the better one)")
        whole = None
        if cfg.train_text_layers:  # the checkpoint holds the whole text model: its trunk with the trained top
            from mmllm.text_layers import compose

            whole = compose(text.build_model(), checkpoint.merged_state(checkpoint.unwrap(chosen).text))
        modelcard.write(out, checkpoint.save(chosen, out, info, tokenizer, text_config, whole))

    return Training(model, train_table, run_validation, save)


def top_layers(cfg: Any, meta: dict, text: Any) -> torch.nn.Module:
    """--train-text-layers K: the text model's top K layers alone (a TextTop), after checking that the prepared data
    stores the states below them for this very text model; the trunk and the embeddings are never loaded."""
    from mmllm.text_layers import check_split, load_top, num_layers

    k, stored = cfg.train_text_layers, meta.get("text_trunk")
    check_split(text.config, k, "--train-text-layers", text.name)
    if not stored:
        raise UserError(f"--train-text-layers {k}: {cfg.prepared} stores no text trunk states; prepare it again "
                        f"with --text-trunk-layers {k}")
    if stored.get("top_layers") != k:
        raise UserError(f"--train-text-layers {k}: {cfg.prepared} stores the states below the top "
                        f"{stored.get('top_layers')} layers (prepare --text-trunk-layers {stored.get('top_layers')}): "
                        f"use --train-text-layers {stored.get('top_layers')}, or prepare again with "
                        f"--text-trunk-layers {k}")
    if stored.get("text_model") != text.identity or stored.get("layers") != num_layers(text.config):
        raise UserError(f"--train-text-layers {k}: {cfg.prepared} stores trunk states of the text model "
                        f"{stored.get('text_model')}, not of {text.identity}: prepare again")
    log(f"text model: its top {k} of {num_layers(text.config)} layers train"
        + (f" (LoRA rank {cfg.lora_r})" if cfg.lora_r else "")
        + f" over the states after layer {num_layers(text.config) - k} stored by prepare ({stored.get('dtype')}); "
        "the layers below and the embeddings never run")
    return load_top(text.folder, text.config, k)


def candidate_fusions(cfg: Any, modalities: list[str]) -> list[str]:
    """The fusion models this run trains: --fusion, or with auto the AUTO_FUSIONS (one, bilinear, when the text
    model trains: candidates share one frozen text model)."""
    if cfg.fusion != "auto":
        return [cfg.fusion]
    if "text" in modalities and not cfg.freeze_text:
        log("--fusion auto with a text model that trains: one fusion model (bilinear); the candidates share a "
            "frozen text model")
        return ["bilinear"]
    return list(AUTO_FUSIONS)


def fit_probes(cfg: Any, data: Any, meta: dict, modalities: list[str], label_to_id: dict, model_config, labels: list,
               weights: torch.Tensor | None, dist: Any, text_model: Any) -> dict[str, tuple]:
    """Linear probes on the stored features (the text model's stored pooled states: none when prepare did not
    store them): on all modalities, and with --fusion auto also on each modality alone. A probe is a candidate
    only with --fusion auto (then it carries the frozen text model for raw records); otherwise its validation
    metrics are reported beside the model's, for comparison."""
    if "text" in modalities and "text_pooled" not in meta["features"]:
        return {}
    subsets = [modalities] + ([[m] for m in modalities] if cfg.fusion == "auto" and len(modalities) > 1 else [])
    train = FeatureTable.from_split(data["train"], modalities, label_to_id, cached_text=True)
    val = FeatureTable.from_split(data["validation"], modalities, label_to_id, cached_text=True)
    probes = {}
    for mods in subsets:
        name = "linear" if mods == modalities else f"linear_{mods[0]}"
        probe, info = fit_probe(model_config("linear", mods), text_model if "text" in mods else None, train,
                                lambda m: validate(m, val, labels, dist.device, cfg.batch_size, dist), cfg.monitor,
                                weights, dist.device)
        log(f"linear probe ({', '.join(mods)}): C {info['C']:g}, " + "  ".join(
            f"{k} {info[k]:.4f}" for k in ("val_loss", "val_accuracy", "val_f1")) + f" ({info['seconds']:.1f} s)")
        probes[name] = (probe, info)
    return probes


def reference(reported: dict) -> dict:
    """The all-modalities probe's validation metrics, reported next to an explicit --fusion's."""
    return {"linear_probe": {k: v for k, v in reported["linear"].items()}} if "linear" in reported else {}


def selection_summary(metrics: dict, monitor: str) -> dict:
    """Which candidate --fusion auto kept and why, with every candidate's validation metrics and time."""
    kept = metrics["kept"]
    return {"kept": kept, "monitor": monitor, "candidates": metrics["candidates"],
            "why": f"best validation {monitor} ({metrics['candidates'][kept][monitor]:.4f}) of "
                   f"{len(metrics['candidates'])} candidates at the best epoch"}


def uses_sequences(fusion: str, meta: dict, modalities: list[str]) -> bool:
    """Whether the fusion reads the stored media sequences; says so when it would but they were not stored."""
    if fusion not in TOKEN_FUSIONS or not set(modalities) - {"text"}:
        return False
    if meta["preprocessing"].get("sequence_features"):
        return True
    log(f"fusion {fusion}: the prepared data has no media sequences, so each medium enters as one pooled token "
        "(prepare with --sequence-features for the image grid, the audio frames, the video frames)")
    return False


def uses_cached_text(mcfg: ModelConfig, meta: dict) -> bool:
    """Whether training reads the frozen text model's pooled states stored by prepare instead of running it."""
    if not mcfg.cached_text:
        return False
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


# ---------------------------------------------------------------- checkpoint

def check_config(config: dict, folder: Path) -> list[str]:
    """The problems of a classifier checkpoint's model section (checkpoint.check_model)."""
    return checkpoint.check_model(config, folder)


# ---------------------------------------------------------------- inference

@torch.no_grad()
def predict_rows(predictor: Any, rows: list[dict], top_k: int, reliance: bool) -> dict:
    """{row id: {"prediction", "probability"[, "top_k"][, "reliance"]}} for featurized rows (an error entry for a
    record whose output is not finite)."""
    model, labels, tokenizer = predictor.model, predictor.labels, predictor.tokenizer
    mods = model.cfg.modalities
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    pad = tokenizer.pad_token_id or 0 if tokenizer is not None else 0
    table = FeatureTable(columns, mods, None, pad, model.cfg.sequence, model.cfg.cached_text)
    batch = table.batch(range(len(rows)), predictor.device)

    def probabilities(drop: frozenset = frozenset()) -> np.ndarray:  # (B, C)
        return model(batch, drop=drop)["logits"].float().softmax(-1).cpu().numpy()

    probs = probabilities()
    masked = {m: probabilities(frozenset({m})) for m in mods} if reliance else {}
    k = min(top_k, len(labels))
    results: dict[str, dict] = {}
    for n, (row, p) in enumerate(zip(rows, probs)):
        if not np.isfinite(p).all():  # never an answer the model did not give: NaN has no argmax
            results[row["id"]] = {"error": "the model's output for this record is not finite (NaN or Inf in its "
                                           "features)"}
            continue
        best = np.argsort(-p)[:k]
        res: dict[str, Any] = {"prediction": labels[int(best[0])], "probability": float(p[best[0]])}
        if top_k > 1:
            res["top_k"] = [{"label": labels[int(i)], "probability": float(p[i])} for i in best]
        if reliance:  # per masked modality: its answer, and how much the unmasked answer's probability fell
            res["reliance"] = {m: {"prediction": labels[int(q[n].argmax())], "probability": float(q[n].max()),
                                   "drop": float(p[best[0]] - q[n][best[0]])} for m, q in masked.items()}
        results[row["id"]] = res
    return results


# ---------------------------------------------------------------- eval model

def evaluate(cfg: Any, device: Any) -> dict:
    """`eval model` of a classifier: accuracy, macro-F1, ECE, the confusion matrix (and modality reliance)."""
    from mmllm.features import split_columns

    model, config, tokenizer = checkpoint.load(cfg.checkpoint, device)
    labels = config["labels"]
    mods = model.cfg.modalities
    pad = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
    columns, source, split = split_columns(cfg, config, mods, model.cfg.cached_text)
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
    pred = padded.argmax(1)
    result: dict[str, Any] = {"task": "classify", "checkpoint": str(cfg.checkpoint), "data": source,
                              "split": split, **classification(gold, pred, names, padded)}
    known = gold >= 0
    found = collapse([names[i] for i in pred[known]], [names[i] for i in gold[known]])
    if found:
        result["collapsed"] = found
        warn(collapse_warning(found))
    if cfg.reliance is not False:
        result["reliance"] = reliance(model, table, device, cfg.batch_size, names, gold, len(unseen), result, gates)
    return result


def reliance(model, table, device, batch_size: int, names: list[str], gold: np.ndarray, n_unseen: int,
             full: dict, gates: np.ndarray | None) -> dict:
    """Metrics with each modality masked in turn (and mean gate weights for gated fusion)."""
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
