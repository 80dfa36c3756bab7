"""Multi-domain sets derived deterministically from the embedded digits (no network).

- `rotated_mnist5k`: mnist5k shuffled with a fixed seed, cut into six disjoint parts, part k
  rotated by 15k degrees: domains `rot0` ... `rot75`. DomainBed's RotatedMNIST construction
  (Gulrajani & Lopez-Paz 2021, after Ghifary et al. 2015) on the 5,000 embedded images.
- `colored_mnist5k`: ColoredMNIST (Arjovsky et al. 2019, "Invariant Risk Minimization") on
  mnist5k, as DomainBed builds it: shuffled with a fixed seed, cut into three parts; the label
  is `digit < 5` flipped with probability 0.25, the colour (which of two channels holds the
  digit) agrees with that label with probability 0.9, 0.8 and 0.1: domains `env90`, `env80`,
  `env10`. Images are 2x28x28; the model takes its input channels from the data.
- `digits_dg`: the embedded digit domains (`digits`, `mnist5k`) as one multi-domain set.

Every random choice uses a fixed generator, so every machine builds the same images.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xdt_cli.data.embedded import load_digits, load_mnist5k
from xdt_cli.data.registry import DatasetSpec, register

ROTATIONS = (0, 15, 30, 45, 60, 75)
ROTATED_DOMAINS = tuple(f"rot{angle}" for angle in ROTATIONS)
# colour-label agreement of each ColoredMNIST environment (DomainBed: 1 - 0.1, 1 - 0.2, 1 - 0.9)
COLOR_AGREEMENT = {"env90": 0.9, "env80": 0.8, "env10": 0.1}
LABEL_NOISE = 0.25
BUILD_SEED = 0  # the fixed seed of the shuffles and coin flips: part of the data set's identity


def rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate images [N, C, H, W] counter-clockwise about their centre, bilinear, zero fill
    (as torchvision's `rotate` in DomainBed's RotatedMNIST)."""
    if degrees == 0:
        return x.clone()
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output (x right, y down) to input coordinates: the inverse rotation
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(matrix.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)


def _parts(n: int, count: int) -> list[np.ndarray]:
    order = np.random.default_rng(BUILD_SEED).permutation(n)
    return np.array_split(order, count)


@lru_cache(maxsize=1)
def _rotated() -> dict[str, tuple[Tensor, Tensor]]:
    x, y = load_mnist5k("mnist5k")
    out = {}
    for name, angle, idx in zip(ROTATED_DOMAINS, ROTATIONS, _parts(len(y), 6), strict=True):
        index = torch.from_numpy(idx)
        out[name] = (rotate(x[index], angle).contiguous(), y[index].clone())
    return out


def load_rotated(domain: str) -> tuple[Tensor, Tensor]:
    x, y = _rotated()[domain]
    return x.clone(), y.clone()


@lru_cache(maxsize=1)
def _colored() -> dict[str, tuple[Tensor, Tensor]]:
    x, digit = load_mnist5k("mnist5k")
    gen = torch.Generator().manual_seed(BUILD_SEED)
    out = {}
    for (name, agree), idx in zip(COLOR_AGREEMENT.items(), _parts(len(digit), 3), strict=True):
        index = torch.from_numpy(idx)
        images, n = x[index], len(idx)
        label = (digit[index] < 5).long()
        label ^= (torch.rand(n, generator=gen) < LABEL_NOISE).long()
        color = label ^ (torch.rand(n, generator=gen) >= agree).long()
        coloured = torch.zeros(n, 2, *images.shape[2:])
        coloured[torch.arange(n), color] = images[:, 0]
        out[name] = (coloured, label)
    return out


def load_colored(domain: str) -> tuple[Tensor, Tensor]:
    x, y = _colored()[domain]
    return x.clone(), y.clone()


def load_digit_domain(domain: str) -> tuple[Tensor, Tensor]:
    return load_digits(domain) if domain == "digits" else load_mnist5k(domain)


register(
    DatasetSpec(
        name="rotated_mnist5k",
        description="mnist5k cut into 6 parts rotated by 0..75 degrees (DomainBed's RotatedMNIST)",
        domains=ROTATED_DOMAINS,
        num_classes=10,
        input_shape=(1, 28, 28),
        load=load_rotated,
    )
)
register(
    DatasetSpec(
        name="colored_mnist5k",
        description="ColoredMNIST of Arjovsky et al. 2019 on mnist5k: digit<5, 25% label "
        "noise, colour agreeing 90/80/10%",
        domains=tuple(COLOR_AGREEMENT),
        num_classes=2,
        input_shape=(2, 28, 28),
        load=load_colored,
        classes=("0-4", "5-9"),
    )
)
register(
    DatasetSpec(
        name="digits_dg",
        description="the embedded digit sets (digits, mnist5k) as domains of one set",
        domains=("digits", "mnist5k"),
        num_classes=10,
        input_shape=(1, 28, 28),
        load=load_digit_domain,
    )
)
