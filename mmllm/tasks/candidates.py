"""Candidates for `--task classify`: linear probes fitted on the stored features, and several fusion models trained
side by side, one of which is kept on validation (`--fusion auto`).

A linear probe (`model.LinearProbe`) is a multinomial logistic regression on the standardized features that
prepare stored; its L2 strength is chosen on validation from `PROBE_C` (scikit-learn's C: the penalty on the mean
training loss is ||W||^2 / (2 C n)). It is fitted once, full batch with L-BFGS, before training starts, and stays
fixed. The fusion models of a `CandidateSet` see the same batches in one training loop (their losses are summed;
their parameters are disjoint, so each learns as it would alone under the shared schedule); at every validation the
set reports the best candidate on --monitor, so early stopping and the restored best epoch follow the best
candidate, and the checkpoint holds that candidate alone: an ordinary checkpoint of its kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from mmllm.model import Classifier, LinearProbe, ModelConfig

PROBE_C = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried (scikit-learn's C), strongest first
PROBE_MAX_ITER = 300  # L-BFGS iterations per C (warm-started from the previous C)


def better(monitor: str, a: float, b: float | None) -> bool:
    """Whether value `a` of --monitor beats `b` (None: nothing to beat)."""
    return b is None or (a < b if monitor == "val_loss" else a > b)


def fit_probe(cfg: ModelConfig, text_model: nn.Module | None, train, validate: Callable[[Classifier], dict],
              monitor: str, class_weights: torch.Tensor | None, device) -> tuple[LinearProbe, dict]:
    """A linear probe over `cfg.modalities`, fitted on the whole training table for each C of PROBE_C; the C with
    the best validation --monitor is kept. Returns (probe, {C, val metrics, seconds})."""
    start = time.perf_counter()
    probe = LinearProbe(cfg, text_model).to(device)
    probe.class_weights = class_weights
    with torch.no_grad():
        batch = train.batch(range(len(train)), device)
        labels = batch.pop("labels")
        for m, (x, here) in zip(cfg.modalities, probe.raw_features(batch)):
            rows = x[here] if here.any() else x.new_zeros(1, x.shape[1])
            getattr(probe, f"mean_{m}").copy_(rows.mean(0))
            getattr(probe, f"std_{m}").copy_(rows.std(0, unbiased=False).clamp(min=1e-6))
        feats = probe.features(batch)  # (N, F)
    keep = labels >= 0
    feats, labels = feats[keep], labels[keep]
    weight = probe.head.weight
    weight.requires_grad_(True)
    probe.head.bias.requires_grad_(True)
    with torch.no_grad():
        weight.zero_()
        probe.head.bias.zero_()
    best: dict | None = None
    best_params: tuple[torch.Tensor, torch.Tensor] | None = None
    n = max(1, len(labels))
    for c in PROBE_C:
        opt = torch.optim.LBFGS([weight, probe.head.bias], lr=1.0, max_iter=PROBE_MAX_ITER, history_size=20,
                                tolerance_grad=1e-7, tolerance_change=1e-9, line_search_fn="strong_wolfe")
        closure = probe_objective(opt, feats, labels, weight, probe.head.bias, class_weights, 1 / (2 * c * n))
        if len(labels):
            opt.step(closure)
        metrics = validate(probe)
        if best is None or better(monitor, metrics[monitor], best[monitor]):
            best = {"C": c, **metrics}
            best_params = (weight.detach().clone(), probe.head.bias.detach().clone())
    probe.head.requires_grad_(False)  # fitted: fixed from here on
    with torch.no_grad():
        weight.copy_(best_params[0])
        probe.head.bias.copy_(best_params[1])
    return probe.eval(), {**best, "seconds": round(time.perf_counter() - start, 3)}


def probe_objective(opt: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, class_weights: torch.Tensor | None, l2: float) -> Callable[[], torch.Tensor]:
    """The L-BFGS closure: mean (class-weighted) cross-entropy + l2 * ||W||^2 (the bias is not penalized)."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(feats @ weight.T + bias, labels, weight=class_weights)
        loss = loss + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    return closure


class CandidateSet(nn.Module):
    """Several classifiers trained (fusion models) or fixed (fitted probes) side by side over the same batches.

    forward sums the trainable candidates' losses (so each one's --l2/--l1 penalty keeps its meaning; the logged
    training loss is that sum, and --grad-clip clips their joint gradient norm); `backbone_parameters` is empty (the
    text model is frozen: candidates share it and read its stored states)."""

    def __init__(self, members: dict[str, Classifier]):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.forward_seconds = {name: 0.0 for name in members}  # training forward time per candidate

    def trainable(self) -> dict[str, Classifier]:
        return {n: m for n, m in self.members.items() if any(p.requires_grad for p in m.parameters())}

    def backbone_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, batch: dict, drop: frozenset = frozenset()) -> dict:
        losses = []
        for name, member in self.trainable().items():
            start = time.perf_counter()
            losses.append(member(batch, drop=drop)["loss"])
            self.forward_seconds[name] += time.perf_counter() - start
        return {"loss": torch.stack(losses).sum()}


def choose(results: dict[str, dict], monitor: str) -> str:
    """The candidate with the best --monitor value (the first listed wins a tie)."""
    best = None
    for name, metrics in results.items():
        if best is None or better(monitor, metrics[monitor], results[best][monitor]):
            best = name
    return best
