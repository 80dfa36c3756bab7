"""Batched image augmentations: the weak and strong views of consistency training (FixMatch).

Each function takes a float batch [N, C, H, W] with values in [0, 1] and returns a new batch
of the same shape, dtype and range. Every sample gets its own random draw, computed with
whole-tensor operations (no Python loop over samples), and all randomness comes from the
global torch RNG on the batch's device (`torch.rand(..., device=x.device)`): the engine seeds
and checkpoints that RNG, so a run and its resumed copy draw the same augmentations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cutout", "strong", "weak"]


def weak(x: Tensor, *, translate: float = 0.125, flip: bool = False) -> Tensor:
    """FixMatch's weak view: a random shift of up to `translate` of the image size.

    The shift is a whole number of pixels, drawn per sample and per axis (pad-and-random-crop).
    The padding is zeros rather than FixMatch's reflection because digit images have a black
    background. `flip` adds FixMatch's random horizontal flip; it is off by default because
    digits are not flip-invariant (a mirrored 2, 3, 4, 5, 7 or 9 is not that digit).
    """
    n, c, h, w = x.shape
    if flip:
        flipped = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flipped.view(n, 1, 1, 1), x.flip(-1), x)
    pad_y, pad_x = round(translate * h), round(translate * w)
    if pad_y == 0 and pad_x == 0:
        return x.clone()
    padded = F.pad(x, (pad_x, pad_x, pad_y, pad_y))
    top = torch.randint(0, 2 * pad_y + 1, (n,), device=x.device)
    left = torch.randint(0, 2 * pad_x + 1, (n,), device=x.device)
    # Crop each padded image at its own offset with one gather: index [N, C, H, W].
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def strong(
    x: Tensor,
    *,
    rotate: float = 30.0,
    shear: float = 0.3,
    scale: float = 0.2,
    translate: float = 0.3,
    jitter: float = 0.5,
    cutout_size: float = 0.5,
) -> Tensor:
    """A RandAugment-like strong view: random affine, brightness/contrast jitter, then cutout.

    As in FixMatch's RandAugment variant, each operation is applied to a sample with
    probability 1/2 and, when applied, with a magnitude drawn uniformly up to its maximum:
    rotation up to `rotate` degrees, shear up to `shear` on each axis, zoom by a factor in
    [1 - scale, 1 + scale], translation up to `translate` of the size (RandAugment's ranges
    for rotation, shear and translation), brightness and contrast factors in
    [1 - jitter, 1 + jitter]. Cutout is always applied afterwards, as in FixMatch: a square of
    side `cutout_size` of the image is set to zero (the background of digits) at a random
    centre, clipped at the border.
    """
    x = _random_affine(x, rotate=rotate, shear=shear, scale=scale, translate=translate)
    x = _random_brightness_contrast(x, jitter)
    return cutout(x, cutout_size)


def cutout(x: Tensor, size: float = 0.5) -> Tensor:
    """Zero a square of side `size` (a fraction of the shorter side) at a random centre per
    sample (DeVries & Taylor 2017); the square is clipped where it crosses the border."""
    n, _, h, w = x.shape
    side = round(size * min(h, w))
    if side == 0:
        return x.clone()
    cy = torch.randint(0, h, (n,), device=x.device)
    cx = torch.randint(0, w, (n,), device=x.device)
    top, left = cy - side // 2, cx - side // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (
        (ys >= top[:, None, None])
        & (ys < (top + side)[:, None, None])
        & (xs >= left[:, None, None])
        & (xs < (left + side)[:, None, None])
    )
    return x.masked_fill(inside[:, None], 0.0)


def _uniform(n: int, bound: float, x: Tensor) -> Tensor:
    """Per-sample values in [-bound, bound], zero for the half of the samples (on average)
    that skip the operation."""
    value = (2 * torch.rand(n, device=x.device, dtype=x.dtype) - 1) * bound
    applied = torch.rand(n, device=x.device) < 0.5
    return torch.where(applied, value, torch.zeros_like(value))


def _random_affine(
    x: Tensor, *, rotate: float, shear: float, scale: float, translate: float
) -> Tensor:
    n, _, h, w = x.shape
    angle = _uniform(n, math.radians(rotate), x)
    shear_x, shear_y = _uniform(n, shear, x), _uniform(n, shear, x)
    zoom = 1 + _uniform(n, scale, x)
    shift_x, shift_y = _uniform(n, translate, x), _uniform(n, translate, x)

    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    one = torch.ones_like(shear_x)
    shearing = torch.stack([torch.stack([one, shear_x], -1), torch.stack([shear_y, one], -1)], -2)
    # affine_grid maps output to input coordinates: zooming in by `zoom` samples a
    # smaller region, hence the division.
    linear = rotation @ shearing / zoom[:, None, None]
    # The matrix is built in pixel units; in affine_grid's normalised coordinates (x spans
    # [-1, 1] over the width, y over the height) entry (i, j) is scaled by size_j / size_i,
    # so that rotations of non-square images are not distorted.
    aspect = x.new_tensor([[1.0, h / w], [w / h, 1.0]])
    linear = linear * aspect
    shift = torch.stack([2 * shift_x, 2 * shift_y], -1)  # a fraction f of the size is 2f
    theta = torch.cat([linear, shift[:, :, None]], -1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # bilinear weights are convex, so the range is kept; clamp only rounding errors
    return out.to(x.dtype).clamp_(0.0, 1.0)


def _random_brightness_contrast(x: Tensor, jitter: float) -> Tensor:
    n = x.shape[0]
    brightness = 1 + _uniform(n, jitter, x)
    contrast = 1 + _uniform(n, jitter, x)
    x = x * brightness.view(n, 1, 1, 1)
    # contrast pulls every pixel toward (or away from) the image's mean intensity, as PIL does
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast.view(n, 1, 1, 1)
    return x.clamp(0.0, 1.0)
