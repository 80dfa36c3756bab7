"""`xdt benchmark SUITE`: run a shipped suite of sweeps and write its tables into the docs.

A suite is `benchmarks/suites/<name>.yaml` (or any path):
```yaml
description: The quick start (LeNet on mnist5k) at seeds 0, 1, 2.
sweeps: [../../configs/sweeps/quickstart_seeds.yaml]   # relative to this file
metrics: [mnist5k/test/acc, digits/test/acc]           # default: every */test/acc
selection: summary                                     # a rule of xdt_cli.selection
```
Each sweep runs through `xdt_cli.sweeps` (so a suite run again skips what is done and
resumes what was cut), then `xdt_cli.report` turns its runs into a markdown table of mean ±
std over seeds. The tables, the command, the machine's core count and the wall times go into
docs/BENCHMARKS.md between `<!-- suite:<name>:start -->` and `<!-- suite:<name>:end -->`
(appended when the markers are not there yet); the rest of the file is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xdt_cli.config import error_lines, read_yaml
from xdt_cli.errors import ConfigError, XdtError
from xdt_cli.files import atomic_write_text

SUITES_DIR = Path("benchmarks") / "suites"
DEFAULT_DOC = Path("docs") / "BENCHMARKS.md"


class TableSpec(BaseModel):
    """A comparison table: one row per sweep, one metric, mean ± std over the sweep's runs.

    With `baseline` and `ceiling` (sweep names), each row also shows its difference to the
    baseline in points and the fraction of the baseline-to-ceiling gap it closes, e.g.
    source-only training (baseline) and training on the target's own labels (ceiling).
    """

    model_config = ConfigDict(extra="forbid")
    title: str
    kind: Literal["comparison", "held_out_domains", "tasks", "search"] = Field(
        "comparison",
        description="held_out_domains: a DomainBed-style table, one column per held-out "
        "domain (each run's data.test_domains[0]) plus their average; tasks: multitask runs, "
        "one column per task (`<task>/<metric>/acc`, or `mse` for a regression task) plus "
        "Delta_m% against the single-task baselines (runs with --single-task-baselines); "
        "search: the rows' sweeps are hyper-parameter searches (a sweep's `search:`) and the "
        "table is `xdt report --choose-by <selection>` over them (choose.py): one row per "
        "method, one column per held-out domain or source -> target pair, plus the average",
    )
    metric: str | None = Field(
        None,
        description="e.g. mnist5k/test/acc; for held_out_domains the part after the domain, "
        "e.g. test/acc; a search table reads each column's own test metric",
    )
    rows: list[str] = Field(min_length=1, description="sweep names, in table order")
    baseline: str | None = None
    ceiling: str | None = None
    selection: str | None = Field(None, description="default: the suite's selection")
    note: str = ""


class SuiteFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    sweeps: list[str] = Field(min_length=1, description="sweep files, relative to the suite")
    metrics: list[str] | None = Field(None, description="default: every */test/acc metric")
    selection: str = Field("summary", description="the rule that picks each run's step")
    tables: list[TableSpec] | None = Field(
        None, description="comparison tables across sweeps instead of one table per sweep"
    )


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    sweeps: tuple[Path, ...]
    metrics: tuple[str, ...] | None
    selection: str
    tables: tuple[TableSpec, ...] = ()


def find_suite(name_or_path: str) -> Path:
    """A suite file path as given, else `benchmarks/suites/<name>.yaml` here."""
    given = Path(name_or_path)
    if given.suffix in (".yaml", ".yml") or given.is_file():
        if not given.is_file():
            raise XdtError(f"SUITE: {given} not found")
        return given
    path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []
        raise XdtError(
            f"SUITE: no suite '{name_or_path}' in {SUITES_DIR}/"
            + (f" (known: {', '.join(known)})" if known else " (run xdt from the repository root)")
        )
    return path


def load_suite(path: Path) -> Suite:
    try:
        spec = SuiteFile.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(*(f"{path}: {line}" for line in error_lines(exc, SuiteFile))) from None
    sweeps = tuple((path.parent / s) for s in spec.sweeps)
    missing = [str(s) for s in sweeps if not s.is_file()]
    if missing:
        raise ConfigError(f"{path}: sweeps: not found: {', '.join(missing)}")
    from xdt_cli.selection import get_rule

    get_rule(spec.selection)  # an unknown rule fails here, before anything runs
    from xdt_cli.sweeps import load_sweep

    # the names the tables use are the sweeps' own (their folders), as the records are keyed
    names = {load_sweep(s).name for s in sweeps}
    for i, table in enumerate(spec.tables or []):
        if table.selection:
            get_rule(table.selection)
        if table.metric is None and table.kind != "search":
            raise ConfigError(f"{path}: tables.{i}.metric: a {table.kind} table needs a metric")
        for name in [*table.rows, table.baseline, table.ceiling]:
            if name is not None and name not in names:
                raise ConfigError(f"{path}: tables.{i}: '{name}' is not one of the suite's sweeps")
    return Suite(
        name=path.stem,
        path=path,
        description=spec.description,
        sweeps=sweeps,
        metrics=tuple(spec.metrics) if spec.metrics else None,
        selection=spec.selection,
        tables=tuple(spec.tables or ()),
    )


def run_benchmark(
    suite: Suite,
    *,
    jobs: int = 1,
    runs_dir: Path | None = None,
    doc: Path = DEFAULT_DOC,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run every sweep of the suite, then write its section of `doc`. Returns a summary."""
    from xdt_cli.report import collect_runs, render, summarize
    from xdt_cli.sweeps import SweepReporter, load_sweep, plan, run_sweep

    sweeps = [load_sweep(path) for path in suite.sweeps]
    for sweep in sweeps:  # a launcher: the suite would run here anyway: say so, do not ignore it
        if sweep.launcher is not None and sweep.launcher.name == "slurm":
            raise ConfigError(
                f"{sweep.path}: launcher.name: slurm, but xdt benchmark runs its sweeps on this "
                "machine; submit them with xdt sweep --launcher slurm"
            )
    plans = [plan(sweep, runs_dir) for sweep in sweeps]  # validates every run up front
    started = time.perf_counter()
    results = []
    for p in plans:
        result = run_sweep(p, jobs=jobs, reporter=SweepReporter(quiet=quiet))
        results.append(result)
        # a search's draw may fail (a learning rate that diverges): it is left out of the
        # choice and counted in the table's note (DomainBed trains on through the NaNs)
        searching = p.sweep.search is not None and result["status"] == "failed"
        if result["status"] != "completed" and not searching:
            raise _SuiteIncomplete(p.sweep.name, result["status"])
    elapsed = time.perf_counter() - started

    tables = []
    train_time = 0.0
    records_of = {}
    for p in plans:
        # the sweep's planned runs only: a folder left by an earlier, larger grid is not one
        planned = {run.run_dir.resolve() for run in p.runs}
        records = [r for r in collect_runs([p.sweep_dir]) if r.path.resolve() in planned]
        records_of[p.sweep.name] = records
        if not suite.tables:
            groups = summarize(records, metrics=suite.metrics, selection=suite.selection)
            tables.append(
                (f"Sweep `{p.sweep.name}`", render(groups, "markdown", selection=suite.selection))
            )
        train_time += sum(float((r.summary or {}).get("wall_time_s", 0.0)) for r in records)
    for spec in suite.tables:
        make = {
            "comparison": comparison_table,
            "held_out_domains": held_out_table,
            "tasks": tasks_table,
            "search": search_table,
        }[spec.kind]
        tables.append((spec.title, make(spec, records_of, suite.selection)))
    section = _section(suite, jobs, tables, elapsed, train_time)
    write_section(doc, suite.name, section)
    return {
        "suite": suite.name,
        "doc": str(doc),
        "wall_time_s": round(elapsed, 1),
        "runs_train_time_s": round(train_time, 1),
        "sweeps": results,
    }


