"""Pieces shared by the unsupervised domain-adaptation methods (the `transfer` regime).

The joint source+target forward pass, the source classification terms, gradient reversal and
its ramp (DANN, CDAN), the domain discriminator, and the statistics that compare two feature
samples: multi-kernel MMD (DAN), covariance (Deep CORAL) and prediction entropy (CDAN+E, MCC).
Statistics are computed in float32 whatever the autocast precision: kernel sums and
covariances of bf16 features lose too many digits, and under autocast `.float()` alone is
not enough (a matmul would cast its inputs back down), so they also switch autocast off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdt_cli.data.stream import DomainBatch
from xdt_cli.models import Classifier

# DAN's kernel family (Long et al. 2015, as in Transfer-Learning-Library): Gaussian kernels
# whose squared bandwidths are 2^k times the mean squared pairwise distance, k = -3..1.
DAN_KERNEL_MULTIPLIERS: tuple[float, ...] = tuple(2.0**k for k in range(-3, 2))


# --------------------------------------------------------------------------- forward pass
@dataclass
class TransferForward:
    """Features and logits of one joint step: the first `n_source` rows are the source."""

    features: Tensor
    logits: Tensor
    labels_s: Tensor
    n_source: int

    @property
    def features_s(self) -> Tensor:
        return self.features[: self.n_source]

    @property
    def features_t(self) -> Tensor:
        return self.features[self.n_source :]

    @property
    def logits_s(self) -> Tensor:
        return self.logits[: self.n_source]

    @property
    def logits_t(self) -> Tensor:
        return self.logits[self.n_source :]


def forward_transfer(model: Classifier, batch: list[DomainBatch]) -> TransferForward:
    """One pass of source and target together, so that batch norm normalises both domains
    with the same statistics (as in Transfer-Learning-Library). The target labels are never
    read: `batch[1].y` is not touched here or anywhere else in the transfer methods."""
    if len(batch) != 2:
        raise ValueError(f"a transfer method expects [source, target] batches, got {len(batch)}")
    source, target = batch
    if source.y is None:
        raise ValueError(f"the source batch of domain '{source.domain}' has no labels")
    features = model.embed(torch.cat([source.x, target.x]))
    return TransferForward(
        features=features,
        logits=model.head(features),
        labels_s=source.y,
        n_source=source.x.shape[0],
    )


def source_classification(out: TransferForward) -> tuple[Tensor, Tensor]:
    """Cross-entropy on the labelled source half, and the source accuracy (detached)."""
    loss = F.cross_entropy(out.logits_s, out.labels_s)
    acc = (out.logits_s.detach().argmax(1) == out.labels_s).float().mean()
    return loss, acc


# --------------------------------------------------------------------------- gradient reversal
class GradientReverse(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by `-coeff` (Ganin &
    Lempitsky 2015). Placed between the features and a domain discriminator, it lets one
    backward pass train the discriminator to tell the domains apart and the features to
    confuse it."""

    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad, None


def reverse_gradient(x: Tensor, coeff: float) -> Tensor:
    return GradientReverse.apply(x, coeff)


def adversarial_ramp(step: int, total_steps: int, gamma: float = 10.0) -> float:
    """DANN's schedule lambda_p = 2 / (1 + exp(-gamma p)) - 1, p = step / total_steps.

    It grows from 0 to almost 1 (0.99991 at p=1 for gamma=10), so that the noisy signal of an
    untrained discriminator does not disturb the features early in training (Ganin et al.
    2016, section 5.2.2).
    """
    p = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


