"""`xdt evaluate`: score a trained run's checkpoint on any registered data set or domain.

The model is rebuilt from the run's own config.yaml (backbone, method, input shape and class
count of the domain it trained on: data.source, or data.target for finetune), the chosen
checkpoint's `method` state is loaded, and the scores come from `evaluation.evaluate` with
the run's `train.eval_batch_size` and precision: the same code and batching as the engine,
so `best` reproduces summary.json's "best" metrics and `last` its "final" metrics exactly
on the device the run trained on. Optionally the penultimate-layer features
(`model.features(x)`), labels and logits go to an .npz file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xdt_cli.checkpoint import load_checkpoint, unwrap_state_dict
from xdt_cli.config import ExperimentConfig, load_config
from xdt_cli.data import Domain, Split, load_configured_domain, load_domain
from xdt_cli.data.registry import SPLITS, DatasetSpec, get_spec
from xdt_cli.errors import CheckpointError, ConfigError, XdtError
from xdt_cli.evaluation import evaluate
from xdt_cli.files import atomic_write_bytes
from xdt_cli.methods import METHODS
from xdt_cli.methods.base import Method
from xdt_cli.models import create_model
from xdt_cli.runs import RunDir
from xdt_cli.runtime import autocast_for, resolve_device, resolve_precision, set_deterministic

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

    `data`: None for the domains the run evaluated (source, then target), else one or more
    "DATASET" (its first domain) or "DATASET:DOMAIN". `split`: train, val, test or all (each
    split scored separately). Metrics are named `<domain>/<split>/<acc|loss>`. With
    `features_out`, also writes an .npz with `features` [N, D], `labels` [N], `domains` [N],
    `splits` [N] and `logits` [N, C]; the result then holds "features" (its path).
    Raises XdtError (ConfigError, CheckpointError) for a bad argument, run folder or file.
    """
    if checkpoint not in CHECKPOINTS:
        raise XdtError(f"--checkpoint: '{checkpoint}' is not one of {', '.join(CHECKPOINTS)}")
    if split not in SPLIT_CHOICES:
        raise XdtError(f"--split: '{split}' is not one of {', '.join(SPLIT_CHOICES)}")
    run = RunDir(Path(run_dir))
    cfg, trained_key = read_run_config(run)
    # The run's own domains exactly as it read them (root, transforms, classes, splits).
    own = {
        key: load_configured_domain(section, split_seed=cfg.data.split_seed, key=f"data.{key}")
        for key in (trained_key, "source", "target")
        if (section := getattr(cfg.data, key)) is not None
    }
    trained = own[trained_key]
    runtime_device = _resolve_device(device)

    path = run.best_ckpt if checkpoint == "best" else run.last_ckpt
    method, step = load_method(cfg, trained, path, runtime_device)

    split_names = SPLITS if split == "all" else (split,)
    if data is None:  # the domains the run evaluated: source, then target
        chosen = [own[k] for k in ("source", "target") if k in own]
    else:
        chosen = [
            load_domain(spec.name, domain, split_seed=cfg.data.split_seed, key="--data")
            for spec, domain in resolve_domains(trained, data)
        ]
    eval_sets = {
        d.name: {name: part for name, part in d.splits.items() if name in split_names}
        for d in chosen
    }
    precision = resolve_precision(cfg.train.precision, runtime_device)
    with _deterministic(cfg.train.deterministic):
        metrics = evaluate(
            method,
            eval_sets,
            batch_size=cfg.train.eval_batch_size,
            device=runtime_device,
            autocast=autocast_for(precision, runtime_device),
        )
        result: dict[str, Any] = {
            "run_dir": str(run.path),
            "checkpoint": str(path),
            "step": step,
            "metrics": metrics,
        }
        if features_out is not None:
            arrays = collect_features(
                method,
                eval_sets,
                batch_size=cfg.train.eval_batch_size,
                device=runtime_device,
                autocast=autocast_for(precision, runtime_device),
            )
            result["features"] = str(save_features(Path(features_out), arrays))
    return result


# --------------------------------------------------------------------------- the run
def read_run_config(run: RunDir) -> tuple[ExperimentConfig, str]:
    """The run's resolved config, validated for the subcommand that trained it, and which of
    `data.source` / `data.target` the model was built for (finetune: the target)."""
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: no such run folder")
    if not run.config_path.is_file():
        raise CheckpointError(f"{run.path}: not an xdt run folder (no config.yaml)")
    subcommand = run.read_json(run.meta_path).get("subcommand")
    if not isinstance(subcommand, str):
        raise CheckpointError(f"{run.meta_path}: has no subcommand")
    cfg = load_config(run.config_path, subcommand=subcommand)
    trained_key = "target" if subcommand == "finetune" else "source"
    if getattr(cfg.data, trained_key) is None:
        raise CheckpointError(
            f"{run.config_path}: has no data.{trained_key} to rebuild the model from"
        )
    return cfg, trained_key


def load_method(
    cfg: ExperimentConfig, trained: Domain, path: Path, device: torch.device
) -> tuple[Method, int]:
    """Rebuild the run's method (as regimes.py does) and load `path`'s `method` state."""
    model = create_model(cfg.model.backbone, trained.input_shape, trained.num_classes)
    method = METHODS[cfg.method.name](model, cfg.method_config, total_steps=cfg.train.steps)
    state = load_checkpoint(path)
    if not isinstance(state.get("method"), dict):
        raise CheckpointError(f"{path}: holds no 'method' state")
    try:
        method.load_state_dict(unwrap_state_dict(state["method"]))
        step = int(state["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: does not match the run's model ({first[:200]})") from None
    return method.to(device), step


def parse_data(text: str) -> tuple[str, str | None]:
    """ "DATASET" or "DATASET:DOMAIN" -> (dataset, domain or None)."""
    dataset, sep, domain = (part.strip() for part in text.partition(":"))
    if not dataset or (sep and not domain):
        raise ConfigError(f"--data '{text}': expected DATASET or DATASET:DOMAIN (see xdt datasets)")
    return dataset, domain or None


def resolve_domains(trained: Domain, data: str | Sequence[str]) -> list[tuple[DatasetSpec, str]]:
    """The --data (data set, domain) pairs to score, each checked against the run's model."""
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
        if spec.input_shape != trained.input_shape or spec.num_classes != trained.num_classes:
            raise ConfigError(
                f"--data: {name} has inputs {spec.input_shape} and {spec.num_classes} classes, "
                f"but the run's model takes {trained.input_shape} and {trained.num_classes} "
                f"(trained on {trained.name})"
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
def _deterministic(flag: bool) -> Iterator[None]:
    """The kernel choices the run trained with (seed_everything), restored afterwards."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    set_deterministic(flag)
    try:
        yield
    finally:
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
    """Penultimate features, logits, labels, domain and split names of every scored sample.

    The features are the output of `method.model.features`, captured by a forward hook
    while `method.predict` runs, so the logits are exactly the ones the metrics scored.
    """
    import numpy as np

    features_module = getattr(method.model, "features", None)
    if not isinstance(features_module, torch.nn.Module):
        raise XdtError(f"--features: the model of method '{method.name}' has no .features")
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
                            f"--features: method '{method.name}' ran model.features "
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


def save_features(path: Path, arrays: dict[str, Any]) -> Path:
    """Write `arrays` with numpy.savez_compressed to exactly `path`, atomically."""
    import numpy as np

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
