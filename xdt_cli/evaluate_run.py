"""`xdt evaluate RUN`: score a trained run's checkpoint again, or on other data.

A command module over the core (cli.py calls `evaluate_run`). The run is rebuilt through
the construction path training used: `regimes.build_run` with the run's config.yaml and
meta.json's subcommand gives the model, the method, the data it evaluated and its
averages, for every subcommand (train-source, finetune, transfer, multitask, generalize).
The chosen checkpoint's weights are loaded into that method, and the scores come from the
engine's own functions (`evaluation.evaluate`, or `evaluation.evaluate_tasks` for
multitask, then `engine.add_averages`) with the run's `train.eval_batch_size` and
precision, so `best` reproduces summary.json's "best" metrics and `last` its "final"
metrics exactly on the device the run trained on. Metric names are the training ones:
`<domain>/<split>/<metric>`, `<task>/<split>/<metric>` (multitask), and the run's averages
(`avg/...`, `train_domains/...`, `test_domains/...`, `worst_domain/...`).

Optionally the features that each head reads, the labels and the logits go to an .npz file
(see `collect_features` and `collect_task_features`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdt_cli.checkpoint import load_checkpoint, unwrap_state_dict
from xdt_cli.config import ExperimentConfig, first_line
from xdt_cli.data import Domain, Split, load_domain
from xdt_cli.data.registry import SPLITS, DatasetSpec, get_spec
from xdt_cli.data.tasks import TaskGroup
from xdt_cli.engine import add_averages
from xdt_cli.errors import CheckpointError, ConfigError, XdtError
from xdt_cli.evaluation import evaluate, evaluate_tasks
from xdt_cli.files import atomic_write_bytes
from xdt_cli.methods.base import Method
from xdt_cli.regimes import build_run
from xdt_cli.resolve import load_config
from xdt_cli.runs import RunDir
from xdt_cli.runtime import Runtime, autocast_for, resolve_device, resolve_precision

CHECKPOINTS = ("best", "last")
SPLIT_CHOICES = (*SPLITS, "all")


def evaluate_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    data: str | Sequence[str] | None = None,
    split: str = "test",
    device: str = "cpu",
    features_out: str | Path | None = None,
) -> dict[str, Any]:
    """Score `run_dir`'s best.pt or last.pt; return {"run_dir", "checkpoint", "step", "metrics"}.

    `data`: None for the data the run evaluated (its domains in training's order, or a
    multitask run's tasks), else one or more "DATASET" (its first domain) or
    "DATASET:DOMAIN" (not for multitask runs). `split`: train, val, test or all (each split
    scored separately; a held-out domain has no train split). With `features_out`, also
    writes an .npz file; the result then holds "features" (its path).
    Raises XdtError (ConfigError, CheckpointError) for a bad argument, run folder or file.
    """
    if checkpoint not in CHECKPOINTS:
        raise XdtError(f"--checkpoint: '{checkpoint}' is not one of {', '.join(CHECKPOINTS)}")
    if split not in SPLIT_CHOICES:
        raise XdtError(f"--split: '{split}' is not one of {', '.join(SPLIT_CHOICES)}")
    run = RunDir(Path(run_dir))
    subcommand, cfg = read_run(run)
    runtime_device = _resolve_device(device)
    if data is not None and subcommand == "multitask":
        raise XdtError("--data: a multitask run is scored on its own tasks' data; leave it out")
    path = run.best_ckpt if checkpoint == "best" else run.last_ckpt
    splits = SPLITS if split == "all" else (split,)
    precision = resolve_precision(cfg.train.precision, runtime_device)
    scoring = {
        "batch_size": cfg.train.eval_batch_size,
        "device": runtime_device,
        "autocast": autocast_for(precision, runtime_device),
    }

    with _isolated():  # building seeds the global generators, as training did
        built = build_run(subcommand, cfg, Runtime(runtime_device), resuming=True)
        experiment, run_data = built.experiment, built.data
        method = experiment.method
        step = load_weights(method, path)
        if subcommand == "multitask":
            groups, losses = run_data.task_groups, run_data.task_losses
            metrics = evaluate_tasks(method, groups, losses, splits=splits, **scoring)
        else:
            domains = list(run_data.domains.values())
            if data is not None:
                domains = [
                    load_domain(spec.name, domain, split_seed=cfg.data.split_seed, key="--data")
                    for spec, domain in resolve_domains(domains[0], data)
                ]
            eval_sets = {
                d.name: {s: d.splits[s] for s in splits if len(d.splits[s])} for d in domains
            }
            metrics = evaluate(method, eval_sets, **scoring)
        if data is None:  # the run's own averages, as its eval rows hold them
            metrics = add_averages(metrics, experiment.averages, experiment.worst)
        result: dict[str, Any] = {
            "run_dir": str(run.path),
            "checkpoint": str(path),
            "step": step,
            "metrics": metrics,
        }
        if features_out is not None:
            if subcommand == "multitask":
                arrays = collect_task_features(method, groups, losses, splits, **scoring)
            else:
                arrays = collect_features(method, eval_sets, **scoring)
            result["features"] = str(save_features(Path(features_out), arrays))
    return result


# --------------------------------------------------------------------------- the run
def read_run(run: RunDir) -> tuple[str, ExperimentConfig]:
    """The subcommand that trained the run (meta.json) and its resolved config, validated
    for that subcommand, as `xdt resume` reads them."""
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: no such run folder")
    if not run.config_path.is_file():
        raise CheckpointError(f"{run.path}: not an xdt run folder (no config.yaml)")
    subcommand = run.read_json(run.meta_path).get("subcommand")
    if not isinstance(subcommand, str):
        raise CheckpointError(f"{run.meta_path}: has no subcommand")
    return subcommand, load_config(run.config_path, subcommand=subcommand)


def load_weights(method: Method, path: Path) -> int:
    """Load the weights that `path`'s metrics scored into `method`; return its step.

    best.pt holds them as `method`; last.pt holds the live weights as `method` and, under
    `train.ema`, the weight average that its evaluation scored as `ema`."""
    state = load_checkpoint(path)
    weights = state.get("ema") if state.get("ema") is not None else state.get("method")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: holds no 'method' state")
    try:
        method.load_state_dict(unwrap_state_dict(weights))
        return int(state["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = first_line(exc, 200, kind=False)
        raise CheckpointError(f"{path}: does not match the run's model ({first})") from None


def parse_data(text: str) -> tuple[str, str | None]:
    """ "DATASET" or "DATASET:DOMAIN" -> (dataset, domain or None)."""
    dataset, sep, domain = (part.strip() for part in text.partition(":"))
    if not dataset or (sep and not domain):
        raise ConfigError(f"--data '{text}': expected DATASET or DATASET:DOMAIN (see xdt datasets)")
    return dataset, domain or None


def resolve_domains(
    model_domain: Domain, data: str | Sequence[str]
) -> list[tuple[DatasetSpec, str]]:
    """The --data (data set, domain) pairs to score, each checked against the run's model
    (`model_domain`: one of the run's domains, which all share its inputs and classes)."""
    pairs = []
    for text in [data] if isinstance(data, str) else data:
        name, domain = parse_data(text)
        spec = get_spec(name, "--data")
        domain = domain or spec.domains[0]
        if domain not in spec.domains:
            raise ConfigError(
                f"--data: data set '{name}' has no domain '{domain}' "
                f"(its domains: {', '.join(spec.domains)})"
            )
        if (
            spec.input_shape != model_domain.input_shape
            or spec.num_classes != model_domain.num_classes
        ):
            raise ConfigError(
                f"--data: {name} has inputs {spec.input_shape} and {spec.num_classes} classes, "
                f"but the run's model takes {model_domain.input_shape} and "
                f"{model_domain.num_classes} (those of {model_domain.name})"
            )
        if any(domain == seen for _, seen in pairs):
            raise ConfigError(f"--data: domain '{domain}' is given twice")
        pairs.append((spec, domain))
    if not pairs:
        raise ConfigError("--data: no data set given")
    return pairs


def _resolve_device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ConfigError as exc:  # it names the config key `device`; here it is the flag
        raise ConfigError(*(f"--{line}" for line in exc.lines)) from None


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """Rebuilding a run seeds the global generators and chooses the kernels the run trained
    with (runtime.seed_everything); the caller's generators and choices are restored
    afterwards."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_state)
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


# --------------------------------------------------------------------------- features
@torch.no_grad()
def collect_features(
    method: Method,
    eval_sets: dict[str, dict[str, Split]],
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, Any]:
    """A run with one model: the penultimate features (`features` [N, D], float32), logits
    ([N, C], float32), labels ([N], int64), domain and split names ([N]) of every scored
    sample, by domain, then split.

    The features are what the head reads: the output of `method.model.bottleneck` (the
    features' own output when the model has no bottleneck layer), captured by a forward
    hook while `method.predict` runs, so the logits are exactly the ones the metrics scored.
    """
    features_module = getattr(method.model, "bottleneck", None)
    if not isinstance(features_module, torch.nn.Module):
        raise XdtError(
            f"--features: the model of method '{method.name}' is not a Classifier (no .bottleneck)"
        )
    captured: list[Tensor] = []
    hook = features_module.register_forward_hook(lambda m, i, out: captured.append(out))
    feats, logits, labels, domains, splits = [], [], [], [], []
    method.eval()
    try:
        for domain, parts in eval_sets.items():
            for split_name, part in parts.items():
                for x, y in part.batches(batch_size, device):
                    captured.clear()
                    with autocast:
                        out = method.predict(x, None)
                    if len(captured) != 1:
                        raise XdtError(
                            f"--features: method '{method.name}' ran model.bottleneck "
                            f"{len(captured)} times per batch; one is needed"
                        )
                    feats.append(captured[0].float().flatten(1).cpu())
                    logits.append(out.float().cpu())
                    labels.append(y.cpu())
                domains += [domain] * len(part)
                splits += [split_name] * len(part)
    finally:
        hook.remove()
    return {
        "features": torch.cat(feats).numpy().astype(np.float32),
        "labels": torch.cat(labels).numpy().astype(np.int64),
        "domains": np.array(domains, dtype=str),
        "splits": np.array(splits, dtype=str),
        "logits": torch.cat(logits).numpy().astype(np.float32),
    }


@torch.no_grad()
def collect_task_features(
    method: Method,
    groups: list[TaskGroup],
    losses: dict[str, str],
    splits: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, Any]:
    """A multitask run: one row per (task, sample of its data), by task, then split.

    `features` [N, D] (float32) is the vector the task's head reads: the shared encoder's
    output (hps), or the task's gated mixture of the experts' outputs (mmoe), captured by a
    forward hook on the head while `method.predict_tasks` runs, so `logits` are exactly the
    outputs the metrics scored ([N, C], float32, C the widest head; NaN beyond a task's own
    width). `labels` [N]: the task's label, int64 with -1 where missing when every task is
    a ce task, else float32 with NaN where missing. `tasks`, `domains` (the task's inputs)
    and `splits` [N] name each row.
    """
    heads = method.model.heads
    rows: dict[tuple[str, str], dict[str, list]] = {}
    captured: dict[str, list[Tensor]] = {}  # task -> its head's input, per predict call
    method.eval()
    for group in groups:
        hooks = [
            heads[task].register_forward_hook(
                lambda m, inputs, out, task=task: captured.setdefault(task, []).append(inputs[0])
            )
            for task in group.tasks
        ]
        try:
            for split_name in splits:
                split_labels = group.labels[split_name]
                for x, idx in group.domain.splits[split_name].batches(batch_size, device):
                    captured.clear()
                    with autocast:
                        outputs = method.predict_tasks(x, group.tasks)
                    for task in group.tasks:
                        if len(captured.get(task, [])) != 1:
                            raise XdtError(
                                f"--features: method '{method.name}' ran the head of task "
                                f"'{task}' {len(captured.get(task, []))} times per batch; "
                                "one is needed"
                            )
                        row = rows.setdefault((task, split_name), {"f": [], "o": [], "y": []})
                        row["f"].append(captured[task][0].float().flatten(1).cpu())
                        row["o"].append(outputs[task].float().cpu())
                        row["y"].append(split_labels[task][idx.cpu()])
        finally:
            for hook in hooks:
                hook.remove()
    inputs_of = {task: group.name for group in groups for task in group.tasks}
    return _task_arrays(rows, losses, splits, inputs_of)


def _task_arrays(
    rows: dict[tuple[str, str], dict[str, list]],
    losses: dict[str, str],
    splits: Sequence[str],
    inputs_of: dict[str, str],
) -> dict[str, Any]:
    """collect_task_features' arrays from its per-(task, split) batches, by task, then
    split (`rows[(task, split)]`: "f" features, "o" head outputs, "y" labels)."""
    order = [(task, s) for task in losses for s in splits if (task, s) in rows]
    width = max(torch.cat(rows[key]["o"]).shape[1] for key in order)
    every_ce = all(losses[task] == "ce" for task, _ in order)
    feats, logits, labels, names = [], [], [], {"tasks": [], "domains": [], "splits": []}
    for task, split_name in order:
        out = torch.cat(rows[(task, split_name)]["o"])
        padded = torch.full((len(out), width), float("nan"))
        padded[:, : out.shape[1]] = out
        y = torch.cat(rows[(task, split_name)]["y"])
        if not every_ce:
            y = y.float().masked_fill(y < 0, float("nan")) if losses[task] == "ce" else y.float()
        feats.append(torch.cat(rows[(task, split_name)]["f"]))
        logits.append(padded)
        labels.append(y)
        names["tasks"] += [task] * len(y)
        names["domains"] += [inputs_of[task]] * len(y)
        names["splits"] += [split_name] * len(y)
    return {
        "features": torch.cat(feats).numpy().astype(np.float32),
        "labels": torch.cat(labels).numpy().astype(np.int64 if every_ce else np.float32),
        "tasks": np.array(names["tasks"], dtype=str),
        "domains": np.array(names["domains"], dtype=str),
        "splits": np.array(names["splits"], dtype=str),
        "logits": torch.cat(logits).numpy().astype(np.float32),
    }


def save_features(path: Path, arrays: dict[str, Any]) -> Path:
    """Write `arrays` with numpy.savez_compressed to exactly `path`, atomically."""
    if path.is_dir():
        raise XdtError(f"--features: {path} is a folder; give a file name such as out.npz")
    try:
        atomic_write_bytes(path, lambda fh: np.savez_compressed(fh, **arrays))
    except OSError as exc:
        raise XdtError(f"--features: cannot write {path} ({exc.strerror or exc})") from None
    return path


# --------------------------------------------------------------------------- output
def print_result(result: dict[str, Any]) -> None:
    """A metric | value table on stdout (the result of the command, not a log)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title = Text(f"{result['checkpoint']} (step {result['step']})")  # a path is not markup
    table = Table(title=title, title_justify="left", highlight=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}")
    console = Console(highlight=False, soft_wrap=True)
    console.print(table, markup=False)
    if "features" in result:
        console.print(f"features: {result['features']}", markup=False)
