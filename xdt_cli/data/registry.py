"""Data set registry: a name -> `DatasetSpec`, and `load_domain` that splits one domain."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from torch import Tensor

from xdt_cli.data.splits import labelled_subset, stratified_split
from xdt_cli.errors import ConfigError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """What `xdt datasets` shows and how to load each domain as whole tensors.

    `load(domain)` returns (x, y): float images [N, C, H, W] in [0, 1] and int64 labels [N].
    """

    name: str
    description: str
    domains: tuple[str, ...]
    num_classes: int
    input_shape: tuple[int, int, int]
    load: Callable[[str], tuple[Tensor, Tensor]] = field(repr=False)
    origin: str = "xdt"


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Domain:
    """One domain of a data set with its train/val/test splits."""

    dataset: str
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    splits: dict[str, Split]


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in DATASETS:
        raise ValueError(f"data set '{spec.name}' is registered twice")
    DATASETS[spec.name] = spec
    return spec


def get_spec(name: str, key: str = "data.source.dataset") -> DatasetSpec:
    spec = DATASETS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"{key}: unknown data set '{name}'{hint}; known: {', '.join(sorted(DATASETS))}"
        )
    return spec


@lru_cache(maxsize=16)
def _load_raw(dataset: str, domain: str) -> tuple[Tensor, Tensor]:
    return DATASETS[dataset].load(domain)


def load_domain(
    dataset: str, domain: str | None = None, *, split_seed: int = 0, key: str = "data.source"
) -> Domain:
    """Load one domain (default: the data set's only one) and split it with `split_seed`."""
    spec = get_spec(dataset, f"{key}.dataset")
    domain = domain or spec.domains[0]
    if domain not in spec.domains:
        raise ConfigError(f"{key}: data set '{dataset}' has no domain '{domain}'")
    x, y = _load_raw(dataset, domain)
    parts = stratified_split(y, split_seed)
    return Domain(
        dataset=dataset,
        name=domain,
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        splits={name: Split(x[idx], y[idx]) for name, idx in zip(SPLITS, parts, strict=True)},
    )


def load_configured_domain(domain_cfg: Any, *, split_seed: int, key: str) -> Domain:
    """Load the domain that a `data.source` / `data.target` section describes.

    `labels_per_class: k` keeps a seeded, stratified subset of k training samples per class;
    val and test stay whole.
    """
    domain = load_domain(domain_cfg.dataset, split_seed=split_seed, key=key)
    k = domain_cfg.labels_per_class
    if k is not None:
        train = domain.splits["train"]
        idx = labelled_subset(train.y, k, split_seed)
        domain.splits["train"] = Split(train.x[idx], train.y[idx])
    return domain
