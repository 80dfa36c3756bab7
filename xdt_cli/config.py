"""Experiment configs: the pydantic schema and `load_config`, the only place that reads YAML.

A config is validated once, strictly, here at the boundary; the rest of the code reads typed
attributes and never supplies a default of its own. Precedence, lowest first:
schema defaults < `base:` config < the config file < `key.path=value` overrides < CLI flags.

Every section forbids unknown keys. An unknown key, a wrong type or a bad value becomes one
line that names the dotted key path (with a did-you-mean for unknown keys). The `method`
section is open here and validated by the chosen method's own `Config` (see methods/base.py),
so that adding a method touches one file.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from xdt_cli.errors import ConfigError
from xdt_cli.selection import DEFAULT_RULES, RULES, Layout

SUBCOMMANDS = ("train-source", "finetune", "transfer", "multitask", "generalize")


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors.

    Integer fields are strict (YAML already yields ints, so `true` or `"10"` is a mistake);
    float fields stay lax so that `1e-3`, which PyYAML reads as a string, is a float.
    """

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- data
# The transform schema lives here, torch-free, so that reading a config never imports torch;
# the ops themselves are in data/transforms.py.

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
                f"unknown transform '{name}'{_did_you_mean(str(name), cls.model_fields)}; "
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


class LoaderConfig(Strict):
    """DataLoader settings of an image-folder (disk) set; in-memory sets take none."""

    num_workers: int = Field(
        0, ge=0, strict=True, description="processes decoding images (0: the training process)"
    )
    pin_memory: bool = Field(False, description="page-locked batches for faster copies to CUDA")
    persistent_workers: bool = Field(False, description="keep the worker processes between uses")

    @model_validator(mode="after")
    def _workers(self) -> LoaderConfig:
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers needs num_workers > 0")
        return self


class DomainConfig(Strict):
    """One domain: which data set (and domain of it), where its files are, which classes,
    and how its images are transformed. See docs/DATA.md."""

    dataset: str = Field(description="a registered data set (see `xdt datasets`)")
    domain: str | None = Field(
        None, description="the domain of a multi-domain set, e.g. amazon in office31"
    )
    root: str | None = Field(
        None,
        description="folder of the files (torchvision sets: default ./data; image-folder sets: "
        "required, holding root/<domain>/<class>/<image>); relative to the working directory",
    )
    download: bool = Field(False, description="torchvision sets: fetch missing files into root")
    classes: list[str] | None = Field(
        None, description="keep only these classes, in this order (labels 0..k-1)"
    )
    class_map: dict[str, str] = Field(
        default_factory=dict,
        description="rename the set's classes before `classes` applies, e.g. {car: automobile}",
    )
    labels_per_class: int | None = Field(
        None,
        gt=0,
        strict=True,
        description="keep k labelled training samples per class (seeded by labels_seed)",
    )
    labels_seed: int | None = Field(
        None,
        ge=0,
        strict=True,
        description="seed of the labels_per_class draw (default: data.split_seed); val and "
        "test stay those of data.split_seed",
    )
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    skip_bad_images: bool = Field(
        False, description="image-folder sets: skip (and count) files that cannot be decoded"
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @model_validator(mode="after")
    def _classes(self) -> DomainConfig:
        if self.classes is not None:
            if not self.classes:
                raise ValueError("classes: keep at least one class (or leave the key out)")
            seen = {c for c in self.classes if self.classes.count(c) > 1}
            if seen:
                raise ValueError(f"classes: {', '.join(sorted(seen))} given twice")
        return self

    @model_validator(mode="after")
    def _labels_seed(self) -> DomainConfig:
        if self.labels_seed is not None and self.labels_per_class is None:
            raise ValueError("labels_seed: seeds the labels_per_class draw; set that too")
        return self


TASK_KEYS = ("label", "loss", "weight", "missing_labels")  # the rest is the task's data


class TaskConfig(DomainConfig):
    """One task of `xdt multitask`: its data (the keys of a `data.source` section), its
    label, its loss and its static weight. Tasks whose data keys are all equal read the same
    inputs (one batch per step, several labels); a task with its own data gets its own batch.
    """

    label: str = Field(
        "class",
        description="class (the set's class index), parity (even/odd of an integer class "
        "name), or a label of the set, e.g. left, right or sum of multimnist5k",
    )
    loss: Literal["ce", "bce", "mse"] = Field(
        "ce", description="ce: classes; bce: a 0/1 label; mse: the label as a number"
    )
    weight: float | None = Field(
        None, ge=0, description="lambda_i of the static weighting (default 1; static only)"
    )
    missing_labels: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="hide this fraction of the task's training labels (seeded by "
        "data.split_seed): those samples add nothing to its loss",
    )

    def data_key(self) -> str:
        """The task's data, as text: tasks with the same key share their inputs."""
        return self.model_dump_json(exclude=set(TASK_KEYS))


