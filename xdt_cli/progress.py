"""What a person sees while a run trains, all on stderr (stdout carries only results).

A rich progress bar when stderr is a terminal; one line per evaluation in any case, unless
`--quiet`; a closing table of final and best metrics.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

stderr_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Reporter:
    """Progress and log lines for one run. `quiet` silences everything but errors."""

    def __init__(self, *, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or stderr_console
        self.quiet = quiet
        self.show_bar = not quiet and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._loss = ""

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)

    def start(self, total: int, done: int) -> None:
        if not self.show_bar:
            return
        self._progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task("train", total=total, completed=done, loss="")
        self._progress.start()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def train_row(self, row: dict[str, Any]) -> None:
        if self._progress is not None and "train/loss" in row:
            self._progress.update(self._task, loss=f"loss {row['train/loss']:.4f}")

    def eval_row(self, step: int, metrics: dict[str, float], key: str | None, best: bool) -> None:
        if self.quiet:
            return
        shown = {k: v for k, v in metrics.items() if "/val/" in k} or metrics
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items())
        mark = "  [green]* best[/green]" if best and key else ""
        self.console.print(f"[dim]step {step:>6}[/dim]  {text}{mark}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _delta_m_table(self, summary: dict[str, Any]) -> None:
        """Multitask against the single-task baselines (best checkpoints, test metric)."""
        table = Table(title="against single-task baselines", title_justify="left")
        for column in ("task", "metric", "multitask", "single-task", "delta %"):
            table.add_column(column, justify="left" if column in ("task", "metric") else "right")
        delta = summary["delta_m"]
        for task, base in summary["single_task"].items():
            change = delta["per_task"].get(task)
            table.add_row(
                task,
                base["metric"],
                _fmt(summary["best"].get(base["metric"], "")),
                _fmt(base["value"]),
                "" if change is None else f"{change:+.2f}",
            )
        overall = delta["overall"]
        table.add_row("Delta_m", "", "", "", "" if overall is None else f"{overall:+.2f}")
        self.console.print(table)

    def summary_table(self, summary: dict[str, Any], run_dir: str | None) -> None:
        if self.quiet:
            return
        status = summary["status"]
        colour = {"completed": "green", "failed": "red"}.get(status, "yellow")
        title = f"[{colour}]{status}[/{colour}] after {summary['steps']} steps"
        title += f" in {summary['wall_time_s']:.1f} s"
        table = Table(title=title, title_justify="left")
        table.add_column("metric")
        table.add_column("final", justify="right")
        sel = summary["selection"]
        best_label = f"best (step {summary['best_step']})" if sel["metric"] else "best"
        table.add_column(best_label, justify="right")
        for key in summary["final"] or summary["best"]:
            table.add_row(
                key, _fmt(summary["final"].get(key, "")), _fmt(summary["best"].get(key, ""))
            )
        self.console.print(table)
        rule = f"selection: {sel['rule']}"
        if sel["metric"]:
            rule += f" on {sel['metric']} ({sel['mode']})"
        self.console.print(f"[dim]{rule}[/dim]")
        if summary.get("delta_m"):
            self._delta_m_table(summary)
        if "error" in summary:
            self.console.print(f"[red]error:[/red] {escape(summary['error'])}")
        if run_dir:
            self.console.print(f"run folder: {run_dir}", markup=False)
