"""Shared helpers of the benchmark scripts: what machine ran them, and how busy it was.

`OtherLoad` measures how many CPU cores *other* processes kept busy during a timed region
(from /proc/stat minus this process's and its waited-for children's CPU time), so that a
number taken while something else was running can be flagged instead of trusted. On a
system without /proc it reports None.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time
from pathlib import Path

import torch


def describe() -> dict[str, str | int]:
    """Cores, CPU model, torch and Python versions, and the date (UTC)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count() or 0,
        "cpu": model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _busy_ticks() -> int | None:
    """All CPUs' non-idle time in clock ticks (user nice system irq softirq steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def _own_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """Context manager: `.cores` = mean number of cores used by other processes inside it."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._ticks = _busy_ticks()
        self._own = _own_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        ticks = _busy_ticks()
        if ticks is None or self._ticks is None or wall <= 0:
            return
        busy = (ticks - self._ticks) / os.sysconf("SC_CLK_TCK")
        # Tick accounting is coarse (10 ms per CPU): clamp small negative noise to zero.
        self.cores = max(busy - (_own_seconds() - self._own), 0.0) / wall