class DomainFilesConfig(Strict):
    """`data.files` of generalize: the file-reading keys of a `data.source` section, shared
    by every domain of `data.dataset` (e.g. PACS's root, transforms and loader)."""

    root: str | None = Field(None, description="the folder holding <domain>/<class>/<image>")
    download: bool = Field(False, description="torchvision sets: fetch missing files into root")
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    skip_bad_images: bool = Field(False, description="skip and count undecodable images")
    loader: LoaderConfig = Field(default_factory=LoaderConfig)


class DataConfig(Strict):
    split_seed: int = Field(
        0,
        strict=True,
        description="seed of the stratified splits: 70/15/15 train/val/test, or 85/15 "
        "train/val of a set's official training split (its official test split stays test)",
    )
    source: DomainConfig | None = Field(
        None, description="the labelled source domain (finetune: only evaluated, optional)"
    )
    target: DomainConfig | None = Field(
        None,
        description="train-source: only evaluated; finetune: trained on with its labels; "
        "transfer: trained on without labels",
    )
    # generalize: one multi-domain set, its training domains and the held-out ones
    dataset: str | None = Field(
        None, description="generalize: a multi-domain data set, e.g. rotated_mnist5k"
    )
    domains: list[str] | None = Field(
        None, description="generalize: the domains used (default: all of data.dataset's)"
    )
    test_domains: list[str] = Field(
        default_factory=list,
        description="generalize: held-out domains, never trained on (split 20% val / 80% test)",
    )
    domain_weights: dict[str, float] = Field(
        default_factory=dict,
        description="generalize: lambda_d of a training domain in the loss (default 1.0)",
    )
    files: DomainFilesConfig | None = Field(
        None,
        description="generalize on a disk set (image folders such as PACS): where every "
        "domain's files are and how they are read; the keys of a data.source section",
    )
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict,
        description="multitask: task name -> its data, label, loss and weight",
    )
    sample_weights: str = Field(
        "none",
        description="generalize: per-sample weights s inside each domain's mean risk: none "
        "(every domain's mean loss counts the same, DomainBed's ERM), pooled (every training "
        "sample counts the same, whatever its domain's size), class_balanced (every class "
        "counts the same in each domain), or a .npy file indexed like the training samples "
        "(the training domains' train splits in data.domains order); see regimes.py",
    )

    @model_validator(mode="after")
    def _weights(self) -> DataConfig:
        for name in self.tasks:
            if name in ("avg", "train"):
                raise ValueError(f"data.tasks.{name}: '{name}' is reserved in metric names")
            if not name.isidentifier():
                raise ValueError(
                    f"data.tasks.{name}: a task name is a letter or _ then letters, digits "
                    "or _ (it names metrics such as left/test/acc)"
                )
        for name, value in self.domain_weights.items():
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"data.domain_weights.{name}: expected a weight >= 0, got {value}")
        if self.domain_weights and not any(v > 0 for v in self.domain_weights.values()):
            raise ValueError("data.domain_weights: at least one weight must be > 0")
        if self.sample_weights == "inverse_domain_size":
            raise ValueError(
                "data.sample_weights: 'inverse_domain_size' was removed: 'none' (the default) "
                "now gives every training domain the same share (DomainBed's ERM)"
            )
        named = ("none", "pooled", "class_balanced")
        if self.sample_weights not in named and not self.sample_weights.endswith(".npy"):
            raise ValueError(
                f"data.sample_weights: expected {', '.join(named)} or a .npy file, "
                f"got '{self.sample_weights}'"
            )
        for key in ("domains", "test_domains"):
            values = getattr(self, key) or []
            twice = sorted({d for d in values if values.count(d) > 1})
            if twice:
                raise ValueError(f"data.{key}: {', '.join(twice)} given twice")
        return self


