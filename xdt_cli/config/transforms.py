"""The schema of `data.*.transforms`: each op's arguments, validated torch-free so that
reading a config never imports torch; the ops themselves are in data/transforms.py."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from xdt_cli.config.errors import did_you_mean
from xdt_cli.config.strict import Strict

NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
    "half": ((0.5,), (0.5,)),  # [0, 1] -> [-1, 1] on any number of channels
}


class _TransformArgs(Strict):
    """The arguments of one transform; a scalar or a list stands for its `shorthand` field."""

    shorthand: ClassVar[str | None] = None
    random: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, value: Any) -> Any:
        if value is None:
            return {}
        if cls.shorthand and not isinstance(value, dict):
            return {cls.shorthand: value}
        return value

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class _SizedArgs(_TransformArgs):
    shorthand = "size"
    size: int | tuple[int, int] = Field(
        description="[H, W]; an int is a square, except for resize: the shorter side"
    )

    @field_validator("size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> int | tuple[int, int]:
        def positive(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        if positive(value):
            return value
        if isinstance(value, list | tuple) and len(value) == 2 and all(map(positive, value)):
            return (value[0], value[1])
        raise ValueError(f"expected a size in pixels or [height, width], got {value!r}")


class ResizeArgs(_SizedArgs):
    """[H, W]: exactly that size; an int: the shorter side becomes that, keeping the aspect."""


class CenterCropArgs(_SizedArgs):
    pass


class RandomCropArgs(_SizedArgs):
    random = True
    padding: int = Field(0, ge=0, strict=True, description="pixels added on every side first")
    padding_mode: Literal["constant", "reflect", "edge"] = "constant"


class RandomResizedCropArgs(_SizedArgs):
    random = True
    scale: tuple[float, float] = Field((0.08, 1.0), description="range of the crop's area share")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="range of its aspect ratio")

    @model_validator(mode="after")
    def _ranges(self) -> RandomResizedCropArgs:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale: expected 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError("ratio: expected 0 < low <= high")
        return self


class RandomAffineArgs(_TransformArgs):
    """A random rotation, shear, scaling and shift per image (torchvision's RandomAffine);
    uncovered pixels become 0."""

    random = True
    degrees: float = Field(0.0, ge=0, le=180, description="rotation drawn from [-d, d] degrees")
    translate: tuple[float, float] = Field(
        (0.0, 0.0), description="largest shift as a share of [width, height], each in [0, 1]"
    )
    scale: tuple[float, float] = Field((1.0, 1.0), description="range of the zoom factor")
    shear: float = Field(0.0, ge=0, lt=90, description="x-shear drawn from [-s, s] degrees")

    @model_validator(mode="after")
    def _ranges(self) -> RandomAffineArgs:
        if not all(0 <= t <= 1 for t in self.translate):
            raise ValueError("translate: expected two shares in [0, 1]")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError("scale: expected 0 < low <= high")
        return self


class HorizontalFlipArgs(_TransformArgs):
    shorthand = "p"
    random = True
    p: float = Field(0.5, ge=0, le=1, description="probability of flipping an image")


def _jitter_range(part: str, value: float | tuple[float, float]) -> tuple[float, float]:
    """The [low, high] a color_jitter part draws from: its range, or a spread around the
    identity (factor 1, hue shift 0), factors kept >= 0."""
    if isinstance(value, tuple):
        return value
    if part == "hue":
        return (-value, value)
    return (max(0.0, 1 - value), 1 + value)


class ColorJitterArgs(_TransformArgs):
    """Each part is a spread x (a factor from [1 - x, 1 + x], a hue shift from [-x, x]) or,
    as in torchvision, an explicit [low, high] range."""

    random = True
    brightness: float | tuple[float, float] = Field(
        0.0, description="factor drawn from [1 - b, 1 + b], or from [low, high]"
    )
    contrast: float | tuple[float, float] = Field(
        0.0, description="factor drawn from [1 - c, 1 + c], or from [low, high]"
    )
    saturation: float | tuple[float, float] = Field(
        0.0, description="factor drawn from [1 - s, 1 + s], or from [low, high]"
    )
    hue: float | tuple[float, float] = Field(
        0.0, description="shift drawn from [-h, h], or from [low, high], within [-0.5, 0.5]"
    )

    @field_validator("brightness", "contrast", "saturation", "hue")
    @classmethod
    def _valid_range(cls, value: Any, info: ValidationInfo) -> Any:
        hue = info.field_name == "hue"
        if isinstance(value, tuple):
            if not value[0] <= value[1]:
                raise ValueError(f"expected low <= high, got {list(value)}")
            if not hue and value[0] < 0:
                raise ValueError("factors must be >= 0")
        elif value < 0:
            raise ValueError("a spread must be >= 0")
        low, high = _jitter_range(str(info.field_name), value)
        if hue and not -0.5 <= low <= high <= 0.5:
            raise ValueError("a hue shift must lie within [-0.5, 0.5]")
        return value

    def range(self, part: str) -> tuple[float, float]:
        """The [low, high] that `part`'s factor (or hue shift) is drawn from."""
        return _jitter_range(part, getattr(self, part))

    def active(self, part: str) -> bool:
        """False when `part` can only be the identity (factor 1, hue shift 0)."""
        return self.range(part) != ((0.0, 0.0) if part == "hue" else (1.0, 1.0))


class LevelsArgs(_TransformArgs):
    """An image editor's "levels": values up to `low` become 0, values from `high` on become
    1, linear in between; the same map for every pixel, channel and image.

    Blurry, faint strokes become crisp, saturated ones: the embedded digits (8x8 scans
    enlarged to 28x28) get MNIST's stroke contrast with `{low: 0.35, high: 0.75}`."""

    low: float = Field(0.0, ge=0, lt=1, description="the value that becomes black (0)")
    high: float = Field(1.0, gt=0, le=1, description="the value that becomes white (1)")

    @model_validator(mode="after")
    def _ordered(self) -> LevelsArgs:
        if not self.low < self.high:
            raise ValueError(f"expected low < high, got low {self.low}, high {self.high}")
        return self


class GrayscaleArgs(_TransformArgs):
    shorthand = "channels"
    channels: Literal[1, 3] = Field(1, description="1: grey; 3: grey repeated on R, G and B")


class NormalizeArgs(_TransformArgs):
    shorthand = "preset"
    preset: Literal["imagenet", "cifar10", "mnist", "half"] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    @model_validator(mode="after")
    def _preset_or_values(self) -> NormalizeArgs:
        given = self.mean is not None or self.std is not None
        if (self.preset is None) == (not given):
            raise ValueError(
                "give a preset (imagenet, cifar10, mnist, half) or mean and std, not both"
            )
        if given:
            if self.mean is None or self.std is None or len(self.mean) != len(self.std):
                raise ValueError("mean and std need one value per channel each")
            if not self.mean or any(s <= 0 for s in self.std):
                raise ValueError("std values must be > 0")
        return self

    def values(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.preset is not None:
            return NORMALIZE_PRESETS[self.preset]
        return tuple(self.mean or ()), tuple(self.std or ())


class TransformStep(Strict):
    """One transform, written as a one-key mapping `{name: arguments}` (or a bare name)."""

    resize: ResizeArgs | None = None
    center_crop: CenterCropArgs | None = None
    random_crop: RandomCropArgs | None = None
    random_resized_crop: RandomResizedCropArgs | None = None
    random_affine: RandomAffineArgs | None = None
    horizontal_flip: HorizontalFlipArgs | None = None
    color_jitter: ColorJitterArgs | None = None
    levels: LevelsArgs | None = None
    grayscale: GrayscaleArgs | None = None
    normalize: NormalizeArgs | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_transform(cls, value: Any) -> Any:
        if isinstance(value, str):  # `- horizontal_flip`: the default arguments
            value = {value: {}}
        if not isinstance(value, dict):
            return value  # pydantic names the type error
        given = list(value)
        if len(given) != 1:
            raise ValueError(
                f"each transform is one {{name: arguments}} mapping; got "
                f"{', '.join(map(str, value)) or 'none'}"
            )
        name = given[0]
        if name not in cls.model_fields:
            raise ValueError(
                f"unknown transform '{name}'{did_you_mean(str(name), cls.model_fields)}; "
                f"known: {', '.join(cls.model_fields)}"
            )
        return {name: {} if value[name] is None else value[name]}

    @property
    def op(self) -> tuple[str, _TransformArgs]:
        """(name, arguments) of the one transform this step holds."""
        return next((k, v) for k in type(self).model_fields if (v := getattr(self, k)) is not None)

    @model_serializer(mode="wrap")
    def _only_the_transform(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class TransformsConfig(Strict):
    """Per-split transforms: `train` feeds the training stream, `eval` the val and test splits.

    Both lists run in order on images as floats in [0, 1] and must give one image size.
    """

    train: list[TransformStep] = Field(default_factory=list)
    eval: list[TransformStep] = Field(default_factory=list)

    @model_validator(mode="after")
    def _deterministic_eval(self) -> TransformsConfig:
        for i, step in enumerate(self.eval):
            name, args = step.op
            if args.random:
                raise ValueError(
                    f"eval.{i}: {name} is random; eval transforms must be deterministic "
                    "(use center_crop, resize)"
                )
        return self
