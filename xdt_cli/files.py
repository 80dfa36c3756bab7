"""Atomic file writes, kept free of torch so that reading and writing run folders is light.

A file is written to a temporary file in the same folder, fsynced, then renamed over the
target, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from xdt_cli.faults import fault_point


def atomic_write_bytes(
    path: Path,
    writer: Callable[[BinaryIO], object],
    *,
    before_replace: Callable[[], object] | None = None,
) -> None:
    """Call `writer(file)` on a temporary file next to `path`, then rename it onto `path`.
    `before_replace` runs once the new file is complete, just before the rename (e.g. to
    keep the file being replaced under another name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            if path.suffix == ".pt":
                fault_point("checkpoint.partial")
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))
