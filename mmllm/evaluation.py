"""`mmllm eval`: metrics of a checkpoint (with modality reliance), and standalone BLEU, FID and accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmllm.config import AccuracyConfig, BleuConfig, EvalModelConfig, FidConfig, save_resolved
from mmllm.console import emit, log, show, warn
from mmllm.errors import UserError
from mmllm.metrics import bleu, classification, frechet_distance


# ---------------------------------------------------------------- eval model

def run_model(cfg: EvalModelConfig) -> int:
    from mmllm import checkpoint
    from mmllm.predict import pick_device

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
    from mmllm.finetune import predict_table

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
    from mmllm.generate import GenTable, bleu_of, load_checkpoint

    model, tokenizer = load_checkpoint(Path(cfg.checkpoint), config, device)
    mods = model.cfg.modalities
    columns, source = eval_columns(cfg, config, mods)
    table = GenTable(columns, mods, tokenizer, with_targets=False)
    if not any(table.targets):
        raise UserError(f"{cfg.data}: no target texts in split '{cfg.split}'")
    args = (tokenizer, cfg.batch_size, device, cfg.max_new_tokens, cfg.num_beams, cfg.bleu_tokenize)
    scored = bleu_of(model, table, *args)
    result: dict[str, Any] = {"task": "generate", "checkpoint": str(cfg.checkpoint), "data": source,
                              "split": cfg.split, "n": len(table), "bleu": scored["val_bleu"],
                              "chrf": scored["val_chrf"], "bleu_signature": scored["bleu_signature"],
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
    from mmllm.prepare import META, load_prepared

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
    from mmllm.predict import raw_records
    from mmllm.prepare import config_from_checkpoint, encoders_for_checkpoint, featurize

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
    from mmllm.finetune import predict_table

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
    for k in ("accuracy", "macro_f1", "ece", "bleu", "chrf"):
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


# ---------------------------------------------------------------- standalone metrics

def read_lines(path: str, field: str | None, candidates: tuple[str, ...]) -> list[str]:
    """Plain lines, or one field of each JSON line (auto-detected when every line is a JSON object)."""
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{p} is not UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if field or (lines and all(_is_json_object(line) for line in lines if line.strip())):
        out = []
        for i, line in enumerate(lines, start=1):
            obj = json.loads(line)
            key = field or next((c for c in candidates if c in obj), None)
            if key is None or key not in obj:
                raise UserError(f"{path}, line {i}: no field '{field or '/'.join(candidates)}'")
            out.append(str(obj[key]))
        return out
    return lines


def _is_json_object(line: str) -> bool:
    s = line.strip()
    if not (s.startswith("{") and s.endswith("}")):
        return False
    try:
        return isinstance(json.loads(s), dict)
    except ValueError:
        return False


def run_bleu(cfg: BleuConfig) -> int:
    hyps = read_lines(cfg.hyp, cfg.field, ("prediction", "text", "hypothesis", "generated"))
    refs = [read_lines(r, cfg.field, ("target", "reference", "text", "ref")) for r in cfg.ref]
    for r, path in zip(refs, cfg.ref):
        if len(r) != len(hyps):
            raise UserError(f"--ref {path}: {len(r)} lines, but --hyp has {len(hyps)}")
    try:
        result = bleu(hyps, refs, cfg.tokenize, cfg.lowercase)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"--tokenize {cfg.tokenize}: {e}") from None
    show(result["bleu_detail"])
    emit({k: v for k, v in result.items() if k != "bleu_detail"})
    return 0


def run_accuracy(cfg: AccuracyConfig) -> int:
    pred = read_lines(cfg.pred, None, (cfg.pred_field,))
    gold = _read_gold(cfg.gold, cfg.gold_field)
    if len(pred) != len(gold):
        raise UserError(f"--pred has {len(pred)} records, --gold has {len(gold)}")
    names = sorted(set(gold) | set(pred))
    index = {n: i for i, n in enumerate(names)}
    result = classification(np.array([index[g] for g in gold]), np.array([index[p] for p in pred]), names)
    show(f"accuracy {result['accuracy']:.4f}  macro_f1 {result['macro_f1']:.4f}  (n={result['n']})")
    emit(result)
    return 0


def _read_gold(path: str, field: str) -> list[str]:
    if path.endswith((".csv", ".tsv", ".parquet")):
        from mmllm.records import read_table

        columns, rows = read_table(Path(path))
        if field not in columns:
            raise UserError(f"--gold {path}: no column '{field}' (columns: {', '.join(columns)})")
        return [str(r[field]) for _, r in rows if isinstance(r, dict)]
    return read_lines(path, None, (field,))


def run_fid(cfg: FidConfig) -> int:
    real, real_size = image_features(cfg.real, cfg)
    gen, gen_size = image_features(cfg.generated, cfg)
    dim = real.shape[1]
    for name, f in (("REAL", real), ("GENERATED", gen)):
        if len(f) < 2:
            raise UserError(f"{name}: need at least 2 images, found {len(f)}")
        if len(f) < dim:
            warn(f"{name} has {len(f)} images, fewer than the feature dimension {dim}: the covariance is "
                 "singular and FID is biased upwards; use more images for comparable numbers")
    fid = frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))
    extractor = f"inception-torchscript:{cfg.fid_model}" if cfg.fid_model else f"{cfg.image_model} (not InceptionV3)"
    result = {"fid": fid, "extractor": extractor, "feature_dim": int(dim), "n_real": len(real), "n_generated": len(gen),
              "resolution": real_size, "comparable_to_published": bool(cfg.fid_model)}
    show(f"FID {fid:.4f}  extractor {extractor}  real {len(real)} / generated {len(gen)} images at {real_size}")
    emit(result)
    return 0


def list_images(source: str, image_column: str | None) -> list[str]:
    from mmllm.records import IMAGE_EXT, detect_columns, read_table

    p = Path(source)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXT and f.is_file())
        if not files:
            raise UserError(f"{p}: no images found")
        return files
    columns, rows = read_table(p)
    col = detect_columns(columns, {"image": image_column})["image"]
    if not col:
        raise UserError(f"{p}: no image column (use --image-column)")
    return [str(Path(r[col]) if Path(r[col]).is_absolute() else p.parent / r[col])
            for _, r in rows if isinstance(r, dict) and r.get(col)]


def image_features(source: str, cfg: FidConfig) -> tuple[np.ndarray, str]:
    """(N, D) features of every image in a folder/manifest, and the resolution the extractor saw."""
    import torch

    from mmllm.media import MediaError, load_image

    files = list_images(source, cfg.image_column)
    if cfg.fid_model:
        path = Path(cfg.fid_model)
        if not path.is_file():
            raise UserError(f"--fid-model: file not found: {path}")
        try:
            net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise UserError(f"--fid-model {path}: not a TorchScript model ({str(e).splitlines()[0]})") from None
        size = 299
    else:
        from mmllm.encoders import load_encoder

        enc = load_encoder("image", cfg.image_model)
        size = enc.image_size
    feats = []
    for start in range(0, len(files), cfg.batch_size):
        images = []
        for f in files[start:start + cfg.batch_size]:
            try:
                images.append(load_image(f))
            except MediaError as e:
                warn(f"skipped {f}: {e}")
        if not images:
            continue
        with torch.inference_mode():
            if cfg.fid_model:  # standard FID: uint8 NCHW at 299x299 into the TorchScript Inception
                from PIL import Image

                x = torch.from_numpy(np.stack([np.asarray(im.resize((299, 299), Image.BICUBIC)) for im in images]))
                feats.append(net(x.permute(0, 3, 1, 2).contiguous()).reshape(len(images), -1).double().numpy())
            else:
                feats.append(enc.encode(images)[0].astype(np.float64))
    if not feats:
        raise UserError(f"{source}: no readable images")
    return np.concatenate(feats), f"{size}x{size}"
