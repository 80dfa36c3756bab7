"""Failed writes (issue 19, point 3): a full disk or an injected OSError while a run writes
its folder leaves the last complete checkpoint and metrics.jsonl intact, stops the run with
exit 1 and one message naming the folder and its free space, and `xdt resume` then
completes it with exactly the metrics of an uninterrupted run.

Two ways to fail: an OSError injected into the checkpoint writer half-way through a file
(always), and a real full file system, a 4 MiB tmpfs filled up during training (where
`mount` is allowed: root on Linux)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import xdt_cli.checkpoint as checkpoint_module
from tests.conftest import TINY, write_config
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.cli import app
from xdt_cli.config import deep_merge
from xdt_cli.runs import RunDir
from xdt_cli.sweeps import child_env

STEPS = ["train.steps=60", "train.eval_every=10", "train.log_every=5"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def no_space(path: str | None = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def xdt(*args) -> subprocess.CompletedProcess:
    """xdt in a process of its own, at one thread (the reference and the cut run alike)."""
    argv = [sys.executable, "-m", "xdt_cli", *map(str, args)]
    return subprocess.run(argv, env=child_env(2), capture_output=True, text=True, timeout=300)


def assert_intact_and_resumes_exactly(run: Path, reference: Path, resume=cli) -> None:
    """The state a failed write leaves, then `xdt resume` to the reference's end."""
    assert not (run / "summary.json").exists()  # resumable: not marked failed
    last = load_checkpoint(run / "checkpoints" / "last.pt")  # complete: its checksum holds
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and max(r["step"] for r in rows) >= last["step"]
    reference_rows = (reference / "metrics.jsonl").read_text().splitlines()
    assert (run / "metrics.jsonl").read_text().splitlines() == reference_rows[: len(rows)]
    assert not [p for p in run.rglob("*.tmp")]  # no temporary file left behind
    resumed = resume("resume", run)
    assert getattr(resumed, "exit_code", getattr(resumed, "returncode", None)) == 0, resumed
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    for key in ("status", "final", "best", "best_step", "steps"):
        assert a[key] == b[key], key
    mine, theirs = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run, reference))
    for name, tensor in theirs["method"].items():
        assert mine["method"][name].equal(tensor), name


def test_an_injected_failure_mid_checkpoint_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY)
    runs = tmp_path / "runs"
    reference = cli("train-source", config, *STEPS, "--runs-dir", runs, "--name", "ref")
    assert reference.exit_code == 0, reference.output

    real = checkpoint_module.atomic_write_bytes
    calls = []

    def fails_on_the_fourth(path, writer, **kwargs):
        calls.append(path.name)
        if len(calls) < 4:
            return real(path, writer, **kwargs)

        def half_then_full(fh):  # half of the file reaches the disk, then no space
            buffer = io.BytesIO()
            writer(buffer)
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise no_space(str(path))

        return real(path, half_then_full, **kwargs)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", fails_on_the_fourth)
    failed = cli("train-source", config, *STEPS, "--runs-dir", runs, "--name", "cut", "-q")
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", real)
    assert failed.exit_code == 1, failed.output
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), lines
    assert f"into {runs / 'cut'}: No space left on device (" in lines[0]
    assert " free on its file system)" in lines[0] and f"xdt resume {runs / 'cut'}" in lines[0]
    assert "Traceback" not in failed.output
    assert len(calls) == 4  # it stopped at the failed write
    assert_intact_and_resumes_exactly(runs / "cut", runs / "ref")


def test_a_metrics_row_cut_short_is_cut_off(tmp_path: Path, monkeypatch) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "split": "train", "train/loss": 0.5})
    before = run.metrics_path.read_bytes()
    real_open = Path.open

    class HalfWritten(io.FileIO):
        def write(self, data):  # the first half reaches the file, then the disk is full
            super().write(bytes(data)[: len(data) // 2])
            raise no_space(str(run.metrics_path))

    def open_(path, mode="r", *args, **kwargs):
        if path == run.metrics_path and mode == "ab":
            return HalfWritten(path, "ab")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(Exception, match=f"into {tmp_path}: No space left on device") as caught:
        run.append_metrics({"step": 2, "split": "train", "train/loss": 0.25})
    assert type(caught.value).__name__ == "WriteFailed"
    monkeypatch.setattr(Path, "open", real_open)
    assert run.metrics_path.read_bytes() == before  # the half row is gone
    run.append_metrics({"step": 2, "split": "train", "train/loss": 0.25})
    assert [r["step"] for r in run.read_metrics()] == [1, 2]


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_file_system_stops_the_run_and_resume_completes_it(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    slow = deep_merge(TINY, {"train": {"eval_batch_size": 64}})
    config = write_config(tmp_path / "tiny.yaml", slow)
    steps = ["train.steps=200", "train.eval_every=20", "train.log_every=2"]
    reference = xdt(
        "train-source", config, *steps, "--runs-dir", tmp_path / "runs", "--name", "ref"
    )
    assert reference.returncode == 0, reference.stderr
    run = small_tmpfs / "runs" / "full"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xdt_cli", "train-source", str(config), *steps]
        + ["--runs-dir", str(small_tmpfs / "runs"), "--name", "full", "--quiet"],
        env=child_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    ballast = small_tmpfs / "ballast"
    with ballast.open("wb") as fh:  # every free block, until the file system is full
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), lines
    assert f"into {run}: No space left on device (0 B free on its file system)" in lines[0]
    assert shutil.disk_usage(small_tmpfs).free == 0
    ballast.unlink()  # space freed
    assert_intact_and_resumes_exactly(run, tmp_path / "runs" / "ref", resume=xdt)
