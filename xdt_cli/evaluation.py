"""Evaluation: score a method on every eval split and return flat, contract-named metrics.

Names are `<domain>/<split>/<metric>` (e.g. `mnist5k/test/acc`, `digits/val/loss`). Every
evaluation scores the val and test splits of every domain, so that any selection rule can be
recomputed later from metrics.jsonl alone. A split gives its batches through
`split.batches(batch_size, device)`: in-memory tensors (uint8 made float per batch) or image
files decoded by DataLoader workers, both through the domain's eval transforms.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from xdt_cli.data import FileSplit, Split
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
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in split.batches(batch_size, device):
        with autocast:
            logits = method.predict(x, task)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    n = max(len(split), 1)
    return {"acc": correct.item() / n, "loss": loss_sum.item() / n}


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
    finally:
        method.train(was_training)
    return metrics
