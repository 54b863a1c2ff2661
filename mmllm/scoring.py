"""`mmllm eval bleu|wer|fid|accuracy`: standalone metrics over files, no checkpoint needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from mmllm.config import AccuracyConfig, BleuConfig, FidConfig, WerConfig
from mmllm.console import emit, show, warn
from mmllm.errors import UserError, utf8_text
from mmllm.metrics import FID_DEFINITION, bleu, classification, error_rates, frechet_distance


def read_lines(path: str, field: str | None, candidates: tuple[str, ...]) -> list[str]:
    """Plain lines, or one field of each JSON line (auto-detected when every line is a JSON object)."""
    return keyed_lines(path, field, candidates)[0]


def keyed_lines(path: str, field: str | None, candidates: tuple[str, ...]) -> tuple[list[str], list[str] | None]:
    """(values, ids): read_lines' values and, when every line is a JSON object with an "id", those ids (as text);
    else None. Line endings are \n, \r\n or a lone \r: a CRLF file reads as its LF twin."""
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"{p} is a folder: expected a file of lines or JSON lines")
        if not p.is_file():
            raise UserError(f"file not found: {p}")
        text = utf8_text(p.read_bytes(), str(p))
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if field or (lines and all(_is_json_object(line) for line in lines if line.strip())):
        out, ids = [], []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # a blank line in JSONL is not a record
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}, line {i}: not a JSON line ({e})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}, line {i}: expected a JSON object, got {type(obj).__name__}")
            key = field or next((c for c in candidates if c in obj), None)
            if key is None or key not in obj:
                raise UserError(f"{path}, line {i}: no field '{field or '/'.join(candidates)}'")
            out.append(str(obj[key]))
            ids.append(obj.get("id"))
        return out, [str(i) for i in ids] if ids and all(i is not None for i in ids) else None
    return lines, None


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
    refs = [read_lines(r, cfg.ref_field, ("target", "reference", "text", "ref")) for r in cfg.ref]  # --field: --hyp
    if not hyps:
        raise UserError(f"--hyp {cfg.hyp}: no lines (an empty file): nothing to score")
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


def run_wer(cfg: WerConfig) -> int:
    hyps = read_lines(cfg.hyp, cfg.field, ("prediction", "text", "hypothesis", "generated", "transcript"))
    refs = read_lines(cfg.ref, cfg.ref_field, ("target", "reference", "text", "ref", "transcript"))
    if len(refs) != len(hyps):
        raise UserError(f"--ref {cfg.ref}: {len(refs)} lines, but --hyp has {len(hyps)}")
    if not hyps:
        raise UserError(f"--hyp {cfg.hyp}: no lines")
    result = error_rates(hyps, refs)
    show(f"WER {result['wer']:.4f}  CER {result['cer']:.4f}  (n={result['n']})")
    emit(result)
    return 0


def run_accuracy(cfg: AccuracyConfig) -> int:
    pred, pred_ids = read_labels(cfg.pred, cfg.pred_field, "--pred")
    gold, gold_ids = read_labels(cfg.gold, cfg.gold_field, "--gold")
    for labels, flag, path in ((pred, "--pred", cfg.pred), (gold, "--gold", cfg.gold)):
        if not labels:
            raise UserError(f"{flag} {path}: no records (an empty file): nothing to score")
    joined: dict[str, Any] = {}
    if pred_ids is not None and gold_ids is not None:  # records are matched by id, in any order
        pred, gold, joined = join_on_ids(pred, pred_ids, gold, gold_ids, cfg)
    elif len(pred) != len(gold):
        raise UserError(f"--pred has {len(pred)} records, --gold has {len(gold)}")
    names = sorted(set(gold) | set(pred))
    index = {n: i for i, n in enumerate(names)}
    result = classification(np.array([index[g] for g in gold]), np.array([index[p] for p in pred]), names)
    show(f"accuracy {result['accuracy']:.4f}  macro_f1 {result['macro_f1']:.4f}  (n={result['n']})")
    emit({**result, **joined})
    return 0


def join_on_ids(pred: list[str], pred_ids: list[str], gold: list[str], gold_ids: list[str], cfg: AccuracyConfig
                ) -> tuple[list[str], list[str], dict]:
    """(predictions, gold labels) of the gold records that have a prediction, matched by id, and the join's
    report: {"joined_on": "id", "matched", "missing_predictions", "unmatched_predictions"}."""
    for ids, flag, path in ((pred_ids, "--pred", cfg.pred), (gold_ids, "--gold", cfg.gold)):
        seen: set[str] = set()
        twice = next((i for i in ids if i in seen or seen.add(i)), None)
        if twice is not None:
            raise UserError(f"{flag} {path}: id {twice[:80]!r} appears twice: ids must be unique to match "
                            "predictions to gold labels")
    by_id = dict(zip(pred_ids, pred))
    both = [(by_id[i], g) for i, g in zip(gold_ids, gold) if i in by_id]
    missing = len(gold_ids) - len(both)
    unmatched = len(pred_ids) - len(both)
    if not both:
        raise UserError(f"--pred {cfg.pred} and --gold {cfg.gold} share no id: are they of the same records?")
    if missing or unmatched:
        warn(f"matched {len(both)} records by id; {missing} gold record(s) have no prediction and "
             f"{unmatched} prediction(s) no gold label: scored over the {len(both)} matched")
    report = {"joined_on": "id", "matched": len(both), "missing_predictions": missing,
              "unmatched_predictions": unmatched}
    return [p for p, _ in both], [g for _, g in both], report


TABLES = (".csv", ".tsv", ".parquet")


def read_labels(path: str, field: str, flag: str) -> tuple[list[str], list[str] | None]:
    """(labels, ids) of --pred / --gold: a CSV/TSV/Parquet column `field` (the header row names the columns, it is
    no label), a JSONL field `field`, or else one label per line (every line, none a header). ids: the "id"
    column or field when every record has one, else None."""
    if Path(path).suffix.lower() not in TABLES:
        return keyed_lines(path, None, (field,))
    from mmllm.records import RecordError, read_table

    columns, rows = read_table(Path(path))
    if field not in columns:
        raise UserError(f"{flag} {path}: no column '{field}' (columns: {', '.join(columns)}); "
                        f"name it with {flag}-field")
    labels, ids = [], []
    for row, r in rows:
        if isinstance(r, RecordError):
            raise UserError(f"{flag} {path}, row {row}: {r.reason}")
        if r[field] is None:
            raise UserError(f"{flag} {path}, row {row}: column '{field}' is empty")
        labels.append(str(r[field]))
        ids.append(r.get("id"))
    return labels, [str(i) for i in ids] if ids and all(i not in (None, "") for i in ids) else None


FID_FEATURES = "inception pool3 2048"
FID_PREPROCESSING = ("RGB, PIL bicubic resize to 299x299, uint8 NCHW (0-255) into the TorchScript, which scales "
                     "to [-1, 1] itself; called with return_features=True")


def run_fid(cfg: FidConfig) -> int:
    sources = {"REAL": cfg.real, "GENERATED": cfg.generated}
    # both inputs are checked (exist, readable, at least 2 images) before an extractor loads or an image is read
    files = {name: list_images(source, cfg.image_column) for name, source in sources.items()}
    for name, listed in files.items():
        need_two(name, sources[name], len(listed))
    extract, side = load_extractor(cfg)
    feats = {name: image_features(listed, sources[name], extract, cfg.batch_size) for name, listed in files.items()}
    real, gen = feats["REAL"], feats["GENERATED"]
    dim, size = real.shape[1], f"{side}x{side}"
    for name, f in feats.items():
        need_two(name, sources[name], len(f))  # again: unreadable images were skipped
        if len(f) < dim:
            warn(f"{name} has {len(f)} images, fewer than the feature dimension {dim}: the covariance is "
                 "singular and FID is biased upwards; use more images for comparable numbers")
    fid = frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))
    result = {"fid": fid, "fid_definition": FID_DEFINITION, **fid_extractor(cfg, int(dim), size),
              "feature_dim": int(dim), "n_real": len(real), "n_generated": len(gen), "resolution": size}
    show(f"FID {fid:.4f}  extractor {result['extractor']}  real {len(real)} / generated {len(gen)} images "
         f"at {size}")
    if "fid_note" in result:
        warn(result["fid_note"])
    emit(result)
    return 0


def need_two(name: str, source: str, n: int) -> None:
    if n < 2:
        raise UserError(f"{name} {source}: need at least 2 images, found {n}")


def fid_extractor(cfg: FidConfig, dim: int, size: str) -> dict:
    """What the features are, so that the number is never read without its meaning."""
    if cfg.fid_model and dim == 2048:
        return {"extractor": f"inception-torchscript:{cfg.fid_model}", "fid_features": FID_FEATURES,
                "fid_preprocessing": FID_PREPROCESSING, "comparable_to_published": True}
    if cfg.fid_model:
        return {"extractor": f"torchscript:{cfg.fid_model}", "fid_features": f"return_features output, {dim}-d",
                "fid_preprocessing": FID_PREPROCESSING, "comparable_to_published": False,
                "fid_note": f"not comparable to published FID: {cfg.fid_model} gives {dim}-d features, not the "
                            "2048-d pool3 of inception-2015-12-05.pt"}
    return {"extractor": f"{cfg.image_model} (not InceptionV3)", "fid_features": f"{cfg.image_model} {dim}",
            "fid_preprocessing": f"the image encoder's own preprocessing at {size}",
            "comparable_to_published": False,
            "fid_note": f"not comparable to published FID: features from {cfg.image_model}, not InceptionV3 pool3; "
                        "pass --fid-model inception-2015-12-05.pt for the standard number"}


def load_fid_model(path_str: str) -> Any:
    """NVIDIA's TorchScript InceptionV3 (inception-2015-12-05.pt); refused unless forward takes return_features."""
    import torch

    path = Path(path_str)
    if not path.is_file():
        raise UserError(f"--fid-model: file not found: {path}")
    try:
        net = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--fid-model {path}: not a TorchScript model ({str(e).splitlines()[0]})") from None
    try:
        args = [a.name for a in net.forward.schema.arguments]
    except (AttributeError, RuntimeError):
        args = ["return_features"] if "return_features" in getattr(net, "code", "") else []
    if "return_features" not in args:
        raise UserError(f"--fid-model {path}: forward has no return_features argument; expected NVIDIA's "
                        "inception-2015-12-05.pt, whose forward(img, return_features=True) gives 2048-d pool3 features")
    return net


