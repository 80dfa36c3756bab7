"""Pieces shared by the domain-generalisation methods (the `generalize` regime).

A generalize step holds one labelled, equally large `DomainBatch` per training domain, each
with optional per-sample weights lambda_d * s_{d,i} (see regimes.py; None by default).
Every method here builds on the per-domain risk R_d = mean_i(weight_i * loss_{d,i}) over
domain d's batch, the plain mean where the weights are None: ERM's objective is the mean of
R_d over domains (DomainBed's, by default), and IRM, V-REx, GroupDRO, CORAL, MMD, Mixup and
MLDG change what is added to or done with the R_d. As in DomainBed (Gulrajani & Lopez-Paz
2021), the domains go through the network in one pass (batch norm sees all of them), except
where a method needs separate passes.

Feature statistics reuse `_shared_da.py` (covariance, full-precision blocks); the MMD kernel
is DomainBed's fixed family of Gaussian bandwidths, not DAN's data-dependent one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xdt_cli.data.stream import DomainBatch
from xdt_cli.methods._shared_da import covariance, full_precision
from xdt_cli.models import Classifier

# DomainBed's MMD kernel: a sum of exp(-gamma ||x - y||^2) over these gammas
MMD_GAMMAS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class DomainsForward:
    """Features and logits of one joint pass, split back into the step's domains."""

    batches: list[DomainBatch]
    features: list[Tensor]
    logits: list[Tensor]

    def risks(self) -> list[Tensor]:
        """R_d: the weighted mean cross-entropy of each domain's batch."""
        return [
            weighted_cross_entropy(z, b.y, b.weight)
            for z, b in zip(self.logits, self.batches, strict=True)
        ]

    def accuracy(self) -> Tensor:
        with torch.no_grad():
            hits = [
                (z.argmax(1) == b.y).float() for z, b in zip(self.logits, self.batches, strict=True)
            ]
            return torch.cat(hits).mean()


def labels_of(batch: DomainBatch) -> Tensor:
    if batch.y is None:
        raise ValueError(f"the batch of domain '{batch.domain}' has no labels")
    return batch.y


def forward_domains(model: Classifier, batch: list[DomainBatch]) -> DomainsForward:
    """All domains through the model in one pass, split per domain."""
    for b in batch:
        labels_of(b)
    sizes = [len(b.x) for b in batch]
    features = model.embed(torch.cat([b.x for b in batch]))
    logits = model.head(features)
    return DomainsForward(
        batches=list(batch),
        features=list(torch.split(features, sizes)),
        logits=list(torch.split(logits, sizes)),
    )


def weighted_cross_entropy(logits: Tensor, y: Tensor | None, weight: Tensor | None) -> Tensor:
    """mean_i(weight_i * CE_i); the plain mean where `weight` is None."""
    assert y is not None
    per_sample = F.cross_entropy(logits.float(), y, reduction="none")
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).mean()


def mean(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()


def domain_pairs(count: int) -> list[tuple[int, int]]:
    """Every unordered pair i < j of the step's domains (DomainBed's CORAL and MMD)."""
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


def random_pairs(count: int) -> list[tuple[int, int]]:
    """DomainBed's `random_pairs_of_minibatches`: a random cycle over the domains, each
    domain paired with the next (itself when there is only one). Uses the global RNG, which
    checkpoints restore."""
    order = torch.randperm(count).tolist()
    return [(order[k], order[(k + 1) % count]) for k in range(count)]


def coral_distance(x: Tensor, y: Tensor) -> Tensor:
    """DomainBed's CORAL penalty between two feature samples: the mean squared difference of
    the means plus that of the (unbiased) covariances (Sun & Saenko 2016, with means)."""
    with full_precision(x):
        x, y = x.float(), y.float()
        mean_diff = (x.mean(0) - y.mean(0)).pow(2).mean()
        cov_diff = (covariance(x) - covariance(y)).pow(2).mean()
    return mean_diff + cov_diff


def gaussian_mmd(x: Tensor, y: Tensor, gammas: tuple[float, ...] = MMD_GAMMAS) -> Tensor:
    """DomainBed's (biased) MMD^2 with the kernel sum_g exp(-g ||a - b||^2):
    mean k(x, x') + mean k(y, y') - 2 mean k(x, y) (Gretton et al. 2012; Li et al. 2018)."""
    with full_precision(x):
        x, y = x.float(), y.float()

        def kernel(a: Tensor, b: Tensor) -> Tensor:
            sq = torch.cdist(a, b).pow(2)
            return sum(torch.exp(-g * sq) for g in gammas)

        return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def pairwise_penalty(features: list[Tensor], distance) -> Tensor:
    """The mean of `distance` over all pairs of domains (0 with a single domain)."""
    pairs = domain_pairs(len(features))
    if not pairs:
        return features[0].new_zeros(()).float()
    return torch.stack([distance(features[i], features[j]) for i, j in pairs]).mean()


def penalty_schedule(step: int, weight: float, anneal_steps: int) -> float:
    """IRM's and V-REx's schedule: weight 1 for the first `anneal_steps` steps, then the
    penalty weight (Arjovsky et al. 2019; Krueger et al. 2021; DomainBed)."""
    return weight if step >= anneal_steps else 1.0
