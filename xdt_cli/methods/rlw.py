"""Random loss weighting: softmax of a standard normal draw each step (Lin et al. 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod
from xdt_cli.methods.base import DomainBatch, MethodConfig


class RLWConfig(MethodConfig):
    """RLW has no hyper-parameter: lambda = softmax(z), z ~ N(0, I) (the paper's default)."""


@register
class RLW(MultiTaskMethod):
    """Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang 2022, TMLR, "Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning").

    Each step draws z ~ N(0, I) (one entry per task) and weighs L = sum_i softmax(z)_i L_i,
    the paper's and LibMTL's default distribution. z comes from torch's global CPU generator,
    so the weights are the same on every device and a resumed run (whose checkpoint restores
    that generator) draws the same sequence. One z is drawn for all the tasks every step; a
    task without a labelled sample in the batch gets weight 0 and the others keep their
    drawn weights (as `static` leaves them).
    """

    name = "rlw"
    Config = RLWConfig
    synchronised = (
        "the gradients; the random weights are drawn with the same random numbers on every rank"
    )
    paper = (
        "Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
        "Multi-Task Learning, TMLR 2022"
    )

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        losses, counts = self.task_losses(batch)
        names = self.task_names
        device = counts[names[0]].device
        drawn = torch.softmax(torch.randn(len(names)), dim=0).to(device)
        labelled = torch.stack([counts[t] > 0 for t in names])
        lam = torch.where(labelled, drawn, torch.zeros_like(drawn))
        weights = {t: lam[i] for i, t in enumerate(names)}
        return {"loss": self.weighted_sum(losses, weights), **self.log_values(losses, weights)}
