"""Seeded, stratified, machine-independent train/val/test splits."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FRACTIONS = (0.70, 0.15, 0.15)


def stratified_split(
    labels: Tensor, seed: int, fractions: tuple[float, ...] = FRACTIONS
) -> list[Tensor]:
    """Split sample indices per class by `fractions`; the last part takes the remainder.

    numpy's PCG64 generator gives the same permutation on every platform, so a given `seed`
    yields the same split everywhere. Each part's indices are returned sorted.
    """
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        start = 0
        for i, frac in enumerate(fractions):
            stop = len(idx) if i == len(fractions) - 1 else start + round(frac * len(idx))
            parts[i].append(idx[start:stop])
            start = stop
    return [torch.from_numpy(np.sort(np.concatenate(p))) for p in parts]
