"""MMD for domain generalisation: match the feature distributions of the training domains."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import forward_domains, gaussian_mmd, mean, pairwise_penalty
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, log10_uniform


class MMDConfig(MethodConfig):
    penalty_weight: float = Field(
        1.0, ge=0, description="weight of the pairwise MMD penalty (DomainBed's mmd_gamma: 1)"
    )


@register
class MMD(Method):
    """MMD-AAE's feature alignment (Li, Pan, Wang & Kot, CVPR 2018) as DomainBed runs it.

    The weighted mean risk plus the mean over all pairs of training domains of the MMD^2
    between their features, with DomainBed's kernel: a sum of Gaussians with
    gamma in {1e-3, ..., 1e3} (no adversarial autoencoder, as in DomainBed).
    """

    name = "mmd"
    regimes = frozenset({"generalize"})
    Config = MMDConfig
    search_space = {
        "penalty_weight": log10_uniform(
            -1, 1, name="mmd_gamma", source=f"{DOMAINBED}: MMD mmd_gamma"
        ),
    }
    synchronised = (
        "the gradients, and each domain's features are gathered from every rank: the MMD "
        "penalty is the global batch's, exactly one process's"
    )
    paper = "Li et al., Domain Generalization with Adversarial Feature Learning, CVPR 2018"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_domains(self.model, batch)
        nll = mean(out.risks())
        # torchrun: the kernel over the whole global batch (every rank's features)
        features = [distributed.gather(f) for f in out.features]
        penalty = pairwise_penalty(features, gaussian_mmd)
        return {
            "loss": nll + self.config.penalty_weight * penalty,
            "nll": nll.detach(),
            "penalty": penalty.detach(),
            "acc": out.accuracy(),
        }