# --------------------------------------------------------------------------- model
class ModelConfig(Strict):
    """The network and which of its parameters train (theta_upd) or stay fixed (theta_fix).

    Parameter names are the model's own (`features.0.0.weight`, `head.bias`); patterns are
    shell-style globs, and a bare module name such as `features` means `features.*`.
    """

    backbone: str = Field(
        "lenet",
        description="lenet, cnn, brief_cnn, a torchvision classification model name, "
        "timm:<name> (with timm installed) or a plug-in backbone",
    )
    preset: Literal["full", "linear_probe", "last_k_blocks"] | None = Field(
        None,
        description="full: all train; linear_probe: only the head; last_k_blocks: the head "
        "and the last k_blocks blocks of the features",
    )
    k_blocks: int | None = Field(
        None, gt=0, strict=True, description="k of preset last_k_blocks (default 1)"
    )
    freeze: list[str] = Field(
        default_factory=list, description="parameters to keep fixed (applied after preset)"
    )
    trainable: list[str] = Field(
        default_factory=list, description="parameters to train even if frozen above"
    )
    freeze_bn: bool = Field(
        False, description="batch-norm layers whose parameters are fixed also keep their statistics"
    )
    unfreeze: dict[str, int] = Field(
        default_factory=dict,
        description="gradual unfreezing: {pattern: step}; those parameters train from that step",
    )
    arch: Literal["hps", "mmoe"] | None = Field(
        None,
        description="multitask: hps (one shared encoder, a head per task; the default) or "
        "mmoe (model.experts copies of the backbone mixed by a softmax gate per task)",
    )
    experts: int | None = Field(
        None, gt=0, strict=True, description="multitask, arch mmoe: the number of experts (3)"
    )
    heads: dict[str, list[Annotated[int, Field(gt=0, strict=True)]]] = Field(
        default_factory=dict,
        description="multitask: a task's head as the widths of its hidden layers (a tower "
        "of linear+ReLU layers, as in MMoE), e.g. {left: [64]}; a task not listed gets a "
        "linear head",
    )

    @model_validator(mode="after")
    def _k_needs_preset(self) -> ModelConfig:
        if self.k_blocks is not None and self.preset != "last_k_blocks":
            raise ValueError("model.k_blocks is only used with model.preset: last_k_blocks")
        if self.experts is not None and self.arch != "mmoe":
            raise ValueError("model.experts is only used with model.arch: mmoe")
        for pattern, step in self.unfreeze.items():
            if isinstance(step, bool) or step < 0:
                raise ValueError(f"model.unfreeze.{pattern}: expected a step >= 0, got {step}")
        return self


