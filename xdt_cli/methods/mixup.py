"""Inter-domain Mixup: train on convex combinations of samples of two domains."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import labels_of, random_pairs, weighted_cross_entropy
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import DOMAINBED, log10_uniform


class MixupConfig(MethodConfig):
    alpha: float = Field(
        0.2, gt=0, description="the mixing weight is drawn from Beta(alpha, alpha) (0.2)"
    )


@register
class Mixup(Method):
    """Inter-domain Mixup (Yan et al. 2020, "Improve Unsupervised Domain Adaptation with
    Mixup Training"; Xu et al. 2020; DomainBed's Mixup).

    Domains are paired in a random cycle; for each pair (i, j) one l ~ Beta(alpha, alpha)
    mixes the two batches, x = l x_i + (1 - l) x_j, and the loss is
    l R_i(x) + (1 - l) R_j(x) with each domain's labels and per-sample weights; the losses of
    the pairs are averaged. Each pair is its own forward pass, as in DomainBed.
    """

    name = "mixup"
    regimes = frozenset({"generalize"})
    Config = MixupConfig
    search_space = {
        "alpha": log10_uniform(-1, 1, name="mixup_alpha", source=f"{DOMAINBED}: Mixup mixup_alpha"),
    }
    synchronised = (
        "the gradients; the domain pairs and mixing weights are drawn with the same random "
        "numbers on every rank, so the mixed batch is one process's"
    )
    paper = "Yan et al., Improve Unsupervised Domain Adaptation with Mixup Training, 2020"

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        alpha = torch.tensor(self.config.alpha)
        beta = torch.distributions.Beta(alpha, alpha)
        losses = []
        for i, j in random_pairs(len(batch)):
            a, b = batch[i], batch[j]
            lam = float(beta.sample())  # the global RNG: checkpoints restore it
            logits = self.model(lam * a.x + (1 - lam) * b.x)
            losses.append(
                lam * weighted_cross_entropy(logits, labels_of(a), a.weight)
                + (1 - lam) * weighted_cross_entropy(logits, labels_of(b), b.weight)
            )
        loss = torch.stack(losses).mean()
        return {"loss": loss}
