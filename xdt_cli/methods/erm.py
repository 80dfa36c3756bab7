"""Empirical risk minimisation: cross-entropy on every labelled domain in the batch,
weighted per sample where the regime gives weights (generalize)."""

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
    point of every paradigm: source training, fine-tuning and DomainBed's ERM baseline
    (Gulrajani & Lopez-Paz 2021: one equal batch per training domain, one pass, so the loss
    is the mean of the domains' mean losses). Where generalize's batches carry per-sample
    weights lambda_d * s_{d,i}, the loss is mean_i(weight_i CE_i) over the step's samples:
    (1/D) sum_d lambda_d R_d (regimes.py).
    """

    name = "erm"
    regimes = frozenset({"train-source", "finetune", "generalize"})
    Config = ERMConfig
    paper = "Vapnik, Statistical Learning Theory, 1998"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        labelled = [b for b in batch if b.y is not None]
        x = torch.cat([b.x for b in labelled]) if len(labelled) > 1 else labelled[0].x
        y = torch.cat([b.y for b in labelled]) if len(labelled) > 1 else labelled[0].y
        logits = self.model(x)
        smoothing = self.config.label_smoothing
        if all(b.weight is None for b in labelled):
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        else:
            weight = torch.cat(
                [
                    b.weight if b.weight is not None else torch.ones_like(b.y, dtype=torch.float32)
                    for b in labelled
                ]
            )
            per_sample = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
            loss = (per_sample * weight).mean()
        acc = (logits.detach().argmax(1) == y).float().mean()
        return {"loss": loss, "acc": acc}
