"""Data set registry: a name -> `DatasetSpec`, and `load_configured_domain`, which turns one
`data.source` / `data.target` section into a split, class-selected, transformed `Domain`.

A spec loads a domain in one of two ways:
- `load(domain) -> (x, y)`: whole tensors, split per class 70/15/15 (the embedded sets, and
  the simplest plug-ins);
- `open(DomainRequest) -> RawDomain`: the set's own parts, as tensors or as image files
  (torchvision sets, image folders). A part called "all" is split 70/15/15; an official
  "train" part is cut 85/15 into train and val, and an official "test" part is the test split.
The splits are stratified and seeded by `data.split_seed` (see splits.py). Then `classes` /
`class_map` select and rename classes, `labels_per_class` thins the train split, and the
`transforms` give the image shape that the model is built for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xdt_cli.config import DomainConfig, LoaderConfig, did_you_mean
from xdt_cli.data.disk import FileSplit, image_shape
from xdt_cli.data.splits import labelled_subset, stratified_split
from xdt_cli.data.stream import InMemoryStream
from xdt_cli.data.transforms import Pipeline, build_pipelines
from xdt_cli.distributed import Shard
from xdt_cli.errors import ConfigError
from xdt_cli.registry import Registry

SPLITS = ("train", "val", "test")
OFFICIAL_TRAIN_FRACTIONS = (0.85, 0.15)  # an official training split -> train, val
# A domain held out from training (`xdt generalize`): no train split, 20% val (read only by
# the oracle rule) and 80% test, as in DomainBed (Gulrajani & Lopez-Paz 2021).
HELD_OUT_FRACTIONS = (0.0, 0.2, 0.8)
DEFAULT_ROOT = "data"


@dataclass(frozen=True)
class DomainRequest:
    """What an `open` loader is asked for. `key` (e.g. "data.source") is for messages."""

    dataset: str
    domain: str
    root: Path | None
    download: bool = False
    skip_bad_images: bool = False
    key: str = field(default="data.source", compare=False)
    # data.split_seed: only read by sets built from another set's splits (multimnist5k)
    split_seed: int = 0


@dataclass
class Samples:
    """One part of a domain as stored, before splitting: image tensors or image files."""

    y: Tensor
    x: Tensor | None = None  # [N, C, H, W], uint8 0..255 or float 0..1
    files: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: Tensor) -> Samples:
        files = None if self.files is None else tuple(self.files[i] for i in idx.tolist())
        return Samples(self.y[idx], None if self.x is None else self.x[idx], files)


@dataclass
class RawDomain:
    """What `open` returns: class names (index = label), the set's parts ("all", or
    "train" and "test"), and the files skipped as unreadable (`skip_bad_images`)."""

    classes: tuple[str, ...]
    parts: dict[str, Samples]
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """What `xdt datasets` shows and how to load a domain (`load` or `open`, see above).

    `domains` is empty for a generic image-folder set, whose domains are its root's folders.
    `num_classes` and `input_shape` (of a stored image) are None where the files decide them.
    `kind`: "memory" (embedded or plug-in tensors), "torchvision" or "imagefolder"; it
    decides which keys of the domain section apply.
    """

    name: str
    description: str
    domains: tuple[str, ...]
    num_classes: int | None
    input_shape: tuple[int, int, int] | None
    load: Callable[[str], tuple[Tensor, Tensor]] | None = field(default=None, repr=False)
    open: Callable[[DomainRequest], RawDomain] | None = field(default=None, repr=False)
    classes: tuple[str, ...] | None = None
    kind: str = "memory"
    # extra labels of a sample, as functions of its class index: `data.tasks.<task>.label`
    # (multitask), e.g. multimnist5k's left and right digits
    labels: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.load is None) == (self.open is None):
            raise ValueError(f"data set '{self.name}': give exactly one of load and open")


@dataclass
class Split:
    """Samples held in memory: `x` [N, C, H, W] float in [0, 1] or uint8 0..255 (made float
    per batch, so CIFAR stays 150 MB of bytes), `y` int64 [N].

    `train_transform` runs on training batches (make_stream), `eval_transform` on the
    batches that evaluation reads (`batches`).
    """

    x: Tensor
    y: Tensor
    train_transform: Pipeline = field(default_factory=Pipeline)
    eval_transform: Pipeline = field(default_factory=Pipeline)

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, device: torch.device, shard: Shard = Shard()
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) on `device` in order, x through the eval transforms (float32); under
        torchrun (`shard`) only this rank's contiguous share of the samples."""
        first, stop = shard.span(len(self))
        for start in range(first, stop, batch_size):
            end = min(start + batch_size, stop)
            x = self.x[start:end].to(device, non_blocking=True)
            y = self.y[start:end].to(device, non_blocking=True)
            yield self.eval_transform(x), y

    def stream(
        self,
        *,
        batch_size: int,
        seed: int,
        domain: str,
        device: torch.device,
        labelled: bool,
        task: str | None,
        weight: Tensor | None = None,
        shard: Shard = Shard(),
    ) -> InMemoryStream:
        return InMemoryStream(
            self.x,
            self.y if labelled else None,
            batch_size=batch_size,
            seed=seed,
            domain=domain,
            device=device,
            task=task,
            transform=self.train_transform,
            weight=weight,
            shard=shard,
        )


