"""DANN: domain-adversarial training through a gradient reversal layer."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods._shared_da import (
    DomainDiscriminator,
    adversarial_ramp,
    domain_adversarial_loss,
    forward_transfer,
    reverse_gradient,
    source_classification,
)
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.models import Classifier
from xdt_cli.search import DOMAINBED, int_pow2_uniform, log10_uniform


class DANNConfig(MethodConfig):
    trade_off: float = Field(
        1.0, ge=0, description="weight of the domain loss in the total loss (paper: 1)"
    )
    gamma: float = Field(
        10.0,
        gt=0,
        description="steepness of the reversal ramp lambda_p = 2/(1+exp(-gamma p)) - 1, "
        "p = step/train.steps (paper: 10)",
    )
    hidden_dim: int = Field(
        1024, ge=1, description="width of the discriminator's two hidden layers (paper: 1024)"
    )


@register
class DANN(Method):
    """Domain-Adversarial Neural Network (Ganin et al., JMLR 2016).

    A discriminator learns to tell source features from target features while, through a
    gradient reversal layer, the feature extractor learns to make them indistinguishable;
    the head is trained on the labelled source only. The reversal coefficient ramps from 0
    to 1 over training (lambda_p), the domain loss weight is fixed (`trade_off`).
    """

    name = "dann"
    regimes = frozenset({"transfer"})
    Config = DANNConfig
    search_space = {
        "trade_off": log10_uniform(-2, 2, name="lambda", source=f"{DOMAINBED}: DANN lambda"),
        "hidden_dim": int_pow2_uniform(
            6, 10, name="mlp_width", source=f"{DOMAINBED}: DANN mlp_width (the discriminator)"
        ),
    }
    synchronised = (
        "the gradients; the discriminator's batch-norm layers normalise each rank's share "
        "(DDP's default), so N ranks are close to, not exactly, one process"
    )
    paper = "Ganin et al., Domain-Adversarial Training of Neural Networks, JMLR 17(59), 2016"

    def __init__(self, model: Classifier, config: DANNConfig, *, total_steps: int = 1) -> None:
        super().__init__(model, config, total_steps=total_steps)
        self.discriminator = DomainDiscriminator(model.feature_dim, config.hidden_dim)

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        out = forward_transfer(self.model, batch)
        cls_loss, acc = source_classification(out)
        coeff = adversarial_ramp(step, self.total_steps, self.config.gamma)
        domain_logits = self.discriminator(reverse_gradient(out.features, coeff))
        n = out.n_source
        transfer_loss, domain_acc = domain_adversarial_loss(domain_logits[:n], domain_logits[n:])
        loss = cls_loss + self.config.trade_off * transfer_loss
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "transfer_loss": transfer_loss.detach(),
            "domain_acc": domain_acc,
            "acc": acc,
            "grl_lambda": loss.new_tensor(coeff).detach(),
        }
