"""The in-memory batch stream: whole-tensor indexing, no per-sample Python.

The batch at step `s` is a pure function of (seed, s): epoch `e = s // batches_per_epoch`
uses the permutation drawn by a generator seeded with (seed, e), and the last incomplete
batch of each epoch is dropped. So the data order needs no state of its own to resume: the
step alone restores it, bit for bit, and the checkpoint records (seed, size, batch size)
only to check that it resumes the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xdt_cli.errors import ConfigError


@dataclass
class DomainBatch:
    """One domain's (or task's) share of a training step. `y` is None when unlabelled."""

    x: Tensor
    y: Tensor | None
    domain: str
    task: str | None = None


class InMemoryStream:
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
    ) -> None:
        if len(x) < batch_size:
            raise ConfigError(
                f"train.batch_size: {batch_size} is larger than the {len(x)} training samples "
                f"of domain '{domain}'"
            )
        self.x = x.to(device)
        self.y = y.to(device) if y is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.domain = domain
        self.task = task
        self.device = device
        self.batches_per_epoch = len(x) // batch_size
        self._epoch = -1
        self._perm: Tensor | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            # torch seeds are 64-bit; wrapping keeps any config seed valid
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
            self._perm = torch.randperm(len(self.x), generator=gen).to(self.device)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> DomainBatch:
        epoch, i = divmod(step, self.batches_per_epoch)
        idx = self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        y = self.y[idx] if self.y is not None else None
        return DomainBatch(x=self.x[idx], y=y, domain=self.domain, task=self.task)

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
) -> InMemoryStream:
    """The training stream of one split; `labelled=False` drops the labels (y is None)."""
    return InMemoryStream(
        split.x,
        split.y if labelled else None,
        batch_size=batch_size,
        seed=seed,
        domain=domain,
        device=device,
        task=task,
    )
