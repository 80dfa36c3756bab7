"""Checkpoints: atomic full-state saves, and loads that refuse anything but plain data.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, written with
`torch.save` to a temporary file in the same folder, fsynced, then renamed over the target,
so a crash never leaves a half-written file. Loading always uses `weights_only=True`: a file
with a pickled object (arbitrary code on load) is refused with a CheckpointError.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from xdt_cli.config import first_line
from xdt_cli.errors import CheckpointError
from xdt_cli.files import atomic_write_bytes

FORMAT = 1
# Name components that torch.compile and DistributedDataParallel add to state-dict keys.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "module"})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda fh: torch.save({"format": FORMAT, **state}, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, on the CPU, refusing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; we report below
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # a pickled class or function: loading it could run arbitrary code
            raise CheckpointError(
                f"{path}: refused: it holds a pickled object ({found.group(1)}), and xdt loads "
                "only tensors and plain values (weights_only)"
            ) from None
        raise CheckpointError(
            f"{path}: unreadable checkpoint (not a torch file, or damaged)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = first_line(exc, 160, kind=False)
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xdt checkpoint (format {FORMAT} expected)")
    return state


def unwrap_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the `_orig_mod` and `module` name components that torch.compile and DDP add."""
    return {
        ".".join(part for part in key.split(".") if part not in WRAPPER_COMPONENTS): value
        for key, value in state_dict.items()
    }
