"""`xdt report --choose-by RULE`: the results of a hyper-parameter search, DomainBed's way.

Gulrajani & Lopez-Paz ("In Search of Lost Domain Generalization", ICLR 2021, section 3;
domainbed/model_selection.py and domainbed/scripts/collect_results.py) report a search so:
within each trial (here: `seed` and `data.split_seed`), among the draws of the search (runs
that differ only in their hyper-parameters, `search.is_hyperparameter`), keep the one whose
validation value under a selection rule is best, and report its test value; then mean and
error over trials. This module does exactly that for every regime, from finished run
folders alone; its one responsibility is choosing draws and laying out their results.

A run belongs to a row and a column. The row is its configuration minus the seeds (trial),
`name` and `device`, the hyper-parameters (draw) and the keys that make its column:
- generalize: the held-out domain t (metric `t/test/acc`), `all` for none
  (`train_domains/test/acc`); a run holding out several domains is in no column (DomainBed's
  get_test_records: it serves leave_one_domain_out only);
- transfer, finetune: `source->target` (just the target for a finetune without a source),
  metric `<target>/test/acc`; train-source: the source, `<source>/test/acc`;
- multitask: one column per task, `<task>/test/acc` (`mse` for a regression task).
(`acc` is the first metric of selection.Layout.metrics_of, `mse` for a regression task.)

What each candidate run is worth under RULE (selection.py defines every rule; none is
re-implemented here):
- source_val, target_val, training_domain_val, task_val: the eval row the rule picks, and
  there the rule's metric (the run's own selection.metric when it trained under the rule),
  compared with the rule's mode (min for */loss, */mse);
- oracle: the last eval row (DomainBed: no early stopping), compared on its
  `test_domains/val/acc`, the held-out domains' val split;
- leave_one_domain_out: report.leave_one_domain_out_rows, over all completed runs, gives a
  run holding out [t] its row and `leave_one_domain_out/val/acc` from its [t, v] siblings;
  those siblings are auxiliary (in no column), and a [t] run missing one drops out;
- last: the last eval row, compared on the validation metric of its subcommand's default
  rule (selection.DEFAULT_RULES) read at that last row.
The draw with the best value wins (selection.is_better: ties go to the first run by path, a
NaN never wins); the trial's result is that row's test metric.

`choose(records, rule)` returns the JSON contract of `xdt report --choose-by RULE --format
json`, one entry per row:

    [{"row": {key: value},   # the row keys that differ between rows (one row: method.name
                             # and, when set, data.dataset)
      "columns": {column: {"metric": str, "n": int,
                           "mean": float | None, "std": float | None, "se": float | None,
                           "trials": [{"trial": {"seed": int, "data.split_seed": int},
                                       "run": str, "step": int, "val_metric": str,
                                       "val": float | None, "test": float | None,
                                       "draws": int, "hparams": {key: value}}]}},
      "avg": {"n": int, "mean": float | None, "std": float | None, "se": float | None}}]

`std` is the sample std over trials (0.0 for one); `se` is what DomainBed prints, the
population std over sqrt(n). `avg` is taken per trial over the columns, for the trials with
a result in every column, then over those trials (DomainBed's Avg, the mean of the column
means, is the same number over complete trials). A test value that is missing or not finite
is null, and makes its cell's (and the avg's) mean, std and se null: never a mean of the
other trials.

This module imports no torch (report.py, selection.py and search.py do not either).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdt_cli.errors import ConfigError, XdtError
from xdt_cli.report import (
    IGNORED_KEYS,
    RunRecord,
    check_format,
    collect_runs,
    differing_keys,
    finite,
    hashable,
    incomplete_runs,
    latex_escape,
    leave_one_domain_out_rows,
    sort_key,
    value_text,
)
from xdt_cli.search import is_hyperparameter
from xdt_cli.selection import (
    DEFAULT_RULES,
    GROUPS,
    LODO,
    RULES,
    SUMMARY,
    Layout,
    is_better,
    rules_of,
    run_criterion,
)

Row = dict[str, Any]
TRIAL_KEYS = ("seed", "data.split_seed")
_SOURCE_KEYS = ("data.source.dataset", "data.source.domain")
_TARGET_KEYS = ("data.target.dataset", "data.target.domain")
# the config keys that a run's column is made of: they do not split rows
COLUMN_KEYS = {
    "generalize": ("data.test_domains",),
    "transfer": _SOURCE_KEYS + _TARGET_KEYS,
    "finetune": _SOURCE_KEYS + _TARGET_KEYS,
    "train-source": _SOURCE_KEYS,
    "multitask": (),
}
AVG = "avg"


# --------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class Column:
    """Where a run's result goes: the column's label, the names it is made of (for its
    place among the columns) and the test metric read there."""

    label: str
    names: tuple[str, ...]
    metric: str


@dataclass(frozen=True)
class Candidate:
    """One draw of one trial: the eval row the rule chose in it and its validation value."""

    run: RunRecord
    row: Row
    val_metric: str
    val: float  # NaN when missing or not finite: never the best
    mode: str


@dataclass
class _Cell:
    """A column of one row while runs are read: its candidates, trial by trial."""

    column: Column
    by_trial: dict[tuple[Any, ...], list[Candidate]] = field(default_factory=dict)


def check_rule(rule: str) -> None:
    """A rule of selection.RULES; `summary` (each run's own choice) compares no draws."""
    if rule == SUMMARY:
        raise XdtError(
            "--choose-by: summary is each run's own choice and compares no draws; "
            f"choose one of {', '.join(RULES)}"
        )
    if rule not in RULES:
        raise XdtError(RULES.unknown(rule, "--choose-by"))


def choose(records: Sequence[RunRecord], rule: str) -> list[dict[str, Any]]:
    """The search's results under `rule`: one entry per row (the JSON contract above).

    Only completed runs count. A run whose subcommand the rule does not serve, or that the
    rule cannot read, is an XdtError naming the run.
    """
    check_rule(rule)
    runs = sorted((r for r in records if r.completed), key=lambda r: r.path)
    lodo: dict[Path, Row | None] = {}
    if rule == LODO:  # a property of the set of runs: each [t] run's row, from its [t, v] runs
        lodo = {r.path: row for r, row in zip(runs, leave_one_domain_out_rows(runs), strict=True)}

    rows: dict[tuple[str, ...], tuple[dict[str, Any], dict[str, _Cell]]] = {}
    for run in runs:
        columns = columns_of(run, rule)
        if not columns:  # leave_one_domain_out's [t, v] runs: auxiliary
            continue
        flat = row_config(run)
        ident = tuple(sorted(f"{k}={hashable(v)}" for k, v in flat.items()))
        _, cells = rows.setdefault(ident, (flat, {}))
        candidate = _candidate(run, rule, lodo.get(run.path))
        for column in columns:
            cell = cells.setdefault(column.label, _Cell(column))
            if candidate is not None:
                cell.by_trial.setdefault(trial_of(run), []).append(candidate)

    order = _name_order(runs)
    flats = [flat for flat, _ in rows.values()]
    shown = differing_keys(flats)
    if len(flats) == 1:
        shown = [k for k in ("method.name", "data.dataset") if flats[0].get(k) is not None]
    out = []
    for flat, cells in rows.values():
        ordered = sorted(cells.values(), key=lambda c: _column_place(c.column, order))
        columns = {c.column.label: _column_result(c) for c in ordered}
        out.append(
            {"row": {k: flat.get(k) for k in shown}, "columns": columns, "avg": _avg(columns)}
        )
    out.sort(key=lambda entry: sort_key(tuple(entry["row"].values())))
    return out


def columns_of(run: RunRecord, rule: str) -> list[Column]:
    """The columns a completed run contributes to (none for a run holding out several
    domains: leave_one_domain_out's auxiliary runs)."""
    subcommand = run.subcommand
    if subcommand not in COLUMN_KEYS:
        raise XdtError(f"{run.path}: --choose-by: unknown subcommand {subcommand!r} in meta.json")
    if subcommand not in RULES[rule].subcommands:
        raise XdtError(
            f"{run.path}: --choose-by: {rule} is not a rule of {subcommand} "
            f"(its rules: {', '.join(rules_of(subcommand))})"
        )
    layout = Layout.from_config(run.config, run.eval_rows(), subcommand)

    def test(name: str) -> str:
        return f"{name}/test/{layout.metrics_of(name)[0]}"

    if subcommand == "generalize":
        held = layout.held_out
        if len(held) == 1:
            return [Column(held[0], held, test(held[0]))]
        if held:  # DomainBed reports runs holding out one domain (get_test_records) only
            return []
        return [Column("all", (), test("train_domains"))]
    if subcommand == "multitask":
        return [Column(task, (task,), test(task)) for task, _ in layout.tasks]
    if subcommand == "train-source":
        source = str(layout.source)
        return [Column(source, (source,), test(source))]
    target = str(layout.target)
    if layout.source is None:  # a finetune from pretrained weights alone
        return [Column(target, (target,), test(target))]
    return [Column(f"{layout.source}->{target}", (layout.source, target), test(target))]


def row_config(run: RunRecord) -> dict[str, Any]:
    """The run's flat config minus what is not its row: seeds, name and device, the
    hyper-parameters and the keys of its column."""
    drop = {*IGNORED_KEYS, *TRIAL_KEYS, *COLUMN_KEYS.get(str(run.subcommand), ())}
    flat = run.flat_config()
    return {k: v for k, v in flat.items() if k not in drop and not is_hyperparameter(k)}


def trial_of(run: RunRecord) -> tuple[Any, ...]:
    """(seed, data.split_seed): DomainBed's trial_seed sets both."""
    flat = run.flat_config()
    return tuple(flat.get(k) for k in TRIAL_KEYS)


def hyperparameters(run: RunRecord) -> dict[str, Any]:
    """The run's searched keys and values: what tells its draw apart."""
    return {k: v for k, v in run.flat_config().items() if is_hyperparameter(k)}


def _candidate(run: RunRecord, rule: str, lodo_row: Row | None) -> Candidate | None:
    """The run's chosen eval row and validation value under `rule`; None when it has none
    (no eval row, or under leave_one_domain_out a missing [t, v] sibling)."""
    if rule == LODO:
        if lodo_row is None:
            return None
        metric = f"{LODO}/val/acc"
        return Candidate(run, lodo_row, metric, _number(lodo_row.get(metric)), "max")
    row = run.choose(rule)  # oracle and last: the last eval row
    if row is None:
        return None
    # `last` reads no metric: draws are compared as their subcommand's default rule would
    criterion_rule = DEFAULT_RULES[str(run.subcommand)] if rule == "last" else rule
    layout = Layout.from_config(run.config, run.eval_rows(), run.subcommand)
    try:
        metric, mode = run_criterion(criterion_rule, run.config, layout)
    except ConfigError as exc:
        raise XdtError(*(f"{run.path}: --choose-by {rule}: {line}" for line in exc.lines)) from None
    if metric is None:
        raise XdtError(f"{run.path}: --choose-by {rule}: no validation metric compares draws")
    return Candidate(run, row, metric, _number(row.get(metric)), mode)


def _number(value: Any) -> float:
    number = finite(value)
    return math.nan if number is None else number


def _best(candidates: Sequence[Candidate]) -> Candidate:
    """DomainBed's choice among the draws of a trial: the best validation value, the first
    (by run path) on a tie, by selection.is_better, the comparison behind best.pt."""
    best, best_val = candidates[0], None
    for candidate in candidates:
        if is_better(candidate.val, best_val, candidate.mode):
            best, best_val = candidate, candidate.val
    return best


def _column_result(cell: _Cell) -> dict[str, Any]:
    trials = []
    for trial in sorted(cell.by_trial, key=sort_key):
        candidates = cell.by_trial[trial]
        winner = _best(candidates)
        trials.append(
            {
                "trial": dict(zip(TRIAL_KEYS, trial, strict=True)),
                "run": str(winner.run.path),
                "step": winner.row.get("step"),
                "val_metric": winner.val_metric,
                "val": finite(winner.val),
                "test": finite(winner.row.get(cell.column.metric)),
                "draws": len(candidates),
                "hparams": hyperparameters(winner.run),
            }
        )
    return {"metric": cell.column.metric, **stats([t["test"] for t in trials]), "trials": trials}


def _avg(columns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per trial with a result in every column, the mean over the columns; then over trials."""
    per_column = [
        {tuple(t["trial"].values()): t["test"] for t in c["trials"]} for c in columns.values()
    ]
    complete = set.intersection(*(set(p) for p in per_column)) if per_column else set()
    values = []
    for trial in sorted(complete, key=sort_key):
        tests = [p[trial] for p in per_column]
        values.append(None if None in tests else statistics.mean(tests))
    return stats(values)


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """n, mean, sample std (0.0 for one) and DomainBed's error np.std(x) / sqrt(n); mean,
    std and se are None when there is no value or one of them is None."""
    n = len(values)
    if n == 0 or any(v is None for v in values):
        return {"n": n, "mean": None, "std": None, "se": None}
    numbers = [float(v) for v in values if v is not None]
    return {
        "n": n,
        "mean": statistics.mean(numbers),
        "std": statistics.stdev(numbers) if n > 1 else 0.0,
        "se": statistics.pstdev(numbers) / math.sqrt(n),
    }


def _name_order(runs: Sequence[RunRecord]) -> dict[str, int]:
    """The place of each domain or task name among the columns: the order of the runs' eval
    rows, which is the data set's or the config's. A generalize run lists its held-out
    domains after its training domains, so only its training domains give the order (two
    domains that no run trains on together come in the order first seen; a search holding
    out every domain in turn, with three or more, orders them all); a name that is held out
    in every run goes after the others."""
    sequences, held = [], []
    for run in runs:
        rows = run.eval_rows()
        layout = Layout.from_config(run.config, rows, run.subcommand)
        if run.subcommand == "generalize":
            sequences.append(list(layout.training))
            held += layout.held_out
            continue
        names = (key.split("/", 1)[0] for key in (rows[0] if rows else {}) if key.count("/") == 2)
        sequences.append([n for n in dict.fromkeys(names) if n not in GROUPS])
    order = _merge(sequences)
    order += [n for n in dict.fromkeys(held) if n not in order]
    return {name: i for i, name in enumerate(order)}


def _merge(sequences: Sequence[Sequence[str]]) -> list[str]:
    """One order of all names that keeps the order of every sequence (each run lists only
    some domains): repeatedly the first-seen name that no unplaced name must precede; on
    sequences that disagree, the first-seen remaining name."""
    before: dict[str, set[str]] = {}
    for seq in sequences:
        for i, name in enumerate(seq):
            before.setdefault(name, set()).update(seq[:i])
    order: list[str] = []
    remaining = list(before)
    while remaining:
        ready = [n for n in remaining if before[n] <= set(order)]
        name = ready[0] if ready else remaining[0]
        order.append(name)
        remaining.remove(name)
    return order


def _column_place(column: Column, order: dict[str, int]) -> tuple:
    # `all` (no held-out domain) last; else by the names' places, then single before pairs
    places = [order.get(n, len(order)) for n in column.names]
    return (not column.names, places, column.label)


# --------------------------------------------------------------------------- describing
def describe_choice(
    records: Sequence[RunRecord], rule: str, choices: Sequence[dict[str, Any]]
) -> str:
    """The note under the tables: the rule, what compares the draws and how many there were."""
    criteria: set[str] = set()
    if rule == LODO:
        criteria.add(f"{LODO}/val/acc, max: the mean of v/test/acc in the runs holding out [t, v]")
    for run in (r for r in records if r.completed and rule != LODO):
        criterion_rule = DEFAULT_RULES.get(str(run.subcommand)) if rule == "last" else rule
        try:
            layout = Layout.from_config(run.config, run.eval_rows(), run.subcommand)
            metric, mode = run_criterion(str(criterion_rule), run.config, layout)
        except XdtError:  # the rule does not serve this run: choose() says so
            continue
        criteria.add(f"{metric}, {mode}")
    how = ", ".join(sorted(criteria)) or "no run"
    if rule == "oracle":
        how = f"the last checkpoint; draws compared on {how}"
    elif rule == "last":
        how = f"the last checkpoint; draws compared there on the default rule's {how}"
    draws = sorted(
        {t["draws"] for c in choices for col in c["columns"].values() for t in col["trials"]}
    )
    among = "0" if not draws else str(draws[0])
    if len(draws) > 1:
        among = f"{draws[0]}-{draws[-1]}"
    plural = "" if among == "1" else "s"
    return (
        f"chosen by {rule} ({how}) among {among} draw{plural} per trial; mean ± sample std over "
        "trials (DomainBed prints np.std/sqrt(n): `se` in --format json)"
    )


# --------------------------------------------------------------------------- rendering
def render_choice(
    choices: Sequence[dict[str, Any]],
    fmt: str = "table",
    *,
    note: str | None = None,
    width: int | None = None,
) -> str:
    """`choose`'s rows as text in `fmt`: rows with the same columns form one table (one per
    data set, as DomainBed prints), each cell mean ± std; json is the contract itself."""
    check_format(fmt)
    if fmt == "json":
        return json.dumps(list(choices), indent=2) + "\n"
    tables: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for entry in choices:
        tables.setdefault((*entry["columns"], AVG), []).append(entry)
    keys = list(choices[0]["row"]) if choices else []
    note = note or "mean ± sample std over trials"
    if fmt == "csv":
        return "\n".join(_csv(rows, keys, cols) for cols, rows in tables.items())
    if fmt == "markdown":
        parts = [_markdown(rows, keys, cols) for cols, rows in tables.items()]
        return "\n".join(parts or ["no completed runs\n"]) + f"\n{note}.\n"
    if fmt == "latex":
        parts = [_latex(rows, keys, cols) for cols, rows in tables.items()]
        return f"% {note}\n" + "".join(parts)
    return _table(tables, keys, note, width)


def _stats_of(entry: dict[str, Any], column: str) -> dict[str, Any]:
    return entry["avg"] if column == AVG else entry["columns"][column]


def _mean_std(stats: dict[str, Any], pm: str = "±") -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.4f} {pm} {stats['std']:.4f}"


def _cells(entry: dict[str, Any], keys: list[str], columns: Sequence[str]) -> list[str]:
    return [
        *(value_text(entry["row"][k]) for k in keys),
        *(_mean_std(_stats_of(entry, c)) for c in columns),
    ]


def _markdown(rows: list[dict[str, Any]], keys: list[str], columns: Sequence[str]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line([*keys, *columns])]
    lines.append("| " + " | ".join(["---"] * len(keys) + ["---:"] * len(columns)) + " |")
    lines += [line(_cells(entry, keys, columns)) for entry in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]], keys: list[str], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, *(f"{c} {s}" for c in columns for s in ("mean", "std"))])
    for entry in rows:
        values = [
            json.dumps(v) if isinstance(v, list | dict) else ("" if v is None else v)
            for v in entry["row"].values()
        ]
        cells = [
            "" if _stats_of(entry, c)[s] is None else repr(_stats_of(entry, c)[s])
            for c in columns
            for s in ("mean", "std")
        ]
        writer.writerow([*values, *cells])
    return buf.getvalue()


def _latex(rows: list[dict[str, Any]], keys: list[str], columns: Sequence[str]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "  " + " & ".join(cells) + r" \\"

    spec = "l" * len(keys) + "r" * len(columns)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"  \hline"]
    lines.append(line([latex_escape(c) for c in [*keys, *columns]]))
    lines.append(r"  \hline")
    for entry in rows:
        cells = [latex_escape(value_text(entry["row"][k])) for k in keys]
        lines.append(line([*cells, *(_mean_std(_stats_of(entry, c), r"$\pm$") for c in columns)]))
    lines += [r"  \hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _table(tables: dict[tuple[str, ...], list[dict[str, Any]]], keys, note, width) -> str:
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    Console(file=buf, width=width or 250, highlight=False, soft_wrap=True).print(note)
    if not tables:
        Console(file=buf, width=width or 250, highlight=False).print("no completed runs")
    for columns, rows in tables.items():
        table = Table()
        for key in keys:
            table.add_column(key)
        for column in columns:
            table.add_column(column, justify="right")
        for entry in rows:
            table.add_row(*_cells(entry, keys, columns))
        Console(file=buf, width=width or 250, highlight=False).print(table)
    return buf.getvalue()


def report_choice(
    paths: Sequence[str | Path] | None,
    rule: str,
    *,
    fmt: str = "table",
    width: int | None = None,
    given: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """What `xdt report --choose-by RULE` prints: (the rendered text, the runs left out).

    The runs are a hyper-parameter search, reported as DomainBed does: rows and columns are
    fixed by the search, so the options in `given` (`--group-by`, `--metric`, `--selection`
    when the user set them) are refused with it."""
    conflicts = [
        f"--choose-by and {option}: one or the other (--choose-by sets the rows, the "
        "columns, their metrics and the selection rule)"
        for option in given
    ]
    if conflicts:
        raise XdtError(*conflicts)
    check_rule(rule)
    check_format(fmt)
    records = collect_runs(paths)
    choices = choose(records, rule)
    note = describe_choice(records, rule, choices)
    return render_choice(choices, fmt, note=note, width=width), incomplete_runs(records)
