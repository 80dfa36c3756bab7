"""DELTA: fine-tuning that keeps the source model's feature maps, weighted by channel attention."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from xdt_cli.errors import ConfigError
from xdt_cli.methods import register
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.methods.l2sp import head_from_source
from xdt_cli.models import Classifier
from xdt_cli.search import log10_uniform

# The authors' code turns the loss increases into attention by softmax(z-score / 5).
ATTENTION_TEMPERATURE = 5.0
# Images per forward pass while estimating attention: each pass ablates several channels,
# one per copy of the batch.
ABLATION_SAMPLES = 512
# Full-batch Adam steps that fit a temporary new head for the attention estimate.
HEAD_FIT_STEPS = 100


class DELTAConfig(MethodConfig):
    alpha: float = Field(
        0.01,
        ge=0,
        description="weight of the feature-map regulariser (authors' code: 0.01; 0.1 on "
        "Stanford Dogs)",
    )
    beta: float = Field(
        0.01, ge=0, description="weight of beta/2 * ||w||^2 over a new head (authors' code: 0.01)"
    )
    attention: bool = Field(
        True,
        description="weight each channel by its supervised attention, estimated once from the "
        "source model (paper); false: every channel weighs the same",
    )
    layers: list[str] | None = Field(
        None,
        description="modules of model.features whose outputs are kept close (names as in "
        "named_modules, e.g. '2' or '1.layer3'); default: the last block at each spatial "
        "resolution",
    )


@contextmanager
def _hooked(
    modules: dict[str, nn.Module],
    store: dict[str, Tensor] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[None]:
    """Within the block, the outputs of `modules` are recorded in `store` by name and/or
    replaced by `transform(output)`; the hooks are removed on exit, so evaluation and
    checkpoints never see them."""

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: Tensor) -> Tensor | None:
            if transform is not None:
                output = transform(output)
            if store is not None:
                store[name] = output
            return output if transform is not None else None

        return hook

    handles = [module.register_forward_hook(make_hook(n)) for n, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def default_layers(features: nn.Module, x: Tensor) -> list[str]:
    """The last block at each spatial resolution of `features`' feature maps.

    A block is a child module holding parameters, looking through wrappers with a single
    such child (the channel repeat around a torchvision model). For `cnn` these are its conv
    blocks (one per resolution), for `lenet` its two convs, for a torchvision ResNet the stem
    and the end of each stage (`layer1` ... `layer4`, under `1.` with grey input), close to
    the authors' choice of the last conv of each ResNet stage.
    """
    prefix, body = "", features
    while True:
        holders = [(n, m) for n, m in body.named_children() if _has_parameters(m)]
        if len(holders) != 1 or _has_parameters(body, recurse=False):
            break
        name, body = holders[0]
        prefix = f"{prefix}{name}."
    blocks = {f"{prefix}{n}": m for n, m in body.named_children() if _has_parameters(m)}
    outputs: dict[str, Tensor] = {}
    with torch.no_grad(), _hooked(blocks, outputs):
        features(x)
    chosen: list[str] = []
    last_size = None
    for name in blocks:
        out = outputs.get(name)
        if out is None or out.ndim != 4:
            continue
        size = tuple(out.shape[-2:])
        if chosen and size == last_size:
            chosen[-1] = name  # a later block at the same resolution replaces the earlier
        else:
            chosen.append(name)
        last_size = size
    if not chosen:
        raise ConfigError(
            "method.layers: the backbone yields no convolutional feature maps to regularise; "
            "name the layers (modules of model.features)"
        )
    return chosen


def _has_parameters(module: nn.Module, recurse: bool = True) -> bool:
    return next(module.parameters(recurse=recurse), None) is not None


def attention_from_loss_increase(increase: Tensor) -> Tensor:
    """The authors' channel weights: softmax over channels of the z-scored loss increases,
    at temperature 5; uniform when every channel matters the same."""
    std = increase.std(unbiased=False)
    if not bool(torch.isfinite(std)) or float(std) == 0.0:
        return torch.full_like(increase, 1.0 / increase.numel())
    z = (increase - increase.mean()) / std
    return torch.softmax(z / ATTENTION_TEMPERATURE, dim=0)


@register
class DELTA(Method):
    """DELTA (Li et al., ICLR 2019): keep the source model's feature maps, weighted by attention.

    A behavioural regulariser: instead of the weights, the outputs of some feature layers
    are kept close to those of the source model on the same batch. The loss is

        CE + alpha * 1/2 sum_layers sum_samples sum_channels (C * a_j) * ||FM_j - FM0_j||^2 / (H W)
           + beta * 1/2 ||w_head||^2  (only for a new head)

    where FM are the fine-tuned model's feature maps, FM0 those of a frozen copy of the
    source features (a deep copy made when the method is built, requires_grad false, so the
    optimizer never trains it), and a_j the attention of channel j (summing to 1 over the
    layer's C channels, so uniform attention weighs each channel by 1). The distance is
    summed over the batch and the feature maps are normalised by their area, as in the
    authors' code (lixingjian/DELTA, train.py `reg_att_fea_map`), whose defaults alpha = beta
    = 0.01 are used; the strength therefore grows with the batch size.

    Attention (`attention: true`, the paper's method): the weight of a channel is how much
    the target loss of the source model grows when that channel is zeroed. As in the
    authors' channel_eval.py, the increases are z-scored per layer and passed through
    softmax(z / 5). Differences from their procedure, stated plainly: it is estimated once,
    at the first step, from that step's target batch only (they average 4 batches of the
    training set), by zeroing the channel in the layer's output (they zero the conv filter),
    and the classifier it measures with is the source head when it was kept; a new head is
    first fitted on the frozen source features of that batch by 100 full-batch Adam steps
    (they train the new head for 10 epochs). `attention: false` gives every channel the same
    weight. The estimate is saved with the method's state, so a resumed run keeps it.

    Layers: `layers` names modules of `model.features`; by default the last block at each
    spatial resolution (see `default_layers`). The source copy's batch-norm layers run in the
    same mode as the model's (batch statistics while training, without updating its running
    statistics), so the regulariser measures changes of the weights only and is exactly 0
    before the first update; the authors compare against the source model in eval mode.
    """

    name = "delta"
    regimes = frozenset({"finetune"})
    Config = DELTAConfig
    search_space = {
        "alpha": log10_uniform(
            -3, -1, name="delta_alpha", source="xdt's own: around the paper's alpha = 0.01"
        ),
        "beta": log10_uniform(
            -3, -1, name="delta_beta", source="xdt's own: around the paper's beta = 0.01"
        ),
    }
    paper = (
        "Li, Xiong, Wang, Rao, Liu, Chen & Huan, DELTA: DEep Learning Transfer using Feature "
        "Map with Attention for Convolutional Networks, ICLR 2019"
    )

    def __init__(self, model: Classifier, config: DELTAConfig, *, total_steps: int) -> None:
        super().__init__(model, config, total_steps=total_steps)
        self.source = copy.deepcopy(model.features).requires_grad_(False)
        for module in self.source.modules():
            if isinstance(module, _BatchNorm):
                # in train mode it normalises by the batch but never touches its statistics
                module.track_running_stats = False
        known = dict(model.features.named_modules())
        for layer in config.layers or []:
            if not layer or layer not in known:
                examples = ", ".join(n for n in list(known)[1:4] if n)
                raise ConfigError(
                    f"method.layers: '{layer}' is not a module of model.features "
                    f"(names are like {examples})"
                )
        self.layers: list[str] | None = list(config.layers) if config.layers else None
        self.head_kept = head_from_source(model)
        self.attention: dict[str, Tensor] = {}
        # (model's, source copy's) batch norm pairs: the copy follows the model's mode
        source_modules = dict(self.source.named_modules())
        self._bn_pairs = [
            (m, source_modules[n])
            for n, m in model.features.named_modules()
            if isinstance(m, _BatchNorm)
        ]

    # The attention estimate and the head's origin are saved with the state: a resumed run
    # rebuilds the method without `init` and must not estimate the attention again.
    def get_extra_state(self) -> dict[str, object]:
        return {"head_kept": self.head_kept, "attention": dict(self.attention)}

    def set_extra_state(self, state: dict[str, object]) -> None:
        self.head_kept = bool(state["head_kept"])
        self.attention = dict(state["attention"])  # type: ignore[arg-type]

    def train(self, mode: bool = True) -> DELTA:
        super().train(mode)
        self._follow_bn_modes()
        return self

    def _follow_bn_modes(self) -> None:
        self.source.eval()  # dropout off; batch norm as in the model
        for mine, theirs in self._bn_pairs:
            theirs.train(mine.training)

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        (target,) = batch
        x, y = target.x, target.y
        if self.layers is None:
            self.source.eval()
            self.layers = default_layers(self.source, x[:2])
        if self.config.attention and not self.attention:
            self.attention = self.estimate_attention(x, y)
        self._follow_bn_modes()

        fine_modules = dict(self.model.features.named_modules())
        maps: dict[str, Tensor] = {}
        with _hooked({n: fine_modules[n] for n in self.layers}, maps):
            features = self.model.features(x)
        logits = self.model.head(self.model.bottleneck(features))
        cls_loss = F.cross_entropy(logits, y)

        reg_loss = self.feature_map_distance(x, maps)
        head_loss = self.new_head_penalty()
        loss = cls_loss + self.config.alpha * reg_loss + self.config.beta * head_loss
        acc = (logits.detach().argmax(1) == y).float().mean()
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "reg_loss": reg_loss.detach(),
            "head_loss": head_loss.detach(),
            "acc": acc,
        }

    def feature_map_distance(self, x: Tensor, maps: dict[str, Tensor]) -> Tensor:
        """The attention-weighted distance between `maps` (the model's feature maps on `x`)
        and the source copy's, in float32."""
        assert self.layers is not None
        source_modules = dict(self.source.named_modules())
        source_maps: dict[str, Tensor] = {}
        with torch.no_grad(), _hooked({n: source_modules[n] for n in self.layers}, source_maps):
            self.source(x)
        total = x.new_zeros((), dtype=torch.float32)
        for name in self.layers:
            diff = maps[name].float() - source_maps[name].float()
            n, channels = diff.shape[:2]
            per_channel = diff.reshape(n, channels, -1).pow(2).mean(-1)  # ||.||^2 / (H W)
            if self.attention:
                per_channel = per_channel * (channels * self.attention[name].to(x.device))
            total = total + 0.5 * per_channel.sum()
        return total

    def new_head_penalty(self) -> Tensor:
        """1/2 ||w||^2 over the trainable weight and bias of a new head; 0 for a kept head,
        which came from the source like the features (the paper's Omega'(w \\ w*))."""
        zero = self.model.head.weight.new_zeros((), dtype=torch.float32)
        if self.head_kept:
            return zero
        squares = [p.float().pow(2).sum() for p in self.model.head.parameters() if p.requires_grad]
        return 0.5 * sum(squares, zero)

    @torch.no_grad()
    def estimate_attention(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per layer, softmax(z-scored loss increase / 5) over its channels, where the loss
        increase of channel j is the source model's target cross-entropy on (x, y) with
        channel j of that layer's output set to zero."""
        assert self.layers is not None
        self.source.eval()  # the source model as deployed: running statistics, no dropout
        source_modules = dict(self.source.named_modules())
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            maps: dict[str, Tensor] = {}
            with _hooked({n: source_modules[n] for n in self.layers}, maps):
                features = self.source(x)
            head = self.model.head if self.head_kept else self._fit_head(features, y)
            base = F.cross_entropy(head(features).float(), y)
            attention = {}
            for name in self.layers:
                losses = self._ablated_losses(source_modules[name], maps[name].shape[1], x, y, head)
                attention[name] = attention_from_loss_increase(losses - base)
        return attention

    def _ablated_losses(
        self, layer: nn.Module, channels: int, x: Tensor, y: Tensor, head: nn.Module
    ) -> Tensor:
        """The cross-entropy with each channel of `layer`'s output zeroed in turn: several
        copies of the batch per forward pass, copy r with one channel zeroed."""
        n = len(x)
        per_pass = max(1, ABLATION_SAMPLES // n)
        losses = []
        for first in range(0, channels, per_pass):
            copies = min(per_pass, channels - first)
            keep = torch.ones(copies, channels, device=x.device)
            keep[torch.arange(copies), first + torch.arange(copies)] = 0.0
            keep = keep.repeat_interleave(n, dim=0)  # rows r*n .. (r+1)*n belong to copy r

            def zero_channel(output: Tensor, keep: Tensor = keep) -> Tensor:
                return output * keep.view(*keep.shape, *([1] * (output.ndim - 2)))

            with _hooked({"layer": layer}, transform=zero_channel):
                logits = head(self.source(x.repeat(copies, *([1] * (x.ndim - 1)))))
            loss = F.cross_entropy(logits.float(), y.repeat(copies), reduction="none")
            losses.append(loss.view(copies, n).mean(1))
        return torch.cat(losses)

    def _fit_head(self, features: Tensor, y: Tensor) -> nn.Module:
        """A temporary copy of the new head, fitted on the frozen source features; only the
        attention estimate uses it (the real head starts training from its own init)."""
        head = copy.deepcopy(self.model.head).float().requires_grad_(True)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-4)
        with torch.enable_grad():
            for _ in range(HEAD_FIT_STEPS):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(head(features), y).backward()
                optimizer.step()
        return head.requires_grad_(False)
