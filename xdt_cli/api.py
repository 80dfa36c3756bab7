"""The importable core behind the CLI: start a run, resume a run.

`cli.py` only parses arguments and turns exceptions into exit codes; everything a run does
is here, so scripts and notebooks can call `start_run` and `resume_run` directly.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xdt_cli.config import (
    ExperimentConfig,
    _read_with_bases,
    apply_overrides,
    dump_config,
    load_config,
)
from xdt_cli.engine import Engine
from xdt_cli.errors import CheckpointError, ConfigError, XdtError
from xdt_cli.files import atomic_write_text
from xdt_cli.progress import Reporter
from xdt_cli.regimes import build_experiment
from xdt_cli.runs import RunDir, check_run_name, create_run_dir, default_runs_dir, make_meta
from xdt_cli.runtime import Runtime, resolve_precision
from xdt_cli.selection import LODO, leave_one_domain_out_choice, select


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
    single_task_baselines: bool = False,
    baselines_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Validate the config, build the experiment, claim a run folder and train.

    `single_task_baselines` (multitask): first train (or reuse, from `baselines_dir`,
    default `<runs-dir>/single_task`) each task alone; summary.json then holds Delta_m.

    Returns the summary (also in `<run>/summary.json`). Raises XdtError for bad input and
    RunInterrupted when stopped by a signal (after saving last.pt).
    """
    reporter = reporter or Reporter()
    cfg = load_config(
        config, overrides, subcommand=subcommand, flags={"seed": seed, "device": device}
    )
    runs_root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    _resolve_from_run(cfg, runs_root)
    extra: dict[str, Any] = {}
    if single_task_baselines:
        from xdt_cli.baselines import run_baselines

        if subcommand != "multitask":
            raise XdtError("--single-task-baselines: only multitask runs have tasks")
        folder = Path(baselines_dir) if baselines_dir else runs_root / "single_task"
        extra["single_task"] = run_baselines(cfg, folder, reporter=reporter)
    elif baselines_dir is not None:
        raise XdtError("--baselines-dir: only used with --single-task-baselines")
    return run_config(
        subcommand,
        cfg,
        runs_root,
        name=name,
        overwrite=overwrite,
        reporter=reporter,
        argv=argv,
        summary_extra=extra,
    )


