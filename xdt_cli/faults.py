"""Fault points: named places where a test harness may kill the process on purpose.

`benchmarks/reliability.py` (the kill matrix of docs/RELIABILITY.md) must kill xdt at
moments a timer rarely hits: half-way through writing a checkpoint, between its two renames,
in the middle of an evaluation. Each such place calls `fault_point(NAME)`. With the
environment variable `XDT_FAULT=NAME:N`, the N-th call of `fault_point(NAME)` in this
process sends the process SIGKILL, exactly as a crash or an out-of-memory kill would: no
handler runs, nothing is flushed. Without the variable a call is one dictionary lookup.

The points:
- `checkpoint.partial`: a checkpoint's temporary file holds its bytes, not yet fsynced or
  renamed (files.atomic_write_bytes);
- `checkpoint.renamed`: last.pt was moved to last.prev.pt and the new file is not yet in
  its place (checkpoint.save_checkpoint);
- `evaluate`: between two splits of an evaluation (evaluation.evaluate);
- `metrics.append`: a metrics.jsonl row is half written (runs.RunDir.append_metrics).

The same mechanism as the fail points of databases (SQLite's test VFS, etcd's gofail):
the production code carries the names, the harness chooses which to trigger.
"""

from __future__ import annotations

import os
import signal

ENV = "XDT_FAULT"
POINTS = ("checkpoint.partial", "checkpoint.renamed", "evaluate", "metrics.append")

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, nth = spec.rpartition(":")
    if name not in POINTS or not nth.isdigit():
        raise ValueError(f"{ENV}={spec}: expected NAME:N with NAME one of {', '.join(POINTS)}")
    return name, int(nth)


def armed(name: str) -> bool:
    """Whether `XDT_FAULT` names this point (for a place that must prepare the fault)."""
    target = _target()
    return target is not None and target[0] == name


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL when `XDT_FAULT` names this point and this call."""
    target = _target()
    if target is None or target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
