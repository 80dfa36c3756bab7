"""Checkpoints: atomic full-state saves, and loads that refuse anything but plain data.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, written with
`torch.save` to a temporary file in the same folder, fsynced, then renamed over the target,
so a crash never leaves a half-written file. Loading always uses `weights_only=True`: a file
with a pickled object (arbitrary code on load) is refused with a CheckpointError.

Damage: every checkpoint records `checksum`, a BLAKE2b digest of its contents (each key,
each tensor's dtype, shape and bytes, each plain value) taken at save time; loading
recomputes it, so a truncated file, or one with a flipped bit anywhere in a tensor or a
value, is refused with one line naming the file. (A digest of the contents rather than of
the file's bytes: it travels inside the one file, and needs no second file kept in step.)

`save_checkpoint(path, state, keep_previous=True)` (last.pt) first renames the file it
replaces to `<name>.prev.pt`, so the previous good state stays on disk until the new one is
complete; `resume_checkpoint` falls back to it when the newest is damaged or missing.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from xdt_cli.config import first_line
from xdt_cli.errors import CheckpointError
from xdt_cli.faults import fault_point
from xdt_cli.files import atomic_write_bytes

FORMAT = 1
# Name components that torch.compile and DistributedDataParallel add to state-dict keys.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "module"})


def save_checkpoint(path: Path, state: dict[str, Any], *, keep_previous: bool = False) -> None:
    """Write `state` atomically, with its checksum; with `keep_previous`, the file it
    replaces becomes `previous_path(path)` (renamed just before the new file takes its
    place, so at every moment one of the two is a complete checkpoint)."""
    payload = {"format": FORMAT, **state}
    payload["checksum"] = content_digest(payload)

    def keep() -> None:
        if path.exists():
            os.replace(path, previous_path(path))
            fault_point("checkpoint.renamed")

    before = keep if keep_previous else None
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh), before_replace=before)


def previous_path(path: Path) -> Path:
    """`last.pt` -> `last.prev.pt`: the checkpoint `path` replaced (see save_checkpoint)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def content_digest(state: Any) -> str:
    """BLAKE2b (128-bit) of a checkpoint's contents, the `checksum` entry excluded: keys
    sorted, each tensor's dtype, shape and raw bytes, each plain value's type and repr."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            digest.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
                if key == "checksum" and value is state:
                    continue
                feed(key)
                feed(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
            for item in value:
                feed(item)
        else:  # int, float, str, bool, None, and the like: their type and exact repr
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


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
        # "Unsupported global: GLOBAL mod.Class was not an allowed global" (a class) or
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(exc))
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
    except Exception:  # noqa: BLE001  (damaged pickles break the unpickler in many ways)
        raise CheckpointError(
            f"{path}: unreadable checkpoint (not a torch file, or damaged)"
        ) from None
    # `type(...) is int`: a tensor there cannot be compared, and True == 1
    if (
        not isinstance(state, dict)
        or type(state.get("format")) is not int
        or state["format"] != FORMAT
    ):
        raise CheckpointError(f"{path}: not an xdt checkpoint (format {FORMAT} expected)")
    saved = state.pop("checksum", None)  # absent in checkpoints written before checksums
    if saved is not None and (not isinstance(saved, str) or saved != content_digest(state)):
        raise CheckpointError(
            f"{path}: damaged: its contents do not match the checksum recorded when it was saved"
        )
    return state


def resume_checkpoint(path: Path) -> tuple[dict[str, Any], str | None]:
    """last.pt to resume from, and a note when it had to be its previous version: the
    newest is damaged (or missing after a crash between the two renames of a save) and
    `<name>.prev.pt` is good. Raises a CheckpointError naming both when neither loads."""
    previous = previous_path(path)
    try:
        return load_checkpoint(path), None
    except CheckpointError as exc:
        if not previous.is_file():
            raise
        newest = exc
    reason = str(newest).removeprefix(f"{path}: ")
    try:
        state = load_checkpoint(previous)
    except CheckpointError:
        raise CheckpointError(f"{path}: {reason}; {previous.name} is unusable too") from None
    return state, f"{path.name} is unusable ({reason}); resuming from {previous.name}"


def unwrap_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the `_orig_mod` and `module` name components that torch.compile and DDP add.

    Raises TypeError for anything but a dict with string keys (a damaged checkpoint), which
    the loaders turn into a CheckpointError naming the file."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError(f"expected a state dict with string keys, got {type(state_dict).__name__}")
    return {
        ".".join(part for part in key.split(".") if part not in WRAPPER_COMPONENTS): value
        for key, value in state_dict.items()
    }
