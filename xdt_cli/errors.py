"""User-facing errors: each one carries a message that names the bad key, file or argument.

The CLI turns an `XdtError` into exit code 2 and one line per problem on stderr, never a
traceback. Anything else that escapes is a runtime failure (exit 1). `XdtError` and
`ConfigError` live on the ground floor (xdt_cli/config/errors.py); this module adds the rest.
"""

from __future__ import annotations

from xdt_cli.config.errors import ConfigError, XdtError  # the ground floor defines them

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NonFiniteLoss",
    "RunInterrupted",
    "WriteFailed",
    "XdtError",
]


class CheckpointError(XdtError):
    """A checkpoint or run folder cannot be read or is refused."""


class RunInterrupted(Exception):
    """Training was stopped by SIGINT or SIGTERM after `last.pt` was saved."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        super().__init__(f"interrupted by signal {signum} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the run stops with status "failed"."""


class WriteFailed(Exception):
    """A file of a run folder could not be written (a full disk, a quota, an I/O error).

    A runtime failure (exit 1), not a bad input: the run stops without a summary.json, its
    last complete checkpoint and its metrics.jsonl as they were, so `xdt resume` continues
    it once the cause is fixed. The message names the folder and its free space."""
