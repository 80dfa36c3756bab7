"""The fault points of xdt_cli/faults.py: each kills a real run where its name says, the
run folder stays readable, and `xdt resume` ends with the uninterrupted run's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, write_config
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.faults import POINTS
from xdt_cli.report import collect_runs
from xdt_cli.sweeps import child_env

STEPS = ["train.steps=40", "train.eval_every=10", "train.log_every=5"]


def xdt(*args, fault: str | None = None) -> subprocess.CompletedProcess:
    env = child_env(2)
    env.pop("XDT_FAULT", None)
    if fault:
        env["XDT_FAULT"] = fault
    argv = [sys.executable, "-m", "xdt_cli", *map(str, args), "--quiet"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root / "tiny.yaml", TINY)
    done = xdt("train-source", config, *STEPS, "--runs-dir", root / "runs", "--name", "ref")
    assert done.returncode == 0, done.stderr
    return config, root / "runs" / "ref"


# the second checkpoint write, the first replacement of last.pt, the third evaluated
# split, the fourth metrics row
@pytest.mark.parametrize(
    "fault",
    ["checkpoint.partial:2", "checkpoint.renamed:1", "evaluate:3", "metrics.append:4"],
)
def test_a_kill_at_a_fault_point_resumes_exactly(reference, tmp_path: Path, fault) -> None:
    assert fault.split(":")[0] in POINTS
    config, ref = reference
    cut = xdt("train-source", config, *STEPS, "--runs-dir", tmp_path, "--name", "cut", fault=fault)
    assert cut.returncode == -9, cut.stderr  # SIGKILL, at the point
    run = tmp_path / "cut"
    assert not (run / "summary.json").exists()
    assert all(r.problem is None for r in collect_runs([tmp_path]))  # report reads it
    resumed = xdt("resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert {k: a[k] for k in ("final", "best", "best_step")} == {
        k: b[k] for k in ("final", "best", "best_step")
    }
    for name in ("last.pt", "best.pt"):
        mine, theirs = (load_checkpoint(d / "checkpoints" / name) for d in (run, ref))
        assert all(mine["method"][k].equal(v) for k, v in theirs["method"].items()), name
    assert not list(run.rglob("*.tmp"))  # what the kill left half-written is gone


def test_a_bad_fault_spec_is_refused(monkeypatch) -> None:
    from xdt_cli.faults import fault_point

    monkeypatch.setenv("XDT_FAULT", "checkpoint:x")
    with pytest.raises(ValueError, match="XDT_FAULT=checkpoint:x"):
        fault_point("evaluate")
    monkeypatch.delenv("XDT_FAULT")
    fault_point("evaluate")  # unset: nothing happens
    assert os.getpid()


def test_resume_trains_on_with_the_thread_count_the_run_started_with(
    reference, tmp_path: Path
) -> None:
    """A sweep resumes its last runs with more threads than they started with (fewer runs
    than --jobs are left), a shell may set none: the CPU sums' last bits would change.
    meta.json records the count and `xdt resume` uses it, so the end is still exact."""
    config, ref = reference
    cut = xdt(
        "train-source", config, *STEPS, "--runs-dir", tmp_path, "--name", "cut",
        fault="checkpoint.partial:4",  # during the second last.pt: the first is there
    )  # fmt: skip
    assert cut.returncode == -9, cut.stderr
    run = tmp_path / "cut"
    assert json.loads((run / "meta.json").read_text())["threads"] == 1
    assert (run / "checkpoints" / "last.pt").exists()
    env = {**child_env(2), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    argv = [sys.executable, "-m", "xdt_cli", "resume", str(run)]
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "using 1 torch thread(s), as when the run started (not 2)" in resumed.stderr
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
