"""V-REx: risk extrapolation through the variance of the domains' risks."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import forward_domains, penalty_schedule
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, int_log10_uniform, log10_uniform


class VRExConfig(MethodConfig):
    penalty_weight: float = Field(
        10.0, ge=0, description="beta of the variance after the anneal steps (DomainBed: 1e1)"
    )
    anneal_steps: int = Field(
        500,
        ge=0,
        strict=True,
        description="steps with penalty weight 1 before beta applies (DomainBed: 500)",
    )


def risk_variance(risks: Tensor) -> Tensor:
    """The (population) variance of the per-domain risks: V-REx's penalty."""
    return (risks - risks.mean()).pow(2).mean()


@register
class VREx(Method):
    """Variance Risk Extrapolation, V-REx (Krueger et al., ICML 2021).

    Penalises the variance of the weighted training risks across domains, so that the
    model does not trade one domain for another: loss = mean_d R_d + beta Var_d(R_d). beta
    is 1 for the first `anneal_steps` steps, then `penalty_weight`, and the loss is then
    divided by beta, as in the authors' code (built on IRM's).
    """

    name = "vrex"
    regimes = frozenset({"generalize"})
    Config = VRExConfig
    search_space = {
        "penalty_weight": log10_uniform(
            -1, 5, name="vrex_lambda", source=f"{DOMAINBED}: VREx vrex_lambda"
        ),
        "anneal_steps": int_log10_uniform(
            0,
            4,
            name="vrex_penalty_anneal_iters",
            source=f"{DOMAINBED}: VREx vrex_penalty_anneal_iters",
        ),
    }
    synchronised = (
        "the gradients, and each domain's risk is averaged over ranks (with its gradient): "
        "the risks' variance is the global batch's, exactly one process's"
    )
    paper = "Krueger et al., Out-of-Distribution Generalization via Risk Extrapolation, ICML 2021"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_domains(self.model, batch)
        # torchrun: each domain's risk over the whole global batch (its mean over ranks)
        risks = distributed.mean(torch.stack(out.risks()))
        nll, penalty = risks.mean(), risk_variance(risks)
        weight = penalty_schedule(step, self.config.penalty_weight, self.config.anneal_steps)
        loss = nll + weight * penalty
        if weight > 1.0:
            loss = loss / weight
        return {
            "loss": loss,
            "nll": nll.detach(),
            "penalty": penalty.detach(),
            "acc": out.accuracy(),
        }
