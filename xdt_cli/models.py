"""Models: a feature extractor plus a linear head, the split that transfer and multitask need.

`create_model(backbone, input_shape, num_classes)` builds a `Classifier` whose `features`
maps an image batch to flat vectors of size `feature_dim` and whose `head` maps those to
class logits. Backbones, looked up in this order:
- the registry `BACKBONES`: the built-in `lenet`, `cnn` and `brief_cnn` for small images,
  and those that plug-ins register (entry-point group `xdt.backbones`, see registry.py);
- `timm:<name>`: a timm model without its classifier, when the optional `timm` package is
  installed;
- any torchvision classification model by name, its last linear layer becoming the head.
A backbone's feature size is measured on one dummy image of the data's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xdt_cli.config import ConfigError, did_you_mean
from xdt_cli.registry import Registry


def make_bottleneck(in_dim: int, width: int | None) -> nn.Module:
    """`model.bottleneck`: Linear(in_dim, width) + BatchNorm1d + ReLU between the features
    and the head, the `bottleneck` of the Transfer-Learning-Library's ImageClassifier
    (tllib/modules/classifier.py, 256 wide in its examples). Without a width, an Identity:
    no parameters, so a model without a bottleneck has the state dict it always had."""
    if width is None:
        return nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU())


class Classifier(nn.Module):
    """features -> bottleneck -> head. `embed(x)` is what the head reads (the bottleneck's
    output, or the features' when there is none) and what domain-adaptation methods align;
    `feature_dim` is its width."""

    def __init__(
        self,
        features: nn.Module,
        feature_dim: int,
        num_classes: int,
        bottleneck: int | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.bottleneck = make_bottleneck(feature_dim, bottleneck)
        self.feature_dim = bottleneck or feature_dim
        self.head = nn.Linear(self.feature_dim, num_classes)
        # names of batch-norm layers kept in eval mode while training (model.freeze_bn)
        self.frozen_bn: list[str] = []
        # False when `init` had to replace the head (a different class count); read by the
        # regularisers toward the source weights (l2sp, delta). See initialization.py.
        self.head_from_source = True

    def embed(self, x: Tensor) -> Tensor:
        return self.bottleneck(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:  # frozen batch norm keeps its running statistics (see freezing.py)
            for name in self.frozen_bn:
                self.get_submodule(name).eval()
        return self


def _lenet(channels: int) -> nn.Module:
    """LeCun et al. 1998 (LeNet-5), with ReLU and max-pooling as in modern re-implementations."""
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
    )


def _cnn(channels: int) -> nn.Module:
    """Three 3x3 conv blocks with batch norm (32-64-64), each followed by 2x2 max-pooling,
    then a 256-wide dense block with dropout.

    Pooling after every block keeps it cheap on a laptop CPU (about 6 M multiply-adds per
    28x28 image). Each conv+BN+ReLU is one child module, so "the last k blocks" (model.preset
    last_k_blocks) means whole blocks: children 0, 2, 4 and the dense block 7.
    """

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    return nn.Sequential(
        block(channels, 32),
        nn.MaxPool2d(2),
        block(32, 64),
        nn.MaxPool2d(2),
        block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.Dropout(0.25)),
    )


def _brief_cnn(channels: int) -> nn.Module:
    """The project brief's CIFAR-10 network: 3x3 convolutions with 32 and 64 channels, each
    followed by ReLU and 2x2 max-pooling, then a 512-unit layer (the head adds the classes).

    As in `cnn`, each conv+ReLU and the dense layer are single children (blocks).
    """
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU()),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Sequential(nn.LazyLinear(512), nn.ReLU()),
    )


BackboneFactory = Callable[[int], nn.Module]
"""(in_channels) -> a module mapping [B, C, H, W] images to [B, D] feature vectors."""

BUILTIN_BACKBONES: dict[str, BackboneFactory] = {
    "lenet": _lenet,
    "cnn": _cnn,
    "brief_cnn": _brief_cnn,
}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: BackboneFactory
    description: str = ""


def _plugged(name: str, obj: Any) -> list[tuple[str, BackboneSpec]]:
    """An `xdt.backbones` entry point that names an object: a factory, under the point's name."""
    if not callable(obj):
        raise TypeError(f"{type(obj).__name__}; expected a factory (in_channels) -> nn.Module")
    return [(name, _spec(name, obj, (obj.__doc__ or "").strip()))]


BACKBONES: Registry[BackboneSpec] = Registry("backbone", group="xdt.backbones", coerce=_plugged)


def _spec(name: str, build: BackboneFactory, description: str) -> BackboneSpec:
    if name.startswith("timm:"):
        raise ValueError(f"backbone '{name}': the prefix timm: names timm's models")
    return BackboneSpec(name, build, description.splitlines()[0] if description else "")


def register_backbone(name: str, build: BackboneFactory, *, description: str = "") -> BackboneSpec:
    """Add a backbone under `name` (plug-ins call this, or name a factory in an entry point)."""
    return BACKBONES.register(name, _spec(name, build, description))


for _name, _build in BUILTIN_BACKBONES.items():
    register_backbone(_name, _build, description=_build.__doc__ or "")


def torchvision_backbones() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_features(name: str, channels: int) -> tuple[nn.Module, int]:
    """A torchvision classifier with its last linear layer replaced by the identity."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    last_name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = module_name, module
    if last is None:
        raise ConfigError(f"model.backbone: '{name}' has no linear classifier layer to replace")
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Identity())
    if channels == 3:
        return model, last.in_features
    if channels == 1:  # grey images: repeat to the three channels the model was built for
        return nn.Sequential(_RepeatChannels(3), model), last.in_features
    raise ConfigError(
        f"model.backbone: '{name}' takes 1- or 3-channel images; the data has {channels}"
    )


class _RepeatChannels(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, self.channels, -1, -1)


def _timm_features(name: str, channels: int) -> tuple[nn.Module, int]:
    """A timm model with its classifier removed (`num_classes=0`), for `timm:<name>`."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"model.backbone: 'timm:{name}' needs the optional package timm (pip install timm)"
        ) from None
    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models(), prefix="timm:")
        raise ConfigError(f"model.backbone: timm has no model '{name}'{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=channels)
    return model, int(model.num_features)


def _measured(features: nn.Module, input_shape: tuple[int, ...], backbone: str) -> int:
    """Materialise lazy layers and measure the feature size; eval mode so that the dummy
    batch leaves batch-norm statistics untouched."""
    features.eval()
    with torch.no_grad():
        out = features(torch.zeros(1, *input_shape))
    features.train()
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(
            f"model.backbone: '{backbone}' gives features of shape {shape}; a backbone must "
            "end in flat [batch, dim] vectors"
        )
    return int(out.shape[1])


def create_model(
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    bottleneck: int | None = None,
) -> Classifier:
    """Build the classifier for inputs of `input_shape` (C, H, W) and `num_classes` classes,
    with a bottleneck of that width between features and head when one is given."""
    BACKBONES.load_plugins()
    channels = input_shape[0]
    if backbone in BACKBONES:
        features = BACKBONES[backbone].build(channels)
        feature_dim = _measured(features, input_shape, backbone)
    elif backbone.startswith("timm:"):
        features, feature_dim = _timm_features(backbone.removeprefix("timm:"), channels)
    else:
        known = torchvision_backbones()
        if backbone not in known:
            hint = did_you_mean(backbone, [*BACKBONES, *known])
            raise ConfigError(
                f"model.backbone: unknown backbone '{backbone}'{hint}; use "
                f"{', '.join(BACKBONES)}, timm:<name> or a torchvision classification model name"
            )
        features, feature_dim = _torchvision_features(backbone, channels)
    return Classifier(features, feature_dim, num_classes, bottleneck)


# --------------------------------------------------------------------------- multitask
class MultiTaskModel(nn.Module):
    """Shared parameters plus one head per task (`xdt multitask`), in two architectures:

    - `hps`, hard parameter sharing (Caruana 1997): one encoder `features` whose vector feeds
      every task's linear head `heads.<task>`.
    - `mmoe`, multi-gate mixture of experts (Ma et al. 2018, KDD, "Modeling Task
      Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"): `experts`
      copies of the backbone (`experts.<k>`), and per task a softmax gate `gates.<task>`, a
      linear map of the flattened image to expert weights (as LibMTL builds it for images);
      a task's vector is its gate's mixture of the expert vectors, then its head.

    With `bottleneck` (model.bottleneck), the encoder and each expert end in one (see
    `make_bottleneck`): `bottleneck` under hps, `bottlenecks.<k>` under mmoe.

    `encode(x)` gives the shared representation (the output of the shared parameters:
    [B, D] for hps, [B, E, D] for mmoe) and `decode(rep, x, tasks)` the outputs of `tasks`
    from it, so that MGDA-UB can differentiate the task losses with respect to `rep`.
    Each head's output width is 1 for `bce` and `mse` tasks and the class count for `ce`;
    a head is linear, or a tower of linear+ReLU layers with the `hidden` widths of its task
    (`model.heads`; MMoE's task towers).
    """

    def __init__(
        self,
        backbone: str,
        input_shape: tuple[int, ...],
        heads: dict[str, int],
        *,
        arch: str | None = "hps",
        experts: int | None = 3,
        hidden: dict[str, list[int]] | None = None,
        bottleneck: int | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.frozen_bn: list[str] = []  # as Classifier.frozen_bn (model.freeze_bn)
        if arch == "hps":
            probe = create_model(backbone, input_shape, 1, bottleneck)
            self.features = probe.features
            self.bottleneck = probe.bottleneck
            dim = probe.feature_dim
        elif arch == "mmoe" and experts is not None:
            built = [create_model(backbone, input_shape, 1, bottleneck) for _ in range(experts)]
            self.experts = nn.ModuleList(b.features for b in built)
            self.bottlenecks = nn.ModuleList(b.bottleneck for b in built)
            dim = built[0].feature_dim
            flat = int(torch.tensor(input_shape).prod())
            self.gates = nn.ModuleDict({t: nn.Linear(flat, experts) for t in heads})
        else:
            raise ConfigError(f"model.arch: unknown architecture '{arch}' (hps or mmoe)")
        self.feature_dim = dim
        hidden = hidden or {}
        self.heads = nn.ModuleDict(
            {t: _head(dim, width, hidden.get(t, [])) for t, width in heads.items()}
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every task's loss reaches (theta_shared): the encoder or experts,
        with their bottlenecks."""
        if self.arch == "hps":
            modules = [self.features, self.bottleneck]
        else:
            modules = [self.experts, self.bottlenecks]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def encoders(self) -> list[tuple[nn.Module, nn.Module]]:
        """(features, bottleneck) of the encoder (hps) or of each expert (mmoe)."""
        if self.arch == "hps":
            return [(self.features, self.bottleneck)]
        return list(zip(self.experts, self.bottlenecks, strict=True))

    def encode(self, x: Tensor) -> Tensor:
        if self.arch == "hps":
            return self.bottleneck(self.features(x))
        return torch.stack([neck(expert(x)) for expert, neck in self.encoders()], dim=1)

    def decode(self, rep: Tensor, x: Tensor, tasks: list[str]) -> dict[str, Tensor]:
        out = {}
        for task in tasks:
            if self.arch == "hps":
                vector = rep
            else:
                gate = torch.softmax(self.gates[task](x.flatten(1)), dim=-1)  # [B, E]
                vector = (gate.unsqueeze(-1) * rep).sum(dim=1)
            out[task] = self.heads[task](vector)
        return out

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        return self.decode(self.encode(x), x, list(self.heads) if tasks is None else tasks)

    def train(self, mode: bool = True) -> MultiTaskModel:
        super().train(mode)
        if mode:  # frozen batch norm keeps its running statistics (see freezing.py)
            for name in self.frozen_bn:
                self.get_submodule(name).eval()
        return self


def _head(dim: int, width: int, hidden: list[int]) -> nn.Module:
    if not hidden:
        return nn.Linear(dim, width)
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(dim, size), nn.ReLU()]
        dim = size
    return nn.Sequential(*layers, nn.Linear(dim, width))