# --------------------------------------------------------------------------- init
class InitConfig(Strict):
    """Where the weights start; at most one key. Unset: random initialisation."""

    from_run: str | None = Field(None, description="a run folder: its checkpoints/best.pt")
    checkpoint: str | None = Field(None, description="an xdt checkpoint file (best.pt, last.pt)")
    weights: str | None = Field(
        None, description="a state_dict file of the model or of the torchvision backbone"
    )
    pretrained: Literal["imagenet"] | None = Field(
        None, description="torchvision's ImageNet weights for a torchvision backbone"
    )

    @model_validator(mode="after")
    def _one_source(self) -> InitConfig:
        given = [k for k in ("from_run", "checkpoint", "weights", "pretrained") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(
                f"give at most one of from_run, checkpoint, weights, pretrained "
                f"(got {', '.join(given)})"
            )
        return self

    @property
    def given(self) -> bool:
        return any((self.from_run, self.checkpoint, self.weights, self.pretrained))


# --------------------------------------------------------------------------- optim
class _OptimBase(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_mult: dict[str, float] = Field(
        default_factory=dict,
        description="per-group lr multipliers {pattern: factor}, e.g. {features: 0.1}",
    )

    @model_validator(mode="after")
    def _positive_mult(self) -> _OptimBase:
        for pattern, factor in self.lr_mult.items():
            if not factor > 0:
                raise ValueError(f"optim.lr_mult.{pattern}: expected a factor > 0, got {factor}")
        return self


class SGDConfig(_OptimBase):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False


class AdamConfig(_OptimBase):
    name: Literal["adam"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)


class AdamWConfig(_OptimBase):
    name: Literal["adamw"] = "adamw"
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


def _name_or(default: str):
    """Discriminator of a tagged section whose `name` may be left out (then `default`)."""

    def pick(value: Any) -> Any:
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", default)

    return Discriminator(pick)


OptimConfig = Annotated[
    Annotated[SGDConfig, Tag("sgd")]
    | Annotated[AdamConfig, Tag("adam")]
    | Annotated[AdamWConfig, Tag("adamw")],
    _name_or("adam"),
]


# --------------------------------------------------------------------------- schedule
class _ScheduleBase(Strict):
    warmup_steps: int = Field(
        0, ge=0, strict=True, description="linear warm-up from 0 to the base lr"
    )


class ConstantSchedule(_ScheduleBase):
    name: Literal["constant"] = "constant"


class StepSchedule(_ScheduleBase):
    name: Literal["step"] = "step"
    step_size: int = Field(
        gt=0, strict=True, description="multiply the lr by gamma every step_size steps"
    )
    gamma: float = Field(0.1, gt=0)


class CosineSchedule(_ScheduleBase):
    name: Literal["cosine"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / base lr")


class InvSchedule(_ScheduleBase):
    """lr * (1 + gamma * p) ** -power with p = step / train.steps: the annealing of DANN
    (Ganin et al. 2016) used by most domain-adaptation papers and the Transfer-Learning-Library.
    """

    name: Literal["inv"] = "inv"
    gamma: float = Field(10.0, gt=0)
    power: float = Field(0.75, gt=0)


class OneCycleSchedule(Strict):
    """Smith & Topin 2019, as torch's OneCycleLR (cosine annealing; no momentum cycling)."""

    name: Literal["onecycle"] = "onecycle"
    pct_start: float = Field(0.3, gt=0, lt=1)
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)


ScheduleConfig = Annotated[
    Annotated[ConstantSchedule, Tag("constant")]
    | Annotated[StepSchedule, Tag("step")]
    | Annotated[CosineSchedule, Tag("cosine")]
    | Annotated[InvSchedule, Tag("inv")]
    | Annotated[OneCycleSchedule, Tag("onecycle")],
    _name_or("constant"),
]


# --------------------------------------------------------------------------- train
class TrainConfig(Strict):
    steps: int = Field(1000, gt=0, strict=True)
    batch_size: int = Field(
        64,
        gt=0,
        strict=True,
        description="images a step (per domain or task); under torchrun the global batch, "
        "split evenly over the ranks, unless batch_size_per_rank",
    )
    batch_size_per_rank: bool = Field(
        False, description="torchrun: batch_size is each rank's, the global batch N times it"
    )
    eval_every: int = Field(
        200, gt=0, strict=True, description="evaluate and save last.pt every N steps"
    )
    eval_batch_size: int = Field(1024, gt=0, strict=True)
    log_every: int = Field(50, gt=0, strict=True)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU"
    )
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    early_stopping: int | None = Field(
        None, gt=0, strict=True, description="stop after N evaluations without improvement"
    )
    deterministic: bool = Field(True, description="deterministic kernels (bit-identical on CPU)")
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decay of an exponential moving average of the weights (e.g. 0.999), "
        "warmed up as min(decay, (1+k)/(10+k)); the average is what is evaluated and saved "
        "as best.pt. Unset: off",
    )


