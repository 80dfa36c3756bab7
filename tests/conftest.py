"""Shared fixtures: tiny configs on the embedded data, and an isolated runs folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# pytest-xdist runs the suite in N processes (pyproject.toml: -n 2): each gets cores/N torch
# threads, and so do the xdt processes that its tests start (OMP_NUM_THREADS)
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, (os.cpu_count() or 2) // _workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": {"dataset": "digits"}},
    "model": {"backbone": "lenet"},
    "optim": {"name": "adam", "lr": 3e-3},
    "train": {"steps": 40, "batch_size": 32, "eval_every": 20, "log_every": 10},
}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _isolated_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes into the repository's runs/ folder."""
    monkeypatch.setenv("XDT_RUNS_DIR", str(tmp_path / "runs"))


@pytest.fixture
def cli():
    """Invoke the `xdt` app in-process through Typer's test runner: `cli("train-source", ...)`."""
    from typer.testing import CliRunner

    from xdt_cli.cli import app

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A 40-step LeNet run on `digits` (a couple of seconds on a laptop CPU)."""
    return write_config(tmp_path / "tiny.yaml", TINY)
