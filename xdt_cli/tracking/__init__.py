"""Experiment trackers: where a run's metrics go besides metrics.jsonl (`tracking.backends`,
`--log-to`). metrics.jsonl stays the source of truth; a tracker mirrors it.

The engine hands every row it appends to metrics.jsonl to each tracker (`log`), and the
summary once it is written (`finish`). A tracker must never kill or slow a run: it catches
its own errors, warns once on stderr, and leaves in the run folder what a later
`xdt log-sync` needs to send the rest.
- `tensorboard` (tensorboard.py): event files under `<run>/tensorboard/`;
- `mlflow` (mlflow.py): an MLflow run on the configured tracking server.

`xdt log-sync RUN --to mlflow` (`sync_run`) sends later what a tracker did not receive.

This floor imports the config and the run folder only; the backends import their optional
packages when a run asks for them. The base class `Tracker` is in base.py (a backend imports
it from there: importing this package from a backend would be an import cycle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdt_cli.config import ConfigError, ExperimentConfig
from xdt_cli.errors import XdtError
from xdt_cli.runs import RunDir
from xdt_cli.tracking.base import Tracker

__all__ = ["BACKENDS", "Tracker", "open_trackers", "sync_run"]

BACKENDS = ("tensorboard", "mlflow")


def open_trackers(
    cfg: ExperimentConfig, run: RunDir, subcommand: str, *, resumed: bool
) -> list[Tracker]:
    """The trackers that `cfg.tracking.backends` asks for, opened on `run` (a resumed run
    continues what it sent before)."""
    trackers: list[Tracker] = []
    for backend in cfg.tracking.backends:
        if backend == "tensorboard":
            from xdt_cli.tracking.tensorboard import TensorBoardTracker

            trackers.append(TensorBoardTracker(cfg, run, resumed=resumed))
        elif backend == "mlflow":
            from xdt_cli.tracking.mlflow import MLflowTracker

            trackers.append(MLflowTracker(cfg, run, subcommand, resumed=resumed))
        else:  # the schema allows only BACKENDS
            raise ConfigError(f"tracking.backends: unknown backend '{backend}'")
    return trackers


def sync_run(
    run_dir: str | Path, backend: str, *, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Send what `backend` has not received of the run in `run_dir`, from the folder alone;
    returns what was sent. Only MLflow keeps a server to catch up with."""
    if backend not in BACKENDS:
        raise XdtError(f"--to: unknown tracker '{backend}'; known: {', '.join(BACKENDS)}")
    if backend != "mlflow":
        raise XdtError(
            f"--to {backend}: it writes into the run folder while the run trains; "
            "only mlflow can be synced"
        )
    from xdt_cli.tracking.mlflow import sync

    return sync(Path(run_dir), tracking_uri=tracking_uri)
