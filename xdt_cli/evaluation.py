"""Evaluation: score a method on every eval split and return flat, contract-named metrics.

Core floor, used by the engine (every eval row) and by `xdt evaluate` (evaluate_run.py).
Names are `<domain>/<split>/<metric>` (e.g. `mnist5k/test/acc`, `digits/val/loss`), or
`<task>/<split>/<metric>` for multitask. Every evaluation during training scores the val and
test splits of every domain, so that any selection rule can be recomputed later from
metrics.jsonl alone. A split gives its batches through `split.batches(batch_size, device)`:
in-memory tensors (uint8 made float per batch) or image files decoded by DataLoader workers,
both through the domain's eval transforms. `delta_m` compares a multitask run's summary
with single-task baselines.

Under torchrun every rank scores its share of each split (`distributed.shard()`) and the
sums (correct predictions, summed losses, counts) are all-reduced before dividing, so each
number is that of the whole split, on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.data import FileSplit, Split
from xdt_cli.data.tasks import EVAL_SPLITS
from xdt_cli.faults import fault_point
from xdt_cli.methods.base import Method


@torch.no_grad()
def evaluate_split(
    method: Method,
    split: Split | FileSplit,
    *,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager,
    task: str | None = None,
) -> dict[str, float]:
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, summed loss
    for x, y in split.batches(batch_size, device, distributed.shard()):
        with autocast:
            logits = method.predict(x, task)
        logits = logits.float()
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += F.cross_entropy(logits, y, reduction="sum").double()
    correct, loss_sum = distributed.sum_(sums).tolist()
    n = max(len(split), 1)
    return {"acc": correct / n, "loss": loss_sum / n}


def evaluate(
    method: Method,
    eval_sets: dict[str, dict[str, Split | FileSplit]],
    *,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager,
) -> dict[str, float]:
    """{domain: {split: Split}} -> {"<domain>/<split>/<metric>": value}."""
    was_training = method.training
    method.eval()
    metrics: dict[str, float] = {}
    try:
        for domain, splits in eval_sets.items():
            for split_name, split in splits.items():
                scores = evaluate_split(
                    method, split, batch_size=batch_size, device=device, autocast=autocast
                )
                for metric, value in scores.items():
                    metrics[f"{domain}/{split_name}/{metric}"] = value
                fault_point("evaluate")
    finally:
        method.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_tasks(
    method: Method,
    groups: list,
    specs: dict[str, str],
    *,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager,
    splits: Sequence[str] = EVAL_SPLITS,
) -> dict[str, float]:
    """Multitask: `<task>/<split>/<metric>` for the `splits` (val and test while training)
    of every task group (data/tasks.py): `acc` and `loss` for ce and bce tasks, `mse` and
    `mae` for mse tasks. Samples whose label is missing (-1 or NaN) are not counted.
    `specs`: task -> loss kind."""
    was_training = method.training
    method.eval()
    metrics: dict[str, float] = {}
    try:
        for group in groups:
            for split_name in splits:
                sums = {t: torch.zeros(3, dtype=torch.float64, device=device) for t in group.tasks}
                labels = {t: y.to(device) for t, y in group.labels[split_name].items()}
                split = group.domain.splits[split_name]
                for x, idx in split.batches(batch_size, device, distributed.shard()):
                    with autocast:
                        outputs = method.predict_tasks(x, group.tasks)
                    for task in group.tasks:
                        sums[task] += _task_sums(
                            specs[task], outputs[task].float(), labels[task][idx]
                        )
                for task in group.tasks:
                    count, first, second = distributed.sum_(sums[task]).tolist()
                    names = ("mse", "mae") if specs[task] == "mse" else ("acc", "loss")
                    n = max(count, 1.0)
                    metrics[f"{task}/{split_name}/{names[0]}"] = first / n
                    metrics[f"{task}/{split_name}/{names[1]}"] = second / n
                fault_point("evaluate")
    finally:
        method.train(was_training)
    return metrics


def _task_sums(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """[labelled count, sum of acc (or squared error), sum of loss (or absolute error)]."""
    if kind == "ce":
        mask = y >= 0
        out, y = out[mask], y[mask]
        first = (out.argmax(1) == y).sum().double()
        second = F.cross_entropy(out, y, reduction="sum").double()
    else:
        mask = ~torch.isnan(y)
        out, y = out[mask].squeeze(-1), y[mask]
        if kind == "bce":
            first = ((out > 0).float() == y).sum().double()
            second = F.binary_cross_entropy_with_logits(out, y, reduction="sum").double()
        else:
            first = ((out - y) ** 2).sum().double()
            second = (out - y).abs().sum().double()
    return torch.stack([mask.sum().double(), first, second])


def delta_m(summary: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `delta_m`: the multitask performance change against single-task
    baselines, per task and overall, in percent (positive is better).

    Delta_m (Maninis et al. 2019, "Attentive Single-Tasking of Multiple Tasks", CVPR; the
    standard measure of the multitask literature, e.g. Vandenhende et al. 2021, TPAMI):
    Delta_m = 100 / T * sum_t (-1)^{l_t} (M_t - S_t) / S_t, with M_t the multitask run's and
    S_t the baseline's test metric of task t (accuracy, or mse with l_t = 1: lower is
    better), each read at the checkpoint its own selection rule chose. `baselines`:
    {task: {"metric", "lower_is_better", "value", ...}} (baselines.run_baselines)."""
    best = summary.get("best") or {}
    per_task: dict[str, float | None] = {}
    for task, base in baselines.items():
        value, reference = best.get(base["metric"]), base["value"]
        if value is None or not reference:
            per_task[task] = None
            continue
        sign = -1.0 if base["lower_is_better"] else 1.0
        per_task[task] = round(100.0 * sign * (value - reference) / reference, 4)
    known = [v for v in per_task.values() if v is not None]
    overall = round(sum(known) / len(known), 4) if len(known) == len(per_task) else None
    return {"per_task": per_task, "overall": overall}
