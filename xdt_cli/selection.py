"""Model-selection rules: the one definition of each rule, used by training, report and evaluate.

A rule answers "which evaluation of this run counts as its result?". Each is one `Rule`
object in `RULES` that declares its name, the subcommands it serves, the splits it may read
(by role: the source, the target, the training domains, the held-out domains, the tasks;
always their val split, never a test split), its default metric (the first metric it may
read), its mode (min for `*/loss`, `*/mse`, `*/mae`, else max, unless `selection.mode` says
otherwise) and whether it takes the best or the last checkpoint. The regimes turn it into the
engine's `Selection` (best.pt), `xdt report --selection` recomputes it from a run's eval rows
(every eval row holds the val and test metrics of every domain and task: DESIGN.md,
"Evaluation rows"), and `xdt evaluate` scores the best.pt it chose. A `selection.metric`
outside the rule's splits is a ConfigError naming the rule and listing what it may read.

- `source_val` (train-source, transfer; finetune with a `data.source`): the source's val split.
- `target_val` (finetune's default; transfer and train-source): the target's val split. Under
  transfer it reads target labels, which the adaptation itself never sees; summary.json says
  so (`selection.note`).
- `training_domain_val` (generalize's default): the training domains' val splits and their
  mean `train_domains/val/*` (default `train_domains/val/acc`) or the worst of them,
  `worst_domain/val/*`. Never a held-out domain. DomainBed's "training-domain validation set".
- `oracle` (generalize, with held-out domains): DomainBed's "test-domain validation set",
  exactly: the LAST checkpoint (no early stopping), its metric `test_domains/val/acc` (the
  held-out domains' 20% val split, DomainBed's env_out) being what a sweep compares whole runs
  by; the result is the held-out domains' 80% test split (DomainBed's env_in) at that step.
- `leave_one_domain_out` (generalize, several runs): DomainBed's "leave-one-domain-out
  cross-validation", exactly. For test domain t: at each eval step, the validation accuracy is
  the mean over every other domain v of v's accuracy on its 80% test split (`v/test/acc`) in
  the run holding out [t, v] (all of them must exist), and the result is `t/test/acc` of the
  run holding out [t] alone at the step with the best validation accuracy. It needs D + D(D-1)
  runs, so it is `xdt generalize --leave-one-out`'s rule (`leave_one_domain_out_choice`); a
  single run under it is refused.
- `task_val` (multitask's default): the tasks' val splits and their mean `avg/val/*`
  (default `avg/val/acc`, or `avg/val/mse` when every task is a regression).
- `last` (every subcommand): the last evaluation; it reads nothing.

Ties go to the earliest row: a later row wins only when strictly better (`is_better`), as the
engine keeps best.pt. Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021, section 3 and domainbed/model_selection.py, define the three DG rules.

This module imports no torch (errors and the registry only), so report.py and choose.py stay light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xdt_cli.errors import ConfigError, XdtError
from xdt_cli.registry import Registry

Row = dict[str, Any]
LOWER_IS_BETTER = ("/loss", "/mse", "/mae")
# names of eval-row groups (engine averages and worst), never a domain's own name;
# `val_domains` is no longer written, but runs made before 2026-11-30 have it in their rows
GROUPS = ("train_domains", "test_domains", "val_domains", "worst_domain", "avg")


def mode_of(metric: str) -> str:
    """min for a loss or an error (`*/loss`, `*/mse`, `*/mae`), max for the rest."""
    return "min" if metric.endswith(LOWER_IS_BETTER) else "max"


@dataclass(frozen=True)
class Layout:
    """The names a run's eval rows use, by role: what a rule's splits resolve to."""

    subcommand: str | None = None
    source: str | None = None
    target: str | None = None
    training: tuple[str, ...] = ()  # generalize: the domains trained on
    held_out: tuple[str, ...] = ()  # generalize: data.test_domains
    tasks: tuple[tuple[str, str], ...] = ()  # multitask: (task, loss kind)

    def metrics_of(self, name: str) -> tuple[str, str]:
        """The metrics an eval row holds for a domain, task or group."""
        kinds = dict(self.tasks)
        if name == "avg" and kinds:
            classifying = [t for t, k in kinds.items() if k != "mse"]
            return ("acc", "loss") if classifying else ("mse", "mae")
        return ("mse", "mae") if kinds.get(name) == "mse" else ("acc", "loss")

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        eval_rows: Sequence[Row] = (),
        subcommand: str | None = None,
    ) -> Layout:
        """The layout of a finished run from its config.yaml (a plain mapping) and eval rows
        (a generalize run's domains, when `data.domains` is not given, are read from the
        rows: every name that is not a group nor held out)."""
        data = config.get("data") or {}

        def name(role: str) -> str | None:
            section = data.get(role) or {}
            return section.get("domain") or section.get("dataset")

        held = tuple(data.get("test_domains") or ())
        training: tuple[str, ...] = ()
        if data.get("dataset"):
            domains = data.get("domains")
            if not domains:
                seen = {k.split("/", 1)[0]: None for r in eval_rows for k in r if k.count("/") == 2}
                domains = [d for d in seen if d not in GROUPS]
            training = tuple(d for d in domains if d not in held)
        tasks = tuple(
            (str(t), str((spec or {}).get("loss") or "ce"))
            for t, spec in (data.get("tasks") or {}).items()
        )
        if subcommand is None:
            subcommand = "multitask" if tasks else "generalize" if data.get("dataset") else None
        return cls(subcommand, name("source"), name("target"), training, held, tasks)


@dataclass(frozen=True)
class Rule:
    """One selection rule: see the module docstring for each."""

    name: str
    subcommands: tuple[str, ...]
    doc: str  # one line, for `xdt report --selection` help and errors
    # the names (domains, tasks, groups) whose val split it may read; the first is its default
    scope: Callable[[Layout], tuple[str | None, ...]] = field(repr=False)
    pick: str = "best"  # "best": the best metric; "last": the last checkpoint
    needs: str | None = None  # what a run lacks when `scope` is empty (None: reads nothing)
    single_run: bool = True  # False: it compares several runs (leave_one_domain_out)
    note: Callable[[Layout], str | None] = field(default=lambda layout: None, repr=False)

    def allowed(self, layout: Layout) -> list[str]:
        """Every metric the rule may choose on for a run of this layout (val splits only)."""
        names = [n for n in self.scope(layout) if n is not None]
        return [f"{n}/val/{m}" for n in names for m in layout.metrics_of(n)]

    def problems(self, layout: Layout) -> list[str]:
        """Why this rule cannot select a run of this layout (empty: it can)."""
        if layout.subcommand is not None and layout.subcommand not in self.subcommands:
            return [
                f"selection.rule: {self.name} is not a rule of {layout.subcommand} "
                f"(its rules: {', '.join(rules_of(layout.subcommand))})"
            ]
        if not self.single_run:
            return [f"selection.rule: {self.name} {self.needs}"]
        if self.needs is not None and not self.allowed(layout):
            return [f"selection.rule: {self.name} {self.needs}"]
        return []

    def criterion(
        self, layout: Layout, metric: str | None = None, mode: str | None = None
    ) -> tuple[str | None, str]:
        """(metric, mode) that the rule chooses on: `metric` / `mode` when given (the run's
        own `selection.metric` / `mode`), else its default. ConfigError when it cannot."""
        problems = self.problems(layout)
        if problems:
            raise ConfigError(*problems)
        allowed = self.allowed(layout)
        if not allowed:
            if metric is not None:
                raise ConfigError(f"selection.metric: rule {self.name} reads no metric; drop it")
            return None, "max"
        metric = metric or allowed[0]
        if metric not in allowed:
            reason = " (a test split is never chosen on)" if "/test/" in metric else ""
            raise ConfigError(
                f"selection.metric: '{metric}' is not read by rule {self.name}{reason}; "
                f"it reads {', '.join(allowed)}"
            )
        return metric, mode or mode_of(metric)

    def choose(self, rows: Sequence[Row], metric: str | None, mode: str) -> Row | None:
        """The chosen eval row: the last one, or the first best by `metric`."""
        if not rows:
            return None
        if self.pick == "last" or metric is None:
            return rows[-1]
        if not any(metric in row for row in rows):
            raise XdtError(f"selection '{self.name}': no eval row holds '{metric}'")
        best_row, best = None, None
        for row in rows:
            value = _value(row, metric)
            if is_better(value, best, mode):
                best_row, best = row, value
        return best_row


def _transfer_note(layout: Layout) -> str | None:
    if layout.subcommand == "transfer":
        return "read the target's val labels, which transfer training never sees"
    return None


RULES: Registry[Rule] = Registry("selection rule")
for _rule in (
    Rule(
        "source_val",
        ("train-source", "transfer", "finetune"),
        "the source's val split",
        lambda lay: (lay.source,),
        needs="needs data.source",
    ),
    Rule(
        "target_val",
        ("train-source", "transfer", "finetune"),
        "the target's val split (target labels)",
        lambda lay: (lay.target,),
        needs="needs data.target",
        note=_transfer_note,
    ),
    Rule(
        "training_domain_val",
        ("generalize",),
        "the training domains' val splits (train_domains/val/acc)",
        lambda lay: ("train_domains", *lay.training, "worst_domain"),
        needs="needs training domains",
    ),
    Rule(
        "oracle",
        ("generalize",),
        "DomainBed's oracle: the last checkpoint; test_domains/val/acc compares runs",
        lambda lay: ("test_domains", *lay.held_out) if lay.held_out else (),
        pick="last",
        needs="needs held-out domains (data.test_domains)",
        note=lambda lay: (
            "the last checkpoint (DomainBed's oracle); its metric, the held-out "
            "domains' val split, compares runs"
        ),
    ),
    Rule(
        "leave_one_domain_out",
        ("generalize",),
        "DomainBed's leave-one-domain-out cross-validation (xdt generalize --leave-one-out)",
        lambda lay: (),
        needs="compares D + D(D-1) runs (DomainBed); run xdt generalize --leave-one-out "
        "with it instead of a single run",
        single_run=False,
    ),
    Rule(
        "task_val",
        ("multitask",),
        "the tasks' val splits (avg/val/acc, or avg/val/mse)",
        lambda lay: ("avg", *(t for t, _ in lay.tasks)) if lay.tasks else (),
        needs="needs data.tasks",
    ),
    Rule(
        "last",
        ("train-source", "finetune", "transfer", "generalize", "multitask"),
        "the last evaluation",
        lambda lay: (),
    ),
):
    RULES.register(_rule.name, _rule)

DEFAULT_RULES = {
    "train-source": "source_val",
    "finetune": "target_val",
    "transfer": "source_val",
    "generalize": "training_domain_val",
    "multitask": "task_val",
}
SUMMARY = "summary"  # report only: each run's own choice, summary.json's "best"
LODO = "leave_one_domain_out"


def rules_of(subcommand: str) -> list[str]:
    """The rules that serve a subcommand, in RULES order."""
    return [r.name for r in RULES.values() if subcommand in r.subcommands]


def get_rule(name: str, key: str = "--selection") -> Rule | None:
    """The rule called `name` (None for `summary`); an unknown name is an XdtError."""
    if name == SUMMARY:
        return None
    if name not in RULES:
        raise XdtError(RULES.unknown(name, key, extra=(SUMMARY,)))
    return RULES[name]


def run_criterion(name: str, config: Mapping[str, Any], layout: Layout) -> tuple[str | None, str]:
    """(metric, mode) of rule `name` for a finished run: the run's own `selection.metric` /
    `mode` when it trained under that rule (so best.pt is reproduced), else the default."""
    rule = get_rule(name)
    assert rule is not None
    own = config.get("selection") or {}
    if own.get("rule") == name:
        return rule.criterion(layout, own.get("metric"), own.get("mode"))
    return rule.criterion(layout)


def select(
    name: str,
    config: Mapping[str, Any],
    eval_rows: Sequence[Row],
    summary: Mapping[str, Any] | None = None,
    subcommand: str | None = None,
) -> Row | None:
    """Apply the rule called `name` to one finished run; `summary`: the run's own choice."""
    rule = get_rule(name)
    if rule is None:
        if summary is None:
            raise XdtError("selection 'summary': the run has no summary.json")
        best = summary.get("best") or {}
        return {"step": summary.get("best_step"), "split": "eval", **best} if best else None
    layout = Layout.from_config(config, eval_rows, subcommand)
    try:
        metric, mode = run_criterion(name, config, layout)
    except ConfigError as exc:
        raise XdtError(f"selection '{name}': {'; '.join(exc.lines)}") from None
    return rule.choose(eval_rows, metric, mode)


