"""Dynamic Weight Average: weights from the rate at which each task's loss falls (Liu et al.)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.methods import register
from xdt_cli.methods._shared_mtl import MultiTaskMethod, TaskSpec
from xdt_cli.methods.base import DomainBatch, MethodConfig
from xdt_cli.search import log10_uniform


class DWAConfig(MethodConfig):
    temperature: float = Field(
        2.0, gt=0, description="T of lambda_i = K softmax_i(w_i / T) (paper: 2)"
    )
    window: int = Field(
        50,
        ge=1,
        description="steps per averaging window, standing in for the paper's epoch: "
        "w_i is the ratio of task i's mean loss over the last two windows",
    )


def dwa_weights(previous: Tensor, before: Tensor, temperature: float) -> Tensor:
    """lambda = K softmax(w / T) with w_i = previous_i / before_i (the mean losses of the last
    two windows); w_i = 1 where task i has no loss before (before_i <= 0: never labelled)."""
    ratio = torch.where(before > 0, previous / before.clamp(min=1e-12), torch.ones_like(before))
    return len(ratio) * torch.softmax(ratio / temperature, dim=0)


@register
class DWA(MultiTaskMethod):
    """Dynamic Weight Average (Liu, Johns & Davison 2019, CVPR, "End-to-End Multi-Task Learning
    with Attention").

    lambda_i(t) = K exp(w_i(t-1)/T) / sum_k exp(w_k(t-1)/T), w_i(t-1) = Lbar_i(t-1) / Lbar_i(t-2)
    over K tasks with T = 2: a task whose loss falls slowly gets more weight, and the weights
    sum to K. The paper averages the losses over epochs; a step-based run averages them over
    windows of `window` steps (window k covers steps [k*window, (k+1)*window)), and every
    weight is 1 in the first two windows, as in the paper's first two epochs.

    Only labelled batches count towards a task's mean; a task with no labelled sample in a
    whole window keeps its previous mean (ratio 1). A task without a labelled sample in the
    batch gets weight 0 for that step and the others keep theirs. The running sums and the
    last two means live in buffers, so a resumed run continues the same windows.
    """

    name = "dwa"
    Config = DWAConfig
    search_space = {
        "temperature": log10_uniform(
            0, 1, name="dwa_temperature", source="xdt's own: 1 to 10 around the paper's T = 2"
        ),
    }
    synchronised = (
        "the gradients, and each task's loss is that of the whole global batch's labelled "
        "samples, so the window means and the weights agree on every rank"
    )
    paper = "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019"

    def setup_tasks(self, tasks: list[TaskSpec]) -> None:
        super().setup_tasks(tasks)
        k = len(self.tasks)
        # the current window's sum of task losses and its number of labelled steps
        self.register_buffer("window_sum", torch.zeros(k))
        self.register_buffer("window_count", torch.zeros(k, dtype=torch.long))
        # mean loss of the last window (t-1) and of the one before (t-2); 0: none yet
        self.register_buffer("mean_previous", torch.zeros(k))
        self.register_buffer("mean_before", torch.zeros(k))

    def training_step(self, batch: list[DomainBatch], step: int) -> dict[str, Tensor]:
        losses, counts = self.task_losses(batch)
        names = self.task_names
        labelled = torch.stack([counts[t] > 0 for t in names]).to(self.window_sum.device)
        window = self.config.window
        if step // window >= 2:
            lam = dwa_weights(self.mean_previous, self.mean_before, self.config.temperature)
        else:
            lam = torch.ones(len(names), device=self.window_sum.device)
        lam = torch.where(labelled, lam, torch.zeros_like(lam))
        weights = {t: lam[i] for i, t in enumerate(names)}
        # torchrun: the window means are those of the whole global batch (the mean over ranks
        # of the task losses, see losses_from), so every rank weighs the tasks alike
        count = torch.stack([counts[t] for t in names]).to(self.window_sum.device).float()
        values = torch.stack([losses[t].detach().float() for t in names])
        self._accumulate(distributed.average_(values), distributed.sum_(count) > 0)
        if (step + 1) % window == 0:
            self._close_window()
        return {"loss": self.weighted_sum(losses, weights), **self.log_values(losses, weights)}

    @torch.no_grad()
    def _accumulate(self, values: Tensor, labelled: Tensor) -> None:
        self.window_sum += torch.where(labelled, values, torch.zeros_like(values))
        self.window_count += labelled.long()

    @torch.no_grad()
    def _close_window(self) -> None:
        seen = self.window_count > 0
        mean = self.window_sum / self.window_count.clamp(min=1)
        self.mean_before.copy_(self.mean_previous)
        self.mean_previous.copy_(torch.where(seen, mean, self.mean_previous))
        self.window_sum.zero_()
        self.window_count.zero_()
