"""GroupDRO: minimise the worst training domain's risk through learned domain weights."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import forward_domains
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, log10_uniform


class GroupDROConfig(MethodConfig):
    eta: float = Field(
        0.01, gt=0, description="step size of the domain weights' exponentiated ascent (1e-2)"
    )


@register
class GroupDRO(Method):
    """Group distributionally robust optimisation (Sagawa et al., ICLR 2020, algorithm 1).

    Keeps a weight q_d per training domain, updated each step by exponentiated gradient
    ascent on the risks, q_d <- q_d exp(eta R_d) / normaliser, and minimises sum_d q_d R_d:
    the learned weights move toward the worst domain. R_d are the weighted per-domain risks,
    so the per-domain and per-sample weights of the config apply inside each domain. q is a
    buffer: checkpoints hold it, and a resumed run continues with the same weights.
    """

    name = "groupdro"
    regimes = frozenset({"generalize"})
    Config = GroupDROConfig
    search_space = {
        "eta": log10_uniform(
            -3, -1, name="groupdro_eta", source=f"{DOMAINBED}: GroupDRO groupdro_eta"
        ),
    }
    synchronised = (
        "the gradients, and each domain's risk is averaged over ranks (with its gradient), so "
        "q is updated from the global batch and agrees on every rank"
    )
    paper = "Sagawa et al., Distributionally Robust Neural Networks for Group Shifts, ICLR 2020"

    q: Tensor

    def setup_domains(self, domains: list[str]) -> None:
        # DomainBed starts from ones; the first update normalises them.
        self.register_buffer("q", torch.ones(len(domains)))
        self.domains = list(domains)

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        if not hasattr(self, "q"):
            self.setup_domains([b.domain for b in batch])
        out = forward_domains(self.model, batch)
        # torchrun: each domain's risk over the whole global batch, so q agrees on all ranks
        risks = distributed.mean(torch.stack(out.risks()))
        with torch.no_grad():
            self.q.mul_(torch.exp(self.config.eta * risks.detach().to(self.q.dtype)))
            self.q.div_(self.q.sum())
        loss = (self.q * risks).sum()
        logged = {"loss": loss, "worst_risk": risks.detach().max(), "acc": out.accuracy()}
        for i, domain in enumerate(b.domain for b in batch):
            logged[f"q_{domain}"] = self.q[i].detach().clone()
        return logged
