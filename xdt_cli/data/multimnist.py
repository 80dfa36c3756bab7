"""`multimnist5k`: two mnist5k digits on one 36x36 canvas, built deterministically.

The MultiMNIST construction of Sener & Koltun 2018 ("Multi-Task Learning as Multi-Objective
Optimization", NeurIPS; after Sabour et al. 2017) on the 5,000 embedded images: each sample
overlays (pixel-wise maximum) one digit shifted up and to the left and one shifted down and
to the right of the canvas centre, each by 1 to 4 pixels sideways and 0 to 4 pixels
vertically. The tasks are the `left` digit and the `right` digit (and `sum`, their sum).

Pairs never cross splits: mnist5k is split 70/15/15 with `data.split_seed` (the same split
as the `mnist5k` set itself), and the 10,000 train, 1,500 val and 1,500 test pairs each
draw both of their digits from one part. So no test digit is ever seen in training, and the
set depends on the split seed (which the loader receives in `DomainRequest.split_seed`).

The stored label is the pair's code 10 * left + right (100 classes named "l-r", so the set
also works as a single-task set); the labels of the tasks are derived from it (`LABELS`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from xdt_cli.data.embedded import load_mnist5k
from xdt_cli.data.registry import DatasetSpec, DomainRequest, RawDomain, Samples, register
from xdt_cli.data.splits import stratified_split

CANVAS = 36
DIGIT = 28
MAX_SHIFT = 4
PAIRS = {"train": 10_000, "val": 1_500, "test": 1_500}
BUILD_SEED = 0  # the fixed seed of the pairings and shifts: part of the data set's identity

LABELS = {  # label name -> function of the stored pair code
    "left": lambda code: code // 10,
    "right": lambda code: code % 10,
    "sum": lambda code: code // 10 + code % 10,
}


def overlay(left: Tensor, right: Tensor, rng: np.random.Generator) -> Tensor:
    """[N, 1, 28, 28] float pairs -> [N, 1, 36, 36] uint8 canvases (pixel-wise maximum)."""
    n = len(left)
    centre = (CANVAS - DIGIT) // 2
    side = torch.from_numpy(rng.integers(1, MAX_SHIFT + 1, size=(n, 2)))  # left, right digit
    down = torch.from_numpy(rng.integers(0, MAX_SHIFT + 1, size=(n, 2)))  # up (left), down
    canvas = torch.zeros(n, 1, CANVAS, CANVAS)
    for digit, images, sign in ((0, left, -1), (1, right, 1)):
        for d in range(MAX_SHIFT + 1):
            for s in range(1, MAX_SHIFT + 1):  # every sample with this shift at once
                idx = torch.nonzero((down[:, digit] == d) & (side[:, digit] == s)).flatten()
                r, c = centre + sign * d, centre + sign * s
                spot = canvas[idx, :, r : r + DIGIT, c : c + DIGIT]
                canvas[idx, :, r : r + DIGIT, c : c + DIGIT] = torch.maximum(spot, images[idx])
    return canvas.mul_(255).round_().to(torch.uint8)


def pair_sources(split_seed: int) -> dict[str, tuple[Tensor, Tensor, np.random.Generator]]:
    """split -> (mnist5k indices of the left digits, of the right digits, the generator that
    then draws the shifts), each pair drawn within that split's images."""
    _, y = load_mnist5k("mnist5k")
    out = {}
    for k, (name, idx) in enumerate(zip(PAIRS, stratified_split(y, split_seed), strict=True)):
        rng = np.random.default_rng([BUILD_SEED, split_seed, k])
        count = PAIRS[name]
        first = rng.integers(0, len(idx), size=count)
        # the second digit is another image of the same part (never the first one itself)
        second = (first + rng.integers(1, len(idx), size=count)) % len(idx)
        out[name] = (idx[torch.from_numpy(first)], idx[torch.from_numpy(second)], rng)
    return out


@lru_cache(maxsize=4)
def _build(split_seed: int) -> dict[str, Samples]:
    x, y = load_mnist5k("mnist5k")
    parts = {}
    for name, (a, b, rng) in pair_sources(split_seed).items():
        parts[name] = Samples(y[a] * 10 + y[b], x=overlay(x[a], x[b], rng))
    return parts


def open_multimnist(request: DomainRequest) -> RawDomain:
    parts = _build(request.split_seed)
    copied = {
        k: Samples(p.y.clone(), x=p.x.clone() if p.x is not None else None)
        for k, p in parts.items()
    }
    classes = tuple(f"{a}-{b}" for a in range(10) for b in range(10))
    return RawDomain(classes=classes, parts=copied)


register(
    DatasetSpec(
        name="multimnist5k",
        description="two mnist5k digits overlaid on 36x36 (MultiMNIST); labels left, right, sum",
        domains=("multimnist5k",),
        num_classes=100,
        input_shape=(1, CANVAS, CANVAS),
        open=open_multimnist,
        labels=LABELS,
    )
)
