"""CORAL for domain generalisation: align feature means and covariances across domains."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import (
    coral_distance,
    forward_domains,
    mean,
    pairwise_penalty,
)
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, log10_uniform


class CORALConfig(MethodConfig):
    penalty_weight: float = Field(
        1.0, ge=0, description="weight of the pairwise CORAL penalty (DomainBed's mmd_gamma: 1)"
    )


@register
class CORAL(Method):
    """Deep CORAL (Sun & Saenko, ECCV-W 2016) for domain generalisation, as in DomainBed.

    The weighted mean risk plus the mean over all pairs of training domains of the squared
    differences of their feature means and covariances (DomainBed's `mean_cov` kernel):
    every pair of training domains is aligned, not a source with a target.
    """

    name = "coral"
    regimes = frozenset({"generalize"})
    Config = CORALConfig
    search_space = {
        "penalty_weight": log10_uniform(
            -1, 1, name="mmd_gamma", source=f"{DOMAINBED}: CORAL mmd_gamma"
        ),
    }
    synchronised = (
        "the gradients, and each domain's features are gathered from every rank: the CORAL "
        "penalty is the global batch's, exactly one process's"
    )
    paper = "Sun & Saenko, Deep CORAL: Correlation Alignment for Deep Domain Adaptation, 2016"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_domains(self.model, batch)
        nll = mean(out.risks())
        # torchrun: the covariances of the whole global batch (every rank's features)
        features = [distributed.gather(f) for f in out.features]
        penalty = pairwise_penalty(features, coral_distance)
        return {
            "loss": nll + self.config.penalty_weight * penalty,
            "nll": nll.detach(),
            "penalty": penalty.detach(),
            "acc": out.accuracy(),
        }
