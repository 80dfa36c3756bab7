"""Leave-one-out: `xdt generalize CONFIG --leave-one-out`, one child run per held-out domain.

A composite run, one floor above the core: it plans the children, starts or resumes each
through the core API (`api.start_run`, `api.resume_run`), and writes the parent's summary
and DomainBed-style table from the children's files. Nothing in the core imports it.

Parent folder: `<run>/leave_one_out.json` (the plan: config, overrides, seed, device, rule,
folds), `<run>/<child>/` (one ordinary generalize run per fold), `<run>/summary.json` and
`<run>/table.md`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from xdt_cli.api import resume_run, start_run
from xdt_cli.config import apply_overrides, read_with_bases, read_yaml
from xdt_cli.data.registry import get_spec
from xdt_cli.errors import ConfigError, XdtError
from xdt_cli.progress import Reporter
from xdt_cli.resolve import load_config
from xdt_cli.runs import RunDir, check_run_name, create_run_dir, default_runs_dir, read_metrics
from xdt_cli.selection import LODO, leave_one_domain_out_choice, select

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
    folds, rule = _folds(Path(config), overrides)
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
    parent = _parent_dir(runs_root, configs[0].name or "generalize", name, overwrite, plan)
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


def _folds(path: Path, overrides: list[str]) -> tuple[list[tuple[str, ...]], str]:
    """The held-out domain(s) of each child, and the selection rule."""
    merged = apply_overrides(read_with_bases(path), overrides)
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


def _parent_dir(
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