class SelectionConfig(Strict):
    rule: (
        Literal[
            "source_val",
            "target_val",
            "last",
            "training_domain_val",
            "leave_one_domain_out",
            "oracle",
            "task_val",
        ]
        | None
    ) = Field(
        None,
        description="source_val: best on the source's val split (default of train-source and "
        "transfer); target_val: best on the target's labelled val split (default of finetune; "
        "under transfer it reads target labels and summary.json says so); last: the final "
        "step. generalize: training_domain_val (default: the training domains' val splits, "
        "train_domains/val/acc), oracle (DomainBed's: the last checkpoint; needs held-out "
        "domains) or leave_one_domain_out (DomainBed's; only with --leave-one-out). multitask: "
        "task_val (default: avg/val/acc; avg/val/mse when every task is mse). See selection.py",
    )
    metric: str | None = Field(
        None, description="default: the rule's first metric; only val splits the rule may read"
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="default: min for */loss, */mse, */mae, else max"
    )


class MethodSection(BaseModel):
    """`method.name` plus that method's own hyper-parameters, checked by its Config."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("erm", description="the learning rule (multitask default: static)")


class ExperimentConfig(Strict):
    name: str | None = Field(None, description="experiment name; default: the file's stem")
    seed: int = Field(0, strict=True)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    init: InitConfig = InitConfig()
    method: MethodSection = MethodSection()
    optim: OptimConfig = Field(default_factory=lambda: AdamConfig(name="adam"))
    schedule: ScheduleConfig = Field(default_factory=lambda: ConstantSchedule(name="constant"))
    train: TrainConfig = TrainConfig()
    selection: SelectionConfig = SelectionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.train.early_stopping is not None and self.selection.rule == "last":
            raise ValueError(
                "train.early_stopping needs a selection metric, and selection.rule 'last' has none"
            )
        if (
            isinstance(
                self.schedule, StepSchedule | CosineSchedule | ConstantSchedule | InvSchedule
            )
            and self.schedule.warmup_steps >= self.train.steps
        ):
            raise ValueError("schedule.warmup_steps must be smaller than train.steps")
        return self

    # The validated `method` section: set by load_config from the method's own Config.
    _method_config: Any = None

    @property
    def method_config(self) -> BaseModel:
        return self._method_config


# --------------------------------------------------------------------------- loading
# What a full walk of a document may visit, aliases expanded: a config is a few hundred
# nodes, while nine levels of nine aliases ("billion laughs") make 9^9 of them, which every
# later walk (duplicate keys, validation, merging) would visit.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that counts each node's size with its aliases expanded while it
    composes the document, and refuses a document past MAX_YAML_NODES or an alias that
    refers to the node that holds it (a structure with no end)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        node = super().compose_node(parent, index)
        size = self._sizes.get(id(node))
        if size is None:
            if alias:  # the anchored node is still being composed: it contains itself
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to the node that holds it", node.start_mark
                )
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            size = 1 + sum(self._sizes[id(n)] for n in children)
            self._sizes[id(node)] = size
        if size > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand the document past {MAX_YAML_NODES:,} nodes",
                node.start_mark,
            )
        return node


def _load_yaml(text: str) -> tuple[Any, str | None]:
    """(`yaml.safe_load(text)`, the first duplicated key or None), in one bounded pass."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        return loader.construct_document(node), _duplicate_key(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping (config, base, sweep or benchmark suite file) with the safe
    loader; any problem is one line that names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data, duplicate = _load_yaml(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {' '.join(problem.split())}") from None
    if duplicate:
        raise ConfigError(f"{path}: {duplicate}")
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a YAML mapping of sections, not a {type(data).__name__}"
        )
    return data


