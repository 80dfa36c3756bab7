"""CDAN: domain-adversarial training conditioned on the classifier's predictions."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_da import (
    DomainDiscriminator,
    adversarial_ramp,
    domain_adversarial_loss,
    entropy,
    forward_transfer,
    reverse_gradient,
    source_classification,
)
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.models import Classifier
from xdt_cli.search import DOMAINBED, int_pow2_uniform, log10_uniform


class CDANConfig(MethodConfig):
    trade_off: float = Field(
        1.0, ge=0, description="weight of the domain loss in the total loss (paper: 1)"
    )
    gamma: float = Field(
        10.0,
        gt=0,
        description="steepness of the reversal ramp lambda_p = 2/(1+exp(-gamma p)) - 1, "
        "p = step/train.steps (paper: 10, as in DANN)",
    )
    entropy: bool = Field(
        False,
        description="CDAN+E: weight each sample's domain loss by 1 + exp(-H(prediction)), "
        "so that confident predictions count more (paper: both variants)",
    )
    hidden_dim: int = Field(
        1024, ge=1, description="width of the discriminator's two hidden layers (paper: 1024)"
    )
    randomized_dim: int = Field(
        1024,
        ge=1,
        description="output size of the randomized multilinear map (paper: 1024)",
    )
    multilinear_limit: int = Field(
        4096,
        ge=0,
        description="use the exact map f (x) g while feature_dim * classes is at most this, "
        "the randomized one above it (paper: 4096)",
    )


@register
class CDAN(Method):
    """Conditional Domain Adversarial Network (Long et al., NeurIPS 2018).

    Like DANN, but the discriminator sees the multilinear map f (x) g of the features f and
    the (detached) softmax predictions g, so that it aligns the joint distribution of
    features and classes rather than the features alone. When the outer product is too
    large, it is replaced by the randomized map (R_f f) * (R_g g) / sqrt(d) with fixed
    Gaussian matrices. CDAN+E (`entropy: true`) weights samples by 1 + exp(-H(g)), each
    domain's weights normalised to mean 1 (as in the authors' code).
    """

    name = "cdan"
    regimes = frozenset({"transfer"})
    Config = CDANConfig
    search_space = {
        "trade_off": log10_uniform(
            -2, 2, name="lambda", source=f"{DOMAINBED}: DANN/CDANN lambda, the adversarial weight"
        ),
        "hidden_dim": int_pow2_uniform(
            6, 10, name="mlp_width", source=f"{DOMAINBED}: DANN/CDANN mlp_width (the discriminator)"
        ),
    }
    synchronised = (
        "the gradients; CDAN+E's entropy weights are normalised by the global batch's mean; "
        "the discriminator's batch-norm layers normalise each rank's share (DDP's default), "
        "so N ranks are close to, not exactly, one process"
    )
    paper = "Long et al., Conditional Adversarial Domain Adaptation, NeurIPS 2018"

    def __init__(self, model: Classifier, config: CDANConfig, *, total_steps: int = 1) -> None:
        super().__init__(model, config, total_steps=total_steps)
        feature_dim, num_classes = model.feature_dim, model.head.out_features
        self.randomized = feature_dim * num_classes > config.multilinear_limit
        if self.randomized:
            # Fixed random projections, drawn once from the (engine-seeded) global RNG and
            # kept as buffers: the checkpoint carries them, so a resumed run uses the same map.
            d = config.randomized_dim
            self.register_buffer("random_f", torch.randn(feature_dim, d))
            self.register_buffer("random_g", torch.randn(num_classes, d))
            in_dim = d
        else:
            in_dim = feature_dim * num_classes
        self.discriminator = DomainDiscriminator(in_dim, config.hidden_dim)

    def multilinear_map(self, f: Tensor, g: Tensor) -> Tensor:
        if self.randomized:
            return (f @ self.random_f) * (g @ self.random_g) / math.sqrt(self.random_f.shape[1])
        # row i is the flattened outer product g_i f_i^T
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_transfer(self.model, batch)
        cls_loss, acc = source_classification(out)
        # The predictions condition the discriminator but are not trained through it:
        # detached, as in the authors' code, so only the features receive the adversarial
        # gradient.
        probs = torch.softmax(out.logits.detach().float(), dim=1)
        h = self.multilinear_map(out.features, probs.to(out.features.dtype))
        coeff = adversarial_ramp(step, self.total_steps, self.config.gamma)
        domain_logits = self.discriminator(reverse_gradient(h, coeff))

        n = out.n_source
        weight_s = weight_t = None
        if self.config.entropy:
            weight = 1.0 + torch.exp(-entropy(probs))
            # torchrun: normalised by the whole global batch's mean weight of each domain
            weight_s = weight[:n] / distributed.average_(weight[:n].mean())
            weight_t = weight[n:] / distributed.average_(weight[n:].mean())
        transfer_loss, domain_acc = domain_adversarial_loss(
            domain_logits[:n], domain_logits[n:], weight_s, weight_t
        )
        loss = cls_loss + self.config.trade_off * transfer_loss
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "transfer_loss": transfer_loss.detach(),
            "domain_acc": domain_acc,
            "acc": acc,
            "grl_lambda": loss.new_tensor(coeff).detach(),
        }
