"""`tracking.backends: [tensorboard]` / `--log-to tensorboard`: the event files read back
equal metrics.jsonl, scalar by scalar and step by step, also across a resume that
recomputes steps the interrupted run had already logged."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, write_config
from tests.test_engine import RESUMABLE, _interrupt_at
from xdt_cli.api import resume_run, start_run
from xdt_cli.config import deep_merge
from xdt_cli.errors import RunInterrupted
from xdt_cli.progress import Reporter

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the dev extra installs tensorboard",
)
from tensorboard.backend.event_processing.event_multiplexer import (  # noqa: E402
    EventMultiplexer,
)

QUIET = Reporter(quiet=True)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files: tag -> [(step, value)] in step order."""
    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {
        tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]
    }


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard stores it (float32), tag -> [(step, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, float | int):
                series.setdefault(key, []).append((row["step"], float(np.float32(value))))
    return {tag: sorted(points) for tag, points in series.items()}


def train(config: Path, runs: Path, name: str, overrides=()) -> dict:
    return start_run(
        "train-source", config, list(overrides), name=name, runs_dir=runs, reporter=QUIET
    )


def test_event_files_equal_metrics_jsonl(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY)
    result = cli(
        "train-source", config, "--log-to", "tensorboard", "--runs-dir", tmp_path, "-q", "--json"
    )
    assert result.exit_code == 0, result.stderr
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    got, want = scalars(run_dir), expected(run_dir)
    assert "train/loss" in want and "digits/test/acc" in want
    assert got == want
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    (text,) = acc.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert "    backends:" in shown and "tensorboard" in shown  # the resolved config


def test_a_resume_that_recomputes_steps_shows_each_step_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is stopped at step 13 (last.pt), resumed and stopped again at 25 (rows up to
    24 logged); then last.pt of step 13 comes back, as if the process had died before its
    next save. The second resume computes steps 14.. again: TensorBoard must show them once,
    equal to metrics.jsonl, which equals a run that was never stopped."""
    tracked = deep_merge(RESUMABLE, {"tracking": {"backends": ["tensorboard"]}})
    config = write_config(tmp_path / "resumable.yaml", tracked)
    runs = tmp_path / "runs"
    straight = train(config, runs, "straight")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 13, signal.SIGINT)
        with pytest.raises(RunInterrupted):
            train(config, runs, "cut")
    cut = runs / "cut"
    early = tmp_path / "last-13.pt"
    shutil.copy(cut / "checkpoints" / "last.pt", early)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 25, signal.SIGINT)
        with pytest.raises(RunInterrupted):
            resume_run(cut, reporter=QUIET)
    assert (24, "train") in {
        (json.loads(line)["step"], json.loads(line)["split"])
        for line in (cut / "metrics.jsonl").read_text().splitlines()
    }
    shutil.copy(early, cut / "checkpoints" / "last.pt")
    resumed, _ = resume_run(cut, reporter=QUIET)
    assert resumed["final"] == straight["final"]
    assert (cut / "metrics.jsonl").read_text() == (runs / "straight" / "metrics.jsonl").read_text()
    assert scalars(cut) == expected(cut) == scalars(runs / "straight")


def test_a_sweep_folder_shows_each_run_as_its_own_curve(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", {**TINY, "train": {**TINY["train"], "steps": 20}})
    sweep = tmp_path / "runs" / "lr-sweep"
    for lr in ("1e-3", "3e-3"):
        train(config, sweep, f"lr{lr}", [f"optim.lr={lr}", "tracking.backends=[tensorboard]"])
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    runs = multiplexer.Runs()
    assert sorted(runs) == ["lr1e-3/tensorboard", "lr3e-3/tensorboard"]
    first, second = (multiplexer.Scalars(r, "train/loss") for r in sorted(runs))
    assert [e.step for e in first] == [e.step for e in second] == [10, 20]
    assert [e.value for e in first] != [e.value for e in second]


def test_unknown_tracker_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tiny.yaml", TINY)
    result = cli("train-source", config, "--log-to", "tensorbord", "--runs-dir", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --log-to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); "
        "known: tensorboard, mlflow"
    )
