"""Image transforms as batched tensor ops: one implementation for every kind of data set.

The config keys (`data.<source|target>.transforms.train|eval`) are checked by the torch-free
schema in config/transforms.py (`TransformStep`); this module turns a validated list into a
`Pipeline`.
A pipeline maps a batch [B, C, H, W] of uint8 (0..255) or float (0..1) images to float32:
geometric ops (resize, crops, flip) keep the storage type, so in-memory uint8 sets are cut
and flipped as bytes, and the batch becomes float in [0, 1] at the first op that needs it
(colour jitter, grayscale, normalize) or at the end.

In-memory sets run the pipeline on whole batches on the training device; image-folder sets
run the same pipeline per image in the DataLoader workers (a batch of one), so the same keys
mean the same thing everywhere. Random draws come from torch's global CPU generator: the
engine checkpoints it, and the disk stream seeds it per image (see data/disk.py), so a
resumed run draws the same crops and flips.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from xdt_cli.config import (
    CenterCropArgs,
    ColorJitterArgs,
    GrayscaleArgs,
    HorizontalFlipArgs,
    LevelsArgs,
    NormalizeArgs,
    RandomAffineArgs,
    RandomCropArgs,
    RandomResizedCropArgs,
    ResizeArgs,
    TransformStep,
    first_line,
)
from xdt_cli.errors import ConfigError

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.2989, 0.587, 0.114)


def to_float(x: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; float images pass through (as float32)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x if x.dtype == torch.float32 else x.float()


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _uniform(n: int, low: float, high: float) -> Tensor:
    return torch.rand(n) * (high - low) + low


def _gray(x: Tensor) -> Tensor:
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


class Op:
    """One transform. `random` ops draw from the global CPU generator; `needs_float` ops get
    float images in [0, 1]."""

    name = ""
    random = False
    needs_float = False

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class Resize(Op):
    name = "resize"

    def __init__(self, args: ResizeArgs) -> None:
        self.size = [args.size] if isinstance(args.size, int) else list(args.size)

    def __call__(self, x: Tensor) -> Tensor:
        return TF.resize(x, self.size, antialias=True)


class CenterCrop(Op):
    name = "center_crop"

    def __init__(self, args: CenterCropArgs) -> None:
        self.size = list(_pair(args.size))

    def __call__(self, x: Tensor) -> Tensor:
        return TF.center_crop(x, self.size)


class RandomCrop(Op):
    """Pad every side by `padding`, then cut a random window of `size` from each image."""

    name = "random_crop"
    random = True

    def __init__(self, args: RandomCropArgs) -> None:
        self.size = _pair(args.size)
        self.padding = args.padding
        self.mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[
            args.padding_mode
        ]
        self.needs_float = self.mode != "constant"  # torch pads integer images with 0 only

    def __call__(self, x: Tensor) -> Tensor:
        if self.padding:
            x = F.pad(x, [self.padding] * 4, mode=self.mode)
        b, _, height, width = x.shape
        h, w = self.size
        if h > height or w > width:
            raise ValueError(
                f"random_crop: {h}x{w} is larger than the (padded) image {height}x{width}"
            )
        top = torch.randint(0, height - h + 1, (b,))
        left = torch.randint(0, width - w + 1, (b,))
        if b == 1:
            t, s = int(top), int(left)
            return x[..., t : t + h, s : s + w]
        rows = (top[:, None] + torch.arange(h)).to(x.device)
        cols = (left[:, None] + torch.arange(w)).to(x.device)
        batch = torch.arange(b, device=x.device)[:, None, None]
        # advanced indices around a slice: the result is [B, h, w, C]
        return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class RandomResizedCrop(Op):
    """A crop of random area share `scale` and aspect `ratio`, resized to `size`.

    The box is drawn as torchvision's RandomResizedCrop does (ten tries, then a central crop
    of the closest allowed aspect), with all tries drawn at once so that every batch uses the
    same number of random numbers.
    """

    name = "random_resized_crop"
    random = True
    TRIES = 10

    def __init__(self, args: RandomResizedCropArgs) -> None:
        self.size = list(_pair(args.size))
        self.scale = args.scale
        self.log_ratio = (math.log(args.ratio[0]), math.log(args.ratio[1]))
        self.ratio = args.ratio

    def boxes(self, b: int, height: int, width: int) -> Tensor:
        """[B, 4] integer boxes (top, left, h, w)."""
        area = height * width
        target = area * _uniform(b * self.TRIES, *self.scale).view(b, self.TRIES)
        aspect = torch.exp(_uniform(b * self.TRIES, *self.log_ratio)).view(b, self.TRIES)
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        u = torch.rand(b, self.TRIES, 2)
        top = (u[..., 0] * (height - h + 1)).floor()
        left = (u[..., 1] * (width - w + 1)).floor()
        # fallback: the whole image, cut to the nearest allowed aspect ratio, centred
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        out = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw]).repeat(b, 1)
        first = torch.where(ok.any(1), ok.float().argmax(1), -1)
        for i in range(b):
            j = int(first[i])
            if j >= 0:
                out[i] = torch.stack([top[i, j], left[i, j], h[i, j], w[i, j]]).long()
        return out

    def __call__(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        boxes = self.boxes(b, height, width).tolist()
        return torch.cat(
            [
                TF.resized_crop(x[i : i + 1], t, s, h, w, self.size, antialias=True)
                for i, (t, s, h, w) in enumerate(boxes)
            ]
        )


class RandomAffine(Op):
    """Rotate, shear, scale and shift each image by its own random draw (one batched
    `grid_sample`, bilinear, zeros outside), about the image centre as torchvision does.

    The forward map in pixel coordinates centred on the image is p -> A p + t with
    A = scale * R(angle) @ Shear(shear); each output pixel samples the input at
    A^-1 (p - t), expressed in `affine_grid`'s [-1, 1] coordinates.
    """

    name = "random_affine"
    random = True
    needs_float = True

    def __init__(self, args: RandomAffineArgs) -> None:
        self.args = args

    def matrices(self, b: int, height: int, width: int) -> Tensor:
        """[B, 2, 3] sampling matrices (output -> input) in normalised coordinates."""
        a = self.args
        angle = torch.deg2rad(_uniform(b, -a.degrees, a.degrees).double())
        shear = torch.deg2rad(_uniform(b, -a.shear, a.shear).double())
        zoom = _uniform(b, *a.scale).double()
        shift = torch.stack(
            [
                _uniform(b, -1, 1) * a.translate[0] * width,
                _uniform(b, -1, 1) * a.translate[1] * height,
            ],
            -1,
        ).double()
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([cos, -sin, sin, cos], -1).view(b, 2, 2)
        shearing = torch.eye(2, dtype=torch.float64).repeat(b, 1, 1)
        shearing[:, 0, 1] = -torch.tan(shear)  # torchvision's sign
        inverse = torch.linalg.inv(zoom.view(b, 1, 1) * rotation @ shearing)
        half = torch.tensor([width / 2, height / 2], dtype=torch.float64)
        linear = inverse * half.view(1, 1, 2) / half.view(1, 2, 1)  # D^-1 A^-1 D
        offset = -(inverse @ shift.unsqueeze(-1)).squeeze(-1) / half
        return torch.cat([linear, offset.unsqueeze(-1)], -1).float()

    def __call__(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        theta = self.matrices(b, height, width).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class HorizontalFlip(Op):
    name = "horizontal_flip"
    random = True

    def __init__(self, args: HorizontalFlipArgs) -> None:
        self.p = args.p

    def __call__(self, x: Tensor) -> Tensor:
        flip = (torch.rand(x.shape[0]) < self.p).to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(-1), x)


class ColorJitter(Op):
    """Brightness, contrast, saturation and hue, each with a factor drawn per image, applied
    in an order drawn per batch (per image for image-folder sets, as in torchvision)."""

    name = "color_jitter"
    random = True
    needs_float = True

    def __init__(self, args: ColorJitterArgs) -> None:
        self.args = args

    def __call__(self, x: Tensor) -> Tensor:
        a, b = self.args, x.shape[0]

        def draw(part: str) -> Tensor:
            return _uniform(b, *a.range(part)).to(x.device).view(-1, 1, 1, 1)

        order = torch.randperm(4).tolist()
        for i in order:
            if i == 0 and a.active("brightness"):
                x = (x * draw("brightness")).clamp_(0, 1)
            elif i == 1 and a.active("contrast"):
                mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
                f = draw("contrast")
                x = (f * x + (1 - f) * mean).clamp_(0, 1)
            elif i == 2 and a.active("saturation") and x.shape[1] == 3:
                f = draw("saturation")
                x = (f * x + (1 - f) * _gray(x)).clamp_(0, 1)
            elif i == 3 and a.active("hue") and x.shape[1] == 3:
                shift = draw("hue").view(-1, 1, 1)
                h, s, v = _rgb_to_hsv(x).unbind(-3)
                x = _hsv_to_rgb(torch.stack([(h + shift) % 1.0, s, v], -3))
        return x


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    same = maxc == minc
    spread = maxc - minc
    ones = torch.ones_like(maxc)
    s = spread / torch.where(same, ones, maxc)
    d = torch.where(same, ones, spread)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = (
        (maxc == r) * (bc - gc)
        + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
        + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    )
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], -3)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    # the six sectors of the hue circle, as in torchvision's _hsv_to_rgb
    table = torch.stack(
        [
            torch.stack([v, q, p, p, t, v], -3),
            torch.stack([t, v, v, q, p, p], -3),
            torch.stack([p, p, t, v, v, q], -3),
        ],
        -4,
    )  # [B, 3, 6, H, W]
    pick = (i.unsqueeze(-3) == torch.arange(6, device=x.device).view(-1, 1, 1)).to(x.dtype)
    return (table * pick.unsqueeze(-4)).sum(-3)


class Levels(Op):
    """x -> (x - low) / (high - low), clamped to [0, 1] (see LevelsArgs)."""

    name = "levels"
    needs_float = True

    def __init__(self, args: LevelsArgs) -> None:
        self.low, self.high = args.low, args.high

    def __call__(self, x: Tensor) -> Tensor:
        return ((x - self.low) / (self.high - self.low)).clamp_(0, 1)


class Grayscale(Op):
    name = "grayscale"
    needs_float = True

    def __init__(self, args: GrayscaleArgs) -> None:
        self.channels = args.channels

    def __call__(self, x: Tensor) -> Tensor:
        g = _gray(x)
        return g.expand(-1, self.channels, -1, -1).contiguous() if self.channels == 3 else g


class Normalize(Op):
    name = "normalize"
    needs_float = True

    def __init__(self, args: NormalizeArgs) -> None:
        mean, std = args.values()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        n = self.mean.shape[1]
        if n not in (1, x.shape[1]):
            raise ValueError(
                f"normalize: {n} mean/std values for images with {x.shape[1]} channels"
            )
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


OPS: dict[str, type[Op]] = {
    op.name: op
    for op in (
        Resize,
        CenterCrop,
        RandomCrop,
        RandomResizedCrop,
        RandomAffine,
        HorizontalFlip,
        ColorJitter,
        Levels,
        Grayscale,
        Normalize,
    )
}


class Pipeline:
    """A list of ops; calling it maps an image batch to float32 (see the module docstring).

    An empty pipeline is the identity on float images, so the embedded sets, which have no
    transforms, reach the model exactly as loaded.
    """

    def __init__(self, ops: tuple[Op, ...] = ()) -> None:
        self.ops = ops

    @property
    def random(self) -> bool:
        return any(op.random for op in self.ops)

    def __call__(self, x: Tensor) -> Tensor:
        for op in self.ops:
            if op.needs_float:
                x = to_float(x)
            x = op(x)
        return to_float(x)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The (C, H, W) that an image of `shape` becomes; raises ValueError when an op
        cannot apply (a crop larger than the image, normalize with the wrong channels)."""
        with torch.random.fork_rng(devices=[]):  # a dry run must not move the global RNG
            out = self(torch.zeros(1, *shape, dtype=torch.uint8))
        c, h, w = out.shape[1:]
        return (c, h, w)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(op.name for op in self.ops)})"


