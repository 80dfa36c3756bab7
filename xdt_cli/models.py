"""Models: a feature extractor plus a linear head, the split that transfer and multitask need.

`create_model(backbone, input_shape, num_classes)` builds a `Classifier` whose `features`
maps an image batch to flat vectors of size `feature_dim` and whose `head` maps those to
class logits. Backbones: the built-in `lenet` and `cnn` for small (28x28) images, and any
torchvision classification model by name, its last linear layer becoming the head.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from xdt_cli.errors import ConfigError


class Classifier(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


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
    """Four 3x3 conv blocks with batch norm (32-32-64-64), then a 256-wide layer.

    Each conv+BN+ReLU is one child module, so that "the last k blocks" (model.preset
    last_k_blocks) means whole blocks: children 0, 1, 3, 4 and the dense block 7.
    """

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    return nn.Sequential(
        block(channels, 32),
        block(32, 32),
        nn.MaxPool2d(2),
        block(32, 64),
        block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.Dropout(0.25)),
    )


BUILTIN_BACKBONES: dict[str, Callable[[int], nn.Module]] = {"lenet": _lenet, "cnn": _cnn}


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


def create_model(backbone: str, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    """Build the classifier for inputs of `input_shape` (C, H, W) and `num_classes` classes."""
    channels = input_shape[0]
    if backbone in BUILTIN_BACKBONES:
        features = BUILTIN_BACKBONES[backbone](channels)
        # Materialise the lazy layer and measure the feature size; eval mode so that the
        # dummy batch leaves batch-norm statistics untouched.
        features.eval()
        with torch.no_grad():
            feature_dim = features(torch.zeros(1, *input_shape)).shape[1]
        features.train()
    else:
        known = torchvision_backbones()
        if backbone not in known:
            close = difflib.get_close_matches(backbone, [*BUILTIN_BACKBONES, *known], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"model.backbone: unknown backbone '{backbone}'{hint}; "
                "use lenet, cnn or a torchvision classification model name"
            )
        features, feature_dim = _torchvision_features(backbone, channels)
    return Classifier(features, feature_dim, num_classes)