class _SuiteIncomplete(XdtError):
    def __init__(self, sweep: str, status: str) -> None:
        super().__init__(
            f"sweep '{sweep}' ended {status}; the docs were not changed "
            "(run xdt benchmark again to continue it)"
        )


def _section(
    suite: Suite, jobs: int, tables: list[tuple[str, str]], elapsed: float, train_time: float
) -> str:
    import torch

    lines = [f"## Suite `{suite.name}`", ""]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += [
        "```",
        f"xdt benchmark {suite.name} --jobs {jobs}",
        "```",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; "
        f"written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        f"Wall time of this call: {elapsed:.1f} s; the runs' own training time adds up to "
        f"{train_time:.1f} s (runs completed by an earlier call are reused, not rerun).",
        "",
    ]
    for title, table in tables:
        lines += [f"### {title}", "", table.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_section(doc: Path, name: str, section: str) -> None:
    """Replace the text between the suite's markers in `doc` (append the block if absent)."""
    start, end = f"<!-- suite:{name}:start -->", f"<!-- suite:{name}:end -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text.split(start, 1)[1]:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(doc, text)


def comparison_table(spec: TableSpec, records_of: dict[str, list], selection: str) -> str:
    """The markdown table of one `TableSpec` (see its docstring)."""
    rule = spec.selection or selection
    stats = {name: _sweep_stats(records_of[name], spec.metric, rule) for name in records_of}
    base = stats[spec.baseline]["mean"] if spec.baseline else None
    ceiling = stats[spec.ceiling]["mean"] if spec.ceiling else None
    header = ["run", "n", f"{spec.metric} (mean ± std)"]
    if base is not None:
        header.append(f"vs {spec.baseline} (points)")
    if base is not None and ceiling is not None:
        header.append("gap closed")
    header.append("wall time per run (s)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in spec.rows:
        st = stats[name]
        cells = [f"`{name}`", str(st["n"])]
        mean = st["mean"]
        cells.append("n/a" if mean is None else f"{mean:.4f} ± {st['std']:.4f}")
        if base is not None:
            cells.append("n/a" if mean is None else f"{100 * (mean - base):+.1f}")
        if base is not None and ceiling is not None:
            gap = ceiling - base
            cells.append("n/a" if mean is None or gap <= 0 else f"{100 * (mean - base) / gap:.0f}%")
        cells.append(f"{st['wall']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Selection: `{rule}`." + (f" {spec.note.strip()}" if spec.note else "")]
    return "\n".join(lines) + "\n"


def _sweep_stats(records: list, metric: str, rule: str) -> dict[str, Any]:
    runs = [r for r in records if r.completed]
    values = []
    for r in runs:
        row = r.choose(rule) or {}
        value = row.get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            values.append(float(value))
    walls = [float((r.summary or {}).get("wall_time_s", 0.0)) for r in runs]
    return {
        "n": len(values),
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "wall": statistics.mean(walls) if walls else 0.0,
    }


def held_out_table(spec: TableSpec, records_of: dict[str, list], selection: str) -> str:
    """Rows: sweeps; columns: the held-out domains and their average, each mean ± std over
    seeds of `<domain>/<metric>` at the step the rule chose. The average is taken per seed
    over the domains, then over seeds (as DomainBed averages over trials)."""
    rule = spec.selection or selection
    domains: list[str] = []
    cells: dict[str, dict[str, dict[int, float]]] = {}  # sweep -> domain -> seed -> value
    for name in spec.rows:
        for r in (r for r in records_of[name] if r.completed):
            held = (r.config.get("data") or {}).get("test_domains") or []
            if not held:
                continue
            domain, seed = held[0], int(r.config.get("seed", 0))
            value = (r.choose(rule) or {}).get(f"{domain}/{spec.metric}")
            if isinstance(value, int | float) and math.isfinite(value):
                cells.setdefault(name, {}).setdefault(domain, {})[seed] = float(value)
                if domain not in domains:
                    domains.append(domain)
    domains = _in_data_set_order(domains, records_of[spec.rows[0]])
    header = ["run", *domains, "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in spec.rows:
        row = cells.get(name, {})
        out = [f"`{name}`"]
        for domain in domains:
            values = list(row.get(domain, {}).values())
            out.append(_pm(values))
        seeds = set.intersection(*(set(row.get(d, {})) for d in domains)) if domains else set()
        per_seed = [statistics.mean(row[d][s] for d in domains) for s in sorted(seeds)]
        out.append(_pm(per_seed))
        lines.append("| " + " | ".join(out) + " |")
    note = f"Metric `<domain>/{spec.metric}`, selection: `{rule}`."
    lines += ["", note + (f" {spec.note.strip()}" if spec.note else "")]
    return "\n".join(lines) + "\n"


def tasks_table(spec: TableSpec, records_of: dict[str, list], selection: str) -> str:
    """Rows: multitask sweeps, then the single-task baselines their runs were compared with;
    columns: each task's `<task>/<split>/acc` (`mse` for a regression task) and Delta_m%,
    mean ± std over seeds, at the checkpoint each run chose (its summary: Delta_m is
    computed there, on the same checkpoint). `spec.metric` is the split, e.g. `test`."""
    runs = {name: [r for r in records_of[name] if r.completed] for name in spec.rows}
    kinds: dict[str, str] = {}
    for r in (r for name in spec.rows for r in runs[name]):
        for task, section in ((r.config.get("data") or {}).get("tasks") or {}).items():
            kinds.setdefault(task, (section or {}).get("loss", "ce"))
    columns = {t: f"{t}/{spec.metric}/{'mse' if k == 'mse' else 'acc'}" for t, k in kinds.items()}
    header = ["run", "n", *(f"`{c}`" for c in columns.values()), "Delta_m %", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baselines: dict[str, dict[str, float]] = {}  # task -> baseline run -> value
    for name in spec.rows:
        cells = [f"`{name}`", str(len(runs[name]))]
        for task, metric in columns.items():
            values = [(r.summary or {}).get("best", {}).get(metric) for r in runs[name]]
            cells.append(_fmt_metric([v for v in values if v is not None], kinds[task]))
        deltas = []
        for r in runs[name]:
            summary = r.summary or {}
            overall = (summary.get("delta_m") or {}).get("overall")
            if overall is not None:
                deltas.append(float(overall))
            for task, base in (summary.get("single_task") or {}).items():
                baselines.setdefault(task, {})[base["run_dir"]] = float(base["value"])
        cells.append(_pm(deltas, scale=1.0, digits=2) if deltas else "n/a")
        walls = [float((r.summary or {}).get("wall_time_s", 0.0)) for r in runs[name]]
        cells.append(f"{statistics.mean(walls):.1f}" if walls else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if baselines:
        cells = ["single-task baselines", str(max(len(v) for v in baselines.values()))]
        for task in columns:
            cells.append(_fmt_metric(list(baselines.get(task, {}).values()), kinds[task]))
        lines.append("| " + " | ".join([*cells, "0 (reference)", ""]) + " |")
    note = (
        "Accuracy in %, mse as is; mean ± std over seeds at each run's own chosen checkpoint. "
        "Delta_m = 100/T sum_t ± (M_t - S_t)/S_t against the single-task baselines "
        "(sign flipped for mse); positive is better."
    )
    lines += ["", note + (f" {spec.note.strip()}" if spec.note else "")]
    return "\n".join(lines) + "\n"


def search_table(spec: TableSpec, records_of: dict[str, list], selection: str) -> str:
    """`xdt report --choose-by RULE` over the rows' sweeps (choose.py), in %: within each trial
    seed the draw whose RULE validation is best, its test accuracy, mean ± std over trials;
    rows in the order of `spec.rows` (the sweep holding each row's runs)."""
    from xdt_cli.choose import choose

    rule = spec.selection or selection
    records = [r for name in spec.rows for r in records_of[name]]
    rows = choose(records, rule)
    place = {name: i for i, name in enumerate(spec.rows)}

    def sweep_of(row: dict[str, Any]) -> str:
        trials = [t for col in row["columns"].values() for t in col["trials"]]
        return Path(trials[0]["run"]).parent.name if trials else ""

    rows.sort(key=lambda row: place.get(sweep_of(row), len(place)))
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row["columns"] if c not in columns]
    header = ["method", *columns, "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    draws, trials = set(), set()
    for row in rows:
        # a table holds one data set's rows (its columns are its domains): name the rest
        shown = [str(v) for k, v in row["row"].items() if k != "data.dataset"]
        label = ", ".join(shown) or sweep_of(row)
        cells = [f"`{label}`"]
        for column in columns:
            entry = row["columns"].get(column)
            cells.append(_pm_stats(entry))
            for t in (entry or {}).get("trials", []):
                draws.add(t["draws"])
                trials.add(json.dumps(t["trial"], sort_keys=True))
        cells.append(_pm_stats(row["avg"]))
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(r.status == "failed" for r in records)
    counts = "-".join(str(d) for d in sorted({min(draws), max(draws)})) if draws else "0"
    note = (
        f"Selection: `{rule}` among {counts} completed draws per trial, {len(trials)} trials; "
        "test accuracy (%) of the chosen draw, mean ± std over trials (avg: per trial over "
        "the columns, then over trials)."
    )
    if failed:
        note += f" {failed} run(s) failed (a diverging draw) and were left out of the choice."
    lines += ["", note + (f" {spec.note.strip()}" if spec.note else "")]
    return "\n".join(lines) + "\n"


def _pm_stats(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{100 * entry['mean']:.1f} ± {100 * (entry.get('std') or 0.0):.1f}"


def _fmt_metric(values: list[float], kind: str) -> str:
    if kind == "mse":
        return _pm(values, scale=1.0, digits=3)
    return _pm(values)


def _in_data_set_order(domains: list[str], records: list) -> list[str]:
    """The domains in their data set's own order (rot0, rot15, ...) when it is registered."""
    from xdt_cli.data import DATASETS

    dataset = next(((r.config.get("data") or {}).get("dataset") for r in records), None)
    spec = DATASETS.get(dataset) if isinstance(dataset, str) else None
    if spec is None:
        return domains
    order = {d: i for i, d in enumerate(spec.domains)}
    return sorted(domains, key=lambda d: order.get(d, len(order)))


def _pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"
