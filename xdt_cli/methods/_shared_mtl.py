"""What every multitask weighting shares (`xdt multitask`): the tasks, their masked losses,
one encoder pass per distinct input batch, per-task gradients and the weight log.

A multitask batch holds one `DomainBatch` per task (`task` set). Tasks that read the same
inputs (several labels of one data set) share the very same `x` tensor, and the encoder runs
once per distinct `x`; tasks with their own data set (one set per task) bring their own `x`.
Labels: `ce` tasks carry int64 class indices with -1 where the label is missing; `bce` and
`mse` tasks carry float32 targets with NaN where it is missing. A missing label adds nothing
to its task's loss: each task's loss is the mean over its labelled samples, and exactly 0,
with zero gradient, when a batch has none.

A weighting (static, equal, uncertainty, dwa, gradnorm, pcgrad, mgda, rlw) decides the
lambda_i of L = sum_i lambda_i L_i (or, for the gradient-surgery methods, how the task
gradients combine) and logs them as `train/weight_<task>`; the per-task losses are logged
as `train/loss_<task>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdt_cli import distributed
from xdt_cli.data.tasks import TaskSpec
from xdt_cli.methods.base import DomainBatch, Method, OptimizerStep

LOSSES = ("ce", "bce", "mse")
__all__ = ["LOSSES", "MultiTaskMethod", "TaskSpec", "assign_flat_gradient", "task_loss"]


def task_loss(kind: str, output: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(mean loss over the labelled samples, number of labelled samples) of one task.

    Missing labels (-1 for ce, NaN otherwise) are masked out; with none labelled the loss
    is 0 and its gradient is 0 everywhere."""
    output = output.float()
    if kind == "ce":
        mask = y >= 0
        per_sample = F.cross_entropy(output, y.clamp(min=0), reduction="none")
    else:
        mask = ~torch.isnan(y)
        target = torch.where(mask, y, torch.zeros_like(y))
        prediction = output.squeeze(-1)
        if kind == "bce":
            per_sample = F.binary_cross_entropy_with_logits(prediction, target, reduction="none")
        else:
            per_sample = (prediction - target) ** 2
    count = mask.sum()
    loss = torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
    return loss / count.clamp(min=1), count


