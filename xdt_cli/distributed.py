"""Collectives for a run launched by torchrun: one process per device, PyTorch's own
DistributedDataParallel for the gradients, and the few reductions around it.

A run is a group of `world` processes (WORLD_SIZE, set by torchrun; `Runtime.from_env` joins
the group). What each process does:
- data: every stream cuts (and augments) the same global batch as one process would and
  keeps its own contiguous share (`Shard`), so the union over ranks is exactly the
  one-process batch; every rank draws the same random numbers (the same seed and calls), so
  a method's random choices agree across ranks;
- gradients: DistributedDataParallel wraps the method (its `forward` is `training_step`), so
  the optimizer sees the mean gradient over ranks; a method with manual optimisation (several
  backward passes, which DDP's reducer does not allow) gets the same mean from
  `average_gradients` before its optimizer step;
- batch statistics a method computes over the batch (a covariance, a kernel, a singular
  value, a per-domain risk) read the whole global batch through `gather` / `mean`, which
  carry gradients back to each rank's own samples; each method's docstring says what it
  synchronises (`xdt methods NAME`);
- metrics: training losses and evaluation sums are all-reduced, so a logged number is that
  of the whole batch or the whole split; evaluation is sharded, each rank scoring its share;
- files: only rank 0 writes the run folder.

Outside torchrun (`world() == 1`) every function here is the identity or a no-op, so the
single-process path runs the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Shard:
    """This process's share of every batch: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    def part(self, items: Tensor | list, total: int) -> Tensor | list:
        """The rank's contiguous `total / world` of a global batch of `total` items."""
        if self.world == 1:
            return items
        size = total // self.world
        return items[self.rank * size : (self.rank + 1) * size]

    def span(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of `count` evaluation samples."""
        return count * self.rank // self.world, count * (self.rank + 1) // self.world


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def shard() -> Shard:
    return Shard(rank(), world())


def sum_(tensor: Tensor) -> Tensor:
    """In place: the sum over ranks (no gradient)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_(tensor: Tensor) -> Tensor:
    """In place: the mean over ranks (no gradient)."""
    return sum_(tensor).div_(world()) if active() else tensor


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Each parameter's gradient becomes its mean over ranks: what DDP's reducer does, for
    methods that compute their gradients themselves. Parameters without a gradient on some
    rank count as zero there (DDP's find_unused_parameters does the same)."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    flat = []
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        flat.append(grad.reshape(-1))
    if not flat:
        return
    joined = torch.cat(flat)
    average_(joined)
    offset = 0
    for p in params:
        n = p.numel()
        value = joined[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        offset += n


def gather(tensor: Tensor) -> Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order, with gradients flowing
    back to this rank's part: a statistic of the global batch computed on every rank. Ranks
    must hold the same shape (the same per-rank batch). With DDP averaging the parameters'
    gradients over ranks, the gradient of a loss computed on the gathered batch is exactly
    the one-process gradient (each rank back-propagates world x its share, DDP divides by
    world)."""
    if not active():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def mean(tensor: Tensor) -> Tensor:
    """The mean of `tensor` over ranks, with gradients (a per-domain risk of the global
    batch from each rank's risk of its share: the shares are equal)."""
    if not active():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM) / dist.get_world_size()


def any_(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank (e.g. a stop signal received by one of them)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (batch-norm statistics, which each rank
    updates from its own share, before an evaluation or a checkpoint)."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in rank order (a collective: every rank calls it)."""
    if not active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
