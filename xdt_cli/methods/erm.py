"""Empirical risk minimisation: plain cross-entropy on every labelled domain in the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig


class ERMConfig(MethodConfig):
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Szegedy et al. 2016; 0 is plain cross-entropy"
    )


@register
class ERM(Method):
    """Empirical risk minimisation (Vapnik, 1998, *Statistical Learning Theory*).

    Averages the cross-entropy over all labelled samples of the step. It is the reference
    point of every paradigm: source training, fine-tuning and DomainBed's ERM baseline.
    """

    name = "erm"
    regimes = frozenset({"train-source", "finetune"})
    Config = ERMConfig
    paper = "Vapnik, Statistical Learning Theory, 1998"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        labelled = [b for b in batch if b.y is not None]
        x = torch.cat([b.x for b in labelled]) if len(labelled) > 1 else labelled[0].x
        y = torch.cat([b.y for b in labelled]) if len(labelled) > 1 else labelled[0].y
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        acc = (logits.detach().argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc}
