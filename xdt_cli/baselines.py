"""Single-task baselines of a multitask run (`xdt multitask CONFIG --single-task-baselines`).

A composite run, one floor above the core: `start_with_baselines` trains (or reuses) each
task's baseline through the core API (`api.run_config`, `api.resume_run`), then trains the
multitask run with their record (`api.run_config(..., single_task=...)`), which the regime
builds into the run: single_task.json, and summary.json's `single_task` and `delta_m`.
Nothing in the core imports this module.

Each task is trained alone with the same budget: the run's config with `data.tasks` reduced
to that task (its static weight dropped), `method.name: static`, hard parameter sharing (one
encoder and the task's own head: the plain single-task network), and the same backbone, init, optim,
schedule, train, selection rule, seed and split seed. A baseline lives in
`<baselines dir>/<task>-seed<S>-<hash>`, the hash being that of its resolved config, so it
is trained once per (task data, settings, seed) and reused by every multitask run that
needs it: static, equal, pcgrad, ... on one data set share their baselines. An interrupted
baseline is resumed; one that another process is training is waited for.

Delta_m, the multitask performance change against the baselines (Maninis et al. 2019), is
`evaluation.delta_m`, re-exported here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any

from xdt_cli.api import prepare_run, resume_run, run_config
from xdt_cli.config import ExperimentConfig, flatten
from xdt_cli.errors import XdtError
from xdt_cli.evaluation import delta_m
from xdt_cli.progress import Reporter
from xdt_cli.resolve import validate_config
from xdt_cli.runs import RunDir

__all__ = [
    "baseline_config",
    "baseline_name",
    "delta_m",
    "run_baselines",
    "start_with_baselines",
    "test_metric",
]


def start_with_baselines(
    config: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    baselines_dir: str | Path | None = None,
    name: str | None = None,
    runs_dir: str | Path | None = None,
    device: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """`xdt multitask CONFIG --single-task-baselines`: first train (or reuse, from
    `baselines_dir`, default `<runs-dir>/single_task`) each task alone, then the multitask
    run; its summary.json holds the baselines and Delta_m. The other arguments are
    `api.start_run`'s; returns the multitask run's summary."""
    reporter = reporter or Reporter()
    cfg, runs_root = prepare_run(
        "multitask", config, overrides, runs_dir=runs_dir, device=device, seed=seed
    )
    folder = Path(baselines_dir) if baselines_dir else runs_root / "single_task"
    record = run_baselines(cfg, folder, reporter=reporter)
    return run_config(
        "multitask",
        cfg,
        runs_root,
        name=name,
        overwrite=overwrite,
        reporter=reporter,
        argv=argv,
        single_task=record,
    )


def baseline_config(cfg: ExperimentConfig, task: str) -> ExperimentConfig:
    """The config of `task`'s baseline: the multitask config reduced to that task alone."""
    data = cfg.model_dump(mode="json")
    section = dict(data["data"]["tasks"][task])
    section.pop("weight", None)
    data["data"]["tasks"] = {task: section}
    data["method"] = {"name": "static"}
    heads = {task: data["model"]["heads"][task]} if task in data["model"]["heads"] else {}
    data["model"] = {**data["model"], "arch": None, "experts": None, "heads": heads}
    data["selection"] = {"rule": data["selection"]["rule"]}
    data["name"] = f"single_task_{task}"
    return validate_config(data, source=f"single-task baseline of {task}", subcommand="multitask")


def baseline_name(cfg: ExperimentConfig, task: str) -> str:
    """`<task>-seed<S>-<hash>`: the hash of every setting that is not empty (None, {}, []),
    so a key added to the schema later, empty by default, keeps old baselines found. (Since
    config.yaml records the resolved defaults, 2026-11-30, baselines trained before are not
    found under their old names: they train again beside them.)"""
    flat = flatten(cfg.model_dump(mode="json", exclude={"name"}))
    kept = {k: v for k, v in flat.items() if v not in (None, [])}  # {} has no entries
    text = json.dumps(kept, sort_keys=True)
    return f"{task}-seed{cfg.seed}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def test_metric(cfg: ExperimentConfig, task: str) -> tuple[str, bool]:
    """(the task's test metric, whether lower is better)."""
    if cfg.data.tasks[task].loss == "mse":
        return f"{task}/test/mse", True
    return f"{task}/test/acc", False


def run_baselines(cfg: ExperimentConfig, folder: Path, *, reporter: Reporter) -> dict[str, Any]:
    """Train or reuse each task's baseline; returns {task: {run_dir, metric, value, ...}}."""
    record: dict[str, Any] = {}
    for i, task in enumerate(cfg.data.tasks):
        single = baseline_config(cfg, task)
        path = folder / baseline_name(single, task)
        reporter.message(f"single-task baseline {i + 1}/{len(cfg.data.tasks)}: {task} ({path})")
        summary = _train_or_reuse(single, path, reporter)
        metric, lower = test_metric(cfg, task)
        value = (summary.get("best") or {}).get(metric)
        if summary.get("status") != "completed" or value is None:
            raise XdtError(f"{path}: the baseline of task {task} did not complete")
        record[task] = {
            "run_dir": str(path),
            "metric": metric,
            "lower_is_better": lower,
            "value": value,
            "best_step": summary.get("best_step"),
        }
    return record


def _train_or_reuse(cfg: ExperimentConfig, path: Path, reporter: Reporter) -> dict[str, Any]:
    quiet = Reporter(quiet=True)
    for _ in range(3):  # a race with another process is settled within two rounds
        summary_path = path / "summary.json"
        if summary_path.is_file():
            summary = RunDir(path).read_json(summary_path)
            if summary.get("status") == "completed":
                reporter.message(f"  reused: {summary.get('best_step')} steps chosen")
                return summary
        if (path / "config.yaml").is_file():
            _wait_while_locked(path)
            if (path / "summary.json").is_file():
                continue
            summary, _ = resume_run(path, reporter=quiet)
            return summary
        try:
            return run_config(
                "multitask",
                cfg,
                path.parent,
                name=path.name,
                overwrite=False,
                reporter=quiet,
                argv=["xdt", "multitask", "--single-task-baselines"],
            )
        except XdtError:
            if not path.exists():
                raise
            _wait_while_locked(path)  # another process claimed the folder first
    raise XdtError(f"{path}: could not train or reuse this single-task baseline")


def _wait_while_locked(path: Path) -> None:
    lock = path / ".lock"
    if not lock.exists():
        return
    with open(lock, "a") as fh:  # blocks while another process trains the baseline
        fcntl.flock(fh, fcntl.LOCK_EX)
        fcntl.flock(fh, fcntl.LOCK_UN)
