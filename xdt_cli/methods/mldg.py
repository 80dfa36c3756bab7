"""MLDG: meta-learning for domain generalisation (a meta-train / meta-test split per step)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor
from torch.func import functional_call

from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import labels_of, random_pairs, weighted_cross_entropy
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig, OptimizerStep


class MLDGConfig(MethodConfig):
    beta: float = Field(
        1.0, ge=0, description="weight of the meta-test loss (Li et al. and DomainBed: 1)"
    )
    inner_lr: float | None = Field(
        None,
        gt=0,
        description="alpha of the virtual step theta' = theta - alpha grad; "
        "default: the optimizer's current learning rate of each parameter",
    )


@register
class MLDG(Method):
    """Meta-Learning Domain Generalization (Li, Yang, Song & Hospedales, AAAI 2018).

    Each step simulates a domain shift: the domains are paired in a random cycle (DomainBed's
    `split_meta_train_test`); for each pair (i, j), a virtual step on domain i,
    theta' = theta - alpha grad R_i(theta), is scored on domain j, and the gradient of
    R_i(theta) + beta R_j(theta') is accumulated, averaged over the pairs, then one optimizer
    step is taken. The gradient through theta' uses DomainBed's first-order approximation
    (grad R_j at theta'), so a pair costs two forward and two backward passes and no
    second-order terms. R are the weighted risks of the generalize regime.

    It needs its own optimisation (`manual_optimization`): several backward passes per step,
    one pair's graph at a time. The engine's `OptimizerStep` keeps the grad scaler, autocast
    and gradient clipping of the run.
    """

    name = "mldg"
    regimes = frozenset({"generalize"})
    Config = MLDGConfig
    paper = "Li et al., Learning to Generalize: Meta-Learning for Domain Generalization, AAAI 2018"
    manual_optimization = True

    def manual_step(
        self, batch: list[DomainBatch], step: int, opt: OptimizerStep
    ) -> dict[str, Tensor]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        lr_of = {id(p): g["lr"] for g in opt.optimizer.param_groups for p in g["params"]}
        grads = [torch.zeros_like(p) for p in params]
        pairs = random_pairs(len(batch))
        train_risks, test_risks = [], []
        for i, j in pairs:
            a, b = batch[i], batch[j]
            with opt.autocast:
                risk_i = weighted_cross_entropy(self.model(a.x), labels_of(a), a.weight)
            grad_i = torch.autograd.grad(opt.scale(risk_i), params, allow_unused=True)
            unscale = 1.0 / opt.scale_factor()
            fast = {}
            for (name, p), g in zip(named, grad_i, strict=True):
                alpha = self.config.inner_lr or lr_of.get(id(p), 0.0)
                value = p.detach() if g is None else p.detach() - alpha * unscale * g
                fast[name] = value.requires_grad_()
            with opt.autocast:
                logits_j = functional_call(self.model, fast, (b.x,))
                risk_j = weighted_cross_entropy(logits_j, labels_of(b), b.weight)
            grad_j = torch.autograd.grad(opt.scale(risk_j), list(fast.values()), allow_unused=True)
            for total, g_i, g_j in zip(grads, grad_i, grad_j, strict=True):
                if g_i is not None:
                    total.add_(g_i, alpha=1.0 / len(pairs))
                if g_j is not None:
                    total.add_(g_j, alpha=self.config.beta / len(pairs))
            train_risks.append(risk_i.detach())
            test_risks.append(risk_j.detach())
        for p, g in zip(params, grads, strict=True):
            p.grad = g  # scaled like a backward pass through opt.scale: step() unscales
        opt.step()
        meta_train, meta_test = torch.stack(train_risks).mean(), torch.stack(test_risks).mean()
        return {
            "loss": meta_train + self.config.beta * meta_test,
            "meta_train_loss": meta_train,
            "meta_test_loss": meta_test,
        }
