"""The core API: start a run, resume a run (one training run in one run folder).

`cli.py` only parses arguments and turns exceptions into exit codes; everything a single run
does is here, so scripts and notebooks can call `start_run` and `resume_run` directly.
Layers: this module sits on the core (regimes.py, engine.py, runs.py) and under the
composite runs, which call it: leave-one-out (leave_one_out.py), single-task baselines
(baselines.py), sweeps and benchmark suites. It imports none of them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from xdt_cli.checkpoint import previous_path
from xdt_cli.config import ExperimentConfig, dump_config
from xdt_cli.engine import Engine
from xdt_cli.errors import CheckpointError
from xdt_cli.files import atomic_write_text
from xdt_cli.progress import Reporter
from xdt_cli.regimes import SINGLE_TASK_FILE, build_experiment
from xdt_cli.resolve import load_config, resolve_from_run
from xdt_cli.runs import RunDir, create_run_dir, default_runs_dir, make_meta
from xdt_cli.runtime import Runtime, resolve_precision
from xdt_cli.tracking import Tracker, open_trackers


def start_run(
    subcommand: str,
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    name: str | None = None,
    runs_dir: str | Path | None = None,
    device: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """Validate the config, build the experiment, claim a run folder and train.

    Returns the summary (also in `<run>/summary.json`). Raises XdtError for bad input and
    RunInterrupted when stopped by a signal (after saving last.pt).
    """
    reporter = reporter or Reporter()
    cfg, runs_root = prepare_run(
        subcommand, config, overrides, runs_dir=runs_dir, device=device, seed=seed
    )
    return run_config(
        subcommand,
        cfg,
        runs_root,
        name=name,
        overwrite=overwrite,
        reporter=reporter,
        argv=argv,
    )


def prepare_run(
    subcommand: str,
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    runs_dir: str | Path | None = None,
    device: str | None = None,
    seed: int | None = None,
) -> tuple[ExperimentConfig, Path]:
    """The first half of `start_run`: the validated config (flags applied, `init.from_run`
    resolved against the runs folder) and the runs folder."""
    cfg = load_config(
        config, overrides, subcommand=subcommand, flags={"seed": seed, "device": device}
    )
    runs_root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    resolve_from_run(cfg, runs_root)
    return cfg, runs_root


def run_config(
    subcommand: str,
    cfg: ExperimentConfig,
    runs_root: Path,
    *,
    name: str | None,
    overwrite: bool,
    reporter: Reporter,
    argv: list[str] | None,
    single_task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a validated config in a new run folder (the second half of `start_run`).

    `single_task` (multitask): the single-task baselines the run is compared with
    (baselines.py trains them); it goes into the experiment, which writes it to
    single_task.json and adds it and the Delta_m it implies to summary.json."""
    runtime = Runtime.from_env(cfg.device)
    experiment = build_experiment(subcommand, cfg, runtime, single_task=single_task)
    run = None
    if runtime.is_main:
        path = create_run_dir(
            runs_root,
            subcommand,
            cfg.name,
            name,
            overwrite,
        )
        run = RunDir(path)
        run.lock()
        atomic_write_text(run.config_path, dump_config(cfg))
        precision = resolve_precision(cfg.train.precision, runtime.device)
        meta = make_meta(subcommand, str(runtime.device), precision, argv or sys.argv)
        meta["processes"] = runtime.world_size  # torchrun: the ranks that trained it
        run.write_json(run.meta_path, meta)
        for file_name, content in experiment.run_files.items():
            run.write_json(path / file_name, content)
        reporter.message(f"run folder: {path}  (device {runtime.device}, {precision})")
    for note in experiment.notes:
        reporter.message(note)
    engine = Engine(cfg, experiment, runtime, run=run, reporter=reporter)
    trackers = open_trackers(cfg, run, subcommand, resumed=False) if run is not None else []
    return _fit(engine, reporter, run, trackers)


