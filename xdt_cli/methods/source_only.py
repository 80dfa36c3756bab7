"""Source only: the no-adaptation baseline of the transfer table."""

from __future__ import annotations

from torch import Tensor

from xdt_cli.methods import register
from xdt_cli.methods.base import DomainBatch
from xdt_cli.methods.erm import ERM


@register
class SourceOnly(ERM):
    """Source only: cross-entropy on the labelled source batch; the target batch is ignored.

    The lower bound every domain-adaptation method is measured against: the same model and
    schedule as the other transfer methods, trained without any use of the target data
    (the "source only" rows of Ganin & Lempitsky, ICML 2015, and of later tables). The target
    is still evaluated, so the table shows how far the source model transfers by itself.
    It is ERM restricted to the first (source) stream, with ERM's `label_smoothing`.
    """

    name = "source_only"
    regimes = frozenset({"transfer"})
    paper = (
        "Ganin & Lempitsky, Unsupervised Domain Adaptation by Backpropagation, ICML 2015 "
        "('source only' baseline)"
    )

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        # batch = [source, target]: only the source enters the loss
        return super().training_step(batch[:1], step)
