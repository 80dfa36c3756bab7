"""Uncertainty weighting: one learnable homoscedastic log-variance per task (Kendall et al.)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod, TaskSpec
from xdt_cli.methods.base import DomainBatch, MethodConfig


class UncertaintyConfig(MethodConfig):
    init: float = Field(
        0.0,
        description="initial s_i = log sigma_i^2 of every task (0: sigma = 1, as the authors' "
        "example code; LibMTL uses -0.5)",
    )


@register
class Uncertainty(MultiTaskMethod):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla 2018, CVPR, "Multi-Task
    Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics").

    Each task has a learnable s_i = log sigma_i^2, trained with the model, and
    L = sum_i exp(-s_i)/2 L_i + s_i/2: the 1/(2 sigma^2) weight and log sigma regulariser of
    the paper's Gaussian likelihood, in the form LibMTL uses for every loss kind (the paper
    drops the 1/2 for classification). s_i starts at `init` = 0 (sigma_i = 1), as in Gal's
    published example (github.com/yaringal/multi-task-learning-example). The logged weight of a
    task is exp(-s_i)/2. A task without a labelled sample in the batch is left out of the sum,
    regulariser included (weight 0), so that its s_i does not drift on an empty loss.
    The s_i are parameters of the method: the optimizer trains them (with its weight decay,
    if any) and the checkpoint keeps them.
    """

    name = "uncertainty"
    Config = UncertaintyConfig
    paper = (
        "Kendall, Gal & Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses for "
        "Scene Geometry and Semantics, CVPR 2018"
    )

    def setup_tasks(self, tasks: list[TaskSpec]) -> None:
        super().setup_tasks(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(self.config.init)))

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        losses, counts = self.task_losses(batch)
        names = self.task_names
        labelled = torch.stack([counts[t] > 0 for t in names]).to(self.log_vars.device)
        s = self.log_vars.float()
        precision = torch.where(labelled, torch.exp(-s) / 2, torch.zeros_like(s))
        regulariser = torch.where(labelled, s / 2, torch.zeros_like(s)).sum()
        weights = {t: precision[i] for i, t in enumerate(names)}
        loss = self.weighted_sum(losses, weights) + regulariser
        return {"loss": loss, **self.log_values(losses, weights)}
