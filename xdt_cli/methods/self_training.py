"""Self-training: confident pseudo-labels of weak target views teach the strong views (FixMatch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.augment import strong, weak
from xdt_cli.methods import register
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig
from xdt_cli.search import log10_uniform, uniform


class SelfTrainingConfig(MethodConfig):
    threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="confidence a weak-view prediction needs to become a pseudo-label "
        "(FixMatch tau: 0.95)",
    )
    unlabelled_weight: float = Field(
        1.0, ge=0, description="weight lambda_u of the pseudo-label loss (FixMatch: 1)"
    )
    mu: int = Field(
        7,
        ge=1,
        description="unlabelled (target) images per labelled (source) image in a step: the "
        "target batch is mu * train.batch_size (FixMatch mu: 7)",
    )
    distribution_alignment: bool = Field(
        False,
        description="ReMixMatch's distribution alignment (Berthelot et al. 2020), not part of "
        "FixMatch: scale the weak-view probabilities by source class prior / running mean "
        "target prediction; the shipped digits configs turn it on",
    )
    alignment_momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="EMA momentum of the two running class distributions (about the last 10 "
        "batches; ReMixMatch averages 128, too slow to stop a collapse across domains)",
    )
    flip: bool = Field(
        False,
        description="weak views also flip horizontally, as FixMatch does on natural images; "
        "off as FixMatch has it on SVHN (digits are not flip-invariant)",
    )


@register
class SelfTraining(Method):
    """FixMatch self-training (Sohn et al., NeurIPS 2020) on the unlabelled target.

    Each step: the source batch's weak view (a random shift) gives the supervised
    cross-entropy; the target batch's weak view is predicted, and a prediction whose top
    probability reaches `threshold` becomes a hard pseudo-label (never back-propagated
    through); the strong view of the same target images (random affine, brightness/contrast,
    cutout: `xdt_cli.augment.strong`, a RandAugment-like view) is trained toward that
    pseudo-label. The unlabelled loss is averaged over the whole target batch, so it fades in
    as the model grows confident:

        loss = CE(source weak)
             + lambda_u * mean_i 1[max p_i >= tau] * CE(target strong_i, argmax p_i)

    As in FixMatch the three views go through the model in one forward pass, so batch norm
    sees them together. The target labels are never read (they are None in a transfer run);
    "mask_rate" logs the fraction of target samples above the threshold. As in FixMatch the
    target batch holds `mu` (7) unlabelled images per labelled one: the method declares it
    (`unlabelled_batch_ratio`) and the transfer regime draws mu * train.batch_size target
    images a step, so a step costs about 1 + 2 mu source-batch forwards.

    The defaults are FixMatch's (tau 0.95, lambda_u 1, mu 7, hard pseudo-labels of the raw
    weak-view prediction). Differences, stated plainly: the weak view is a shift without a
    flip (FixMatch's own setting on SVHN; `flip: true` adds it), the strong view is the
    fixed-magnitude affine + brightness/contrast + cutout above rather than RandAugment's
    random choice of 2 of 14 operations, and the optimiser and schedule are the run's.

    FixMatch assumes the unlabelled data come from the labelled distribution. Across a
    domain shift its pseudo-labels can confirm their own bias: once the first confident
    target predictions are dominated by one class, the network (which can tell the domains
    apart) learns to give that class to every target image, and "mask_rate" jumps to 1.
    Plain FixMatch did exactly that on digits -> mnist5k with the cnn and mu 1 within about
    100 steps (target accuracy 0.10). `distribution_alignment: true` (off by default; the
    shipped digits configs turn it on) first aligns the weak-view probabilities as in
    ReMixMatch (Berthelot et al., ICLR 2020): p <- normalise(p * prior / running_mean(p)),
    with the source's running class frequencies as the prior; a class that the target
    predictions over-use is damped before it can become a pseudo-label. Both running
    distributions are buffers, so they are checkpointed.

    The augmentations assume images in [0, 1] (cutout writes 0, the digits' background), so
    put `normalize` in the model rather than in the train transforms of a self_training run.
    """

    name = "self_training"
    regimes = frozenset({"transfer"})
    Config = SelfTrainingConfig
    search_space = {
        "threshold": uniform(
            0.8, 0.99, name="fixmatch_threshold", source="xdt's own: around FixMatch's 0.95"
        ),
        "unlabelled_weight": log10_uniform(
            -1,
            1,
            name="fixmatch_lambda_u",
            source="xdt's own: a decade either side of FixMatch's lambda_u = 1",
        ),
    }
    synchronised = (
        "the gradients; distribution alignment's running class frequencies and mean "
        "prediction are the global batch's; the weak and strong augmentations draw the same "
        "random numbers on every rank (each rank's share of samples differs)"
    )
    paper = (
        "Sohn et al., FixMatch: Simplifying Semi-Supervised Learning with Consistency and "
        "Confidence, NeurIPS 2020"
    )

    def __init__(self, model, config, *, total_steps: int) -> None:
        super().__init__(model, config, total_steps=total_steps)
        classes = model.head.out_features
        self.register_buffer("source_prior", torch.full((classes,), 1.0 / classes))
        self.register_buffer("target_mean", torch.full((classes,), 1.0 / classes))
        self.unlabelled_batch_ratio = config.mu

    @torch.no_grad()
    def _align(self, probs: Tensor, labels: Tensor) -> Tensor:
        """ReMixMatch's distribution alignment; updates the running distributions."""
        m = self.config.alignment_momentum
        # torchrun: the whole global batch's class frequencies and mean prediction
        counts = distributed.sum_(torch.bincount(labels, minlength=probs.shape[1]).float())
        self.source_prior.mul_(m).add_(counts / counts.sum(), alpha=1 - m)
        self.target_mean.mul_(m).add_(distributed.average_(probs.mean(0)), alpha=1 - m)
        aligned = probs * self.source_prior / self.target_mean.clamp_min(1e-6)
        return aligned / aligned.sum(1, keepdim=True)

    @torch.no_grad()
    def pseudo_labels(self, logits_weak: Tensor, source_y: Tensor) -> tuple[Tensor, Tensor]:
        """(argmax p, 1[max p >= tau] as floats) of the weak-view probabilities p, aligned
        first when `distribution_alignment` is on (which updates the running distributions
        with `source_y` and p)."""
        probs = torch.softmax(logits_weak.float(), dim=1)
        if self.config.distribution_alignment:
            probs = self._align(probs, source_y)
        confidence, pseudo_label = probs.max(dim=1)
        return pseudo_label, (confidence >= self.config.threshold).float()

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        cfg = self.config
        source, target = batch  # target.y is never used
        x_source = weak(source.x, flip=cfg.flip)
        x_weak = weak(target.x, flip=cfg.flip)
        x_strong = strong(target.x)
        logits = self.model(torch.cat([x_source, x_weak, x_strong]))
        logits_source, logits_weak, logits_strong = logits.split(
            [len(x_source), len(x_weak), len(x_strong)]
        )

        cls_loss = F.cross_entropy(logits_source, source.y)
        pseudo_label, mask = self.pseudo_labels(logits_weak, source.y)
        per_sample = F.cross_entropy(logits_strong.float(), pseudo_label, reduction="none")
        unlabelled_loss = (per_sample * mask).mean()
        loss = cls_loss + cfg.unlabelled_weight * unlabelled_loss
        acc = (logits_source.detach().argmax(1) == source.y).float().mean()
        return {
            "loss": loss,
            "cls_loss": cls_loss.detach(),
            "unlabelled_loss": unlabelled_loss.detach(),
            "mask_rate": mask.mean(),
            "acc": acc,
        }
