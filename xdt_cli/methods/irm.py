"""IRM: invariant risk minimisation through the IRMv1 gradient penalty."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import (
    forward_domains,
    mean,
    penalty_schedule,
    weighted_cross_entropy,
)
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, int_log10_uniform, log10_uniform


class IRMConfig(MethodConfig):
    penalty_weight: float = Field(
        100.0, ge=0, description="lambda of the penalty after the anneal steps (DomainBed: 1e2)"
    )
    anneal_steps: int = Field(
        500,
        ge=0,
        strict=True,
        description="steps with penalty weight 1 before lambda applies (DomainBed: 500)",
    )


def irm_penalty(logits: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """IRMv1's penalty ||grad_{w|w=1} R(w * logits)||^2 for one domain, estimated without bias
    as the product of the gradients on the two halves of the batch (Arjovsky et al. 2019,
    section 3.2 and appendix D; DomainBed's `_irm_penalty`).

    It is 0 when the scale w = 1 is already optimal for this domain (the classifier on top of
    the features cannot be improved by rescaling), and grows with the mismatch.
    """
    if len(y) < 2:
        raise ValueError("the IRM penalty needs at least two samples per domain")
    scale = torch.ones((), device=logits.device, requires_grad=True)
    scaled = logits.float() * scale
    halves = []
    for part in (slice(0, None, 2), slice(1, None, 2)):
        w = None if weight is None else weight[part]
        risk = weighted_cross_entropy(scaled[part], y[part], w)
        grad = torch.autograd.grad(risk, [scale], create_graph=True)[0]
        halves.append(distributed.mean(grad))  # torchrun: the global half-batch's gradient
    return (halves[0] * halves[1]).sum()


@register
class IRM(Method):
    """Invariant Risk Minimization (Arjovsky, Bottou, Gulrajani & Lopez-Paz, 2019).

    Seeks features on which one classifier is optimal in every training domain: the
    weighted mean risk plus lambda times the IRMv1 penalty of each domain (averaged over
    domains). lambda is 1 for the first `anneal_steps` steps, then `penalty_weight`; from
    then on the loss is divided by lambda to keep gradients in range, as in the authors'
    code (DomainBed instead resets Adam at that step).
    """

    name = "irm"
    regimes = frozenset({"generalize"})
    Config = IRMConfig
    search_space = {
        "penalty_weight": log10_uniform(
            -1, 5, name="irm_lambda", source=f"{DOMAINBED}: IRM irm_lambda"
        ),
        "anneal_steps": int_log10_uniform(
            0,
            4,
            name="irm_penalty_anneal_iters",
            source=f"{DOMAINBED}: IRM irm_penalty_anneal_iters",
        ),
    }
    synchronised = (
        "the gradients, and each half-batch's gradient with respect to the scale is averaged "
        "over ranks: the IRMv1 penalty is the global batch's"
    )
    paper = "Arjovsky et al., Invariant Risk Minimization, arXiv:1907.02893, 2019"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_domains(self.model, batch)
        nll = mean(out.risks())
        penalty = mean(
            [
                irm_penalty(z, b.y, b.weight)
                for z, b in zip(out.logits, out.batches, strict=True)
                if b.y is not None
            ]
        )
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
