"""The real command in a real process: streams, signals, a hard kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, write_config
from xdt_cli.config import deep_merge

XDT = [sys.executable, "-m", "xdt_cli"]


def xdt(*args, env_runs: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDT_RUNS_DIR": str(env_runs)}
    return subprocess.run(
        [*XDT, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


def start(*args, env_runs: Path) -> subprocess.Popen:
    env = {**os.environ, "XDT_RUNS_DIR": str(env_runs)}
    return subprocess.Popen(
        [*XDT, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_json_on_stdout_and_no_progress_bar_off_a_terminal(tiny_config, tmp_path) -> None:
    result = xdt("train-source", tiny_config, "--json", "--name", "p", env_runs=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout holds the summary and nothing else
    assert summary == json.loads((tmp_path / "p" / "summary.json").read_text())
    assert "step" in result.stderr  # one log line per evaluation ...
    assert "\r" not in result.stderr and "training" not in result.stderr  # ... and no bar


def test_bad_config_exits_2_without_traceback(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("!!python/object/apply:os.system ['touch hacked']\n")
    result = xdt("train-source", bad, env_runs=tmp_path, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bad.yaml" in result.stderr
    assert not (tmp_path / "hacked").exists()


# Long enough that a signal lands mid-run: ~600 steps of LeNet on digits.
LONG = deep_merge(TINY, {"train": {"steps": 600, "eval_every": 50, "log_every": 25}})


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_pt_and_resume_finishes_identically(
    tmp_path: Path, signum: int, code: int
) -> None:
    config = write_config(tmp_path / "long.yaml", LONG)
    proc = start("train-source", config, "--name", "cut", env_runs=tmp_path)
    wait_for(tmp_path / "cut" / "checkpoints" / "last.pt", proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "xdt resume" in stderr
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] < 600

    resumed = xdt("resume", tmp_path / "cut", "--json", env_runs=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    straight = xdt("train-source", config, "--json", "--name", "straight", env_runs=tmp_path)
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    for key in ("status", "final", "best", "best_step", "steps"):
        assert a[key] == b[key], key
    cut_rows = (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert cut_rows == (tmp_path / "straight" / "metrics.jsonl").read_text()


def test_sigkill_loses_at_most_one_eval_interval(tmp_path: Path) -> None:
    config = write_config(tmp_path / "long.yaml", LONG)
    proc = start("train-source", config, "--name", "killed", "-q", env_runs=tmp_path)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    wait_for(last, proc)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = xdt("resume", tmp_path / "killed", "--json", env_runs=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    straight = xdt("train-source", config, "--json", "--name", "ref", "-q", env_runs=tmp_path)
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    assert (a["final"], a["best"], a["best_step"]) == (b["final"], b["best"], b["best_step"])
    assert (tmp_path / "killed" / "metrics.jsonl").read_text() == (
        tmp_path / "ref" / "metrics.jsonl"
    ).read_text()
