"""TensorBoard: the run's metrics as event files under `<run>/tensorboard/`.

Every metric of every metrics.jsonl row becomes a scalar under its own name at the row's
step (`train/loss`, `mnist5k/val/acc`, ...), and the resolved config a text entry (`config`).
A sweep's runs sit in folders of the sweep's folder, so `tensorboard --logdir <sweep folder>`
shows each run as its own curve, named by its folder. A resumed run writes a new event file
beside the old ones and purges the events of steps it computes again (`purge_step`, the
first step it logs), so no curve shows a step twice.

Uses `torch.utils.tensorboard` (the optional extra xdt[tensorboard]).
"""

from __future__ import annotations

import math
from typing import Any

from xdt_cli.config import ConfigError, ExperimentConfig, first_line
from xdt_cli.runs import RunDir
from xdt_cli.tracking.base import Tracker

FOLDER = "tensorboard"


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, cfg: ExperimentConfig, run: RunDir, *, resumed: bool) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tracking.backends: tensorboard needs the package tensorboard "
                "(pip install 'xdt[tensorboard]')"
            ) from None
        self._make_writer = SummaryWriter
        self.log_dir = run.path / FOLDER
        self.resumed = resumed
        self.config_text = (
            run.config_path.read_text() if cfg.tracking.tensorboard.config_text else None
        )
        self.writer: Any = None

    def _open(self, first_step: int) -> None:
        # a resumed run recomputes the steps after last.pt: purge what was logged at or after
        # the first of them before the interruption
        purge = first_step if self.resumed else None
        self.writer = self._make_writer(log_dir=str(self.log_dir), purge_step=purge)
        if self.config_text is not None and not self.resumed:
            # TensorBoard renders text as markdown: four spaces keep the YAML as it is
            text = "\n".join("    " + line for line in self.config_text.splitlines())
            self.writer.add_text("config", text, global_step=0)

    def log(self, row: dict[str, Any]) -> None:
        try:
            step = int(row["step"])
            if self.writer is None:
                self._open(step)
            for key, value in row.items():
                if key in ("step", "split") or not isinstance(value, int | float):
                    continue
                if isinstance(value, bool) or not math.isfinite(float(value)):
                    continue
                self.writer.add_scalar(key, float(value), global_step=step)
            if row.get("split") == "eval":  # last.pt follows: what it covers is on disk
                self.writer.flush()
        except Exception as exc:  # noqa: BLE001  (a disk or package problem never stops a run)
            self.warn(f"cannot write {self.log_dir} ({first_line(exc)}); metrics.jsonl has it all")

    def finish(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            return
        try:
            self.writer.flush()
            self.writer.close()
        except Exception as exc:  # noqa: BLE001
            self.warn(f"cannot close {self.log_dir} ({first_line(exc)})")
        self.writer = None