def describe(name: str, config: Mapping[str, Any], eval_rows: Sequence[Row] = ()) -> str:
    """`metric, mode` of a rule for a run, or the rule's own words when it reads no metric."""
    rule = get_rule(name)
    assert rule is not None
    metric, mode = run_criterion(name, config, Layout.from_config(config, eval_rows))
    if rule.pick == "last" or metric is None:
        return "the last checkpoint"
    return f"{metric}, {mode}"


def _value(row: Row, metric: str) -> float:
    """metrics.jsonl writes NaN and infinities as null: read them back as NaN."""
    value = row.get(metric)
    return math.nan if value is None else float(value)


def is_better(value: float, best: float | None, mode: str) -> bool:
    """The one comparison behind best.pt and every recomputed choice.

    The first value always wins; later ones only when strictly better. A NaN is never
    better, and a NaN best is beaten by any number, so one bad evaluation cannot pin best.pt.
    """
    if best is None or (math.isnan(best) and not math.isnan(value)):
        return True
    return value > best if mode == "max" else value < best


def leave_one_domain_out_choice(
    test_domain: str, test_rows: Sequence[Row], val_rows: Mapping[str, Sequence[Row]]
) -> Row | None:
    """DomainBed's LeaveOneOutSelectionMethod for one test domain t.

    `test_rows`: the eval rows of the run holding out [t]; `val_rows[v]`: those of the run
    holding out [t, v], for every other domain v. At each step that every run evaluated, the
    validation accuracy is the mean over v of `v/test/acc` (v's 80% split, DomainBed's
    env_in) in run [t, v]; the chosen row is run [t]'s row at the first step with the best
    one, plus `leave_one_domain_out/val/acc` (that mean). None when a run is missing or no
    step is common to all.
    """
    if not val_rows or not test_rows:
        return None
    by_step = [{r["step"]: r for r in rows} for rows in val_rows.values()]
    best_row, best = None, None
    for row in test_rows:
        step = row["step"]
        if not all(step in rows for rows in by_step):
            continue
        values = [
            _value(rows[step], f"{v}/test/acc") for v, rows in zip(val_rows, by_step, strict=True)
        ]
        value = sum(values) / len(values)
        if is_better(value, best, "max"):
            best_row, best = row, value
    if best_row is None:
        return None
    return {**best_row, "leave_one_domain_out/val/acc": best}