AnySplit = Split | FileSplit


@dataclass
class Domain:
    """One domain of a data set with its train/val/test splits.

    `input_shape` is what the model reads: a stored image after the transforms. `classes`
    names the labels 0..num_classes-1; `skipped` lists unreadable files left out.
    """

    dataset: str
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    splits: dict[str, AnySplit]
    classes: tuple[str, ...] | None = None
    skipped: tuple[str, ...] = ()


def _plugged(name: str, obj: Any) -> list[tuple[str, DatasetSpec]]:
    """An `xdt.datasets` entry point that names an object: a DatasetSpec or a list of them."""
    specs = list(obj) if isinstance(obj, list | tuple) else [obj]
    if not specs or not all(isinstance(s, DatasetSpec) for s in specs):
        raise TypeError(f"{type(obj).__name__}; expected a DatasetSpec or a list of them")
    return [(s.name, s) for s in specs]


# the built-ins register themselves when xdt_cli.data is imported (data/__init__.py)
DATASETS: Registry[DatasetSpec] = Registry("data set", group="xdt.datasets", coerce=_plugged)


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a data set under its `name` (plug-ins call this, or name a spec in an entry point)."""
    return DATASETS.register(spec.name, spec)


def get_spec(name: str, key: str = "data.source.dataset") -> DatasetSpec:
    """The data set called `name`; a miss is one ConfigError line naming `key`."""
    return DATASETS.lookup(name, key)


@lru_cache(maxsize=16)
def _load_raw(dataset: str, domain: str) -> tuple[Tensor, Tensor]:
    load = DATASETS[dataset].load
    assert load is not None
    return load(domain)


@lru_cache(maxsize=16)
def _open_raw(request: DomainRequest) -> RawDomain:
    opener = DATASETS[request.dataset].open
    assert opener is not None
    return opener(request)


def load_domain(
    dataset: str, domain: str | None = None, *, split_seed: int = 0, key: str = "data.source"
) -> Domain:
    """Load one domain (default: the data set's first) with default settings."""
    if domain is None:
        spec = get_spec(dataset, f"{key}.dataset")
        domain = spec.domains[0] if spec.domains else None
    return load_configured_domain(
        DomainConfig(dataset=dataset, domain=domain), split_seed=split_seed, key=key
    )


def load_configured_domain(
    domain_cfg: DomainConfig, *, split_seed: int, key: str, held_out: bool = False
) -> Domain:
    """Load the domain that a `data.source` / `data.target` section describes.

    `labels_per_class: k` keeps a stratified subset of k training samples per class, drawn
    with `labels_seed` (default: the split seed); val and test stay whole. `held_out`: a
    domain that no step trains on; all of its samples are split 20% val / 80% test (its train
    split is empty).
    """
    spec = get_spec(domain_cfg.dataset, f"{key}.dataset")
    _check_keys(spec, domain_cfg, key)
    domain = _domain_name(spec, domain_cfg.domain, key)
    if spec.load is not None:
        x, y = _load_raw(spec.name, domain)
        count = spec.num_classes or int(y.max()) + 1
        classes = spec.classes or tuple(str(i) for i in range(count))
        raw = RawDomain(classes=classes, parts={"all": Samples(y, x=x)})
    else:
        root = Path(domain_cfg.root or DEFAULT_ROOT).expanduser()
        request = DomainRequest(
            dataset=spec.name,
            domain=domain,
            root=root,
            download=domain_cfg.download,
            skip_bad_images=domain_cfg.skip_bad_images,
            key=key,
            split_seed=split_seed,
        )
        raw = _open_raw(request)

    classes, parts = _select_classes(raw, domain_cfg, spec.name, key)
    splits = _held_out_split(parts, split_seed) if held_out else _split(parts, split_seed)
    k = domain_cfg.labels_per_class
    if k is not None:
        draw = split_seed if domain_cfg.labels_seed is None else domain_cfg.labels_seed
        splits["train"] = splits["train"].take(labelled_subset(splits["train"].y, k, draw))

    stored = _stored_shape(splits, key)
    train_tf, eval_tf, input_shape = build_pipelines(domain_cfg.transforms, stored, key)
    built: dict[str, AnySplit] = {}
    for name, part in splits.items():
        if part.files is not None:
            built[name] = FileSplit(
                files=part.files,
                y=part.y,
                train_transform=train_tf,
                eval_transform=eval_tf,
                loader=domain_cfg.loader,
                key=key,
            )
        else:
            assert part.x is not None
            built[name] = Split(part.x, part.y, train_tf, eval_tf)
    return Domain(
        dataset=spec.name,
        name=domain,
        num_classes=len(classes),
        input_shape=input_shape,
        splits=built,
        classes=classes,
        skipped=raw.skipped,
    )


def _check_keys(spec: DatasetSpec, cfg: DomainConfig, key: str) -> None:
    """Keys that this kind of set does not use are errors, not silently ignored."""
    if spec.kind != "imagefolder":
        if cfg.skip_bad_images:
            raise ConfigError(
                f"{key}.skip_bad_images: {spec.name} is not read from image files "
                "(only image-folder sets decode files)"
            )
        if cfg.loader != LoaderConfig():
            raise ConfigError(
                f"{key}.loader: {spec.name} is held in memory; loader settings apply to "
                "image-folder sets, whose images are decoded by DataLoader workers"
            )
    elif cfg.download:
        raise ConfigError(
            f"{key}.download: xdt does not download image-folder sets; unpack {spec.name} "
            f"into {key}.root as root/<domain>/<class>/<image>"
        )
    if spec.load is not None and (cfg.root is not None or cfg.download):
        what = "root" if cfg.root is not None else "download"
        raise ConfigError(f"{key}.{what}: {spec.name} ships with a package and reads no files")


def _domain_name(spec: DatasetSpec, domain: str | None, key: str) -> str:
    if domain is None:
        if len(spec.domains) == 1:
            return spec.domains[0]
        choices = f" (one of {', '.join(spec.domains)})" if spec.domains else ""
        raise ConfigError(f"{key}.domain: {spec.name} has several domains; choose one{choices}")
    if spec.domains and domain not in spec.domains:
        raise ConfigError(
            f"{key}.domain: data set '{spec.name}' has no domain '{domain}'"
            f"{did_you_mean(domain, spec.domains)}; "
            f"its domains: {', '.join(spec.domains)}"
        )
    return domain


def _select_classes(
    raw: RawDomain, cfg: DomainConfig, dataset: str, key: str
) -> tuple[tuple[str, ...], dict[str, Samples]]:
    """Apply `class_map` (renaming; several names may map onto one) and then `classes`
    (which classes to keep, in which order); relabel the samples to 0..k-1."""
    names = list(raw.classes)
    if not cfg.class_map and cfg.classes is None:
        return raw.classes, raw.parts
    for old in cfg.class_map:
        if old not in names:
            raise ConfigError(
                f"{key}.class_map: '{old}' is not a class of {dataset}"
                f"{did_you_mean(old, names)}; its classes: {_listing(names)}"
            )
    renamed = [cfg.class_map.get(n, n) for n in names]
    if cfg.classes is not None:
        for name in cfg.classes:
            if name not in renamed:
                raise ConfigError(
                    f"{key}.classes: '{name}' is not a class of {dataset}"
                    f"{' after class_map' if cfg.class_map else ''}{did_you_mean(name, renamed)}; "
                    f"its classes: {_listing(renamed)}"
                )
        kept = tuple(cfg.classes)
    else:
        kept = tuple(dict.fromkeys(renamed))
    lookup = torch.tensor([kept.index(n) if n in kept else -1 for n in renamed], dtype=torch.long)
    parts = {}
    for name, part in raw.parts.items():
        if bool((part.y < 0).any()):
            raise ConfigError(
                f"{key}.classes: {dataset} has samples without a label (-1); class selection "
                "needs every sample's class"
            )
        y = lookup[part.y]
        keep = torch.nonzero(y >= 0).flatten()
        taken = part.take(keep)
        taken.y = y[keep]
        parts[name] = taken
    return kept, parts


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _split(parts: dict[str, Samples], seed: int) -> dict[str, Samples]:
    if set(parts) == {"all"}:
        idx = stratified_split(parts["all"].y, seed)
        return {name: parts["all"].take(i) for name, i in zip(SPLITS, idx, strict=True)}
    if set(parts) == {"train", "test"}:
        train, val = stratified_split(parts["train"].y, seed, OFFICIAL_TRAIN_FRACTIONS)
        return {
            "train": parts["train"].take(train),
            "val": parts["train"].take(val),
            "test": parts["test"],
        }
    if set(parts) == set(SPLITS):
        return dict(parts)
    raise ValueError(f"a data set's parts must be all, train+test or train+val+test: {parts}")


def _held_out_split(parts: dict[str, Samples], seed: int) -> dict[str, Samples]:
    """All the samples of a held-out domain (every official part pooled), 0/20/80."""
    pooled = list(parts.values())
    if len(pooled) == 1:
        every = pooled[0]
    else:
        files = None
        if all(p.files is not None for p in pooled):
            files = tuple(f for p in pooled for f in (p.files or ()))
        x = None
        if all(p.x is not None for p in pooled):
            x = torch.cat([p.x for p in pooled if p.x is not None])
        every = Samples(torch.cat([p.y for p in pooled]), x=x, files=files)
    idx = stratified_split(every.y, seed, HELD_OUT_FRACTIONS)
    return {name: every.take(i) for name, i in zip(SPLITS, idx, strict=True)}


def _stored_shape(splits: dict[str, Samples], key: str) -> tuple[int, int, int]:
    """(C, H, W) of a stored image: the tensors' shape, or the first image file's."""
    for part in splits.values():
        if len(part) == 0:
            continue
        if part.x is not None:
            c, h, w = part.x.shape[1:]
            return (c, h, w)
        assert part.files is not None
        return image_shape(part.files[0], key)
    raise ConfigError(f"{key}: no samples left (check {key}.classes and {key}.class_map)")


def check_compatible(source: Domain, target: Domain, key: str = "data.target") -> None:
    """Two domains that one model reads: the same image shape and the same classes."""
    if source.input_shape != target.input_shape:
        raise ConfigError(
            f"{key}: {target.name} gives images of shape {target.input_shape} but "
            f"{source.name} gives {source.input_shape}; add a resize (or grayscale) to "
            f"{key}.transforms"
        )
    if source.num_classes != target.num_classes:
        raise ConfigError(
            f"{key}: {target.name} has {target.num_classes} classes but {source.name} has "
            f"{source.num_classes}; choose shared ones with {key}.classes and class_map"
        )
    if source.classes and target.classes and source.classes != target.classes:
        diff = [
            f"{a} vs {b}" for a, b in zip(source.classes, target.classes, strict=True) if a != b
        ]
        raise ConfigError(
            f"{key}: its classes differ from {source.name}'s ({', '.join(diff[:3])}); "
            f"list the shared ones in the same order with {key}.classes (and class_map)"
        )


def describe(spec: DatasetSpec) -> dict[str, Any]:
    """The static facts of a spec, for `xdt datasets`."""
    return {
        "name": spec.name,
        "kind": spec.kind,
        "domains": list(spec.domains),
        "classes": spec.num_classes,
        "input_shape": list(spec.input_shape) if spec.input_shape else None,
        "description": spec.description,
        "origin": DATASETS.origin(spec.name),
    }