def resume_run(
    run_dir: str | Path, *, reporter: Reporter | None = None, argv: list[str] | None = None
) -> tuple[dict[str, Any], bool]:
    """Continue an interrupted run from its last.pt; returns (summary, trained).

    The experiment is rebuilt from the folder alone: config.yaml, meta.json's subcommand,
    and (a multitask run compared with single-task baselines) single_task.json."""
    reporter = reporter or Reporter()
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path}: no such run folder")
    if not run.config_path.is_file():
        raise CheckpointError(f"{run.path}: not an xdt run folder (no config.yaml)")
    meta = run.read_json(run.meta_path)
    if run.summary_path.exists():
        summary = run.read_json(run.summary_path)
        if summary.get("status") in ("completed", "failed"):
            return summary, False
    subcommand = meta.get("subcommand")
    if not isinstance(subcommand, str):
        raise CheckpointError(f"{run.meta_path}: has no subcommand")
    cfg = load_config(run.config_path, subcommand=subcommand)
    _same_threads(meta, reporter)
    runtime = Runtime.from_env(cfg.device)
    if runtime.is_main:  # torchrun: rank 0 alone writes the folder; every rank reads last.pt
        run.lock()
    try:  # a bad last.pt, meta.json or metrics.jsonl releases the lock (the caller may
        # fix it and retry in this process); _fit releases it when training ends
        # last.prev.pt alone: a crash between the two renames of a save (checkpoint.py)
        resuming = run.last_ckpt.exists() or previous_path(run.last_ckpt).exists()
        if runtime.is_main:  # temporary files of writes a kill cut short (files.py)
            for stale in [*run.path.glob(".*.tmp"), *run.path.glob("checkpoints/.*.tmp")]:
                stale.unlink(missing_ok=True)
        single_task_path = run.path / SINGLE_TASK_FILE
        single_task = run.read_json(single_task_path) if single_task_path.is_file() else None
        experiment = build_experiment(
            subcommand, cfg, runtime, resuming=resuming, single_task=single_task
        )
        engine = Engine(cfg, experiment, runtime, run=run, reporter=reporter)
        if resuming:
            note = engine.resume_from(run.last_ckpt)
            if note is not None:
                reporter.message(note)
            reporter.message(f"resuming {run.path} at step {engine.step}/{cfg.train.steps}")
        elif runtime.is_main:
            run.best_ckpt.unlink(missing_ok=True)
            reporter.message(f"{run.path} has no last.pt yet: training from step 0")
        if not runtime.is_main:
            return _fit(engine, reporter, None), True
        run.truncate_metrics(engine.step)
        run.summary_path.unlink(missing_ok=True)
        meta.setdefault("resumed", []).append(
            {
                "argv": argv or sys.argv,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "step": engine.step,
                "device": str(runtime.device),
                "processes": runtime.world_size,
            }
        )
        run.write_json(run.meta_path, meta)
        trackers = open_trackers(cfg, run, subcommand, resumed=True)
        return _fit(engine, reporter, run, trackers), True
    except BaseException:
        run.unlock()
        raise


def _same_threads(meta: dict[str, Any], reporter: Reporter) -> None:
    """Train on with the torch thread count the run started with (meta.json's "threads"):
    a CPU sum's last bits depend on how it is split among threads, so a resumed run ends
    exactly as an uninterrupted one only at the same count. A sweep resumes its runs with
    more threads when fewer of them are left than --jobs, and a shell may set none."""
    threads = meta.get("threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        reporter.message(
            f"using {threads} torch thread(s), as when the run started "
            f"(not {torch.get_num_threads()}): the resumed run then ends exactly as an "
            "uninterrupted one"
        )
        torch.set_num_threads(threads)


def _fit(
    engine: Engine, reporter: Reporter, run: RunDir | None, trackers: Sequence[Tracker] = ()
) -> dict[str, Any]:
    try:
        summary = engine.fit(trackers)
    finally:
        if run is not None:
            run.unlock()
    reporter.summary_table(summary, str(run.path) if run else None)
    return summary
