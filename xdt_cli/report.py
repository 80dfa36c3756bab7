"""`xdt report`: mean ± std over seeds of finished runs, one row per configuration.

The importable API, used by the CLI and by anything that writes tables into docs:

    records = collect_runs(["runs/lr-sweep"])        # every run folder found, recursively
    groups = summarize(records, selection="source_val")
    print(render(groups, "markdown", selection=describe_selection(records, "source_val")))

A run is a folder holding config.yaml and meta.json. Only completed runs (summary.json with
`"status": "completed"`) are summarised; failed, interrupted and unfinished ones (no
summary.json) are left out, never averaged in: `incomplete_runs(records)` lists them.

Runs that differ only by `seed` (and by `name` and `device`, which do not change what is
learned) form one group; a group is shown by the config keys whose values differ between
groups, or grouped and shown by exactly the `group_by` keys when given. Per group: n, and
the mean and sample standard deviation (0.0 for one run) of each metric in the eval row
that the selection rule picks (see selection.py). A metric that a run of the group lacks,
or recorded as non-finite, has mean and std None for that group: never a mean of a subset.

`summarize` returns the JSON contract of `xdt report --format json`:
`[{"group": {key: value}, "n": int, "mean": {metric: value}, "std": {metric: value}}, ...]`.

Reading a report never imports torch: config.yaml is read by config.read_yaml, the rest is
JSON.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdt_cli.config import did_you_mean
from xdt_cli.errors import XdtError
from xdt_cli.runs import read_metrics
from xdt_cli.selection import (
    LODO,
    SUMMARY,
    Layout,
    describe,
    get_rule,
    leave_one_domain_out_choice,
    select,
)

FORMATS = ("table", "markdown", "csv", "latex", "json")
IGNORED_KEYS = frozenset({"seed", "name", "device"})  # what never separates two groups
DEFAULT_METRICS = "*/test/acc"


# --------------------------------------------------------------------------- run folders
@dataclass
class RunRecord:
    """One run folder as read from disk. `problem` says why it could not be read."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    problem: str | None = None
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        """completed | failed | interrupted | unfinished (no summary.json) | unreadable."""
        if self.problem is not None:
            return "unreadable"
        if self.summary is None:
            return "unfinished"
        return str(self.summary.get("status", "unreadable"))

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def subcommand(self) -> str | None:
        return self.meta.get("subcommand") or (self.summary or {}).get("subcommand")

    def rows(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl (up to a last line cut short by a hard kill)."""
        if self._rows is None:
            self._rows = read_metrics(self.path / "metrics.jsonl")
        return self._rows

    def eval_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows() if row.get("split") == "eval"]

    def flat_config(self) -> dict[str, Any]:
        """The config as dotted keys, plus `subcommand` (two regimes are never one group)."""
        return {"subcommand": self.subcommand, **flatten(self.config)}

    def choose(self, selection: str) -> dict[str, Any] | None:
        """The eval row that the rule `selection` picks for this run (selection.py)."""
        rows = [] if selection == SUMMARY else self.eval_rows()
        try:
            return select(selection, self.config, rows, self.summary, self.subcommand)
        except XdtError as exc:
            raise XdtError(*(f"{self.path}: {line}" for line in exc.lines)) from None


def leave_one_domain_out_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any] | None]:
    """DomainBed's leave-one-domain-out choice for each run (selection.py): a run holding out
    [t] gets its row at the step chosen on the runs that hold out [t, v] for every other
    domain v and differ from it in nothing else (seed included); runs holding out two
    domains, and runs whose [t, v] runs are not all found, get None (left out)."""

    def ident(r: RunRecord) -> tuple[str, ...]:
        flat = r.flat_config()
        skip = {"name", "device", "data.test_domains"}
        return tuple(sorted(f"{k}={hashable(v)}" for k, v in flat.items() if k not in skip))

    def held(r: RunRecord) -> tuple[str, ...]:
        return tuple((r.config.get("data") or {}).get("test_domains") or ())

    index = {(ident(r), held(r)): r for r in runs}
    out: list[dict[str, Any] | None] = []
    for r in runs:
        if len(held(r)) != 1:
            out.append(None)
            continue
        t = held(r)[0]
        others = Layout.from_config(r.config, r.eval_rows()).training
        siblings = {v: index.get((ident(r), (t, v))) for v in others}
        if not others or any(s is None for s in siblings.values()):
            out.append(None)
            continue
        val_rows = {v: s.eval_rows() for v, s in siblings.items() if s is not None}
        out.append(leave_one_domain_out_choice(t, r.eval_rows(), val_rows))
    return out


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "meta.json").is_file()


def read_run(path: Path) -> RunRecord:
    from xdt_cli.config import read_yaml  # pydantic and yaml, not torch

    record = RunRecord(Path(path))
    try:
        record.config = read_yaml(path / "config.yaml")
        record.meta = _read_json(path / "meta.json")
        if (path / "summary.json").exists():
            record.summary = _read_json(path / "summary.json")
    except XdtError as exc:
        record.problem = "; ".join(exc.lines)
    return record


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XdtError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise XdtError(f"{path}: expected a JSON object")
    return data


def find_run_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a run folder, else every run folder below it (sorted)."""
    if is_run_dir(root):
        return [root]
    found = []
    for folder, subdirs, _files in os.walk(root):
        here = Path(folder)
        if here != root and is_run_dir(here):
            found.append(here)
            subdirs[:] = []  # a run folder holds no runs
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found)


