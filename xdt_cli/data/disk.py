"""Image files on disk: the split that holds their paths, and the DataLoader-backed stream
and evaluation batches that decode them in worker processes.

The stream keeps the in-memory stream's contract: the batch at step `s` is a pure function
of (seed, s). The sample order comes from the same epoch permutation (stream.py), and each
image's random transforms run under its own seed, drawn from (seed, s) with numpy's
SeedSequence (the same on every platform), whichever worker decodes it. So resuming at step
`s` restarts the loader there and replays the same batches.

`loader` settings (`num_workers`, `pin_memory`, `persistent_workers`) come from the
domain's config section. An image that cannot be decoded comes back from the worker as a
value, not an exception, so the training process can stop with one line naming the file.
Worker processes are stopped by `close()`, and at the latest when the interpreter exits:
a loader left to torch's own exit handling keeps the process waiting for seconds.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from xdt_cli import distributed
from xdt_cli.config import LoaderConfig, first_line
from xdt_cli.data.stream import DomainBatch, check_batch_size, epoch_permutation
from xdt_cli.data.transforms import Pipeline
from xdt_cli.distributed import Shard
from xdt_cli.errors import ConfigError

_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()  # streams and splits with loaders


@atexit.register
def _close_all() -> None:
    # registered after torch's own exit hook, so it runs first (atexit is last-in,
    # first-out), while DataLoader iterators can still shut their workers down cleanly
    for owner in list(_OPEN):
        owner.close()


def read_image(path: str) -> Tensor:
    """An image file as a uint8 RGB tensor [3, H, W] (grey and palette images converted)."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


def image_shape(path: str, key: str) -> tuple[int, int, int]:
    """(C, H, W) of the image at `path`, as `read_image` gives it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001  (Pillow raises many types for a bad file)
        raise ConfigError(f"{key}: cannot decode image {path} ({first_line(exc, 160)})") from None
    return (3, height, width)


@dataclass(frozen=True)
class _Unreadable:
    """Returned by a worker in place of a sample (or batch) that could not be made."""

    path: str
    reason: str


class _ImageFiles(Dataset):
    """Items are (index, seed): the image at `index`, transformed under `seed`, returned
    with its label and `index` (the stream looks the sample's loss weight up by it)."""

    def __init__(self, files: tuple[str, ...], labels: list[int], transform: Pipeline) -> None:
        self.files = files
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int] | _Unreadable:
        index, seed = item
        path = self.files[index]
        try:
            x = read_image(path)
        except Exception as exc:  # noqa: BLE001
            return _Unreadable(path, first_line(exc, 160))
        with torch.random.fork_rng(devices=[]):  # never moves the caller's RNG (workers=0)
            torch.manual_seed(seed)
            x = self.transform(x.unsqueeze(0))[0]
        return x, self.labels[index], index


def _collate(samples: list[Any]) -> tuple[Tensor, Tensor, Tensor] | _Unreadable:
    """(x, y, index) of a batch, or the first sample that could not be made."""
    for sample in samples:
        if isinstance(sample, _Unreadable):
            return sample
    shapes = {tuple(x.shape) for x, _, _ in samples}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        return _Unreadable(
            "",
            f"images of different sizes in one batch ({'x'.join(map(str, a))} and "
            f"{'x'.join(map(str, b))}); add a resize with [height, width] or a crop",
        )
    x = torch.stack([x for x, _, _ in samples])
    return x, torch.tensor([y for _, y, _ in samples]), torch.tensor([i for _, _, i in samples])


def _failure(out: _Unreadable, key: str) -> ConfigError:
    if out.path:
        return ConfigError(
            f"{key}: cannot decode image {out.path} ({out.reason}); remove or replace it"
        )
    return ConfigError(f"{key}.transforms: {out.reason}")


def _sample_seeds(seed: int, step: int, count: int) -> list[int]:
    state = np.random.SeedSequence([seed % 2**63, step]).generate_state(count, dtype=np.uint64)
    return [int(s) for s in state]


class _StepBatches:
    """The batch sampler of a FileStream: from step `start` on, forever. Under torchrun a
    rank loads its share of each global batch, with the samples' own augmentation seeds: the
    union over ranks is exactly the one-process batch."""

    def __init__(self, size: int, batch_size: int, seed: int, shard: Shard = Shard()) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.shard = shard
        self.start = 0
        self.batches_per_epoch = size // batch_size

    def indices(self, step: int, perm: Tensor) -> list[int]:
        i = step % self.batches_per_epoch
        return perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, epoch, perm = self.start, None, None
        while True:
            if step // self.batches_per_epoch != epoch:
                epoch = step // self.batches_per_epoch
                perm = epoch_permutation(self.seed, epoch, self.size)
            assert perm is not None
            seeds = _sample_seeds(self.seed, step, self.batch_size)
            batch = list(zip(self.indices(step, perm), seeds, strict=True))
            yield self.shard.part(batch, self.batch_size)
            step += 1