def build_pipeline(steps: list[TransformStep]) -> Pipeline:
    ops = []
    for step in steps:
        name, args = step.op
        ops.append(OPS[name](args))
    return Pipeline(tuple(ops))


def build_pipelines(
    transforms, input_shape: tuple[int, int, int], key: str
) -> tuple[Pipeline, Pipeline, tuple[int, int, int]]:
    """The train and eval pipelines of a domain section and the image shape they produce.

    `input_shape` is one stored image's (C, H, W). Both pipelines must give the same shape,
    since one model reads both; a mismatch or an op that cannot apply is a ConfigError.
    """
    pipelines, shapes = [], []
    for split in ("train", "eval"):
        pipeline = build_pipeline(getattr(transforms, split))
        try:
            shapes.append(pipeline.output_shape(input_shape))
        except (ValueError, RuntimeError) as exc:
            first = first_line(exc, kind=False)
            raise ConfigError(
                f"{key}.transforms.{split}: cannot transform images of shape "
                f"{'x'.join(map(str, input_shape))} ({first})"
            ) from None
        pipelines.append(pipeline)
    if shapes[0] != shapes[1]:
        raise ConfigError(
            f"{key}.transforms: train gives images of shape {'x'.join(map(str, shapes[0]))} "
            f"but eval gives {'x'.join(map(str, shapes[1]))}; one model reads both"
        )
    return pipelines[0], pipelines[1], shapes[0]
