"""Metrics shared by finetune, eval and the standalone `mmllm eval` commands."""

from __future__ import annotations

from collections import Counter

import numpy as np


def confusion(gold: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows = gold, columns = predicted."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (gold, pred), 1)
    return m


F1_LABELS = {"union": "union of gold and predicted", "all": "all classes of the checkpoint"}
F1_DEFINITION = ("unweighted mean over macro_f1_labels of per-class F1 = 2TP/(2TP+FP+FN); precision, recall and F1 "
                 "are 0 where undefined (scikit-learn zero_division=0)")


def classification(gold: np.ndarray, pred: np.ndarray, names: list[str], probs: np.ndarray | None = None,
                   n_bins: int = 15, f1_labels: str = "union") -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and (with probs) ECE.

    Equal to scikit-learn with zero_division=0. Macro-F1 averages over the classes that occur in gold or
    predictions (scikit-learn's default labels, f1_labels="union") or over every name (f1_labels="all").
    Records with gold < 0 are ignored.
    """
    gold, pred = np.asarray(gold), np.asarray(pred)
    keep = gold >= 0
    gold, pred = gold[keep], pred[keep]
    n = len(names)
    cm = confusion(gold, pred, n)
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(0), cm.sum(1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, predicted + support)  # 2TP / (2TP + FP + FN) = 2PR / (P + R)
    averaged = (predicted + support) > 0 if f1_labels == "union" else np.ones(n, dtype=bool)
    out = {"n": int(len(gold)), "accuracy": float((gold == pred).mean()) if len(gold) else 0.0,
           "macro_f1": float(f1[averaged].mean()) if averaged.any() else 0.0,
           "macro_f1_labels": F1_LABELS[f1_labels], "macro_f1_classes": int(averaged.sum()),
           "macro_f1_definition": F1_DEFINITION, "zero_division": 0,
           "per_class": {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                    "support": int(support[i])} for i in range(n)},
           "confusion_matrix": {"labels": names, "matrix": cm.tolist(), "rows": "gold", "columns": "predicted"}}
    if probs is not None:
        out["ece"] = expected_calibration_error(np.asarray(probs)[keep], gold, n_bins)
        out["ece_definition"] = ece_definition(n_bins)
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0."""
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def ece_definition(n_bins: int = 15) -> str:
    return (f"equal-width, {n_bins} bins, top-label confidence: bins (k/{n_bins}, (k+1)/{n_bins}], "
            "sum over bins of (bin share) * |accuracy - mean confidence| (Guo et al. 2017)")


def expected_calibration_error(probs: np.ndarray, gold: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width, right-closed bins of the top-label confidence (Guo et al. 2017)."""
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


COLLAPSE_DEFINITION = ("the most common answer, flagged when it is at least half of n (n >= 10) and at least twice "
                       "as common as among the references, or when it is the only answer and the references have "
                       "more than one; answers and references compared as stripped strings")


def collapse(answers: list, references: list, at_least: int = 10) -> dict | None:
    """The one answer a model gives to most records when the references do not (COLLAPSE_DEFINITION), else None.
    Pairs whose reference is None (unlabelled) are left out."""
    pairs = [(str(a).strip(), str(r).strip()) for a, r in zip(answers, references, strict=True) if r is not None]
    n = len(pairs)
    if n < at_least:
        return None
    counts = Counter(a for a, _ in pairs)
    answer, count = counts.most_common(1)[0]
    share = count / n
    reference_share = sum(r == answer for _, r in pairs) / n
    only = len(counts) == 1 and len({r for _, r in pairs}) > 1
    if not only and (share < 0.5 or share < 2 * reference_share):
        return None
    return {"answer": answer, "count": count, "n": n, "share": share, "reference_share": reference_share,
            "definition": COLLAPSE_DEFINITION}


def collapse_warning(found: dict) -> str:
    """The one line `eval model` prints for a collapse."""
    answer = found["answer"] if len(found["answer"]) <= 60 else found["answer"][:57] + "..."
    return (f"{found['count']} of {found['n']} records ({found['share']:.0%}) get the same answer {answer!r}, "
            f"which is {found['reference_share']:.0%} of the references: the model has collapsed to one answer "
            "(\"collapsed\" in the result)")


def error_rates(hyps: list[str], refs: list[str]) -> dict:
    """Corpus WER and CER with jiwer's default transforms (case and punctuation kept)."""
    from importlib.metadata import version

    import jiwer

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses, {len(refs)} references")
    v = version("jiwer")
    return {"wer": float(jiwer.process_words(refs, hyps).wer), "cer": float(jiwer.process_characters(refs, hyps).cer),
            "n": len(hyps),
            "wer_definition": f"jiwer {v}: word edits (S+D+I) / reference words over the corpus; words split on "
                              "whitespace after stripping and collapsing spaces; case and punctuation kept; a fraction",
            "cer_definition": f"jiwer {v}: character edits (S+D+I) / reference characters over the corpus, spaces "
                              "counted, after stripping; case and punctuation kept; a fraction"}


def bleu(hyps: list[str], refs: list[list[str]], tokenize: str = "13a", lowercase: bool = False) -> dict:
    """sacreBLEU corpus BLEU and chrF; refs is a list of reference streams (each as long as hyps)."""
    from sacrebleu.metrics import BLEU, CHRF

    b = BLEU(tokenize=tokenize, lowercase=lowercase)
    score = b.corpus_score(hyps, refs)
    chrf = CHRF()
    c = chrf.corpus_score(hyps, refs)
    return {"bleu": score.score, "bleu_signature": str(b.get_signature()), "bleu_detail": str(score),
            "chrf": c.score, "chrf_signature": str(chrf.get_signature()), "n": len(hyps)}


FID_DEFINITION = ("||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2) over the feature means and unbiased "
                  "covariances (pytorch-fid's algorithm)")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), stable for near-singular covariances (as pytorch-fid)."""
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
