"""Which parameters train (theta_upd) and which stay fixed (theta_fix), and their lr groups.

`plan_freezing(model, cfg.model)` reads `model.preset`, `model.freeze`, `model.trainable`,
`model.freeze_bn` and `model.unfreeze`, sets `requires_grad` on the model's parameters and
returns a `FreezePlan`. In order:

1. the preset: `full` (or none) trains everything; `linear_probe` only the head;
   `last_k_blocks` the head and the last `k_blocks` blocks of the features;
2. `freeze` patterns are fixed; 3. `trainable` patterns train again;
4. `unfreeze: {pattern: step}` fixes those parameters until that step (gradual unfreezing,
   Howard & Ruder 2018); the engine releases them at that step.

A *block* is a child module of the backbone that holds parameters (for `cnn`, the conv
blocks and the dense block; for a torchvision ResNet, `conv1`, `bn1`, `layer1` ... `layer4`),
and the bottleneck (`model.bottleneck`) is the last block when there is one: `linear_probe`
keeps it fixed, `last_k_blocks` with k 1 trains it and the head.
Patterns are shell globs over the model's parameter names; a bare module name such as
`features` also matches everything below it. A pattern that matches nothing is an error, so
a typo cannot silently train the whole network.

Fixed parameters get no gradient, so the optimizer never touches them (not even weight
decay): they stay identical to the bit. With `freeze_bn`, batch-norm layers whose
parameters are all fixed also stay in eval mode during training, so their running
statistics stay those of the source.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from xdt_cli.config import ModelConfig
from xdt_cli.errors import ConfigError
from xdt_cli.models import Classifier


def matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def blocks(model: Classifier) -> list[list[str]]:
    """Parameter names of each block of the features, first to last (see module docstring)."""
    prefix, module = "features", model.features
    while True:  # look through wrappers with a single parameterised child (e.g. channel repeat)
        holders = [(n, m) for n, m in module.named_children() if _has_params(m)]
        if len(holders) == 1 and not list(module.parameters(recurse=False)):
            name, module = holders[0]
            prefix = f"{prefix}.{name}"
            continue
        break
    found = [
        [f"{prefix}.{child}.{p}" for p, _ in sub.named_parameters()]
        for child, sub in module.named_children()
        if _has_params(sub)
    ]
    neck = getattr(model, "bottleneck", None)  # model.bottleneck: the last block
    if neck is not None and _has_params(neck):
        found.append([f"bottleneck.{p}" for p, _ in neck.named_parameters()])
    return found


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


@dataclass
class FreezePlan:
    trainable: int  # parameters (elements) that train from step 0
    fixed: int  # parameters that never train
    scheduled: dict[int, list[str]] = field(default_factory=dict)  # step -> names released

    @property
    def scheduled_count(self) -> int:
        return sum(len(v) for v in self.scheduled.values())


def plan_freezing(model: Classifier, cfg: ModelConfig) -> FreezePlan:
    params = dict(model.named_parameters())
    names = list(params)
    if cfg.preset == "linear_probe":
        train = {n for n in names if n.startswith("head.")}
    elif cfg.preset == "last_k_blocks":
        all_blocks = blocks(model)
        k = cfg.k_blocks  # the schema resolved its default, 1
        assert k is not None
        if k > len(all_blocks):
            raise ConfigError(
                f"model.k_blocks: {k} is more than the {len(all_blocks)} blocks of '{cfg.backbone}'"
            )
        train = {n for n in names if n.startswith("head.")}
        train.update(n for block in all_blocks[-k:] for n in block)
    else:
        train = set(names)
    train -= _select(names, cfg.freeze, "model.freeze")
    train |= _select(names, cfg.trainable, "model.trainable")
    scheduled: dict[int, list[str]] = {}
    for pattern, step in cfg.unfreeze.items():
        chosen = _select(names, [pattern], f"model.unfreeze.{pattern}")
        train -= chosen
        if step > 0:
            scheduled.setdefault(step, []).extend(sorted(chosen))
        else:
            train |= chosen
    for name, p in params.items():
        p.requires_grad_(name in train)
    released = {n for v in scheduled.values() for n in v}
    model.frozen_bn = _frozen_bn(model) if cfg.freeze_bn else []
    model.train(model.training)
    return FreezePlan(
        trainable=sum(params[n].numel() for n in train),
        fixed=sum(p.numel() for n, p in params.items() if n not in train and n not in released),
        scheduled=scheduled,
    )


def release(model: Classifier, names: list[str]) -> None:
    """Let the parameters `names` train from now on (a step of gradual unfreezing)."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    if model.frozen_bn:
        model.frozen_bn = _frozen_bn(model)
        model.train(model.training)


def _select(names: list[str], patterns: list[str], key: str) -> set[str]:
    chosen = set()
    for pattern in patterns:
        hit = {n for n in names if matches(n, pattern)}
        if not hit:
            example = ", ".join(names[:2] + names[-2:])
            raise ConfigError(f"{key}: '{pattern}' matches no parameter (names are like {example})")
        chosen |= hit
    return chosen


def _frozen_bn(model: Classifier) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not any(p.requires_grad for p in module.parameters())
    ]


def param_groups(
    method: nn.Module, plan: FreezePlan, lr_mult: dict[str, float]
) -> list[dict[str, object]]:
    """Optimizer groups [{"params": [...], "lr_mult": f}] of everything that trains now or later.

    `lr_mult` patterns match the model's parameter names (`features`, `head.*`); a parameter
    matched by two patterns is an error. The method's own parameters (a domain discriminator)
    and unmatched model parameters get a multiplier of 1.
    """
    released = {f"model.{n}" for names in plan.scheduled.values() for n in names}
    groups: dict[float, list] = {}
    used = dict.fromkeys(lr_mult, False)
    for name, p in method.named_parameters():
        if not (p.requires_grad or name in released):
            continue
        mult = 1.0
        if name.startswith("model."):
            hits = [pat for pat in lr_mult if matches(name.removeprefix("model."), pat)]
            if len(hits) > 1:
                raise ConfigError(
                    f"optim.lr_mult: '{hits[0]}' and '{hits[1]}' both match {name[6:]}"
                )
            if hits:
                mult, used[hits[0]] = lr_mult[hits[0]], True
        groups.setdefault(mult, []).append(p)
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        raise ConfigError(f"optim.lr_mult.{unused[0]}: matches no trainable parameter of the model")
    return [{"params": ps, "lr_mult": mult} for mult, ps in groups.items()]
