"""`xdt plot`: learning curves of one or several runs on one figure, written to a file.

One subplot per metric, the step on the x axis, one colour per run in every subplot.
`train/*` metrics come from the train rows of metrics.jsonl, every other metric from the
eval rows. Default metrics: `train/loss` and each source domain's `<source>/val/acc`.
`--metric` takes names or glob patterns (`train/weight_*` plots every multitask task weight).

The legend names each run by the config keys whose values differ between the runs
(`optim.lr=0.001, seed=1`), or by its folder name when nothing differs. Unfinished runs are
plotted too: a curve of a run still training is useful. matplotlib draws with the Agg backend:
no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xdt_cli.errors import XdtError
from xdt_cli.report import RunRecord, collect_runs, differing_keys, resolve_metrics
from xdt_cli.selection import Layout

LABEL_IGNORED = frozenset({"name", "device"})


def run_labels(records: Sequence[RunRecord]) -> list[str]:
    """`key=value, ...` over the keys that differ between the runs; else the folder name."""
    flats = [r.flat_config() for r in records]
    keys = differing_keys(flats, ignore=LABEL_IGNORED)
    labels = [", ".join(f"{k}={_short(flat.get(k))}" for k in keys) for flat in flats]
    if len(set(labels)) < len(labels) or not all(labels):  # same config twice: use folders
        labels = [
            f"{r.path.name} ({label})" if label else r.path.name
            for r, label in zip(records, labels, strict=True)
        ]
    return labels


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return "-" if value is None else str(value)


def plot_metrics(records: Sequence[RunRecord], patterns: Sequence[str] | None) -> list[str]:
    """The metric names to plot: `patterns` (names or globs) resolved against the runs' rows."""
    rows = [row for r in records for row in r.rows()]
    if patterns:
        return resolve_metrics(patterns, rows)
    wanted = ["train/loss"]
    for r in records:
        source = Layout.from_config(r.config).source
        if source is not None:
            wanted.append(f"{source}/val/acc")
    have = {k for row in rows for k in row}
    names = [m for m in dict.fromkeys(wanted) if m in have]
    if not names:
        raise XdtError("no train/loss or source val acc in these runs; pick metrics with --metric")
    return names


def plot_runs(
    paths: Sequence[str | Path], out: str | Path, metrics: Sequence[str] | None = None
) -> Path:
    """Draw the curves of the runs under `paths` (run folders or folders of runs) to `out`."""
    out = Path(out)
    records = collect_runs(paths)
    bad = [f"{r.path}: {r.problem}" for r in records if r.problem]
    if bad:
        raise XdtError(*bad)
    names = plot_metrics(records, metrics)
    labels = run_labels(records)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise XdtError(
            f"--out: cannot write '{out.suffix or out.name}' images; use one of "
            f".{', .'.join(sorted(formats))}"
        )

    ncols = 1 if len(names) == 1 else 2
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows + 0.4), squeeze=False, layout="constrained"
    )
    last_step = max((row.get("step", 0) for r in records for row in r.rows()), default=0)
    handles = {}
    for ax, metric in zip(axes.flat, names, strict=False):
        split = "train" if metric.startswith("train/") else "eval"
        for i, (record, label) in enumerate(zip(records, labels, strict=True)):
            points = [
                (row["step"], math.nan if row[metric] is None else row[metric])
                for row in record.rows()
                if row.get("split") == split and metric in row
            ]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            (line,) = ax.plot(
                steps,
                values,
                color=f"C{i % 10}",
                marker="o" if split == "eval" else None,
                markersize=3.5,
                linewidth=1.6,
                label=label,
            )
            handles.setdefault(label, line)
        ax.set_title(metric, fontsize=11)
        ax.set_xlabel("step")
        if last_step > 0:  # the same steps on every subplot: train and eval curves line up
            ax.set_xlim(0, last_step * 1.03)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    # as many legend columns as fit across the figure (about 0.08 inch per character)
    entry_width = 0.08 * (max((len(label) for label in handles), default=0) + 6)
    fit = int(fig.get_figwidth() // entry_width)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        ncols=max(1, min(len(handles), fit)),
        frameon=False,
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as exc:  # a parent that is a file, a folder named like the image, ...
        raise XdtError(f"--out: cannot write {out} ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return out
