"""Single-task baselines and the multitask performance change Delta_m
(`xdt multitask CONFIG --single-task-baselines`).

Each task is trained alone with the same budget: the run's config with `data.tasks` reduced
to that task (its static weight dropped), `method.name: static`, hard parameter sharing (one
encoder and the task's own head: the plain single-task network), and the same backbone, init, optim,
schedule, train, selection rule, seed and split seed. A baseline lives in
`<baselines dir>/<task>-seed<S>-<hash>`, the hash being that of its resolved config, so it
is trained once per (task data, settings, seed) and reused by every multitask run that
needs it: static, equal, pcgrad, ... on one data set share their baselines. An interrupted
baseline is resumed; one that another process is training is waited for.

Delta_m (Maninis et al. 2019, "Attentive Single-Tasking of Multiple Tasks", CVPR; the
standard measure of the multitask literature, e.g. Vandenhende et al. 2021, TPAMI):
Delta_m = 100 / T * sum_t (-1)^{l_t} (M_t - S_t) / S_t, with M_t the multitask run's and
S_t the baseline's test metric of task t (accuracy, or mse with l_t = 1: lower is better),
each read at the checkpoint its own selection rule chose. Positive is better.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any

from xdt_cli.config import ExperimentConfig, flatten, validate_config
from xdt_cli.errors import XdtError
from xdt_cli.progress import Reporter
from xdt_cli.runs import RunDir


def baseline_config(cfg: ExperimentConfig, task: str) -> ExperimentConfig:
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
    so a key added to the schema later, empty by default, keeps old baselines found."""
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
    from xdt_cli.api import resume_run, run_config

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


def delta_m(summary: dict[str, Any], baselines: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `delta_m`: per task and overall, in percent (positive is better)."""
    best = summary.get("best") or {}
    per_task: dict[str, float | None] = {}
    for task, base in baselines.items():
        value, reference = best.get(base["metric"]), base["value"]
        if value is None or not reference:
            per_task[task] = None
            continue
        sign = -1.0 if base["lower_is_better"] else 1.0
        per_task[task] = round(100.0 * sign * (value - reference) / reference, 4)
    known = [v for v in per_task.values() if v is not None]
    overall = round(sum(known) / len(known), 4) if len(known) == len(per_task) else None
    return {"per_task": per_task, "overall": overall}