def collect_runs(paths: Iterable[str | Path] | None = None) -> list[RunRecord]:
    """Every run folder under `paths` (default: $XDT_RUNS_DIR, else ./runs), each once.

    Raises XdtError with one line per path that is missing or holds no run.
    """
    paths = list(paths or [])
    if not paths:
        from xdt_cli.runs import default_runs_dir  # imported late: runs.py imports torch

        paths = [default_runs_dir()]
    problems, records, seen = [], [], set()
    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            problems.append(f"{root}: no such folder")
            continue
        found = find_run_dirs(root)
        if not found:
            problems.append(
                f"{root}: no xdt runs found (a run folder holds config.yaml and meta.json)"
            )
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                records.append(read_run(path))
    if problems:
        raise XdtError(*problems)
    return records


def incomplete_runs(records: Iterable[RunRecord]) -> list[str]:
    """One line per run that is not reported: `PATH (status: why)`."""
    lines = []
    for r in records:
        if r.completed:
            continue
        why = r.problem or (r.summary or {}).get("error")
        if r.status == "unfinished":
            why = "no summary.json: still running, or stopped without one"
        lines.append(f"{r.path} ({r.status}{': ' + str(why) if why else ''})")
    return lines


# --------------------------------------------------------------------------- grouping
def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists and empty mappings are values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


_MISSING = "\0missing"  # a key that a config lacks differs from any value, null included


def differing_keys(flat_configs: Sequence[dict[str, Any]], ignore=frozenset()) -> list[str]:
    """The keys whose values are not the same in every config (a missing key differs)."""
    keys: dict[str, None] = {}
    for flat in flat_configs:
        keys.update(dict.fromkeys(flat))
    return [
        key
        for key in keys
        if key not in ignore
        and len({hashable(flat.get(key, _MISSING)) for flat in flat_configs}) > 1
    ]


def sort_key(values: tuple[Any, ...]) -> tuple:
    def one(v: Any) -> tuple:
        if v is None:
            return (0, 0, "")
        if isinstance(v, int | float) and not isinstance(v, bool):
            return (1, v, "")
        return (2, 0, str(v))

    return tuple(one(v) for v in values)