def _duplicate_key(root: yaml.Node) -> str | None:
    """PyYAML keeps the last of two equal keys; a config that repeats one is a mistake.

    Walks the composed node tree, each node once (an alias shares its anchor's node)."""
    stack, seen_nodes = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        line = key.start_mark.line + 1
                        return f"key '{key.value}' appears twice in one mapping (line {line})"
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: base: configs form a cycle: {cycle}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of a config file")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: config file {base_path} not found")
    return deep_merge(_read_with_bases(base_path, (*chain, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. train.steps=500")
    try:
        value = _load_yaml(raw)[0] if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML") from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{text}': {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    subcommand: str = "train-source",
    flags: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Read, merge, override and validate a config for `subcommand`.

    `flags` holds top-level values from CLI flags (`seed`, `device`), which win over all.
    Raises ConfigError with one line per problem.
    """
    path = Path(path)
    data = apply_overrides(_read_with_bases(path), list(overrides))
    for key, value in (flags or {}).items():
        if value is not None:
            data[key] = value
    return validate_config(data, source=str(path), subcommand=subcommand, stem=path.stem)


def validate_config(
    data: dict[str, Any], *, source: str, subcommand: str, stem: str | None = None
) -> ExperimentConfig:
    """Validate a merged config mapping; `source` names it in error messages."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = error_lines(exc, ExperimentConfig)
        raise ConfigError(*(f"{source}: {line}" for line in lines)) from None
    if cfg.name is None and stem:
        cfg.name = stem

    from xdt_cli.methods import METHODS  # methods import torch; keep `config` light to import
    from xdt_cli.plugins import load_plugins

    load_plugins("methods")  # third-party methods (entry-point group xdt.methods)

    if "name" not in cfg.method.model_fields_set and subcommand in DEFAULT_METHODS:
        cfg.method.name = DEFAULT_METHODS[subcommand]  # resolved: config.yaml names it
    method_name = cfg.method.name
    method_cls = METHODS.get(method_name)
    if method_cls is None:
        raise ConfigError(
            f"{source}: method.name: unknown method '{method_name}'"
            + _did_you_mean(method_name, METHODS)
            + f" (known: {', '.join(sorted(METHODS))})"
        )
    if subcommand not in method_cls.regimes:
        raise ConfigError(
            f"{source}: method.name: '{method_name}' does not serve {subcommand} "
            f"(it serves: {', '.join(sorted(method_cls.regimes))})"
        )
    params = dict(cfg.method.model_extra or {})
    try:
        method_cfg = method_cls.Config.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(
            *(f"{source}: method.{line}" for line in error_lines(exc, method_cls.Config))
        ) from None
    cfg.method = MethodSection(name=method_name, **method_cfg.model_dump())
    cfg._method_config = method_cfg

    if cfg.selection.rule is None and subcommand in DEFAULT_RULES:
        cfg.selection.rule = DEFAULT_RULES[subcommand]  # resolved: config.yaml names it
    problems = _regime_problems(cfg, subcommand)
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    return cfg


DEFAULT_METHODS = {"multitask": "static"}  # method.name when not given (else erm)
GENERALIZE_KEYS = (
    "dataset",
    "domains",
    "test_domains",
    "domain_weights",
    "files",
    "sample_weights",
)


def _regime_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    """Settings that the schema accepts but this subcommand cannot run (the selection rule's
    only once the data is right: a missing data.source is one problem, not two)."""
    if subcommand not in SUBCOMMANDS:
        return [f"unknown subcommand '{subcommand}'"]
    return _data_problems(cfg, subcommand) or _selection_problems(cfg, subcommand)


def _data_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    problems = _model_problems(cfg, subcommand)
    if subcommand == "generalize":
        return problems + _generalize_problems(cfg)
    if subcommand == "multitask":
        return problems + _multitask_problems(cfg)
    data = cfg.data
    if data.tasks:
        problems.append(f"data.tasks: only used by multitask (not {subcommand})")
    default = DataConfig()
    for key in GENERALIZE_KEYS:
        if getattr(data, key) != getattr(default, key):
            problems.append(f"data.{key}: only used by generalize (not {subcommand})")
    if subcommand in ("train-source", "transfer") and data.source is None:
        problems.append(f"data.source: required by {subcommand} (e.g. {{dataset: mnist5k}})")
    if subcommand in ("finetune", "transfer") and data.target is None:
        problems.append(f"data.target: required by {subcommand} (e.g. {{dataset: digits}})")
    if subcommand == "finetune" and not cfg.init.given:
        problems.append(
            "init: finetune starts from trained weights; set init.from_run, init.checkpoint, "
            "init.weights or init.pretrained (or use train-source to train from scratch)"
        )
    if subcommand == "transfer" and data.target is not None and data.target.labels_per_class:
        problems.append(
            "data.target.labels_per_class: transfer uses no target labels; "
            "use finetune to train on a few labelled target samples"
        )
    if subcommand == "train-source" and data.target is not None and data.target.labels_per_class:
        problems.append("data.target.labels_per_class: train-source only evaluates data.target")
    return problems


def _selection_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    """What selection.py's rule says it cannot do for this subcommand and data (the rule's
    metric is checked against the run's own names when the experiment is built)."""
    rule = RULES[str(cfg.selection.rule)]
    data = cfg.data

    def name(section: DomainConfig | None) -> str | None:
        return None if section is None else section.domain or section.dataset

    layout = Layout(
        subcommand,
        source=name(data.source),
        target=name(data.target),
        held_out=tuple(data.test_domains),
        tasks=tuple((t, task.loss or "ce") for t, task in data.tasks.items()),
    )
    problems = rule.problems(layout)
    if not problems and rule.pick == "last" and cfg.train.early_stopping is not None:
        problems.append(
            f"train.early_stopping: selection.rule {rule.name} takes the last checkpoint; "
            "nothing can stop early"
        )
    return problems


def _model_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    if subcommand == "multitask":
        if cfg.model.preset is not None:
            return [
                "model.preset: presets choose a single head; under multitask freeze the "
                "encoder with model.freeze (e.g. [features]) instead"
            ]
        return []
    return [
        f"model.{key}: only used by multitask (not {subcommand})"
        for key in ("arch", "experts", "heads")
        if getattr(cfg.model, key)
    ]


def _multitask_problems(cfg: ExperimentConfig) -> list[str]:
    """multitask reads data.tasks (and data.split_seed) only; `weight` belongs to static."""
    data, problems = cfg.data, []
    for key in ("source", "target", *GENERALIZE_KEYS):
        if getattr(data, key) != getattr(DataConfig(), key):
            problems.append(f"data.{key}: multitask reads data.tasks (not data.{key})")
    for name in cfg.model.heads:
        if name not in data.tasks:
            problems.append(
                f"model.heads.{name}: not a task{_did_you_mean(name, data.tasks)} "
                f"(tasks: {', '.join(data.tasks)})"
            )
    if not data.tasks:
        problems.append(
            "data.tasks: required by multitask, e.g. {left: {dataset: multimnist5k, "
            "label: left}, right: {dataset: multimnist5k, label: right}}"
        )
    if cfg.method.name != "static":
        for name, task in data.tasks.items():
            if task.weight is not None:
                problems.append(
                    f"data.tasks.{name}.weight: only the static weighting reads task weights "
                    f"(method.name is {cfg.method.name})"
                )
    return problems


def _generalize_problems(cfg: ExperimentConfig) -> list[str]:
    """generalize reads `data.dataset`, its domains and the held-out ones; domain names are
    checked against the data set (unknown names, overlaps, nothing left to train on)."""
    data, problems = cfg.data, []
    for key in ("source", "target"):
        if getattr(data, key) is not None:
            problems.append(
                f"data.{key}: generalize reads data.dataset, data.domains and "
                "data.test_domains (not data.source / data.target)"
            )
    if data.tasks:
        problems.append("data.tasks: only used by multitask (not generalize)")
    if data.dataset is None:
        problems.append("data.dataset: required by generalize (e.g. rotated_mnist5k)")
        return problems
    from xdt_cli.data.registry import get_spec  # torch: only once a data set is named

    try:
        spec = get_spec(data.dataset, "data.dataset")
    except ConfigError as exc:
        return [*problems, *exc.lines]
    known = list(spec.domains)
    if len(known) < 2:
        return [*problems, f"data.dataset: {spec.name} has one domain; generalize needs several"]
    for key in ("domains", "test_domains", "domain_weights"):
        for name in getattr(data, key) or []:
            if name not in known:
                problems.append(
                    f"data.{key}: {spec.name} has no domain '{name}'{_did_you_mean(name, known)}"
                    f"; its domains: {', '.join(known)}"
                )
    if problems:
        return problems
    used = data.domains if data.domains is not None else known
    outside = [d for d in data.test_domains if d not in used]
    if data.domains is not None and outside:
        problems.append(f"data.test_domains: {', '.join(outside)} not in data.domains")
    training = [d for d in used if d not in data.test_domains]
    if data.test_domains and not training:
        problems.append("data.test_domains: holds out every domain; keep one to train on")
    held = [d for d in data.domain_weights if d not in training]
    if held:
        problems.append(
            f"data.domain_weights: {', '.join(held)} is not a training domain "
            "(held-out domains never reach the loss)"
        )
    elif training and not any(data.domain_weights.get(d, 1.0) > 0 for d in training):
        problems.append("data.domain_weights: every training domain has weight 0")
    return problems


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"dotted.key": leaf value}; an empty mapping has no entries."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, exactly what runs (and what `xdt resume` re-reads)."""
    data = cfg.model_dump(mode="json")
    for section in data.values():  # `name` first where a section is chosen by name
        if isinstance(section, dict) and "name" in section:
            section_name = section.pop("name")
            items = list(section.items())
            section.clear()
            section.update({"name": section_name, **dict(items)})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- error text
def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, Union, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Follow a pydantic error location through the schema.

    Returns the dotted path without union tags, and the field names valid at its last level.
    """
    models, path = [root], []
    for part in loc:
        tagged = [m for m in models if _tag_of(m) == part]
        if tagged:  # a discriminated-union tag, not a key the user wrote
            models = tagged
            continue
        path.append(str(part))
        nxt = []
        for model in models:
            field = model.model_fields.get(str(part))
            if field is not None:
                nxt.extend(_models_in(field.annotation))
        models = nxt
    return path, sorted({name for m in models for name in m.model_fields})


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("name")
    if field is not None and typing.get_origin(field.annotation) is Literal:
        return typing.get_args(field.annotation)[0]
    return None


def error_lines(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            path, valid = _walk(root, loc[:-1])
            key = str(loc[-1])
            dotted = ".".join([*path, key])
            close = _did_you_mean(key, valid)
            if close:
                close = close.replace("'", "'" + ".".join(path) + ".", 1) if path else close
            lines.append(f"{dotted}: unknown key{close}")
            continue
        path, _ = _walk(root, loc)
        dotted = ".".join(path) or "(top level)"
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            tag = err["ctx"]["tag"]
            expected = [t.strip(" '") for t in err["ctx"]["expected_tags"].split(",")]
            dotted = ".".join([*path, "name"])
            msg = (
                f"unknown name '{tag}'{_did_you_mean(tag, expected)}; "
                f"expected one of {', '.join(expected)}"
            )
        elif err["type"] in ("model_type", "dict_type", "model_attributes_type"):
            msg = f"expected a mapping of keys, got {err.get('input')!r}"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not path:
                lines.append(msg)
                continue
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{dotted}: {msg}")
    return lines
