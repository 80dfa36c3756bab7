"""Model-selection rules, recomputed after the fact from a run's evaluation rows.

A rule answers "which evaluation of this run counts as its result?". Every eval row of
metrics.jsonl holds the val and test metrics of every domain at that step (DESIGN.md,
"Evaluation rows"), so a rule needs only the run's resolved config and those rows:

    RULES[name](config, eval_rows, summary=None) -> the chosen eval row, or None (no rows)

`config` is config.yaml as a plain mapping, `eval_rows` the `"split": "eval"` rows in file
order, and `summary` the run's summary.json (only the `summary` rule reads it).

- `source_val`: the row with the best `<source>/val/acc`, the source being
  `data.source.dataset` (the embedded sets have one domain each). Ties go to the earliest
  row: a later row wins only when strictly better, exactly as the engine keeps best.pt.
  When the run itself was trained with `selection.rule: source_val`, its own
  `selection.metric` and `selection.mode` are honoured (with the engine's defaults: the
  source's val acc; `min` for a `*/loss` metric, else `max`), so the rule reproduces the
  run's best.pt. For a run trained under another rule they are not used: the rule then
  means the default source val acc, maximised.
- `last`: the last eval row.
- `summary`: whatever the run chose itself: `summary["best"]` at `summary["best_step"]`.

- `target_val`: the same with `data.target` (fine-tuning's default; under transfer it reads
  target labels of the val split, which the user must own, and is reported as such).

Domain generalisation (`xdt generalize`; DomainBed's three rules, Gulrajani & Lopez-Paz
2021, section 3), on the means that every generalize eval row holds:
- `training_domain_val`: the best `train_domains/val/acc`, the mean val accuracy of the
  training domains (their own val splits: never a held-out domain).
- `leave_one_domain_out`: the best `val_domains/val/acc`, the mean val accuracy of the
  held-out domains after the first of `data.test_domains` (validation domains, held out of
  training like the test domain; `xdt generalize --leave-one-out` builds the folds and
  averages the test domain's result over them).
- `oracle`: the best `test_domains/val/acc`, the held-out domains' own val split (20% of
  them): a reference that uses test-domain labels, reported as such.
Multitask (`xdt multitask`): `task_val`, the best `avg/val/acc` (the mean val accuracy of
the classification tasks; `avg/val/mse`, minimised, when every task is a regression).

The held-out domains' test splits are never read by any rule. As for `source_val`, a run
trained under the rule with its own `selection.metric` / `mode` is reproduced exactly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xdt_cli.errors import XdtError

Row = dict[str, Any]
Rule = Callable[..., Row | None]

RULES: dict[str, Rule] = {}


def register(name: str) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"selection rule '{name}' is registered twice")
        RULES[name] = fn
        return fn

    return add


def get_rule(name: str, key: str = "--selection") -> Rule:
    """The rule called `name`; an unknown name is an XdtError with a did-you-mean."""
    rule = RULES.get(name)
    if rule is None:
        close = difflib.get_close_matches(name, list(RULES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise XdtError(
            f"{key}: unknown selection rule '{name}'{hint}; known: {', '.join(sorted(RULES))}"
        )
    return rule


def select(
    name: str,
    config: Mapping[str, Any],
    eval_rows: Sequence[Row],
    summary: Mapping[str, Any] | None = None,
) -> Row | None:
    """Apply the rule called `name` to one run."""
    return get_rule(name)(config, eval_rows, summary=summary)


def source_domain(config: Mapping[str, Any], role: str = "source") -> str:
    """The name of the `data.<role>` domain: its `dataset` (single-domain embedded sets)."""
    section = (config.get("data") or {}).get(role) or {}
    dataset = section.get("dataset")
    if not dataset:
        raise XdtError(f"selection '{role}_val': the run's config has no data.{role}.dataset")
    return str(dataset)


def val_criterion(config: Mapping[str, Any], role: str = "source") -> tuple[str, str]:
    """(metric, mode) that `<role>_val` uses for this run; see the module docstring."""
    rule = f"{role}_val"
    metric, mode = f"{source_domain(config, role)}/val/acc", None
    own = config.get("selection") or {}
    if own.get("rule", "source_val") == rule:
        metric = own.get("metric") or metric
        mode = own.get("mode")
    return metric, mode or ("min" if metric.endswith("loss") else "max")


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


def _best_row(rule: str, metric: str, mode: str, eval_rows: Sequence[Row]) -> Row | None:
    if eval_rows and not any(metric in row for row in eval_rows):
        raise XdtError(f"selection '{rule}': no eval row holds '{metric}'")
    best_row, best = None, None
    for row in eval_rows:
        value = _value(row, metric)
        if is_better(value, best, mode):
            best_row, best = row, value
    return best_row


@register("source_val")
def source_val(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    return _best_row("source_val", *val_criterion(config, "source"), eval_rows)


@register("target_val")
def target_val(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    return _best_row("target_val", *val_criterion(config, "target"), eval_rows)


@register("last")
def last(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    return eval_rows[-1] if eval_rows else None


@register("summary")
def from_summary(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    if summary is None:
        raise XdtError("selection 'summary': the run has no summary.json")
    best = summary.get("best") or {}
    if not best:
        return None
    return {"step": summary.get("best_step"), "split": "eval", **best}


GENERALIZE_METRICS = {
    "training_domain_val": "train_domains/val/acc",
    "leave_one_domain_out": "val_domains/val/acc",
    "oracle": "test_domains/val/acc",
}


def generalize_criterion(config: Mapping[str, Any], rule: str) -> tuple[str, str]:
    """(metric, mode) of a generalize rule for this run (its own settings under that rule)."""
    if not (config.get("data") or {}).get("test_domains"):
        raise XdtError(f"selection '{rule}': the run is not a generalize run (no test_domains)")
    metric, mode = GENERALIZE_METRICS[rule], None
    own = config.get("selection") or {}
    if own.get("rule") == rule:
        metric = own.get("metric") or metric
        mode = own.get("mode")
    return metric, mode or ("min" if metric.endswith("loss") else "max")


@register("training_domain_val")
def training_domain_val(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    rule = "training_domain_val"
    return _best_row(rule, *generalize_criterion(config, rule), eval_rows)


@register("leave_one_domain_out")
def leave_one_domain_out(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    rule = "leave_one_domain_out"
    return _best_row(rule, *generalize_criterion(config, rule), eval_rows)


@register("oracle")
def oracle(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    return _best_row("oracle", *generalize_criterion(config, "oracle"), eval_rows)


def task_criterion(config: Mapping[str, Any]) -> tuple[str, str]:
    """(metric, mode) of `task_val` for a multitask run: the mean val acc of its
    classification tasks (`avg/val/acc`), or `avg/val/mse` (minimised) when every task is a
    regression; its own `selection.metric` / `mode` when it was trained under the rule."""
    tasks = (config.get("data") or {}).get("tasks") or {}
    if not tasks:
        raise XdtError("selection 'task_val': the run is not a multitask run (no data.tasks)")
    regression = all((t or {}).get("loss", "ce") == "mse" for t in tasks.values())
    metric, mode = ("avg/val/mse" if regression else "avg/val/acc"), None
    own = config.get("selection") or {}
    if own.get("rule") == "task_val":
        metric = own.get("metric") or metric
        mode = own.get("mode")
    lower = metric.endswith(("/loss", "/mse", "/mae"))
    return metric, mode or ("min" if lower else "max")


@register("task_val")
def task_val(
    config: Mapping[str, Any], eval_rows: Sequence[Row], summary: Mapping[str, Any] | None = None
) -> Row | None:
    return _best_row("task_val", *task_criterion(config), eval_rows)
