"""BSS: fine-tuning that shrinks the smallest singular values of the batch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import log10_uniform


class BSSConfig(MethodConfig):
    eta: float = Field(
        0.001, ge=0, description="weight eta of the spectral penalty (paper and TLLib: 0.001)"
    )
    k: int = Field(
        1, ge=1, strict=True, description="how many of the smallest singular values (paper: 1)"
    )


def batch_spectral_shrinkage(features: Tensor, k: int) -> Tensor:
    """Sum of the k smallest squared singular values of the [batch, dim] feature matrix.

    The singular values are computed in float32 with autocast off: a bf16/fp16 SVD is
    neither supported everywhere nor accurate for the small values that matter here.
    """
    with torch.autocast(features.device.type, enabled=False):
        singular = torch.linalg.svdvals(features.float())  # descending, min(batch, dim) values
    return singular[-k:].pow(2).sum()


@register
class BSS(Method):
    """Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): fine-tuning without negative transfer.

    Cross-entropy on the labelled target plus eta times the sum of the k smallest squared
    singular values of the batch's feature matrix (the output of `model.features`, one row
    per sample). The paper finds that the spectral components with small singular values
    are those that carry source knowledge that does not transfer and that fine-tuning on few
    target labels cannot correct; shrinking them suppresses that negative transfer. Defaults
    eta = 0.001 and k = 1 are the paper's (also TLLib's bss.py). With a batch smaller than
    the feature size the penalised values are the smallest of the `batch` non-trivial ones.
    """

    name = "bss"
    regimes = frozenset({"finetune"})
    Config = BSSConfig
    search_space = {
        "eta": log10_uniform(
            -4, -2, name="bss_eta", source="xdt's own: a decade either side of the paper's 0.001"
        ),
    }
    synchronised = (
        "the gradients, and the features are gathered from every rank: the singular values "
        "are the global batch's, exactly one process's"
    )
    paper = (
        "Chen, Wang, Fu, Long & Wang, Catastrophic Forgetting Meets Negative Transfer: "
        "Batch Spectral Shrinkage for Safe Transfer Learning, NeurIPS 2019"
    )

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        (target,) = batch
        features = self.model.embed(target.x)
        logits = self.model.head(features)
        cls_loss = F.cross_entropy(logits, target.y)
        # torchrun: the singular values of the whole global batch's feature matrix
        bss_loss = batch_spectral_shrinkage(distributed.gather(features), self.config.k)
        loss = cls_loss + self.config.eta * bss_loss
        acc = (logits.detach().argmax(1) == target.y).float().mean()
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "bss_loss": bss_loss.detach(),
            "acc": acc,
        }
