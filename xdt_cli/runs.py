"""Run folders: creation, meta.json, the metrics.jsonl writer and summary.json.

```
<run>/config.yaml          the fully resolved config
<run>/meta.json            versions, git sha, device, argv, start time
<run>/metrics.jsonl        one JSON object per line, each with "step" and "split"
<run>/checkpoints/last.pt  full training state
<run>/checkpoints/best.pt  the checkpoint the selection rule chose
<run>/summary.json         written last, atomically; its presence means the run ended
```
A folder is claimed with `os.mkdir`, which fails if it exists, so two processes never share
one. A run holds an exclusive lock on `<run>/.lock` while it trains, so `xdt resume` cannot
race a run that is still going.

A write that fails (a full disk, a quota, an I/O error) inside `RunDir.writing()` becomes a
`WriteFailed` naming the folder and its free space: the file being written is left as it
was (JSON files and checkpoints are replaced atomically; a metrics row that was cut short
is cut off again), so the run stops with its last checkpoint intact and resumes exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xdt_cli import __version__
from xdt_cli.errors import CheckpointError, WriteFailed, XdtError
from xdt_cli.faults import armed, fault_point
from xdt_cli.files import atomic_write_text


def default_runs_dir() -> Path:
    return Path(os.environ.get("XDT_RUNS_DIR") or "runs")


def check_run_name(name: str, what: str = "--name") -> str:
    """A run name is one folder name inside the runs folder: it can never escape it."""
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise XdtError(
            f"{what} '{name}': a run name is one folder name, without '/', '..' or a leading '.'"
        )
    return name


def create_run_dir(
    runs_dir: Path, subcommand: str, config_name: str, name: str | None, overwrite: bool
) -> Path:
    """Claim a new run folder: `<runs>/NAME`, or `<runs>/<subcommand>/<config>-<timestamp>`."""
    try:
        return _create_run_dir(Path(runs_dir), subcommand, config_name, name, overwrite)
    except PermissionError as exc:
        raise XdtError(f"--runs-dir: cannot write {exc.filename}: permission denied") from None
    except NotADirectoryError as exc:
        raise XdtError(f"--runs-dir: {exc.filename} is not a folder") from None


def _create_run_dir(
    runs_dir: Path, subcommand: str, config_name: str, name: str | None, overwrite: bool
) -> Path:
    if name is not None:
        path = runs_dir / check_run_name(name)
        if path.exists() and overwrite:
            if not (path / "config.yaml").exists() and any(
                p.name != ".lock" for p in path.iterdir()
            ):
                raise XdtError(f"--overwrite: {path} is not an xdt run folder; not deleting it")
            RunDir(path).lock()  # refuses a run that another process is training
            shutil.rmtree(path)
        runs_dir.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise XdtError(
                f"--name: run folder {path} already exists (use --overwrite to replace it, "
                "or xdt resume to continue it)"
            ) from None
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = runs_dir / subcommand
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{check_run_name(config_name, 'name (in the config)')}-{stamp}"
    for attempt in range(1000):  # two runs started in the same second get -1, -2, ...
        path = parent / (base if attempt == 0 else f"{base}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise XdtError(f"could not create a run folder under {parent}")


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,  # the sha of the xdt source that runs
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_meta(subcommand: str, device: str, precision: str, argv: list[str]) -> dict[str, Any]:
    import torch

    return {
        "xdt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "subcommand": subcommand,
        "device": device,
        "precision": precision,
        "argv": argv,
        "start_time": datetime.now(UTC).isoformat(timespec="seconds"),
        # the CPU sums depend on it bit-wise: `xdt resume` trains with the same count
        "threads": torch.get_num_threads(),
    }


def write_failed(folder: Path, exc: OSError) -> WriteFailed:
    """The error for a failed write into `folder`: what failed, and the free space left."""
    try:
        free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    what = exc.strerror or type(exc).__name__
    name = f" {exc.filename}" if exc.filename else ""
    return WriteFailed(
        f"cannot write{name} into {folder}: {what} ({free} on its file system); the run "
        f"stopped and keeps its last complete checkpoint: make room, then xdt resume {folder}"
    )


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null (also inside dicts and lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, up to a last line cut short by a hard kill."""
    if not path.is_file():
        return []
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:  # deleted since (xdt run --overwrite): a run no more
        return []
    except UnicodeDecodeError as exc:  # json.dumps writes ASCII: the file is damaged
        raise XdtError(f"{path}: not UTF-8 text (byte at offset {exc.start}); damaged") from None
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


class RunDir:
    """Paths and files of one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fh = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def last_ckpt(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def best_ckpt(self) -> Path:
        return self.path / "checkpoints" / "best.pt"

    def lock(self) -> None:
        """Hold an exclusive lock for the life of this process (released at exit)."""
        self._lock_fh = open(self.path / ".lock", "w")  # noqa: SIM115  (held until exit)
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise XdtError(f"{self.path}: another xdt process is using this run") from None

    def unlock(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        with self.writing():
            atomic_write_text(path, json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn an OSError raised inside into a WriteFailed that names this folder, its free
        space and how to continue (module docstring)."""
        try:
            yield
        except OSError as exc:
            raise write_failed(self.path, exc) from exc

    def read_json(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found; is {self.path} an xdt run folder?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return data

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row; a row that fails half-way is cut off again, so the file keeps
        only whole rows."""
        line = (json.dumps(_clean(row), allow_nan=False) + "\n").encode("utf-8")
        with self.writing(), self.metrics_path.open("ab") as fh:
            end = fh.seek(0, os.SEEK_END)
            try:
                half = len(line) // 2 if armed("metrics.append") else 0
                if half:  # the kill matrix (faults.py): the row's first half, then a kill
                    fh.write(line[:half])
                    fh.flush()
                    fault_point("metrics.append")
                fh.write(line[half:])
                fh.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    fh.truncate(end)
                raise

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Keep only the rows up to `step`: what a resumed run will write again is dropped."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
