"""Where the weights of a model start: the four `init` keys.

`initialize(model, cfg)` loads the chosen weights into a freshly built `Classifier` and
returns one line that says what it did. The rules:

- `from_run`: an xdt run folder; its `checkpoints/best.pt` (the checkpoint its selection rule
  chose). Its `config.yaml` must name the same backbone.
- `checkpoint`: an xdt checkpoint file (`best.pt` or `last.pt`).
- `weights`: a file holding a plain state_dict, either of our `Classifier` (`features.*`,
  `head.*`) or of the torchvision model named by `model.backbone` (its last linear layer
  becomes our head), e.g. `torch.save(torchvision.models.resnet18().state_dict(), path)`.
- `pretrained: imagenet`: torchvision's default ImageNet weights of the backbone, read from
  torch's cache (`$TORCH_HOME/hub/checkpoints`) or downloaded into it when online; for a
  `timm:<name>` backbone, timm's default pretrained weights (the Hugging Face cache).

The head is kept when its shape matches this run's class count, and a new (randomly
initialised) head is used otherwise, so a 1000-class ImageNet model or a 10-class source
run both start a 9-class target. Every file is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import sys
import urllib.error
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from xdt_cli.checkpoint import load_checkpoint, unwrap_state_dict
from xdt_cli.config import ExperimentConfig, first_line, read_yaml
from xdt_cli.errors import CheckpointError, ConfigError, XdtError
from xdt_cli.models import Classifier


def initialize(model: Classifier, cfg: ExperimentConfig) -> str | None:
    """Load `cfg.init` into `model`; returns a message for the user (None: random init)."""
    init = cfg.init
    if init.from_run:
        state, origin = _from_run(Path(init.from_run), cfg.model.backbone)
    elif init.checkpoint:
        state, origin = _from_xdt_checkpoint(Path(init.checkpoint), "init.checkpoint")
    elif init.weights:
        state, origin = _from_weights_file(Path(init.weights), model), init.weights
    elif init.pretrained:
        state, origin = _imagenet(cfg.model.backbone, model), f"torchvision {init.pretrained}"
    else:
        return None
    key = next(k for k in ("from_run", "checkpoint", "weights", "pretrained") if getattr(init, k))
    head = _load(model, state, f"init.{key}")
    return f"init: {cfg.model.backbone} weights from {origin}; {head}"


def _from_run(run: Path, backbone: str) -> tuple[dict[str, Tensor], str]:
    if not run.is_dir():
        raise ConfigError(f"init.from_run: {run} is not a run folder")
    best = run / "checkpoints" / "best.pt"
    if not best.is_file():
        raise ConfigError(f"init.from_run: {run} has no checkpoints/best.pt (has it evaluated?)")
    config_path = run / "config.yaml"
    if config_path.is_file():
        theirs = (read_yaml(config_path).get("model") or {}).get("backbone")
        if theirs and theirs != backbone:
            raise ConfigError(
                f"init.from_run: {run} trained backbone '{theirs}', "
                f"but model.backbone is '{backbone}'"
            )
    return _from_xdt_checkpoint(best, "init.from_run")[0], str(best)


def _from_xdt_checkpoint(path: Path, key: str) -> tuple[dict[str, Tensor], str]:
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found")
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    method_state = state.get("method") if isinstance(state, dict) else None
    if not isinstance(method_state, dict):
        raise ConfigError(f"{key}: {path} is not an xdt checkpoint (no 'method' state)")
    # The method's state holds the model under "model." next to its own modules (a
    # discriminator, a frozen source copy); only the model is carried over.
    model_state = {
        k.removeprefix("model."): v
        for k, v in unwrap_state_dict(method_state).items()
        if k.startswith("model.")
    }
    if not model_state:
        raise ConfigError(f"{key}: {path} holds no model weights")
    return model_state, str(path)


def _from_weights_file(path: Path, model: Classifier) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"init.weights: {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: one line
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unpickling error: report the file)
        first = first_line(exc, 160, kind=False)
        raise ConfigError(f"init.weights: {path} cannot be read safely ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"init.weights: {path} is not a state_dict of tensors")
    state = unwrap_state_dict(state)
    if any(k.startswith(("features.", "head.")) for k in state):
        return state
    return _map_backbone_state(state, model, f"init.weights: {path}")


def _map_backbone_state(
    state: dict[str, Tensor], model: Classifier, where: str
) -> dict[str, Tensor]:
    """A torchvision model's state_dict -> ours: its body under `features.`, its last linear
    layer (the two keys our features do not have) as `head.`."""
    ours = set(model.features.state_dict())
    for prefix in ("", "1."):  # "1." when grey images go through a channel-repeat wrapper
        body = {k: v for k, v in state.items() if prefix + k in ours}
        if len(body) >= len(ours):
            rest = sorted(set(state) - set(body))
            mapped = {f"features.{prefix}{k}": v for k, v in body.items()}
            if len(rest) == 2 and rest[0].endswith(".bias") and rest[1].endswith(".weight"):
                mapped["head.bias"], mapped["head.weight"] = state[rest[0]], state[rest[1]]
            elif rest:
                raise ConfigError(f"{where}: unexpected keys {', '.join(rest[:3])}")
            return mapped
    missing = sorted(ours - set(state))[:3]
    raise ConfigError(f"{where}: does not fit backbone (missing {', '.join(missing)})")


def _imagenet(backbone: str, model: Classifier) -> dict[str, Tensor]:
    if backbone.startswith("timm:"):
        return _timm_imagenet(backbone.removeprefix("timm:"), model)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(backbone).DEFAULT
    except (ValueError, KeyError):
        raise ConfigError(
            f"init.pretrained: '{backbone}' has no torchvision ImageNet weights "
            "(use a torchvision backbone, or init.weights with a local file)"
        ) from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:  # torch.hub announces a download on stdout, which carries only results here
        with contextlib.redirect_stdout(sys.stderr):
            state = torch.hub.load_state_dict_from_url(
                weights.url, progress=False, check_hash=True, map_location="cpu", weights_only=True
            )
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = getattr(exc, "reason", None) or first_line(exc, 120, kind=False)
        raise ConfigError(
            f"init.pretrained: ImageNet weights of {backbone} are not in torch's cache "
            f"({cache}) and could not be downloaded ({reason}); fetch {weights.url} into "
            "that folder on a machine with network, or use init.weights with a local file"
        ) from None
    return _map_backbone_state(state, model, f"init.pretrained: {cache}")


def _timm_imagenet(name: str, model: Classifier) -> dict[str, Tensor]:
    """timm's default pretrained weights of `name` (from the Hugging Face cache, downloaded
    into it when online), built as our features are: no classifier, the data's channels
    (timm adapts the first layer's weights to them)."""
    import timm  # model creation already required it

    channels = next(p for p in model.features.parameters() if p.dim() == 4).shape[1]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            pretrained = timm.create_model(name, pretrained=True, num_classes=0, in_chans=channels)
    except Exception as exc:  # noqa: BLE001  (hub, network and file errors have many types)
        reason = first_line(exc, 160, kind=False)
        raise ConfigError(
            f"init.pretrained: ImageNet weights of timm:{name} are not in the Hugging Face "
            f"cache and could not be downloaded ({reason}); fetch them on a machine with "
            "network (HF_HOME sets the cache), or use init.weights with a local file"
        ) from None
    return {f"features.{k}": v for k, v in pretrained.state_dict().items()}


def _load(model: Classifier, state: dict[str, Any], key: str) -> str:
    """Load `state` into `model`, keeping its head only when the shapes match."""
    odd = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
    if odd is not None:
        raise ConfigError(f"{key}: the weights are not all tensors ({odd} is not)")
    ours = model.state_dict()
    # weights without a bottleneck (ImageNet's, a run without model.bottleneck) leave this
    # model's bottleneck new, and so its head: the head would read what the bottleneck makes
    new_neck = any(k.startswith("bottleneck.") for k in ours) and not any(
        k.startswith("bottleneck.") for k in state
    )
    head_w = state.get("head.weight")
    if head_w is not None and head_w.dim() != 2:
        raise ConfigError(f"{key}: head.weight has shape {tuple(head_w.shape)}, not [classes, dim]")
    kept = head_w is not None and head_w.shape == model.head.weight.shape and not new_neck
    # regularisers toward the source (l2sp, delta) treat a kept head like the features
    model.head_from_source = kept
    if kept:
        note = f"head kept ({model.head.out_features} classes)"
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        before = f"{head_w.shape[0]} -> " if head_w is not None else ""
        note = f"new head ({before}{model.head.out_features} classes)"
    if new_neck:
        note = f"new bottleneck ({model.feature_dim} wide), {note}"
    fresh = ("head.", "bottleneck.") if new_neck else ("head.",)
    missing = sorted(k for k in ours if not k.startswith(fresh) and k not in state)
    unexpected = sorted(k for k in state if k not in ours)
    wrong = sorted(k for k in state if k in ours and state[k].shape != ours[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected and all(k.startswith("bottleneck.") for k in unexpected):
            parts.append("they have a bottleneck layer and this model none: set model.bottleneck")
        elif unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)}, not {tuple(ours[k].shape)}")
        raise ConfigError(f"{key}: the weights do not fit this model ({'; '.join(parts)})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # dtype or other mismatch not caught above
        raise XdtError(f"{key}: cannot load the weights ({first_line(exc, kind=False)})") from None
    return note
