"""MCC: minimise the confusion between classes in the target predictions."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_da import (
    entropy,
    forward_transfer,
    full_precision,
    source_classification,
)
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import log10_uniform, uniform


class MCCConfig(MethodConfig):
    trade_off: float = Field(
        1.0, ge=0, description="weight of the class-confusion loss in the total loss (paper: 1)"
    )
    temperature: float = Field(
        2.5, gt=0, description="softmax temperature that rescales the target logits (paper: 2.5)"
    )


def class_confusion_loss(logits: Tensor, temperature: float) -> Tensor:
    """Jin et al. 2020, eqs. 1-6: the off-diagonal mass of the row-normalised, entropy-weighted
    class-correlation matrix of the predictions, divided by the number of classes."""
    batch_size, num_classes = logits.shape
    with full_precision(logits):
        probs = torch.softmax(logits.float() / temperature, dim=1)
        # Confident samples (low entropy) say more about the class confusion: weight them by
        # 1 + exp(-H), normalised to sum to the batch size; the weights are not trained.
        weight = 1.0 + torch.exp(-entropy(probs.detach()))
        weight = batch_size * weight / weight.sum()
        confusion = (probs * weight.unsqueeze(1)).T @ probs
        # category normalisation: rows sum to 1, so large classes do not dominate
        confusion = confusion / confusion.sum(dim=1, keepdim=True)
        return (confusion.sum() - confusion.trace()) / num_classes


@register
class MCC(Method):
    """Minimum Class Confusion (Jin et al., ECCV 2020).

    Adds to the source cross-entropy a loss on the unlabelled target predictions: the
    correlation between classes across the batch (how often one sample is predicted as two
    classes at once), after temperature rescaling, entropy-based sample weighting and
    category normalisation. It needs no discriminator and no target labels.
    """

    name = "mcc"
    regimes = frozenset({"transfer"})
    Config = MCCConfig
    search_space = {
        "trade_off": log10_uniform(
            -1, 1, name="mcc_trade_off", source="xdt's own: a decade either side of the paper's 1"
        ),
        "temperature": uniform(
            1.5, 3.5, name="mcc_temperature", source="xdt's own: one either side of the paper's 2.5"
        ),
    }
    synchronised = (
        "the gradients, and the target logits are gathered from every rank: the class "
        "confusion is the global batch's, exactly one process's"
    )
    paper = "Jin et al., Minimum Class Confusion for Versatile Domain Adaptation, ECCV 2020"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_transfer(self.model, batch)
        cls_loss, acc = source_classification(out)
        # torchrun: the class confusion of the whole global target batch
        logits_t = distributed.gather(out.logits_t)
        transfer_loss = class_confusion_loss(logits_t, self.config.temperature)
        loss = cls_loss + self.config.trade_off * transfer_loss
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "transfer_loss": transfer_loss.detach(),
            "acc": acc,
        }
