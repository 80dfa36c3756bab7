"""The method contract: a learning rule that turns a training batch into a loss.

A method owns the math; the engine owns the loop (stepping, precision, evaluation, saving).
To add one, copy `erm.py`: set `name`, the `regimes` (subcommands) it serves, its `Config`
(pydantic, with its paper's defaults) and `training_step`, then add the module to
`methods/__init__.py`. `xdt methods` lists it and the parametrised tests run it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from xdt_cli.data.stream import DomainBatch
from xdt_cli.models import Classifier

__all__ = ["DomainBatch", "Method", "MethodConfig"]


class MethodConfig(BaseModel):
    """Base of every method's hyper-parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Method(nn.Module):
    """A learning rule around a `Classifier`.

    It is an `nn.Module` so that any extra parameters it owns (a domain discriminator, task
    weights) are trained by the same optimizer and saved in the same checkpoint.
    """

    name: ClassVar[str]
    regimes: ClassVar[frozenset[str]]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""

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

    @torch.no_grad()
    def predict(self, x: Tensor, task: str | None = None) -> Tensor:
        """Class logits for `x` (the model is in eval mode when this is called)."""
        return self.model(x)
