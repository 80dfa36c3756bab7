"""Deep CORAL: match the second-order statistics of source and target features."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_da import coral_loss, forward_transfer, source_classification
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, log10_uniform


class DeepCORALConfig(MethodConfig):
    trade_off: float = Field(
        1.0,
        ge=0,
        description="weight of the CORAL loss in the total loss (paper: chosen so that the "
        "two losses are of similar size at the end of training; 1 here)",
    )


@register
class DeepCORAL(Method):
    """Deep CORAL (Sun & Saenko, ECCV 2016 workshops).

    Adds to the source cross-entropy the distance between the covariance matrices of the
    source and target features, ||C_s - C_t||_F^2 / (4 d^2): a differentiable
    alignment of second-order statistics that adds no parameters.
    """

    name = "deep_coral"
    regimes = frozenset({"transfer"})
    Config = DeepCORALConfig
    search_space = {
        "trade_off": log10_uniform(
            -1, 1, name="mmd_gamma", source=f"{DOMAINBED}: CORAL mmd_gamma, the CORAL weight"
        ),
    }
    synchronised = (
        "the gradients, and the source and target features are gathered from every rank: the "
        "CORAL loss is the global batch's, exactly one process's"
    )
    paper = (
        "Sun & Saenko, Deep CORAL: Correlation Alignment for Deep Domain Adaptation, "
        "ECCV 2016 Workshops"
    )

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_transfer(self.model, batch)
        cls_loss, acc = source_classification(out)
        # torchrun: the covariances of the whole global batch (every rank's features)
        fs, ft = distributed.gather(out.features_s), distributed.gather(out.features_t)
        transfer_loss = coral_loss(fs, ft)
        loss = cls_loss + self.config.trade_off * transfer_loss
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "transfer_loss": transfer_loss.detach(),
            "acc": acc,
        }
