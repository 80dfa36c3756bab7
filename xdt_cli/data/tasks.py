"""The data of `xdt multitask`: tasks grouped by their inputs, their labels, their streams.

Tasks whose data keys are equal (`TaskConfig.data_key`: same set, domain, classes,
transforms, ...) read the same inputs: one `TaskGroup`, one domain loaded once, one batch
per step that every task of the group labels in its own way (several labels on the same
inputs, e.g. multimnist5k's left and right digits). A task with data of its own is a group
of one (one data set per task, e.g. digits and mnist5k); each step draws a batch from every
group, so every task is in every step.

A group's splits are indexed by sample (`y` = 0..N-1), so the streams and eval batches of
`stream.py` / `disk.py` hand out sample indices, and `TaskStream` looks the task labels up:
`ce` labels as int64 with -1 where missing, `bce` and `mse` labels as float32 with NaN where
missing (see methods/_shared_mtl.py). Labels are derived per task:
- `class`: the set's class index; `parity`: 1 for an odd class (class names must be
  integers, as for the digit sets);
- a label the set declares (`DatasetSpec.labels`), e.g. multimnist5k's `left`, `right`, `sum`.
A set may store -1 as the class of a sample without a label; it stays missing in every
derived label. `missing_labels: f` hides a seeded fraction f of the task's training labels.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdt_cli.config import TASK_KEYS, DomainConfig, TaskConfig
from xdt_cli.data.disk import FileSplit
from xdt_cli.data.registry import Domain, Split, get_spec, load_configured_domain
from xdt_cli.data.stream import DomainBatch, make_stream
from xdt_cli.distributed import Shard
from xdt_cli.errors import ConfigError

GENERIC_LABELS = ("class", "parity")
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """One task as built: its loss, its head's width and its static lambda_i."""

    name: str
    loss: str  # ce, bce or mse
    outputs: int  # head width: classes for ce, 1 for bce and mse
    weight: float = 1.0  # lambda_i of the static weighting (data.tasks.<task>.weight)


@dataclass
class TaskGroup:
    """Tasks that read the same inputs: the domain (splits indexed by sample) and, per split,
    each task's labels."""

    name: str  # the group's inputs, e.g. "multimnist5k"
    domain: Domain
    tasks: list[str]
    labels: dict[str, dict[str, Tensor]]  # split -> task -> labels (sentinels where missing)


def load_task_groups(
    tasks: dict[str, TaskConfig], split_seed: int
) -> tuple[list[TaskGroup], list[TaskSpec]]:
    by_data: dict[str, list[str]] = {}
    for name, task in tasks.items():
        by_data.setdefault(task.data_key(), []).append(name)
    groups: list[TaskGroup] = []
    infos: dict[str, TaskSpec] = {}
    for names in by_data.values():
        first = tasks[names[0]]
        key = f"data.tasks.{names[0]}"
        section = DomainConfig.model_validate(first.model_dump(exclude=set(TASK_KEYS)))
        domain = load_configured_domain(section, split_seed=split_seed, key=key)
        labels: dict[str, dict[str, Tensor]] = {split: {} for split in domain.splits}
        for name in names:
            task = tasks[name]
            for split, part in domain.splits.items():
                labels[split][name] = derive_label(domain, task, part.y, f"data.tasks.{name}")
            labels["train"][name] = hide_labels(
                labels["train"][name], task.missing_labels, split_seed, name
            )
            infos[name] = TaskSpec(
                name=name,
                loss=task.loss,
                outputs=_outputs(task, labels, name),
                weight=1.0 if task.weight is None else task.weight,
            )
        indexed = {split: _indexed(part) for split, part in domain.splits.items()}
        group_domain = Domain(
            dataset=domain.dataset,
            name=domain.name,
            num_classes=domain.num_classes,
            input_shape=domain.input_shape,
            splits=indexed,
            classes=domain.classes,
            skipped=domain.skipped,
        )
        groups.append(TaskGroup(domain.name, group_domain, names, labels))
    return groups, [infos[name] for name in tasks]


def derive_label(domain: Domain, task: TaskConfig, y: Tensor, key: str) -> Tensor:
    """The task's label of each sample from its class index `y` (see module docstring)."""
    spec = get_spec(domain.dataset, f"{key}.dataset")
    missing = y < 0  # a set may mark a sample's missing label with -1
    y = y.clamp(min=0)
    if task.label == "class":
        value = y
    elif task.label == "parity":
        names = domain.classes or ()
        if not all(n.lstrip("-").isdigit() for n in names):
            raise ConfigError(
                f"{key}.label: parity needs integer class names; {domain.dataset}'s classes "
                f"are {', '.join(names[:4])}, ..."
            )
        value = torch.tensor([int(n) % 2 for n in names], dtype=torch.long)[y]
    elif task.label in spec.labels:
        value = spec.labels[task.label](y)
    else:
        known = [*GENERIC_LABELS, *spec.labels]
        raise ConfigError(
            f"{key}.label: {domain.dataset} has no label '{task.label}' (one of {', '.join(known)})"
        )
    if task.loss == "ce":
        return value.long().masked_fill(missing, -1)
    if task.loss == "bce" and len(value) and not bool(((value == 0) | (value == 1)).all()):
        raise ConfigError(
            f"{key}.loss: bce needs a 0/1 label; '{task.label}' takes values "
            f"{int(value.min())}..{int(value.max())} (use ce)"
        )
    return value.float().masked_fill(missing, float("nan"))


def hide_labels(labels: Tensor, fraction: float, split_seed: int, task: str) -> Tensor:
    """Replace a seeded `fraction` of the labels by the missing sentinel (-1 or NaN)."""
    if fraction == 0:
        return labels
    rng = np.random.default_rng([split_seed, zlib.crc32(task.encode())])
    hidden = torch.from_numpy(rng.random(len(labels)) < fraction)
    missing = -1 if labels.dtype == torch.long else float("nan")
    return labels.masked_fill(hidden, missing)


def _outputs(task: TaskConfig, labels: dict[str, dict[str, Tensor]], name: str) -> int:
    if task.loss != "ce":
        return 1
    return int(max(int(s[name].max()) for s in labels.values() if len(s[name]))) + 1


def _indexed(split: Any) -> Any:
    """The split with `y` replaced by the sample indices 0..N-1."""
    index = torch.arange(len(split))
    if isinstance(split, FileSplit):
        return FileSplit(
            files=split.files,
            y=index,
            train_transform=split.train_transform,
            eval_transform=split.eval_transform,
            loader=split.loader,
            key=split.key,
        )
    assert isinstance(split, Split)
    return Split(split.x, index, split.train_transform, split.eval_transform)


class TaskStream:
    """A group's training stream: `batch(step)` gives one DomainBatch per task of the group,
    all with the same `x` tensor, each with its task's labels."""

    def __init__(
        self,
        group: TaskGroup,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        shard: Shard = Shard(),
    ) -> None:
        self.group = group
        self.inner = make_stream(
            group.domain.splits["train"],
            batch_size=batch_size,
            seed=seed,
            domain=group.name,
            device=device,
            shard=shard,
        )
        self.labels = {t: y.to(device) for t, y in group.labels["train"].items()}

    def batch(self, step: int) -> list[DomainBatch]:
        b = self.inner.batch(step)
        assert b.y is not None
        return [
            DomainBatch(x=b.x, y=self.labels[t][b.y], domain=self.group.name, task=t)
            for t in self.group.tasks
        ]

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "tasks": list(self.group.tasks)}
