"""L2-SP: fine-tuning with weight decay toward the starting point instead of toward zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from xdt_cli.methods import register
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.models import Classifier
from xdt_cli.search import log10_uniform


class L2SPConfig(MethodConfig):
    alpha: float = Field(
        0.1,
        ge=0,
        description="weight of alpha/2 * ||w - w0||^2 over the weights that came from the "
        "source (authors' code: 0.1)",
    )
    beta: float = Field(
        0.01,
        ge=0,
        description="weight of beta/2 * ||w||^2 over a new head (authors' code: 0.01)",
    )
    weights_only: bool = Field(
        True,
        description="penalise only conv and linear kernels (tensors of 2 or more dimensions), "
        "as the authors' code does; false: every parameter, biases and batch-norm scales too",
    )


def head_from_source(model: Classifier) -> bool:
    """Whether the head was loaded from the source (same class count) or is new.

    `init` keeps the source head only when its shape fits the target's classes and
    records that as `model.head_from_source` (True unless the head was replaced).
    """
    return bool(model.head_from_source)


def _key(name: str) -> str:
    """A parameter name as a buffer name (buffer names may not contain dots)."""
    return name.replace(".", "__")


@register
class L2SP(Method):
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018): weight decay toward the source weights.

    Fine-tuning by cross-entropy on the labelled target, plus

        alpha/2 * sum ||w - w0||^2 over the parameters that came from the source
                  (the features, and the head when it was kept: same class count)
      + beta/2  * sum ||w||^2 over a new head,

    where w0 are the weights when the method is built, i.e. the source weights `init`
    loaded. They are snapshotted as persistent buffers, so a resumed run keeps the same
    reference. As in the authors' TensorFlow code (`weight_decay_mode 1`, which sums
    `tf.nn.l2_loss = ||.||^2 / 2` over the `weights` variables) only conv and linear kernels
    are penalised, unless `weights_only` is false. Parameters that do not train
    (requires_grad false: frozen by `model.freeze`/`preset`, or not yet released by
    `model.unfreeze`) are left out, so they add nothing and get no gradient. The defaults
    alpha = 0.1 and beta = 0.01 are those of the authors' script for ResNet-101
    (holyseven/TransferLearningClassification, run_classification/train.sh). Use it with
    optim.weight_decay = 0: plain weight decay would pull the same weights toward zero.
    """

    name = "l2sp"
    regimes = frozenset({"finetune"})
    Config = L2SPConfig
    search_space = {
        "alpha": log10_uniform(
            -3, 0, name="l2sp_alpha", source="xdt's own: around the paper's alpha = 0.1"
        ),
        "beta": log10_uniform(
            -4, -1, name="l2sp_beta", source="xdt's own: around the paper's beta = 0.01"
        ),
    }
    paper = (
        "Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning with "
        "Convolutional Networks, ICML 2018"
    )

    def __init__(self, model: Classifier, config: L2SPConfig, *, total_steps: int) -> None:
        super().__init__(model, config, total_steps=total_steps)
        self.starting_point = nn.Module()  # a plain container: its buffers are w0
        for name, p in model.named_parameters():
            self.starting_point.register_buffer(_key(name), p.detach().clone(), persistent=True)
        self.head_kept = head_from_source(model)

    # The head's origin is saved with the state: a resumed run does not pass through `init`,
    # so the model it rebuilds carries no mark of where its head came from.
    def get_extra_state(self) -> dict[str, bool]:
        return {"head_kept": self.head_kept}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.head_kept = bool(state["head_kept"])

    def penalties(self) -> tuple[Tensor, Tensor]:
        """(1/2 sum ||w - w0||^2 over source weights, 1/2 sum ||w||^2 over a new head), in
        float32, over the parameters that train now."""
        zero = self.model.head.weight.new_zeros((), dtype=torch.float32)
        to_start, to_zero = zero, zero
        for name, p in self.model.named_parameters():
            if not p.requires_grad or (self.config.weights_only and p.ndim < 2):
                continue
            if name.startswith("head.") and not self.head_kept:
                to_zero = to_zero + p.float().pow(2).sum()
            else:
                w0 = self.starting_point.get_buffer(_key(name))
                to_start = to_start + (p.float() - w0.float()).pow(2).sum()
        return 0.5 * to_start, 0.5 * to_zero

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        (target,) = batch
        logits = self.model(target.x)
        cls_loss = F.cross_entropy(logits, target.y)
        sp_loss, head_loss = self.penalties()
        loss = cls_loss + self.config.alpha * sp_loss + self.config.beta * head_loss
        acc = (logits.detach().argmax(1) == target.y).float().mean()
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "sp_loss": sp_loss.detach(),
            "head_loss": head_loss.detach(),
            "acc": acc,
        }
