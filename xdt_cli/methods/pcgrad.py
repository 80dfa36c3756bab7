"""PCGrad: project each task's gradient off the gradients it conflicts with (Yu et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod, assign_flat_gradient
from xdt_cli.methods.base import DomainBatch, MethodConfig, OptimizerStep


class PCGradConfig(MethodConfig):
    reduction: Literal["sum", "mean"] = Field(
        "sum",
        description="how the projected task gradients combine on the shared parameters "
        "(the paper's code and LibMTL: sum)",
    )


def project_conflicting(
    grads: Sequence[Tensor], orders: Sequence[Sequence[int]] | None = None
) -> Tensor:
    """The PCGrad projections, one row per task: [K, P].

    For each task i, in the order `orders[i]` (the other tasks' indices; default a random
    permutation from torch's global CPU generator), g_i <- g_i - min(g_i.g_j, 0) / ||g_j||^2
    g_j against the ORIGINAL g_j: a conflicting component is removed, agreeing ones are
    left alone. Written without branches, so nothing waits on the device."""
    k = len(grads)
    originals = torch.stack([g.float() for g in grads])
    norms_sq = (originals * originals).sum(dim=1).clamp(min=1e-20)
    projected = []
    for i in range(k):
        if orders is None:
            others = [j for j in range(k) if j != i]
            order = [others[n] for n in torch.randperm(len(others)).tolist()]
        else:
            order = list(orders[i])
        g = originals[i].clone()
        for j in order:
            dot = torch.dot(g, originals[j])
            g = g - dot.clamp(max=0) / norms_sq[j] * originals[j]
        projected.append(g)
    return torch.stack(projected)


@register
class PCGrad(MultiTaskMethod):
    """Projecting Conflicting Gradients (Yu, Kumar, Gupta, Levine, Hausman & Finn 2020,
    NeurIPS, "Gradient Surgery for Multi-Task Learning").

    On the shared parameters, each task's gradient g_i is projected, against the other tasks
    in a random order, onto the normal plane of every g_j it conflicts with
    (g_i.g_j < 0: g_i <- g_i - (g_i.g_j)/||g_j||^2 g_j), and the projected gradients are
    summed (`reduction`). The task-specific parameters (heads, MMoE gates) get the ordinary
    gradient of sum_i L_i. The random orders come from torch's global CPU generator, which the
    checkpoint restores. Tasks without a labelled sample in the batch are left out of the
    surgery; the logged weight is the effective coefficient: 1 for a task in it (1/K with
    `reduction: mean`), 0 otherwise.

    It needs its own optimisation (`manual_optimization`): one gradient per task before the
    single optimizer step.
    """

    name = "pcgrad"
    Config = PCGradConfig
    synchronised = (
        "each task's gradient is averaged over ranks before the projections (the random order "
        "is the same on every rank), so the surgery is the global batch's, exactly one "
        "process's"
    )
    paper = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    manual_optimization = True

    def manual_step(
        self, batch: list[DomainBatch], step: int, opt: OptimizerStep
    ) -> dict[str, Tensor]:
        with opt.autocast:
            losses, counts = self.task_losses(batch)
        names = self.task_names
        active = self.labelled_tasks(counts)
        shared = self.shared_parameters()
        shared_ids = {id(p) for p in shared}
        others = [p for p in opt.params if p.requires_grad and id(p) not in shared_ids]
        coefficient = 1.0 / len(active) if self.config.reduction == "mean" and active else 1.0
        if active and shared:
            grads = self.task_gradients({t: losses[t] for t in active}, opt, shared)
            projected = project_conflicting([grads[t] for t in active])
            merged = projected.sum(dim=0) * coefficient
            assign_flat_gradient(shared, merged, scale=opt.scale_factor())
        total = sum((losses[t] for t in names), torch.zeros((), device=losses[names[0]].device))
        if others:  # the heads and gates: the plain gradient of sum_i L_i
            parts = torch.autograd.grad(opt.scale(total), others, allow_unused=True)
            for p, g in zip(others, parts, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        opt.step()
        weights = {t: (coefficient if t in active else 0.0) for t in names}
        return {"loss": total.detach(), **self.log_values(losses, weights)}
