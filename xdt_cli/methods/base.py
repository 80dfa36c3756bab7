"""The method contract: a learning rule that turns a training batch into a loss.

A method owns the math; the engine owns the loop (stepping, precision, evaluation, saving).
Most methods return a loss from `training_step` and the engine does backward and the
optimizer step. A method that needs its own optimisation (MLDG's meta-step: several
backward passes per step) sets `manual_optimization = True` and implements `manual_step`,
which receives an `OptimizerStep`: the engine's optimizer, grad scaler, autocast and
clipping, so that precision and `train.grad_clip` mean the same for every method.
To add one, copy `erm.py`: set `name`, the `regimes` (subcommands) it serves, its `Config`
(pydantic, with its paper's defaults), its `search_space` (search.py) and `training_step`,
then add the module to `methods/__init__.py`. `xdt methods` lists it and the parametrised
tests run it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from xdt_cli import distributed
from xdt_cli.data.stream import DomainBatch
from xdt_cli.models import Classifier
from xdt_cli.search import Param

__all__ = ["DomainBatch", "Method", "MethodConfig", "OptimizerStep", "Param"]


@dataclass
class OptimizerStep:
    """The engine's optimisation of one training step, handed to a manual method.

    `backward(loss)` back-propagates the (scaled) loss; `scale(loss)` gives the scaled loss
    for `torch.autograd.grad` (divide such gradients by `scale_factor()` before using them as
    values); `step()` unscales, clips (`train.grad_clip`), steps the optimizer, updates the
    scaler and zeroes the gradients. A manual step must call `step()` exactly once; the
    engine then steps the lr schedule and the weight average, as for any method.
    """

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager
    params: list[nn.Parameter]
    grad_clip: float | None = None
    # torchrun, manual methods: average the gradients over ranks before stepping (what
    # DistributedDataParallel does for the others); idempotent on already-averaged ones
    average_gradients: bool = False
    # train.on_nonfinite skip: a step whose gradients hold a NaN or an infinity changes no
    # weight; `skipped` says whether the last `step()` was such a step
    skip_nonfinite: bool = False
    skipped: bool = False

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def scale_factor(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.average_gradients:
            distributed.average_gradients(self.params)
        self.skipped = False
        if self.skip_nonfinite and not self.scaler.is_enabled():  # fp16's scaler skips its own
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped = True
                return
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class MethodConfig(BaseModel):
    """Base of every method's hyper-parameters: unknown keys, inf and nan are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Method(nn.Module):
    """A learning rule around a `Classifier`.

    It is an `nn.Module` so that any extra parameters it owns (a domain discriminator, task
    weights) are trained by the same optimizer and saved in the same checkpoint.
    """

    name: ClassVar[str]
    regimes: ClassVar[frozenset[str]]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    # Its hyper-parameter search space: a key of `Config` -> its distribution (search.py),
    # DomainBed's or its paper's where one exists; the shared keys (lr, batch size) are
    # search.shared_space's. `xdt methods NAME` prints both; a sweep's `search:` draws them.
    search_space: ClassVar[dict[str, Param]] = {}
    # True: the engine calls `manual_step` instead of `training_step` + backward + step
    manual_optimization: ClassVar[bool] = False
    # torchrun (distributed.py): what N ranks share beyond DDP's averaged gradients, in words;
    # `xdt methods NAME` prints it
    synchronised: ClassVar[str] = (
        "the gradients (DistributedDataParallel's mean over ranks); every loss term is a mean "
        "over samples, so N ranks give one process's gradient on the same global batch"
    )
    # torchrun: True when a training step may leave a trainable parameter without a gradient
    # (DistributedDataParallel must then search the graph for it, find_unused_parameters)
    unused_parameters: ClassVar[bool] = False
    # Images of the unlabelled target stream (transfer) per labelled image of a step: the
    # transfer regime's target batch is train.batch_size times this (FixMatch's mu)
    unlabelled_batch_ratio: int = 1

    def __init__(self, model: Classifier, config: MethodConfig, *, total_steps: int) -> None:
        super().__init__()
        self.model = model
        self.config = config
        # the run's train.steps: schedules such as DANN's adversarial weight ramp read it
        self.total_steps = total_steps

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        """Return {"loss": scalar tensor, ...}; every entry is logged as `train/<key>`.

        `batch` holds one DomainBatch per training stream, in the regime's order:
        train-source: [source]; finetune: [target (labelled)]; transfer: [source (labelled),
        target (y is None: no target label ever reaches a transfer method)].
        """
        raise NotImplementedError

    def forward(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        """`training_step`: under torchrun, DistributedDataParallel wraps the method and
        calls this, so that its gradient reduction sees the whole step."""
        return self.training_step(batch, step)

    def setup_domains(self, domains: list[str]) -> None:
        """Called by the regime with the training streams' domain names, in batch order,
        before the optimizer is built or a checkpoint is loaded: a method whose state has one
        entry per domain (GroupDRO's weights) creates it here."""

    def manual_step(
        self, batch: list[DomainBatch], step: int, opt: OptimizerStep
    ) -> dict[str, Tensor]:
        """With `manual_optimization`: compute the gradients (through `opt.backward` or
        `opt.scale` + autograd), call `opt.step()` once, and return the values to log
        ({"loss": detached scalar, ...}), as `training_step` does."""
        raise NotImplementedError(f"{self.name} does not set manual_optimization")

    @torch.no_grad()
    def predict(self, x: Tensor, task: str | None = None) -> Tensor:
        """Class logits for `x` (the model is in eval mode when this is called)."""
        return self.model(x)
