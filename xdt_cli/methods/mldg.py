"""MLDG: meta-learning for domain generalisation (a meta-train / meta-test split per step)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor
from torch.func import functional_call

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_dg import labels_of, random_pairs, weighted_cross_entropy
from xdt_cli.methods.base import DomainBatch, Method, MethodConfig, OptimizerStep
from xdt_cli.search import DOMAINBED, log10_uniform


class MLDGConfig(MethodConfig):
    beta: float = Field(
        1.0, ge=0, description="weight of the meta-test loss (Li et al. and DomainBed: 1)"
    )
    inner_lr: float | None = Field(
        None,
        gt=0,
        description="learning rate of the virtual step (the inner optimizer's lr); "
        "default: the run's current learning rate of each parameter group, as DomainBed",
    )


def inner_hyperparameters(group: dict) -> dict:
    """An optimizer param group's hyper-parameters (lr, weight decay, betas or momentum...),
    without its parameters and the schedule's bookkeeping."""
    return {k: v for k, v in group.items() if k not in ("params", "initial_lr")}


@register
class MLDG(Method):
    """Meta-Learning Domain Generalization (Li, Yang, Song & Hospedales, AAAI 2018).

    Each step simulates a domain shift, as DomainBed's MLDG does: the D domains are paired
    in a random cycle (`random_pairs_of_minibatches`); for each pair (i, j) the gradient
    G_i = grad R_i(theta) is taken, a virtual step theta' = InnerOpt(theta, G_i) is made by a
    fresh optimizer of the run's own kind and hyper-parameters (`optim.name`, the lr of the
    current step in each parameter group, weight decay, momentum or betas; e.g. Adam, so the
    first-step update is about lr * sign(G_i)), and domain j is scored at theta'. The
    gradient of the step is first-order MLDG:

        g = sum over pairs (G_i + beta * grad R_j(theta')) / D,

    then the run's optimizer takes one step with g. R are the weighted risks of the
    generalize regime. Differences from DomainBed, stated plainly: the virtual step works on
    a copy of the trainable parameters only (a frozen or not yet released parameter keeps its
    value, as it would in a deep copy that it does not train), `inner_lr` can override the
    inner learning rate, and the meta-train forward runs through the real model, so its
    batch-norm statistics are updated once per domain and step, as in ERM (DomainBed's real
    network never runs forward in MLDG; its MNIST net has no batch norm); the meta-test
    forward uses a throw-away copy of the statistics, like DomainBed's copied network.

    It needs its own optimisation (`manual_optimization`): several backward passes per step,
    one pair's graph at a time. The engine's `OptimizerStep` keeps the grad scaler, autocast
    and gradient clipping of the run (clipping applies to g, not to the virtual step).
    """

    name = "mldg"
    regimes = frozenset({"generalize"})
    Config = MLDGConfig
    search_space = {
        "beta": log10_uniform(-1, 1, name="mldg_beta", source=f"{DOMAINBED}: MLDG mldg_beta"),
    }
    synchronised = (
        "the gradients, including the inner step's: the virtual weights and the meta-test "
        "gradient are the global batch's on every rank, exactly one process's"
    )
    paper = "Li et al., Learning to Generalize: Meta-Learning for Domain Generalization, AAAI 2018"
    manual_optimization = True

    def virtual_step(
        self, optimizer: torch.optim.Optimizer, named: list[tuple[str, Tensor]], grads
    ) -> dict[str, Tensor]:
        """theta' after one step of a fresh optimizer like `optimizer` (same class, same
        group hyper-parameters) from theta with the gradients `grads` (unscaled)."""
        fast = {name: p.detach().clone() for name, p in named}
        fast_of = {id(p): fast[name] for name, p in named}
        for (name, _), g in zip(named, grads, strict=True):
            fast[name].grad = None if g is None else g.detach().to(fast[name].dtype)
        groups = []
        for group in optimizer.param_groups:
            members = [fast_of[id(p)] for p in group["params"] if id(p) in fast_of]
            if members:
                hyper = inner_hyperparameters(group)
                if self.config.inner_lr is not None:
                    hyper["lr"] = self.config.inner_lr
                groups.append({**hyper, "params": members})
        if groups:
            type(optimizer)(groups).step()
        return {name: value.detach().requires_grad_() for name, value in fast.items()}

    def manual_step(
        self, batch: list[DomainBatch], step: int, opt: OptimizerStep
    ) -> dict[str, Tensor]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        grads = [torch.zeros_like(p) for p in params]
        pairs = random_pairs(len(batch))
        domains = len(batch)  # DomainBed divides by the number of minibatches (= of pairs)
        train_risks, test_risks = [], []
        for i, j in pairs:
            a, b = batch[i], batch[j]
            with opt.autocast:
                risk_i = weighted_cross_entropy(self.model(a.x), labels_of(a), a.weight)
            grad_i = torch.autograd.grad(opt.scale(risk_i), params, allow_unused=True)
            # torchrun: the inner step takes the whole global batch's gradient, so the
            # virtual weights (and the meta-test gradient) are alike on every rank
            grad_i = [None if g is None else distributed.average_(g) for g in grad_i]
            unscale = 1.0 / opt.scale_factor()
            fast = self.virtual_step(
                opt.optimizer, named, [None if g is None else g * unscale for g in grad_i]
            )
            # a throw-away copy of the statistics: the meta-test pass leaves the model's alone
            state = {n: t.clone() for n, t in self.model.named_buffers()}
            state.update(fast)
            with opt.autocast:
                logits_j = functional_call(self.model, state, (b.x,))
                risk_j = weighted_cross_entropy(logits_j, labels_of(b), b.weight)
            grad_j = torch.autograd.grad(opt.scale(risk_j), list(fast.values()), allow_unused=True)
            for total, g_i, g_j in zip(grads, grad_i, grad_j, strict=True):
                if g_i is not None:
                    total.add_(g_i, alpha=1.0 / domains)
                if g_j is not None:
                    total.add_(g_j, alpha=self.config.beta / domains)
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
