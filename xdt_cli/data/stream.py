"""Training streams: the batch of one domain at step `s`, as a pure function of (seed, s).

Epoch `e = s // batches_per_epoch` uses the permutation drawn by a generator seeded with
(seed, e), and the last incomplete batch of each epoch is dropped. So the data order needs
no state of its own to resume: the step alone restores it, bit for bit, and the checkpoint
records (seed, size, batch size) only to check that it resumes the same stream.

`InMemoryStream` indexes whole tensors on the device (no per-sample Python) and runs the
train transforms on the batch there; image files are streamed by `disk.FileStream`, which
keeps the same contract. `make_stream` picks the right one for a split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdt_cli.distributed import Shard
from xdt_cli.errors import ConfigError


@dataclass
class DomainBatch:
    """One domain's (or task's) share of a training step. `y` is None when unlabelled.

    `weight`: per-sample loss weights of the batch's samples (`xdt generalize`: lambda_d
    times s_{d,i}, so that the weighted batch mean is the domain's weighted risk; see
    regimes.py); None where every sample counts the same (plain means).
    """

    x: Tensor
    y: Tensor | None
    domain: str
    task: str | None = None
    weight: Tensor | None = None


def epoch_permutation(seed: int, epoch: int, size: int) -> Tensor:
    """The order of the samples in `epoch` (on the CPU), the same on every machine."""
    # torch seeds are 64-bit; wrapping keeps any config seed valid
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(size, generator=gen)


def check_batch_size(size: int, batch_size: int, domain: str, shard: Shard = Shard()) -> None:
    if size < batch_size:
        raise ConfigError(
            f"train.batch_size: {batch_size} is larger than the {size} training samples "
            f"of domain '{domain}'"
        )
    if batch_size % shard.world:
        raise ConfigError(
            f"train.batch_size: the global batch of {batch_size} images of '{domain}' does not "
            f"split evenly over {shard.world} processes; use a multiple of {shard.world}, or "
            "train.batch_size_per_rank: true"
        )


class InMemoryStream:
    """Batches cut from tensors held on the device; `transform` (the split's train
    transforms) runs on each batch, with the global RNG, which checkpoints restore. Under
    torchrun (`shard`) each rank transforms the same global batch and keeps its contiguous
    share, so the shares are exactly the one-process batch."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor | None,
        *,
        batch_size: int,
        seed: int,
        domain: str,
        device: torch.device,
        task: str | None = None,
        transform: Any = None,
        weight: Tensor | None = None,
        shard: Shard = Shard(),
    ) -> None:
        check_batch_size(len(x), batch_size, domain, shard)
        self.shard = shard
        self.x = x.to(device)
        self.y = y.to(device) if y is not None else None
        self.weight = weight.to(device) if weight is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.domain = domain
        self.task = task
        self.device = device
        self.transform = transform
        self.batches_per_epoch = len(x) // batch_size
        self._epoch = -1
        self._perm: Tensor | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch or self._perm is None:
            self._perm = epoch_permutation(self.seed, epoch, len(self.x)).to(self.device)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> DomainBatch:
        epoch, i = divmod(step, self.batches_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.x[idx]
        if self.transform is not None:
            # the whole global batch, as one process would, then this rank's share: every
            # rank draws the same random numbers, and the shares join into the same batch
            x = self.transform(x)
        x, idx = self.shard.part(x, self.batch_size), self.shard.part(idx, self.batch_size)
        y = self.y[idx] if self.y is not None else None
        weight = self.weight[idx] if self.weight is not None else None
        return DomainBatch(x=x, y=y, domain=self.domain, task=self.task, weight=weight)

    def state_dict(self) -> dict[str, int | str]:
        return {
            "domain": self.domain,
            "seed": self.seed,
            "size": len(self.x),
            "batch_size": self.batch_size,
        }


def make_stream(
    split: Any,
    *,
    batch_size: int,
    seed: int,
    domain: str,
    device: torch.device,
    labelled: bool = True,
    task: str | None = None,
    weight: Tensor | None = None,
    shard: Shard = Shard(),
) -> Any:
    """The training stream of one split (in memory or image files); `labelled=False` drops
    the labels (y is None); `weight` (per sample, indexed like the split) rides along in
    every batch; `shard`: this rank's share of each global batch of `batch_size` (torchrun).
    Every stream has `batch(step) -> DomainBatch` and `state_dict()`."""
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "seed": seed,
        "domain": domain,
        "device": device,
        "labelled": labelled,
        "task": task,
        "shard": shard,
    }
    if weight is not None:
        if len(weight) != len(split):
            raise ValueError(f"{len(weight)} weights for the {len(split)} samples of '{domain}'")
        options["weight"] = weight
    return split.stream(**options)
