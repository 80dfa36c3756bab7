"""Equal task weights: L = sum_i L_i."""

from __future__ import annotations

from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod
from xdt_cli.methods.base import DomainBatch, MethodConfig


@register
class Equal(MultiTaskMethod):
    """Every task weighs 1: L = sum_i L_i (LibMTL's EW, the usual multitask baseline;
    Caruana 1997, "Multitask Learning", Machine Learning 28).

    Unlike `static` it takes no weights from the config: `data.tasks.<task>.weight` is an
    error with it.
    """

    name = "equal"
    Config = MethodConfig
    paper = "Caruana, Multitask Learning, Machine Learning 28, 1997"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        losses, _ = self.task_losses(batch)
        weights = dict.fromkeys(self.task_names, 1.0)
        return {"loss": self.weighted_sum(losses, weights), **self.log_values(losses, weights)}