def run_config(
    subcommand: str,
    cfg: ExperimentConfig,
    runs_root: Path,
    *,
    name: str | None,
    overwrite: bool,
    reporter: Reporter,
    argv: list[str] | None,
    summary_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a validated config in a new run folder (the second half of `start_run`).

    `summary_extra` (multitask: the single-task baselines) is handed to the experiment,
    which adds it and the Delta_m that it implies to summary.json."""
    runtime = Runtime.from_env(cfg.device)
    experiment = build_experiment(subcommand, cfg, runtime)
    if summary_extra:
        experiment.run_files.update({SINGLE_TASK_FILE: summary_extra["single_task"]})
        _attach_baselines(experiment, summary_extra["single_task"])
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
    return _fit(engine, reporter, run)


SINGLE_TASK_FILE = "single_task.json"  # the baselines of a multitask run, for resume


def _attach_baselines(experiment, baselines: dict[str, Any]) -> None:
    """summary.json gets the baselines and the Delta_m that the run's best metrics imply."""
    from xdt_cli.baselines import delta_m

    experiment.summary_extra["single_task"] = baselines
    experiment.finish_summary = lambda summary: {"delta_m": delta_m(summary, baselines)}


def _resolve_from_run(cfg, runs_root: Path) -> None:
    """`init.from_run` may name a run inside the runs folder (`digits-src`, or
    `../other_sweep/seed0-1a2b3c4d` from a sweep's folder) when no such path exists here.
    The resolved absolute path is what config.yaml records."""
    given = cfg.init.from_run
    if given and not Path(given).expanduser().is_absolute() and not Path(given).exists():
        candidate = runs_root / given
        if candidate.exists():
            cfg.init.from_run = str(candidate.resolve())


def resume_run(
    run_dir: str | Path, *, reporter: Reporter | None = None, argv: list[str] | None = None
) -> tuple[dict[str, Any], bool]:
    """Continue an interrupted run from its last.pt; returns (summary, trained)."""
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
    runtime = Runtime.from_env(cfg.device)
    if runtime.is_main:  # torchrun: rank 0 alone writes the folder; every rank reads last.pt
        run.lock()
    resuming = run.last_ckpt.exists()
    experiment = build_experiment(subcommand, cfg, runtime, resuming=resuming)
    if (run.path / SINGLE_TASK_FILE).is_file():
        _attach_baselines(experiment, run.read_json(run.path / SINGLE_TASK_FILE))
    engine = Engine(cfg, experiment, runtime, run=run, reporter=reporter)
    if resuming:
        engine.resume_from(run.last_ckpt)
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
    return _fit(engine, reporter, run), True


def _fit(engine: Engine, reporter: Reporter, run: RunDir | None) -> dict[str, Any]:
    try:
        summary = engine.fit()
    finally:
        if run is not None:
            run.unlock()
    reporter.summary_table(summary, str(run.path) if run else None)
    return summary


# --------------------------------------------------------------------------- leave-one-out
LOO_PLAN = "leave_one_out.json"
# rules recomputed for the parent's table besides the run's own (selection.py)
TABLE_RULES = ("training_domain_val", "oracle", "last")
# the rule the children of a leave_one_domain_out parent train under (their best.pt)
LODO_CHILD_RULE = "training_domain_val"


def start_leave_one_out(
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
    """`xdt generalize CONFIG --leave-one-out`: one child run per domain, holding it out.

    Children are `<run>/<domain>/`, D of them. Under `selection.rule: leave_one_domain_out`
    (DomainBed's leave-one-domain-out cross-validation, Gulrajani & Lopez-Paz 2021) there are
    also the children `<run>/<t>-<v>/` holding out [t, v] for every ordered pair of domains,
    D + D(D-1) runs in all; every child then trains under training_domain_val (its own
    best.pt), and the parent chooses, for each test domain t, the step of child [t] at which
    the mean over v of `v/test/acc` in child [t, v] is best (selection.py). The parent's
    summary.json holds `<domain>/test/acc` per held-out domain (from child [t]) and
    `avg/test/acc` under the run's rule, `best_steps` the steps chosen, and `tables` the
    DomainBed-style table under the other rules (computed on the [t] children only, as
    DomainBed does); table.md has it in markdown. Calling it again with the same `--name`
    skips finished children and resumes interrupted ones.
    """
    reporter = reporter or Reporter()
    overrides = list(overrides)
    flags = {"seed": seed, "device": device}
    folds, rule = _leave_one_out_folds(Path(config), overrides)
    child_overrides = [*overrides]
    if rule == LODO:  # a single run cannot use it: the children select on the training domains
        child_overrides.append(f"selection.rule={LODO_CHILD_RULE}")
    configs = [
        load_config(
            config, [*child_overrides, _held_out(fold)], subcommand="generalize", flags=flags
        )
        for fold in folds
    ]
    runs_root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    plan = {
        "config": str(Path(config).resolve()),
        "overrides": overrides,
        "seed": seed,
        "device": device,
        "rule": rule,
        "folds": [list(f) for f in folds],
    }
    parent = _leave_one_out_dir(runs_root, configs[0].name or "generalize", name, overwrite, plan)
    started = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    for i, fold in enumerate(folds):
        child = "-".join(fold)
        reporter.message(f"leave-one-out {i + 1}/{len(folds)}: holding out {', '.join(fold)}")
        summaries[child] = _run_child(
            config, [*child_overrides, _held_out(fold)], parent, child, flags, reporter, argv
        )
    summary = leave_one_out_summary(parent, folds, rule, summaries)
    summary["wall_time_s"] = round(time.perf_counter() - started, 3)
    RunDir(parent).write_json(parent / "summary.json", summary)
    (parent / "table.md").write_text(summary["table"], encoding="utf-8")
    reporter.message(summary["table"])
    return summary


def _held_out(fold: tuple[str, ...]) -> str:
    return f"data.test_domains=[{', '.join(fold)}]"


def _leave_one_out_folds(path: Path, overrides: list[str]) -> tuple[list[tuple[str, ...]], str]:
    """The held-out domain(s) of each child, and the selection rule."""
    from xdt_cli.data.registry import get_spec

    merged = apply_overrides(_read_with_bases(path), overrides)
    data = merged.get("data") if isinstance(merged.get("data"), dict) else {}
    if data.get("test_domains"):
        raise ConfigError(
            "data.test_domains: --leave-one-out holds out every domain in turn; leave it out"
        )
    dataset = data.get("dataset")
    if not isinstance(dataset, str):
        raise ConfigError("data.dataset: required by generalize (e.g. rotated_mnist5k)")
    domains = data.get("domains") or list(get_spec(dataset, "data.dataset").domains)
    if not isinstance(domains, list) or len(domains) < 2:
        raise ConfigError("data.domains: --leave-one-out needs two domains or more")
    selection = merged.get("selection") if isinstance(merged.get("selection"), dict) else {}
    rule = str(selection.get("rule") or "training_domain_val")
    if rule == LODO:
        if len(domains) < 3:
            raise ConfigError(
                "selection.rule: leave_one_domain_out needs three domains or more "
                "(a test domain, a validation domain and one to train on)"
            )
        # per test domain t: [t], then [t, v] for every other v (D + D(D-1) children)
        return [
            fold
            for t in domains
            for fold in [(str(t),), *((str(t), str(v)) for v in domains if v != t)]
        ], rule
    return [(str(t),) for t in domains], rule


def _leave_one_out_dir(
    runs_root: Path, config_name: str, name: str | None, overwrite: bool, plan: dict[str, Any]
) -> Path:
    """The parent folder: new, or (same --name, same plan) the one to continue."""
    if name is not None:
        path = runs_root / check_run_name(name)
        plan_path = path / LOO_PLAN
        if path.exists() and plan_path.is_file():
            if overwrite:
                shutil.rmtree(path)
            else:
                previous = json.loads(plan_path.read_text(encoding="utf-8"))
                if previous != plan:
                    raise XdtError(
                        f"--name: {path} holds a leave-one-out run of another config, overrides "
                        "or seed; use another --name, or --overwrite to replace it"
                    )
                return path
    path = create_run_dir(runs_root, "generalize", config_name, name, overwrite)
    RunDir(path).write_json(path / LOO_PLAN, plan)
    return path


def _run_child(
    config: str | Path,
    overrides: list[str],
    parent: Path,
    child: str,
    flags: dict[str, Any],
    reporter: Reporter,
    argv: list[str] | None,
) -> dict[str, Any]:
    run = RunDir(parent / child)
    if run.summary_path.is_file():
        summary = run.read_json(run.summary_path)
        if summary.get("status") in ("completed", "failed"):
            reporter.message(f"{run.path}: already {summary['status']}; skipped")
            return summary
    if run.config_path.is_file() and run.meta_path.is_file():
        return resume_run(run.path, reporter=reporter, argv=argv)[0]
    if run.path.exists():  # claimed but never started (stopped before config.yaml)
        shutil.rmtree(run.path)
    return start_run(
        "generalize",
        config,
        overrides,
        name=child,
        runs_dir=parent,
        device=flags["device"],
        seed=flags["seed"],
        reporter=reporter,
        argv=argv,
    )


def leave_one_out_summary(
    parent: Path, folds: list[tuple[str, ...]], rule: str, summaries: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The parent's summary: per test domain t the test accuracy `t/test/acc` of child [t] at
    the step each rule picks (leave_one_domain_out: DomainBed's choice over the children
    [t, v]; selection.leave_one_domain_out_choice), and their mean."""
    from xdt_cli.config import read_yaml
    from xdt_cli.runs import read_metrics

    domains = list(dict.fromkeys(fold[0] for fold in folds))
    pairs = any(len(fold) == 2 for fold in folds)
    rules = [rule, *(r for r in TABLE_RULES if r != rule)]
    rows_of: dict[str, list[dict[str, Any]] | None] = {}

    def rows(child: str) -> list[dict[str, Any]] | None:
        """The eval rows of a completed child (None: it did not complete)."""
        if child not in rows_of:
            done = summaries.get(child, {}).get("status") == "completed"
            path = parent / child / "metrics.jsonl"
            rows_of[child] = (
                [x for x in read_metrics(path) if x["split"] == "eval"] if done else None
            )
        return rows_of[child]

    def chosen(r: str, t: str) -> dict[str, Any] | None:
        test_rows = rows(t)
        if test_rows is None:
            return None
        if r == LODO:
            val = {v: rows(f"{t}-{v}") for v in domains if v != t}
            if not pairs or any(v is None for v in val.values()):
                return None
            return leave_one_domain_out_choice(t, test_rows, val)  # type: ignore[arg-type]
        if r == rule:
            best = summaries[t].get("best") or {}
            return {"step": summaries[t].get("best_step"), **best}
        return select(r, read_yaml(parent / t / "config.yaml"), test_rows)

    tables: dict[str, dict[str, float | None]] = {}
    steps: dict[str, int | None] = {}
    for r in rules:
        per_domain: dict[str, float | None] = {}
        for t in domains:
            row = chosen(r, t) or {}
            value = row.get(f"{t}/test/acc")
            per_domain[t] = None if value is None else float(value)
            if r == rule:
                steps[t] = row.get("step")
        known = [v for v in per_domain.values() if v is not None]
        per_domain["avg"] = sum(known) / len(known) if len(known) == len(domains) else None
        tables[r] = per_domain
    own = tables[rule]
    best = {f"{t}/test/acc": own[t] for t in domains}
    best["avg/test/acc"] = own["avg"]
    final = {f"{t}/test/acc": summaries[t].get("final", {}).get(f"{t}/test/acc") for t in domains}
    complete = all(s.get("status") == "completed" for s in summaries.values())
    first = summaries.get(domains[0], {}) if domains else {}
    selection = first.get("selection", {"rule": rule})
    if rule == LODO:
        selection = {"rule": LODO, "metric": f"{LODO}/val/acc", "mode": "max"}
    return {
        "status": "completed" if complete else "failed",
        "subcommand": "generalize",
        "leave_one_out": True,
        "domains": domains,
        "selection": selection,
        "best": best,
        "best_steps": steps,
        "final": final,
        "tables": tables,
        "table": render_table(tables, domains, rule),
        "children": {child: s.get("status") for child, s in summaries.items()},
        "steps": first.get("steps"),
        "run_dir": str(parent),
    }


def render_table(tables: dict[str, dict[str, float | None]], domains: list[str], own: str) -> str:
    """DomainBed's results table: test accuracy (%) of each held-out domain and the mean,
    one row per selection rule (the run's own first)."""
    head = ["selection", *domains, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r, values in tables.items():
        label = f"{r} (the run's rule)" if r == own else r
        cells = ["-" if values[k] is None else f"{100 * values[k]:.1f}" for k in [*domains, "avg"]]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    note = (
        "test accuracy (%) of each held-out domain t (the run holding out [t] alone); oracle: "
        "its last checkpoint (DomainBed)"
    )
    return "\n".join([*lines, "", note, ""])