def summarize(
    records: Sequence[RunRecord],
    group_by: Sequence[str] | str | None = None,
    metrics: Sequence[str] | None = None,
    selection: str = "summary",
) -> list[dict[str, Any]]:
    """Group the completed runs and return mean and std per metric (the JSON contract).

    `group_by`: dotted config keys (or one comma-separated string); default: every key but
    seed, name and device. `metrics`: metric names or glob patterns; default `*/test/acc`.
    `selection`: a rule of selection.RULES; `summary` is each run's own choice.
    """
    get_rule(selection)
    runs = [r for r in records if r.completed]
    if selection == LODO:  # a property of a set of runs: only the [t] runs are reported
        picked = leave_one_domain_out_rows(runs)
        runs = [r for r, row in zip(runs, picked, strict=True) if row is not None]
        chosen = [row for row in picked if row is not None]
    else:
        chosen = [r.choose(selection) or {} for r in runs]
    if not runs:
        return []
    flats = [r.flat_config() for r in runs]
    keys_wanted = _group_keys(group_by, flats)
    names = resolve_metrics(metrics, chosen)

    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for flat, row in zip(flats, chosen, strict=True):
        if keys_wanted is None:
            ident = tuple(
                sorted(f"{k}={hashable(v)}" for k, v in flat.items() if k not in IGNORED_KEYS)
            )
        else:
            ident = tuple(hashable(flat.get(k)) for k in keys_wanted)
        group = groups.setdefault(ident, {"flat": flat, "rows": []})
        group["rows"].append(row)

    shown = keys_wanted
    if shown is None:
        shown = differing_keys([g["flat"] for g in groups.values()], ignore=IGNORED_KEYS)
    out = []
    for g in groups.values():
        entry: dict[str, Any] = {
            "group": {k: g["flat"].get(k) for k in shown},
            "n": len(g["rows"]),
            "mean": {},
            "std": {},
        }
        for name in names:
            values = [finite(row.get(name)) for row in g["rows"]]
            if any(v is None for v in values):
                entry["mean"][name] = entry["std"][name] = None
            else:
                entry["mean"][name] = statistics.mean(values)
                entry["std"][name] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    out.sort(key=lambda e: sort_key(tuple(e["group"].values())))
    return out


def finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _group_keys(group_by: Sequence[str] | str | None, flats: list[dict]) -> list[str] | None:
    if group_by is None:
        return None
    items = [group_by] if isinstance(group_by, str) else list(group_by)
    keys = [k.strip() for item in items for k in item.split(",") if k.strip()]
    if not keys:
        raise XdtError("--group-by: expected comma-separated config keys, e.g. optim.lr,seed")
    known = {k: None for flat in flats for k in flat}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise XdtError(
            *(f"--group-by: no run's config has '{k}'{did_you_mean(k, known)}" for k in unknown)
        )
    return list(dict.fromkeys(keys))