class MultiTaskMethod(Method):
    """Base of the multitask weightings: `setup_tasks`, `task_losses`, `predict(x, task)`."""

    regimes: ClassVar[frozenset[str]] = frozenset({"multitask"})

    def __init__(self, model: nn.Module, config, *, total_steps: int) -> None:
        super().__init__(model, config, total_steps=total_steps)
        self.tasks: list[TaskSpec] = []

    def setup_tasks(self, tasks: Sequence[TaskSpec]) -> None:
        """Called by the regime before the optimizer is built or a checkpoint loaded; a
        weighting with per-task state (log-variances, loss weights) creates it here."""
        self.tasks = list(tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    # -- forward -------------------------------------------------------------------------
    def encode_batches(self, batch: list[DomainBatch]) -> list[tuple[Tensor, Tensor, list[str]]]:
        """[(x, shared representation, the tasks reading it)], one per distinct input."""
        groups: dict[int, tuple[Tensor, list[str]]] = {}
        for b in batch:
            groups.setdefault(id(b.x), (b.x, []))[1].append(self._task_of(b))
        return [(x, self.model.encode(x), tasks) for x, tasks in groups.values()]

    def losses_from(
        self, batch: list[DomainBatch], encoded: list[tuple[Tensor, Tensor, list[str]]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-task (loss, labelled count) from representations given by `encode_batches`
        (or a detached copy of them, as MGDA-UB uses)."""
        outputs: dict[str, Tensor] = {}
        for x, rep, tasks in encoded:
            outputs.update(self.model.decode(rep, x, tasks))
        kinds = {t.name: t.loss for t in self.tasks}
        losses, counts = {}, {}
        for b in batch:
            name = self._task_of(b)
            assert b.y is not None  # every multitask stream is labelled (masks mark gaps)
            losses[name], counts[name] = task_loss(kinds[name], outputs[name], b.y)
        if distributed.world() > 1:
            # torchrun: a task's loss is the mean over the labelled samples of the whole
            # global batch; each rank's mean is scaled by its share of them, so that the mean
            # over ranks (DDP's, the logged one) is exactly that, however labels are spread
            local = torch.stack([counts[t] for t in losses]).float()
            total = distributed.sum_(local.clone())
            for i, name in enumerate(losses):
                losses[name] = losses[name] * (local[i] * distributed.world() / total[i].clamp(1))
        return losses, counts

    def task_losses(self, batch: list[DomainBatch]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-task mean loss over its labelled samples, and the labelled counts."""
        return self.losses_from(batch, self.encode_batches(batch))

    @staticmethod
    def _task_of(b: DomainBatch) -> str:
        assert b.task is not None, "a multitask batch names its task"
        return b.task

    @torch.no_grad()
    def predict(self, x: Tensor, task: str | None = None) -> Tensor:
        assert task is not None
        return self.model(x, [task])[task]

    @torch.no_grad()
    def predict_tasks(self, x: Tensor, tasks: list[str]) -> dict[str, Tensor]:
        """The outputs of several tasks on the same inputs, with one encoder pass."""
        return self.model(x, tasks)

    # -- combining -----------------------------------------------------------------------
    def weighted_sum(self, losses: dict[str, Tensor], weights: dict[str, Tensor | float]) -> Tensor:
        return sum(
            (weights[t] * losses[t] for t in losses), torch.zeros((), device=_device(losses))
        )

    def log_values(
        self, losses: dict[str, Tensor], weights: dict[str, Tensor | float]
    ) -> dict[str, Tensor]:
        """`loss_<task>` and `weight_<task>` for the train rows (detached scalars)."""
        device = _device(losses)
        out = {}
        for t in self.task_names:
            out[f"loss_{t}"] = losses[t].detach().float()
            out[f"weight_{t}"] = torch.as_tensor(weights[t], device=device).detach().float()
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.model.shared_parameters()

    def labelled_tasks(self, counts: dict[str, Tensor]) -> list[str]:
        """The tasks with a labelled sample in the step's batch (torchrun: on any rank, so
        that every rank computes the same gradients and collectives)."""
        names = self.task_names
        labelled = distributed.sum_(torch.stack([counts[t] for t in names]).float())
        return [t for t, n in zip(names, labelled.tolist(), strict=True) if n > 0]

    def task_gradients(
        self, losses: dict[str, Tensor], opt: OptimizerStep, params: list[nn.Parameter]
    ) -> dict[str, Tensor]:
        """Each task's gradient with respect to `params`, flattened into one vector (zeros
        for a parameter the task does not reach), unscaled from the grad scaler."""
        scale = opt.scale_factor()
        grads = {}
        for name, loss in losses.items():
            parts = torch.autograd.grad(
                opt.scale(loss), params, retain_graph=True, allow_unused=True
            )
            grads[name] = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten().float() / scale
                    for g, p in zip(parts, params, strict=True)
                ]
            )
            distributed.average_(grads[name])  # torchrun: the whole global batch's gradient
        return grads


def assign_flat_gradient(params: list[nn.Parameter], flat: Tensor, scale: float = 1.0) -> None:
    """Add the slices of `flat` (times `scale`, e.g. the grad scaler's factor, so that
    `opt.step()` unscales it like any other gradient) to the `.grad` of `params`."""
    offset = 0
    for p in params:
        n = p.numel()
        piece = (flat[offset : offset + n] * scale).view_as(p).to(p.dtype)
        p.grad = piece.clone() if p.grad is None else p.grad + piece
        offset += n


def _device(losses: dict[str, Tensor]) -> torch.device:
    return next(iter(losses.values())).device
