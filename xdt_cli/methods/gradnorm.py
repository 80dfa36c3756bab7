"""GradNorm: loss weights learnt so that the tasks' gradient norms train at similar rates."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod, TaskSpec
from xdt_cli.methods.base import DomainBatch, MethodConfig, OptimizerStep
from xdt_cli.search import uniform


class GradNormConfig(MethodConfig):
    alpha: float = Field(
        1.5,
        ge=0,
        description="asymmetry alpha of the target mean(G) r_i^alpha (paper: 1.5 for NYUv2, "
        "0.12 for the synthetic task; 0 equalises the gradient norms)",
    )
    layer: Literal["last", "all"] = Field(
        "last",
        description="W of G_i = ||grad_W w_i L_i||: 'last', the last shared weight matrix "
        "(the paper's choice), or 'all' shared parameters (LibMTL's)",
    )


def gradnorm_loss(weights: Tensor, norms: Tensor, ratios: Tensor, alpha: float) -> Tensor:
    """L_grad = sum_i |G_i - stopgrad(mean(G) r_i^alpha)| with G_i = w_i ||grad_W L_i||
    (`norms`, constants) and r_i = ratio_i / mean(ratio), ratio_i = L_i(t) / L_i(0)."""
    g = weights * norms
    r = ratios / ratios.mean()
    target = (g.mean() * r**alpha).detach()
    return (g - target).abs().sum()


@register
class GradNorm(MultiTaskMethod):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich 2018, ICML, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks").

    Each task has a learnable weight w_i (init 1). A step computes G_i = w_i ||grad_W L_i||,
    W the last shared layer's weight (`layer: last`; `all` uses every shared parameter, as
    LibMTL does; with `model.arch: mmoe` `last` is the last expert's last weight), the
    relative inverse training rate r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)), L_i(0) the
    task's first labelled loss (a buffer), and
    L_grad = sum_i |G_i - stopgrad(mean(G) r_i^alpha)|. The model is trained on
    sum_i stopgrad(w_i) L_i, the weights on L_grad only (through the same optimizer and
    learning rate), and after the step the weights are renormalised to sum to the number of
    tasks K. Tasks without a labelled sample in the batch are left out of G, r and the loss
    for that step (weight 0 logged); their w_i is unchanged but for the renormalisation.

    It needs its own optimisation (`manual_optimization`): a gradient per task on W before
    the single optimizer step.
    """

    name = "gradnorm"
    Config = GradNormConfig
    search_space = {
        "alpha": uniform(
            0, 3, name="gradnorm_alpha", source="xdt's own: 0 to 3 around the paper's 1.5"
        ),
    }
    synchronised = (
        "each task's gradient on the last shared layer is averaged over ranks before its "
        "norm, and the loss ratios are the global batch's: the weights agree on every rank"
    )
    paper = (
        "Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
        "Multitask Networks, ICML 2018"
    )
    manual_optimization = True

    def setup_tasks(self, tasks: list[TaskSpec]) -> None:
        super().setup_tasks(tasks)
        k = len(self.tasks)
        self.loss_weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_loss", torch.zeros(k))
        self.register_buffer("initial_set", torch.zeros(k, dtype=torch.bool))

    def norm_parameters(self) -> list[nn.Parameter]:
        shared = self.shared_parameters()
        if self.config.layer == "last":
            matrices = [p for p in shared if p.dim() >= 2]
            if matrices:
                return [matrices[-1]]
        return shared

    def manual_step(
        self, batch: list[DomainBatch], step: int, opt: OptimizerStep
    ) -> dict[str, Tensor]:
        with opt.autocast:
            losses, counts = self.task_losses(batch)
        names = self.task_names
        labelled = set(self.labelled_tasks(counts))
        active = [i for i, t in enumerate(names) if t in labelled]
        # torchrun: the whole global batch's task losses (see losses_from)
        values = distributed.average_(torch.stack([losses[t].detach().float() for t in names]))
        w = self.loss_weights
        with torch.no_grad():  # L_i(0): each task's first labelled loss
            for i in active:
                if not self.initial_set[i]:
                    self.initial_loss[i] = values[i]
                    self.initial_set[i] = True
        coefficients = torch.zeros_like(w.detach())
        if active:
            index = torch.tensor(active, device=w.device)
            coefficients[index] = w.detach()[index]
            layer = self.norm_parameters()
            if len(active) > 1 and layer:
                norms = self._gradient_norms([losses[names[i]] for i in active], layer, opt)
                ratios = values[index] / self.initial_loss[index].clamp(min=1e-12)
                l_grad = gradnorm_loss(w[index], norms, ratios, self.config.alpha)
                opt.backward(l_grad)  # reaches w only: the norms are constants
        weights = {t: coefficients[i] for i, t in enumerate(names)}
        total = self.weighted_sum(losses, weights)
        opt.backward(total)
        opt.step()
        with torch.no_grad():
            w.mul_(len(names) / w.sum())
        return {"loss": total.detach(), **self.log_values(losses, weights)}

    @staticmethod
    def _gradient_norms(
        losses: list[Tensor], layer: list[nn.Parameter], opt: OptimizerStep
    ) -> Tensor:
        """||grad_W L_i|| per loss, unscaled from the grad scaler (no graph: constants)."""
        scale = opt.scale_factor()
        norms = []
        for loss in losses:
            parts = torch.autograd.grad(
                opt.scale(loss), layer, retain_graph=True, allow_unused=True
            )
            flat = [g.float().flatten() for g in parts if g is not None]
            flat = torch.cat(flat) if flat else loss.new_zeros(1, dtype=torch.float)
            distributed.average_(flat)  # torchrun: the norm of the global batch's gradient
            norms.append(flat.pow(2).sum().sqrt() / scale)
        return torch.stack(norms)