# --------------------------------------------------------------------------- discriminator
class DomainDiscriminator(nn.Sequential):
    """The MLP that tells source from target: in_dim -> hidden -> hidden -> 1 logit.

    Two hidden layers of 1024 units as in Ganin et al. 2016 (x -> 1024 -> 1024 -> domain),
    with batch norm after each as in Transfer-Learning-Library's default. It outputs a logit
    (no sigmoid) so that the loss is `binary_cross_entropy_with_logits`, which is stable and
    autocast-safe.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).squeeze(1)


def domain_adversarial_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    weight_s: Tensor | None = None,
    weight_t: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Binary cross-entropy of the discriminator (source = 1, target = 0), each domain's
    mean counting half, and its accuracy (detached). Optional per-sample weights (CDAN+E)
    should average 1 within each domain."""
    logits_s, logits_t = logits_s.float(), logits_t.float()
    bce_s = F.binary_cross_entropy_with_logits(
        logits_s, torch.ones_like(logits_s), reduction="none"
    )
    bce_t = F.binary_cross_entropy_with_logits(
        logits_t, torch.zeros_like(logits_t), reduction="none"
    )
    if weight_s is not None:
        bce_s = bce_s * weight_s
    if weight_t is not None:
        bce_t = bce_t * weight_t
    loss = 0.5 * (bce_s.mean() + bce_t.mean())
    with torch.no_grad():
        correct = torch.cat([logits_s > 0, logits_t <= 0]).float()
    return loss, correct.mean()


# --------------------------------------------------------------------------- statistics
def full_precision(x: Tensor) -> torch.autocast:
    """Autocast off on `x`'s device: the float32 inputs of a matmul stay float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def entropy(probs: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-sample Shannon entropy (nats) of rows of probabilities."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def gaussian_kernels(x: Tensor, multipliers: tuple[float, ...] | list[float]) -> Tensor:
    """Sum over k of exp(-||x_i - x_j||^2 / (2 sigma_k^2)), sigma_k^2 = m_k * mean distance^2.

    The bandwidths follow the data (the mean squared distance of the batch, detached so that
    the features cannot shrink the loss by rescaling the kernel), as in Transfer-Learning-
    Library's GaussianKernel; summing the kernels with equal weights replaces DAN's learned
    kernel weights, as TLLib does.
    """
    with full_precision(x):
        x = x.float()
        sq_dist = torch.cdist(x, x).pow(2)
        mean_sq = sq_dist.detach().mean().clamp_min(1e-12)
        return sum(torch.exp(-sq_dist / (2.0 * m * mean_sq)) for m in multipliers)


def mk_mmd(
    source: Tensor,
    target: Tensor,
    multipliers: tuple[float, ...] | list[float] = DAN_KERNEL_MULTIPLIERS,
) -> Tensor:
    """Unbiased multi-kernel MMD^2 between two equally sized samples.

    The quadratic-time version of DAN's estimator (Long et al. 2015, eq. 5; Gretton et al.
    2012, lemma 6): the mean over pairs i != j of
    h_ij = k(s_i, s_j) + k(t_i, t_j) - k(s_i, t_j) - k(s_j, t_i).
    Its expectation is MMD^2 (so it is ~0, and may be slightly negative, when both samples
    come from one distribution) and it is exactly 0 when the two batches are identical.
    """
    n = source.shape[0]
    if target.shape[0] != n:
        raise ValueError(f"MMD needs equal batch sizes, got {n} and {target.shape[0]}")
    if n < 2:
        raise ValueError("MMD needs at least two samples per domain")
    k = gaussian_kernels(torch.cat([source, target]), multipliers)
    k_ss, k_tt, k_st = k[:n, :n], k[n:, n:], k[:n, n:]
    h = k_ss + k_tt - k_st - k_st.T
    return (h.sum() - h.diagonal().sum()) / (n * (n - 1))


def covariance(x: Tensor) -> Tensor:
    """The unbiased d x d covariance of the rows of `x` (Sun & Saenko 2016, eq. 2-3)."""
    with full_precision(x):
        x = x.float()
        centred = x - x.mean(dim=0, keepdim=True)
        return centred.T @ centred / (x.shape[0] - 1)


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL: ||C_s - C_t||_F^2 / (4 d^2) (Sun & Saenko 2016, eq. 1)."""
    d = source.shape[1]
    return (covariance(source) - covariance(target)).pow(2).sum() / (4.0 * d * d)
