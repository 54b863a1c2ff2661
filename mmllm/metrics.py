"""Metrics shared by finetune, eval and the standalone `mmllm eval` commands."""

from __future__ import annotations

import numpy as np


def confusion(gold: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows = gold, columns = predicted."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (gold, pred), 1)
    return m


def classification(gold: np.ndarray, pred: np.ndarray, names: list[str], probs: np.ndarray | None = None,
                   n_bins: int = 15) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and (with probs) ECE."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    keep = gold >= 0
    gold, pred = gold[keep], pred[keep]
    n = len(names)
    cm = confusion(gold, pred, n)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(n), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(n), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    present = cm.sum(1) > 0  # macro average over classes that occur in the gold labels
    out = {"n": int(len(gold)), "accuracy": float((gold == pred).mean()) if len(gold) else 0.0,
           "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
           "per_class": {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                    "support": int(cm[i].sum())} for i in range(n)},
           "confusion_matrix": {"labels": names, "matrix": cm.tolist()}}
    if probs is not None:
        out["ece"] = expected_calibration_error(np.asarray(probs)[keep], gold, n_bins)
    return out


def expected_calibration_error(probs: np.ndarray, gold: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    if len(gold) == 0:
        return 0.0
    conf = probs.max(1)
    correct = probs.argmax(1) == gold
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def bleu(hyps: list[str], refs: list[list[str]], tokenize: str = "13a", lowercase: bool = False) -> dict:
    """sacreBLEU corpus BLEU and chrF; refs is a list of reference streams (each as long as hyps)."""
    from sacrebleu.metrics import BLEU, CHRF

    b = BLEU(tokenize=tokenize, lowercase=lowercase)
    score = b.corpus_score(hyps, refs)
    chrf = CHRF()
    c = chrf.corpus_score(hyps, refs)
    return {"bleu": score.score, "bleu_signature": str(b.get_signature()), "bleu_detail": str(score),
            "chrf": c.score, "chrf_signature": str(chrf.get_signature()), "n": len(hyps)}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), stable for near-singular covariances."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product: add eps to the diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
