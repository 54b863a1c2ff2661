"""Average pooling of token sequences: a stored sequence to fewer vectors (prepare's --sequence-features, the
modalities' stored sequences) and a batch of them to fewer decoder tokens (generation's --image-tokens). Below the
encoders and the modalities, which both use it."""

from __future__ import annotations

import math

import numpy as np
import torch


def pool_tokens(seq: torch.Tensor, n: int, grid: bool = False) -> torch.Tensor:
    """(B, T, D) -> (B, n, D) by averaging n equal spans of the sequence (repeats vectors when T < n); with `grid`,
    when T and n are both squares, the T vectors are a square spatial map row by row, averaged over a
    sqrt(n) x sqrt(n) grid of equal cells (row by row). Unchanged when n == T."""
    t = seq.shape[1]
    if n == t:
        return seq
    side, out = math.isqrt(t), math.isqrt(n)
    if grid and side * side == t and out * out == n:
        square = seq.transpose(1, 2).reshape(len(seq), -1, side, side)  # (B, D, s, s)
        return torch.nn.functional.adaptive_avg_pool2d(square, out).flatten(2).transpose(1, 2)
    return torch.nn.functional.adaptive_avg_pool1d(seq.transpose(1, 2), n).transpose(1, 2)


def pool_sequence(seq: np.ndarray, n: int, grid: bool = False) -> np.ndarray:
    """One stored sequence (T, D) -> (n, D): `pool_tokens` of it."""
    return pool_tokens(torch.from_numpy(np.ascontiguousarray(seq))[None], n, grid)[0].numpy()
