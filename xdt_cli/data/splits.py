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


def labelled_subset(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """Sorted indices of `per_class` samples of every class, drawn with `seed` (few-shot).

    A class with fewer samples keeps all of them. The draw is seeded like the splits, so a
    given (`seed`, `per_class`) picks the same samples on every machine.
    """
    rng = np.random.default_rng([seed, per_class])
    y = labels.numpy()
    picked = [rng.permutation(np.flatnonzero(y == cls))[:per_class] for cls in np.unique(y)]
    return torch.from_numpy(np.sort(np.concatenate(picked)))
