"""MGDA-UB: the min-norm convex combination of the task gradients (Sener & Koltun 2018)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod
from xdt_cli.methods.base import DomainBatch, MethodConfig, OptimizerStep
from xdt_cli.search import choice


class MGDAConfig(MethodConfig):
    normalization: Literal["none", "l2", "loss", "loss+"] = Field(
        "loss+",
        description="how each task gradient is scaled before the min-norm solve: g/||g|| (l2), "
        "g/L (loss), g/(L ||g||) (loss+, the authors' published config), or none (LibMTL)",
    )
    max_iter: int = Field(
        250, ge=1, description="Frank-Wolfe iterations for 3 or more tasks (paper's code: 250)"
    )
    tolerance: float = Field(
        1e-5, gt=0, description="stop when the weights move less than this in L1 (code: 1e-5)"
    )


def _segment(v1v1: float, v1v2: float, v2v2: float) -> float:
    """gamma minimising ||gamma x1 + (1 - gamma) x2||^2 over [0, 1] from the inner products."""
    denominator = v1v1 + v2v2 - 2 * v1v2
    if denominator <= 1e-20 * max(v1v1, v2v2, 1e-30):
        return 0.5  # x1 = x2: every point of the segment is the same
    return min(max((v2v2 - v1v2) / denominator, 0.0), 1.0)


def min_norm_weights(grads: Tensor, max_iter: int = 250, tolerance: float = 1e-5) -> Tensor:
    """alpha >= 0, sum alpha = 1, minimising ||sum_i alpha_i grads_i|| ([K, P] -> [K]).

    Exact for one or two rows (the closed form on the segment); otherwise the paper's
    Algorithm 2 (Frank-Wolfe with exact line search on the Gram matrix), started like its
    MinNormSolver from the best pair, so the result is never worse than any vertex or pair.
    Non-finite gradients (an fp16 overflow, whose step the grad scaler skips) give equal
    weights."""
    k = grads.shape[0]
    out = dict(device=grads.device, dtype=torch.float32)
    if k == 1:
        return torch.ones(1, **out)
    g = grads.double()
    gram = (g @ g.T).cpu()
    if not torch.isfinite(gram).all():
        return torch.full((k,), 1.0 / k, **out)
    m = gram.tolist()
    best, alpha = None, None
    for i in range(k):
        for j in range(i + 1, k):
            gamma = _segment(m[i][i], m[i][j], m[j][j])
            cost = (
                gamma**2 * m[i][i] + 2 * gamma * (1 - gamma) * m[i][j] + (1 - gamma) ** 2 * m[j][j]
            )
            if best is None or cost < best:
                best = cost
                alpha = torch.zeros(k, dtype=torch.float64)
                alpha[i], alpha[j] = gamma, 1 - gamma
    assert alpha is not None
    if k > 2:
        for _ in range(max_iter):
            m_alpha = gram @ alpha
            t = int(torch.argmin(m_alpha))
            v1v1 = float(alpha @ m_alpha)
            v1v2 = float(m_alpha[t])
            v2v2 = float(gram[t, t])
            gamma = _segment(v1v1, v1v2, v2v2)
            new = gamma * alpha
            new[t] += 1 - gamma
            change = float((new - alpha).abs().sum())
            alpha = new
            if change < tolerance:
                break
    return alpha.to(**out)


@register
class MGDA(MultiTaskMethod):
    """MGDA-UB (Sener & Koltun 2018, NeurIPS, "Multi-Task Learning as Multi-Objective
    Optimization").

    Each step finds the minimum-norm point of the convex hull of the task gradients, the
    Multiple Gradient Descent Algorithm's common descent direction, and trains on
    L = sum_i alpha_i L_i with those convex weights. The upper-bound variant (UB) takes the
    gradients with respect to the shared representation Z rather than the shared parameters:
    one backward pass through the heads per task. Tasks that read different inputs have zero
    gradient on each other's Z; each task's vector concatenates its gradients on every Z.
    Before the solve each gradient is scaled (`normalization`): the default `loss+`,
    g_i / (L_i ||g_i||), is the authors' published configuration (their repository's
    sample.json; their code applies alpha to the raw losses, as here); LibMTL's default is
    `none`. The solver is exact for two tasks and the paper's Frank-Wolfe beyond.

    The heads and the representations' gradients come from one backward pass of
    sum_i alpha_i L_i through the detached Z, then Z.backward(dL/dZ) carries it through the
    encoder: by the chain rule the same gradients as back-propagating sum_i alpha_i L_i
    through the whole graph, without running the heads twice. Tasks without a labelled
    sample in the batch are left out of the solve (alpha_i = 0, logged as the weight).
    """

    name = "mgda"
    Config = MGDAConfig
    search_space = {
        "normalization": choice(
            "none",
            "l2",
            "loss",
            "loss+",
            name="mgda_normalization",
            source="Sener & Koltun's code (min_norm_solvers.gradient_normalizers): its four",
        ),
    }
    synchronised = (
        "each task's gradient on the shared representations is gathered from every rank (side "
        "by side) before the min-norm solve, so alpha is the global batch's on every rank"
    )
    paper = "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    manual_optimization = True

    def manual_step(
        self, batch: list[DomainBatch], step: int, opt: OptimizerStep
    ) -> dict[str, Tensor]:
        with opt.autocast:
            encoded = self.encode_batches(batch)
            detached = [(x, rep.detach().requires_grad_(), ts) for x, rep, ts in encoded]
            losses, counts = self.losses_from(batch, detached)
        names = self.task_names
        active = self.labelled_tasks(counts)
        reps = [rep for _, rep, _ in detached]
        device = losses[names[0]].device
        alpha = torch.zeros(len(names), device=device)
        if active:
            grads = torch.stack([self._rep_gradient(losses[t], reps, opt) for t in active])
            # torchrun: the gradient on the whole global batch's representations is every
            # rank's, side by side (each a mean over 1/world of the samples), so the solve,
            # and alpha, are the one-process ones on every rank
            grads = distributed.gather(grads.T.contiguous()).T / distributed.world()
            grads = self._normalise(grads, [losses[t] for t in active])
            solved = min_norm_weights(grads, self.config.max_iter, self.config.tolerance)
            alpha[torch.tensor([names.index(t) for t in active], device=device)] = solved
        weights = {t: alpha[i] for i, t in enumerate(names)}
        total = self.weighted_sum(losses, weights)
        opt.backward(total)  # heads and gates; the (scaled) dL/dZ lands in each Z's .grad
        pairs = [(rep, d.grad) for (_, rep, _), d in zip(encoded, reps, strict=True)]
        pairs = [(rep, g) for rep, g in pairs if g is not None and rep.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g.to(r.dtype) for r, g in pairs])
        opt.step()
        return {"loss": total.detach(), **self.log_values(losses, weights)}

    @staticmethod
    def _rep_gradient(loss: Tensor, reps: list[Tensor], opt: OptimizerStep) -> Tensor:
        parts = torch.autograd.grad(opt.scale(loss), reps, retain_graph=True, allow_unused=True)
        scale = opt.scale_factor()
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(r)).flatten().float() / scale
                for g, r in zip(parts, reps, strict=True)
            ]
        )

    def _normalise(self, grads: Tensor, losses: list[Tensor]) -> Tensor:
        kind = self.config.normalization
        if kind == "none":
            return grads
        norms = grads.norm(dim=1)
        values = distributed.average_(torch.stack([v.detach().float() for v in losses]))
        scale = {"l2": norms, "loss": values, "loss+": values * norms}[kind]
        return grads / scale.clamp(min=1e-12).unsqueeze(1)