def _loader_kwargs(options: LoaderConfig, device: torch.device) -> dict[str, Any]:
    kwargs = {
        # the loader draws its workers' base seed from this generator, not the global one,
        # which the engine checkpoints: starting a loader must not shift the training RNG
        "generator": torch.Generator().manual_seed(0),
        "num_workers": options.num_workers,
        "pin_memory": options.pin_memory and device.type == "cuda",
        "persistent_workers": options.persistent_workers and options.num_workers > 0,
        "collate_fn": _collate,
    }
    if options.num_workers > 0 and distributed.active():
        # torchrun: a rank holds the process group's threads (gloo, NCCL), and a worker
        # forked while one of them holds a lock can hang forever; forkserver starts workers
        # from a clean single-threaded server instead
        kwargs["multiprocessing_context"] = "forkserver"
    return kwargs


@dataclass(eq=False)  # identity, not contents: splits are kept in a WeakSet
class FileSplit:
    """Samples as image files: `files[i]` has label `y[i]`. The images are decoded when a
    batch is read, by `loader.num_workers` processes (0: the calling process)."""

    files: tuple[str, ...]
    y: Tensor
    train_transform: Pipeline = field(default_factory=Pipeline)
    eval_transform: Pipeline = field(default_factory=Pipeline)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    key: str = "data.source"
    _eval_loaders: dict[Any, DataLoader] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, device: torch.device, shard: Shard = Shard()
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) on `device` in file order, x through the eval transforms (float32); under
        torchrun (`shard`) only this rank's contiguous share of the files, read by its workers."""
        loader = self._eval_loader(batch_size, device, shard)
        non_blocking = loader.pin_memory
        batches = iter(loader)
        del loader
        while (out := next(batches, None)) is not None:
            if isinstance(out, _Unreadable):
                # drop the workers now (by reference count): an exception's traceback
                # would keep them for the garbage collector, which shuts them down slowly
                del batches
                self.close()
                raise _failure(out, self.key)
            x, y, _ = out
            yield x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)

    def _eval_loader(self, batch_size: int, device: torch.device, shard: Shard) -> DataLoader:
        cache_key = (batch_size, str(device), shard)
        loader = self._eval_loaders.get(cache_key)
        if loader is None:
            first, stop = shard.span(len(self))
            chunks = [
                [(i, 0) for i in range(start, min(start + batch_size, stop))]
                for start in range(first, stop, batch_size)
            ]
            dataset = _ImageFiles(self.files, self.y.tolist(), self.eval_transform)
            loader = DataLoader(
                dataset, batch_sampler=chunks, **_loader_kwargs(self.loader, device)
            )
            self._eval_loaders[cache_key] = loader  # kept for persistent workers
            _OPEN.add(self)
        return loader

    def close(self) -> None:
        """Stop the evaluation loaders' worker processes (they restart when needed)."""
        self._eval_loaders.clear()

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
    ) -> FileStream:
        return FileStream(
            self,
            batch_size=batch_size,
            seed=seed,
            domain=domain,
            device=device,
            labelled=labelled,
            task=task,
            weight=weight,
            shard=shard,
        )


class FileStream:
    """Training batches of a FileSplit through a DataLoader, `batch(step)` at any step.

    `weight` (per sample, indexed like the split) stays in this process: each batch comes
    back from the workers with its samples' indices, and its `weight` is looked up by them,
    so it holds exactly the weights of the images in the batch."""

    def __init__(
        self,
        split: FileSplit,
        *,
        batch_size: int,
        seed: int,
        domain: str,
        device: torch.device,
        labelled: bool = True,
        task: str | None = None,
        weight: Tensor | None = None,
        shard: Shard = Shard(),
    ) -> None:
        check_batch_size(len(split), batch_size, domain, shard)
        self.size = len(split)
        self.weight = weight.to(device) if weight is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.domain = domain
        self.task = task
        self.device = device
        self.labelled = labelled
        self.key = split.key
        self.batches_per_epoch = self.size // batch_size
        self._sampler = _StepBatches(self.size, batch_size, seed, shard)
        dataset = _ImageFiles(split.files, split.y.tolist(), split.train_transform)
        self._loader_kwargs = _loader_kwargs(split.loader, device)
        self._loader = DataLoader(dataset, batch_sampler=self._sampler, **self._loader_kwargs)
        self._iter: Iterator[Any] | None = None
        self._next_step: int | None = None
        _OPEN.add(self)

    def batch(self, step: int) -> DomainBatch:
        if self._iter is None or step != self._next_step:
            # a jump (resume, or a step replayed): restart the loader at `step`
            self._sampler.start = step
            self._iter = iter(self._loader)
        out = next(self._iter)
        self._next_step = step + 1
        if isinstance(out, _Unreadable):
            self.close()  # see FileSplit.batches
            raise _failure(out, self.key)
        x, y, index = out
        non_blocking = self._loader.pin_memory
        return DomainBatch(
            x=x.to(self.device, non_blocking=non_blocking),
            y=y.to(self.device, non_blocking=non_blocking) if self.labelled else None,
            domain=self.domain,
            task=self.task,
            weight=self.weight[index.to(self.weight.device)] if self.weight is not None else None,
        )

    def state_dict(self) -> dict[str, int | str]:
        return {
            "domain": self.domain,
            "seed": self.seed,
            "size": self.size,
            "batch_size": self.batch_size,
        }

    def close(self) -> None:
        """Stop the worker processes; a later `batch` starts them again."""
        self._iter = None
        self._next_step = None
        self._loader = DataLoader(
            self._loader.dataset,
            batch_sampler=self._sampler,
            **self._loader_kwargs,
        )
