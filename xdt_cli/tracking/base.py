"""The base class of an experiment tracker (tensorboard.py, mlflow.py).

It lives apart from the package's `__init__`, which imports the backends, so that a backend
can import it without an import cycle.
"""

from __future__ import annotations

import sys
from typing import Any


class Tracker:
    """One backend of one run. Subclasses override what they record."""

    name = "tracker"

    def __init__(self) -> None:
        self._warned = False

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row ({"step", "split", metric: value, ...})."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's summary.json was written (completed, failed or interrupted)."""

    def warn(self, problem: str) -> None:
        """One line on stderr, the first time only: the run goes on."""
        if not self._warned:
            self._warned = True
            print(f"warning: {self.name}: {problem}", file=sys.stderr, flush=True)
