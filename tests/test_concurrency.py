"""Several xdt processes at once on one runs folder (two calls of one sweep: test_sweep.py).

- Two runs started at the same moment with the same `--name`: one creates the folder, the
  other exits 2 naming it, and nothing of the loser lands in the winner's folder.
- `xdt report` and `xdt plot` in a loop while a sweep writes its runs never crash, and a
  report counts exactly the runs whose summary said "completed" when it read them, never a
  run still writing its metrics."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.conftest import TINY, write_config
from xdt_cli.cli import app
from xdt_cli.sweeps import child_env, load_sweep, plan


def completed(run_dirs: list[Path]) -> int:
    count = 0
    for run in run_dirs:
        with contextlib.suppress(OSError, ValueError):
            count += json.loads((run / "summary.json").read_text())["status"] == "completed"
    return count


def test_report_and_plot_in_a_loop_while_a_sweep_writes(tmp_path: Path) -> None:
    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = tmp_path / "live.yaml"
    overrides = ["train.steps=60", "train.eval_every=10", "train.log_every=5"]
    spec = {"config": "tiny.yaml", "overrides": overrides, "seeds": [0, 1, 2, 3]}
    sweep.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    folder = runs / "live"
    run_dirs = [r.run_dir for r in plan(load_sweep(sweep), runs, validate=False).runs]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdt_cli", "sweep", str(sweep), "--jobs", "2"]
        + ["--runs-dir", str(runs), "--quiet"],
        env=child_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    runner = CliRunner()
    seen_counts, plots = set(), 0
    try:
        while proc.poll() is None or not seen_counts or max(seen_counts) < len(run_dirs):
            if not any((run / "meta.json").exists() for run in run_dirs):
                continue  # nothing to read yet
            before = completed(run_dirs)
            result = runner.invoke(app, ["report", str(folder), "--format", "json"])
            after = completed(run_dirs)
            assert result.exception is None or isinstance(result.exception, SystemExit)
            assert result.exit_code == 0, result.output
            groups = json.loads(result.stdout)
            n = sum(g["n"] for g in groups)
            assert before <= n <= after, (before, n, after)  # no half-written run averaged
            for group in groups:
                assert group["mean"] and all(v is not None for v in group["mean"].values())
            seen_counts.add(n)
            out = tmp_path / f"curves{plots % 2}.png"
            drawn = runner.invoke(app, ["plot", str(folder), "--out", str(out)])
            assert drawn.exit_code == 0, drawn.output
            plots += 1
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.wait() == 0, proc.stderr.read()
    assert max(seen_counts) == len(run_dirs) and len(seen_counts) >= 2, seen_counts


def test_two_runs_with_one_name_started_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY)
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "xdt_cli", "train-source", str(config), "train.steps=20"]
    argv += ["--runs-dir", str(runs), "--name", "same", "--quiet"]
    procs = [
        subprocess.Popen(argv, env=child_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=300) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 2], outs
    loser = next(err for (_, err), p in zip(outs, procs, strict=True) if p.returncode == 2)
    lines = loser.decode().strip().splitlines()
    assert len(lines) == 1 and str(runs / "same") in lines[0] and "already exists" in lines[0]
    meta = json.loads((runs / "same" / "meta.json").read_text())
    assert "resumed" not in meta
    summary = json.loads((runs / "same" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    rows = (runs / "same" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(row)["step"] for row in rows]
    assert steps == sorted(steps) and len(steps) == len(set(map(str, rows)))
