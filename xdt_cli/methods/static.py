"""Static task weights: the brief's L(theta) = sum_i lambda_i L_i with the user's lambda_i."""

from __future__ import annotations

from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod
from xdt_cli.methods.base import DomainBatch, MethodConfig


@register
class Static(MultiTaskMethod):
    """A fixed, user-given weight per task: L = sum_i lambda_i L_i, lambda_i from
    `data.tasks.<task>.weight` (default 1).

    The linear scalarisation that every multitask method is measured against (see e.g.
    Caruana 1997, "Multitask Learning", Machine Learning 28; Xin et al. 2022, "Do Current
    Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS). It is the
    default weighting of `xdt multitask` and the only one that reads `weight`.
    """

    name = "static"
    Config = MethodConfig
    paper = "Caruana, Multitask Learning, Machine Learning 28, 1997"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        losses, _ = self.task_losses(batch)
        weights = {t.name: t.weight for t in self.tasks}
        return {"loss": self.weighted_sum(losses, weights), **self.log_values(losses, weights)}