def resolve_metrics(patterns: Sequence[str] | None, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric names in `rows` matching `patterns` (names or globs), in order of appearance.

    Default: every `*/test/acc`. A pattern that matches nothing is an XdtError.
    """
    available: dict[str, None] = {}
    for row in rows:
        available.update(dict.fromkeys(k for k in row if k not in ("step", "split")))
    if not patterns:
        found = fnmatch.filter(available, DEFAULT_METRICS)
        if not found and available:
            raise XdtError(
                f"no '{DEFAULT_METRICS}' metric in the chosen evaluations; pick some with "
                f"--metric (known: {', '.join(available)})"
            )
        return found
    names: dict[str, None] = {}
    problems = []
    for pattern in patterns:
        found = fnmatch.filter(available, pattern)
        if not found:
            problems.append(
                f"--metric: no run has a metric '{pattern}'{did_you_mean(pattern, available)}"
            )
        names.update(dict.fromkeys(found))
    if problems:
        raise XdtError(*problems)
    return list(names)


def describe_selection(records: Iterable[RunRecord], selection: str) -> str:
    """How the reported eval rows were chosen, in words, e.g. `source_val (digits/val/acc, max)`."""
    runs = [r for r in records if r.completed]
    if selection == "summary":
        own = {
            f"{s.get('rule')}" + (f" on {s['metric']}" if s.get("metric") else "")
            for s in ((r.summary or {}).get("selection") or {} for r in runs)
        }
        return "each run's own rule" + (f" ({', '.join(sorted(own))})" if own else "")
    if selection == LODO:
        return f"{selection} (DomainBed's, over the runs holding out [t] and [t, v])"
    criteria = set()
    for r in runs:
        try:
            criteria.add(describe(selection, r.config, r.eval_rows()))
        except XdtError:
            continue
    return selection + (f" ({', '.join(sorted(criteria))})" if criteria else "")


# --------------------------------------------------------------------------- rendering
def render(
    groups: Sequence[dict[str, Any]],
    fmt: str = "table",
    *,
    selection: str | None = None,
    width: int | None = None,
) -> str:
    """The groups from `summarize` as text in `fmt` (table, markdown, csv, latex or json).

    `selection` (e.g. from `describe_selection`) is named in the table's title, under the
    markdown table and in a LaTeX comment; csv and json carry only the data.
    """
    check_format(fmt)
    if fmt == "json":
        return json.dumps(list(groups), indent=2) + "\n"
    keys = list(groups[0]["group"]) if groups else []
    metrics = list(groups[0]["mean"]) if groups else []
    note = "mean ± sample std over the runs of each group (seeds)"
    if selection:
        note = f"selection: {selection}; {note}"
    if fmt == "csv":
        return _csv(groups, keys, metrics)
    if fmt == "markdown":
        return _markdown(groups, keys, metrics, note)
    if fmt == "latex":
        return _latex(groups, keys, metrics, note)
    return _table(groups, keys, metrics, note, width)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise XdtError(
            f"--format: unknown format '{fmt}'{did_you_mean(fmt, FORMATS)}; "
            f"choose one of {', '.join(FORMATS)}"
        )


def value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _mean_std(group: dict[str, Any], metric: str, pm: str = "±") -> str:
    mean, std = group["mean"].get(metric), group["std"].get(metric)
    if mean is None:
        return "-"
    return f"{mean:.4f} {pm} {std:.4f}"


def _cells(group: dict[str, Any], keys: list[str], metrics: list[str]) -> list[str]:
    return [
        *(value_text(group["group"][k]) for k in keys),
        str(group["n"]),
        *(_mean_std(group, m) for m in metrics),
    ]


def _markdown(groups, keys, metrics, note) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line([*keys, "n", *metrics])]
    lines.append("| " + " | ".join(["---"] * len(keys) + ["---:"] * (1 + len(metrics))) + " |")
    lines += [line(_cells(g, keys, metrics)) for g in groups]
    if not groups:
        lines.append(line(["0"]))
    return "\n".join(lines) + f"\n\n{note}.\n"


def _csv(groups, keys, metrics) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "n", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))])
    for g in groups:
        values = [
            json.dumps(v) if isinstance(v, list | dict) else ("" if v is None else v)
            for v in g["group"].values()
        ]
        stats = ["" if g[s][m] is None else repr(g[s][m]) for m in metrics for s in ("mean", "std")]
        writer.writerow([*values, g["n"], *stats])
    return buf.getvalue()


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def _latex(groups, keys, metrics, note) -> str:
    def line(cells: Iterable[str]) -> str:
        return "  " + " & ".join(cells) + r" \\"

    spec = "l" * len(keys) + "r" * (1 + len(metrics))
    lines = [f"% {note}", rf"\begin{{tabular}}{{{spec}}}", r"  \hline"]
    lines.append(line(latex_escape(c) for c in [*keys, "n", *metrics]))
    lines.append(r"  \hline")
    for g in groups:
        cells = [latex_escape(value_text(g["group"][k])) for k in keys]
        lines.append(line([*cells, str(g["n"]), *(_mean_std(g, m, r"$\pm$") for m in metrics)]))
    lines += [r"  \hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _table(groups, keys, metrics, note, width) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(caption_justify="left")
    for key in keys:
        table.add_column(key)
    table.add_column("n", justify="right")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for g in groups:
        table.add_row(*_cells(g, keys, metrics))
    if not groups:
        table.caption = "no completed runs"
    buf = io.StringIO()
    Console(file=buf, width=width or 250, highlight=False, soft_wrap=True).print(note)
    Console(file=buf, width=width or 250, highlight=False).print(table)
    return buf.getvalue()


# --------------------------------------------------------------------------- the command
def report(
    paths: Sequence[str | Path] | None = None,
    *,
    group_by: str | Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    selection: str = "summary",
    fmt: str = "table",
    width: int | None = None,
) -> tuple[str, list[str]]:
    """What `xdt report` prints: (the rendered text, the runs left out, one line each).
    `xdt report --choose-by RULE` is choose.py's `report_choice`, one floor up."""
    get_rule(selection)
    check_format(fmt)  # bad arguments fail before any folder is read
    records = collect_runs(paths)
    groups = summarize(records, group_by=group_by, metrics=metrics, selection=selection)
    text = render(groups, fmt, selection=describe_selection(records, selection), width=width)
    return text, incomplete_runs(records)