def inception_features(net: Any, images: list) -> np.ndarray:
    """(N, D) features (D = 2048 pool3 for inception-2015-12-05.pt): PIL bicubic to 299x299, uint8 NCHW,
    forward(x, return_features=True)."""
    import torch
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(im.resize((299, 299), Image.BICUBIC)) for im in images]))
    f = net(x.permute(0, 3, 1, 2).contiguous(), return_features=True)  # (N, 3, 299, 299) uint8 -> (N, D)
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or len(f) != len(images):
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise UserError(f"--fid-model: forward(x, return_features=True) gave {shape}, expected ({len(images)}, 2048) "
                        "pool3 features as inception-2015-12-05.pt gives")
    return f.double().numpy()


def list_images(source: str, image_column: str | None) -> list[str]:
    from mmllm.modalities.image import EXTENSIONS as IMAGE_EXT
    from mmllm.records import detect_columns, read_table

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


def load_extractor(cfg: FidConfig) -> tuple[Callable[[list], np.ndarray], int]:
    """(images -> (N, D) float64 features, the side in pixels the extractor sees): --fid-model's TorchScript
    Inception (standard FID), else the image encoder --image-model."""
    if cfg.fid_model:
        net = load_fid_model(cfg.fid_model)
        return (lambda images: inception_features(net, images)), 299
    from mmllm.modalities import load_encoder

    enc = load_encoder("image", cfg.image_model)
    return (lambda images: enc.encode(images)[0].astype(np.float64)), enc.image_size


def image_features(files: list[str], source: str, extract: Callable[[list], np.ndarray],
                   batch_size: int) -> np.ndarray:
    """(N, D) features of the readable images among `files` (of `source`), in batches; unreadable ones warned."""
    import torch

    from mmllm.media import MediaError, load_image

    feats = []
    for start in range(0, len(files), batch_size):
        images = []
        for f in files[start:start + batch_size]:
            try:
                images.append(load_image(f))
            except MediaError as e:
                warn(f"skipped {f}: {e}")
        if images:
            with torch.inference_mode():
                feats.append(extract(images))
    if not feats:
        raise UserError(f"{source}: no readable images")
    return np.concatenate(feats)
