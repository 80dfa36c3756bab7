"""DAN: align source and target features by multi-kernel maximum mean discrepancy."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_da import (
    DAN_KERNEL_MULTIPLIERS,
    forward_transfer,
    mk_mmd,
    source_classification,
)
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, log10_uniform


class DANConfig(MethodConfig):
    trade_off: float = Field(
        1.0, ge=0, description="weight of the MK-MMD penalty in the total loss (paper: 1)"
    )
    kernel_multipliers: list[float] = Field(
        list(DAN_KERNEL_MULTIPLIERS),
        min_length=1,
        description="Gaussian kernels: sigma^2 = m * the batch's mean squared distance, one "
        "kernel per m (paper/TLLib: 2^k, k = -3..1)",
    )


@register
class DAN(Method):
    """Deep Adaptation Network (Long et al., ICML 2015).

    Adds to the source cross-entropy the multi-kernel MMD between the source and target
    features of the batch: a sum of Gaussian kernels whose bandwidths span a range around
    the data's scale, estimated without bias over all pairs (the quadratic form of the
    paper's linear-time estimator). As in Transfer-Learning-Library, the kernels are summed
    with equal weights and the penalty is on the penultimate features only.
    """

    name = "dan"
    regimes = frozenset({"transfer"})
    Config = DANConfig
    search_space = {
        "trade_off": log10_uniform(
            -1, 1, name="mmd_gamma", source=f"{DOMAINBED}: MMD mmd_gamma, the MMD weight"
        ),
    }
    synchronised = (
        "the gradients, and the source and target features are gathered from every rank: the "
        "MK-MMD is the global batch's, exactly one process's"
    )
    paper = "Long et al., Learning Transferable Features with Deep Adaptation Networks, ICML 2015"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_transfer(self.model, batch)
        cls_loss, acc = source_classification(out)
        # torchrun: the kernel over the whole global batch (every rank's features)
        fs, ft = distributed.gather(out.features_s), distributed.gather(out.features_t)
        transfer_loss = mk_mmd(fs, ft, self.config.kernel_multipliers)
        loss = cls_loss + self.config.trade_off * transfer_loss
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "transfer_loss": transfer_loss.detach(),
            "acc": acc,
        }
