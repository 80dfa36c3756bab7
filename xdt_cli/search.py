"""Hyper-parameter search spaces and draws, as DomainBed's hparams_registry defines them.

Gulrajani & Lopez-Paz ("In Search of Lost Domain Generalization", ICLR 2021, section 3 and
domainbed/hparams_registry.py) give every method the same budget: random draws from a search
space declared with the method, draw 0 being the defaults. `xdt` does the same in every
paradigm:

- a method declares its own space next to its `Config` (`Method.search_space`: a key of
  its config -> a `Param`), with the distribution of DomainBed or of its paper where one
  exists (each `Param` names its source; `xdt methods NAME` prints them);
- the keys every method shares (`optim.lr`, `train.batch_size`, `optim.weight_decay`) come
  from `shared_space`, DomainBed's, which depends on the image size (its SMALL_IMAGES sets
  are the 28x28 ones) and, here, on the optimizer: DomainBed's ranges are Adam's, so an SGD
  config gets xdt's own range around the Transfer-Learning-Library's lr of 0.01;
- draw d of key k is sampled from `numpy.random.RandomState(seed_hash(d, name))`, `name`
  being DomainBed's name of that hyper-parameter (`lr`, `batch_size`, `irm_lambda`, ...):
  each key has its own stream, so adding a key changes no other key's draws, and a draw of
  a DomainBed algorithm equals DomainBed's `random_hparams(algorithm, dataset, d)` for the
  keys the two share;
- draw 0 is the defaults: the values of the config the search starts from (for a shipped
  config, the method's defaults), as DomainBed's hparams_seed 0.

Differences from DomainBed, on purpose: on small images DomainBed "searches" weight decay
over the single value 0; here it is not searched (the config's value stays). DomainBed's
DANN also draws discriminator steps, a gradient penalty, Adam's beta1 and separate learning
rates; xdt's DANN has no such keys, so only `trade_off` (lambda) and the discriminator width
(mlp_width) are drawn.

This module imports numpy only (no torch), so `xdt report` can name a run's
hyper-parameters without loading a model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The keys every method's search shares (DomainBed's lr, batch_size, weight_decay)
SHARED_KEYS = ("optim.lr", "train.batch_size", "optim.weight_decay")
# DomainBed's SMALL_IMAGES (Debug28, RotatedMNIST, ColoredMNIST) are 28x28; here every set
# whose images are at most this many pixels a side (the embedded and derived digit sets,
# MNIST, USPS, SVHN, MultiMNIST's 36x36) is small, and image folders are not
SMALL_IMAGE_PX = 36
DOMAINBED = "DomainBed hparams_registry.py"


@dataclass(frozen=True)
class Param:
    """One hyper-parameter's distribution, DomainBed's way of writing it.

    `kind`: `log10_uniform` (10**U(lo, hi)), `int_log10_uniform` (int(10**U(lo, hi))),
    `int_pow2_uniform` (int(2**U(lo, hi))), `uniform` (U(lo, hi)) or `choice` (one of
    `args`). `name`: the stream it is drawn from (DomainBed's name of the hyper-parameter);
    `source`: where the distribution comes from, for `xdt methods NAME`.
    """

    kind: str
    args: tuple[Any, ...]
    name: str
    source: str

    def sample(self, rng: Any) -> Any:
        """One value, drawn as DomainBed's lambda would from the RandomState `rng`."""
        if self.kind == "choice":
            # RandomState.choice over a list draws an index as below: DomainBed's r.choice
            return self.args[int(rng.choice(len(self.args)))]
        lo, hi = self.args
        u = float(rng.uniform(lo, hi))
        if self.kind == "log10_uniform":
            return float(10**u)
        if self.kind == "int_log10_uniform":
            return int(10**u)
        if self.kind == "int_pow2_uniform":
            return int(2**u)
        return u

    def contains(self, value: Any) -> bool:
        """Whether `value` is a value this distribution can give."""
        if self.kind == "choice":
            return value in self.args
        lo, hi = self.args
        if self.kind == "uniform":
            return lo <= value <= hi
        base = 2 if self.kind == "int_pow2_uniform" else 10
        if self.kind == "log10_uniform":
            return 10**lo <= value <= 10**hi
        return isinstance(value, int) and int(base**lo) <= value <= int(base**hi)

    def describe(self) -> str:
        """The distribution as DomainBed's code writes it, e.g. `10^uniform(-4.5, -2.5)`."""
        if self.kind == "choice":
            return "choice(" + ", ".join(map(str, self.args)) + ")"
        lo, hi = (f"{v:g}" for v in self.args)
        return {
            "log10_uniform": f"10^uniform({lo}, {hi})",
            "int_log10_uniform": f"int(10^uniform({lo}, {hi}))",
            "int_pow2_uniform": f"int(2^uniform({lo}, {hi}))",
            "uniform": f"uniform({lo}, {hi})",
        }[self.kind]


def log10_uniform(lo: float, hi: float, *, name: str, source: str) -> Param:
    return Param("log10_uniform", (lo, hi), name, source)


def int_log10_uniform(lo: float, hi: float, *, name: str, source: str) -> Param:
    return Param("int_log10_uniform", (lo, hi), name, source)


def int_pow2_uniform(lo: float, hi: float, *, name: str, source: str) -> Param:
    return Param("int_pow2_uniform", (lo, hi), name, source)


def uniform(lo: float, hi: float, *, name: str, source: str) -> Param:
    return Param("uniform", (lo, hi), name, source)


def choice(*values: Any, name: str, source: str) -> Param:
    return Param("choice", tuple(values), name, source)


def seed_hash(*args: Any) -> int:
    """DomainBed's misc.seed_hash: an int seed from the md5 of `str(args)`."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def draw(space: Mapping[str, Param], index: int, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Draw `index` of a space: the defaults for draw 0, else every key from its own stream
    RandomState(seed_hash(index, param.name)), as DomainBed's `_hparam` does."""
    import numpy as np

    if index < 0:
        raise ValueError(f"a draw is numbered from 0 (got {index})")
    if index == 0:
        return {key: defaults[key] for key in space}
    return {
        key: param.sample(np.random.RandomState(seed_hash(index, param.name)))
        for key, param in space.items()
    }


def is_small(input_shape: tuple[int, ...] | list[int] | None) -> bool:
    """DomainBed's SMALL_IMAGES test, by size: a known shape at most SMALL_IMAGE_PX a side."""
    return input_shape is not None and max(input_shape[-2:]) <= SMALL_IMAGE_PX


def shared_space(optimizer: str, small_images: bool) -> dict[str, Param]:
    """The keys every method searches: DomainBed's learning rate, batch size and (on large
    images) weight decay, for an Adam-family optimizer; for SGD, xdt's own learning-rate
    range, a decade either side of the Transfer-Learning-Library's 0.01."""
    if optimizer == "sgd":
        lr = log10_uniform(
            -3, -1, name="lr", source="xdt's own: a decade either side of TLlib's SGD lr 0.01"
        )
    elif small_images:
        lr = log10_uniform(-4.5, -2.5, name="lr", source=f"{DOMAINBED}: lr, small images")
    else:
        lr = log10_uniform(-5, -3.5, name="lr", source=f"{DOMAINBED}: lr")
    space = {"optim.lr": lr}
    if small_images:
        space["train.batch_size"] = int_pow2_uniform(
            3, 9, name="batch_size", source=f"{DOMAINBED}: batch_size, small images"
        )
    else:
        space["train.batch_size"] = int_pow2_uniform(
            3, 5.5, name="batch_size", source=f"{DOMAINBED}: batch_size"
        )
        space["optim.weight_decay"] = log10_uniform(
            -6, -2, name="weight_decay", source=f"{DOMAINBED}: weight_decay"
        )
    return space


def is_hyperparameter(key: str) -> bool:
    """Whether a dotted config key is a searched hyper-parameter: one of the shared keys or a
    method's own key (`method.*` but `method.name`). `xdt report --choose-by` tells a search's
    draws apart by these keys and its cells by every other key."""
    return key in SHARED_KEYS or (key.startswith("method.") and key != "method.name")


def render(value: Any) -> str:
    """A drawn value for a table: floats to 4 significant digits."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
