"""The corpus of bad inputs in tests/bad_inputs/: loading a case, preparing its files, running
it, and judging the result against the CLI contract (exit codes and error lines).

One YAML file per case (read with `yaml.safe_load`):
```yaml
# why this is bad, one line (the first comment line is the case's description)
argv: [train-source, config.yaml]   # the arguments after `xdt`
fixtures: [tiny.yaml, run]          # optional, see FIXTURES
files:                              # optional: text files to write (`{workdir}` is replaced)
  config.yaml: |
    optim: {lr: -1}
binary_files: {ckpt.pt: random}     # optional, see BINARY_KINDS
dirs: [empty_folder]                # optional: folders to create
symlinks: {loop_a.yaml: loop_b.yaml}  # optional: link -> target
remove: [run/summary.json]          # optional: paths to delete once the rest is written
expect:
  exit: 2                           # the exit code
  names: optim.lr                   # a substring (or list of them) the message must contain
  lines: 1                          # optional (default 1): lines on stderr, each `error: ...`
known_bug: "..."                    # optional: a bug not fixed yet (the test is a strict xfail)
```
Each case runs in a fresh working folder with `XDT_RUNS_DIR=<workdir>/runs`. `run_case`
returns a `Result` (case, exit code, message, ok, problems), which tests/test_bad_inputs.py
asserts on and a report generator can turn into docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CORPUS_DIR = Path(__file__).parent / "bad_inputs"
REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = "(top level)"  # the "subcommand" of a case whose argv starts with an option
CASE_KEYS = {
    "argv",
    "fixtures",
    "files",
    "binary_files",
    "dirs",
    "symlinks",
    "remove",
    "expect",
    "known_bug",
}
EXPECT_KEYS = {"exit", "names", "lines"}
MARKER = "PWNED"  # a pickle-with-code payload would create this file in the working folder

# A valid config that fails nothing: 4 steps of LeNet on the embedded `digits`.
TINY_CONFIG = """\
name: tiny
seed: 0
data:
  source: {dataset: digits}
model: {backbone: lenet}
optim: {name: adam, lr: 3.0e-3}
train: {steps: 4, batch_size: 16, eval_every: 2, log_every: 2}
"""
# fixture name -> what it puts in the working folder
FIXTURES = {
    "tiny.yaml": "the valid 4-step train-source config above, as tiny.yaml",
    "run": "a copy of a finished tiny train-source run, as run/ (see make_tiny_run)",
}


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One bad input: what to write, what to run, what must come out."""

    name: str
    path: Path
    why: str
    argv: tuple[str, ...]
    expect_exit: int
    expect_names: tuple[str, ...]
    expect_lines: int = 1
    fixtures: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    binary_files: dict[str, str] = field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    symlinks: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    known_bug: str | None = None

    @property
    def subcommand(self) -> str:
        """The subcommand the case exercises: TOP_LEVEL when argv starts with an option or
        a word that is not one of the CLI's subcommands."""
        return self.argv[0] if self.argv[0] in cli_subcommands() else TOP_LEVEL

    @property
    def needs_run(self) -> bool:
        return "run" in self.fixtures


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{what}: expected a string or a list of strings, got {value!r}")


def load_case(path: Path) -> Case:
    """Read and check one case file (a malformed case is a ValueError naming the file)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a case is a YAML mapping")
    unknown = set(data) - CASE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    comments = [ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")]
    if not comments or not comments[0]:
        raise ValueError(f"{path}: the first line must be a comment saying why the input is bad")
    argv = data.get("argv")
    if not isinstance(argv, list) or not argv:
        raise ValueError(f"{path}: argv: expected a non-empty list")
    expect = data.get("expect")
    if not isinstance(expect, dict) or set(expect) - EXPECT_KEYS or "exit" not in expect:
        raise ValueError(f"{path}: expect: a mapping with exit, names and optionally lines")
    if "names" not in expect:
        raise ValueError(f"{path}: expect.names: say what the message must name")
    fixtures = _strings(data.get("fixtures", []), f"{path}: fixtures")
    bad_fixtures = set(fixtures) - set(FIXTURES)
    if bad_fixtures:
        raise ValueError(f"{path}: unknown fixtures {sorted(bad_fixtures)}")
    binary = data.get("binary_files") or {}
    bad_kinds = {v for v in binary.values() if v not in BINARY_KINDS}
    if bad_kinds:
        raise ValueError(f"{path}: unknown binary_files kinds {sorted(bad_kinds)}")
    return Case(
        name=path.stem,
        path=path,
        why=comments[0],
        argv=tuple(str(a) for a in argv),
        expect_exit=int(expect["exit"]),
        expect_names=_strings(expect["names"], f"{path}: expect.names"),
        expect_lines=int(expect.get("lines", 1)),
        fixtures=fixtures,
        files={str(k): str(v) for k, v in (data.get("files") or {}).items()},
        binary_files={str(k): str(v) for k, v in binary.items()},
        dirs=_strings(data.get("dirs", []), f"{path}: dirs"),
        symlinks={str(k): str(v) for k, v in (data.get("symlinks") or {}).items()},
        remove=_strings(data.get("remove", []), f"{path}: remove"),
        known_bug=data.get("known_bug"),
    )


def load_cases(folder: Path = CORPUS_DIR) -> list[Case]:
    """Every case of the corpus, sorted by file name."""
    return [load_case(p) for p in sorted(Path(folder).glob("*.yaml"))]


@functools.cache
def cli_subcommands() -> tuple[str, ...]:
    """The subcommands that the real CLI lists in `xdt --help`."""
    import click
    import typer

    from xdt_cli.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="xdt")
    return tuple(
        name
        for name in group.list_commands(ctx)
        if not getattr(group.get_command(ctx, name), "hidden", False)
    )


# --------------------------------------------------------------------------- binary files
class _RunsCode:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _small_checkpoint() -> bytes:
    """A real, small xdt checkpoint (what `save_checkpoint` writes), as bytes."""
    import torch

    from xdt_cli.checkpoint import FORMAT

    return _torch_bytes({"format": FORMAT, "step": 3, "w": torch.arange(2000.0)})


def _existing_or_small(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else _small_checkpoint()


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _zip_not_torch(_: Path, __: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle at all")
    return buffer.getvalue()


def _object_npy(_: Path, __: Path) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _xdt_with_strings(_: Path, __: Path) -> bytes:
    """An xdt-format checkpoint whose model weights are strings, not tensors."""
    return _torch_bytes(
        {"format": 1, "step": 1, "method": {"model.features.0.weight": "not a tensor"}}
    )


# kind -> (path of the file to write, working folder) -> bytes
BINARY_KINDS = {
    "random": lambda path, wd: random.Random(str(path.name)).randbytes(4096),
    "empty": lambda path, wd: b"",
    "not-utf8": lambda path, wd: b"\xff\xfe\x00seed: 1\n\x80\x81",
    "truncated": lambda path, wd: _existing_or_small(path)[: len(_existing_or_small(path)) // 2],
    "truncated-header": lambda path, wd: _existing_or_small(path)[:10],
    "pickle-with-code": lambda path, wd: _torch_bytes({"format": 1, "x": _RunsCode(wd / MARKER)}),
    "raw-pickle-with-code": lambda path, wd: pickle.dumps(
        {"format": 1, "x": _RunsCode(wd / MARKER)}, protocol=2
    ),
    "raw-pickle-with-code-protocol-4": lambda path, wd: pickle.dumps(
        {"format": 1, "x": _RunsCode(wd / MARKER)}, protocol=4
    ),
    "foreign-torch-file": lambda path, wd: _torch_bytes({"step": 1, "w": [1.0, 2.0]}),
    "zip-not-torch": _zip_not_torch,
    "object-npy": _object_npy,
    "xdt-with-strings": _xdt_with_strings,
}


# --------------------------------------------------------------------------- the tiny run
def make_tiny_run(dest: Path) -> Path:
    """Train the 4-step TINY_CONFIG into `dest` (a new folder) in this process; returns it."""
    from xdt_cli.api import start_run
    from xdt_cli.progress import Reporter

    dest = Path(dest)
    config = dest.parent / f"{dest.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(TINY_CONFIG)
    summary = start_run(
        "train-source",
        config,
        name=dest.name,
        runs_dir=dest.parent,
        device="cpu",
        reporter=Reporter(quiet=True),
        argv=["xdt", "train-source", str(config)],
    )
    assert summary["status"] == "completed", summary
    return dest


def prepare(case: Case, workdir: Path, tiny_run: Path | None = None) -> None:
    """Write the case's fixtures and files into `workdir` (an empty folder)."""
    workdir = Path(workdir)
    if "tiny.yaml" in case.fixtures:
        (workdir / "tiny.yaml").write_text(TINY_CONFIG)
    if "run" in case.fixtures:
        if tiny_run is None:
            raise ValueError(f"{case.name}: needs a tiny run (make_tiny_run)")
        shutil.copytree(tiny_run, workdir / "run", ignore=shutil.ignore_patterns(".lock"))
    for name in case.dirs:
        (workdir / name).mkdir(parents=True, exist_ok=True)
    for name, text in case.files.items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace("{workdir}", str(workdir)), encoding="utf-8")
    for name, kind in case.binary_files.items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = BINARY_KINDS[kind](target, workdir)
        target.write_bytes(data)
    for link, points_to in case.symlinks.items():
        (workdir / link).symlink_to(points_to)
    for name in case.remove:
        target = workdir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


# --------------------------------------------------------------------------- running
@dataclass
class Result:
    """What one case did: the record a report is written from."""

    case: str
    subcommand: str
    why: str
    argv: list[str]
    mode: str  # "in-process" (Typer's CliRunner) or "subprocess" (python -m xdt_cli)
    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    expected_exit: int
    expected_names: list[str]
    known_bug: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """stderr without its trailing newline (for a good case: the one `error:` line)."""
        return self.stderr.rstrip("\n")

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(case: Case, exit_code: int, stdout: str, stderr: str, workdir: Path) -> list[str]:
    """The ways in which an outcome breaks the contract (empty: it keeps it)."""
    problems = []
    if exit_code != case.expect_exit:
        problems.append(f"exit code {exit_code}, expected {case.expect_exit}")
    for stream, text in (("stdout", stdout), ("stderr", stderr)):
        if "Traceback" in text:
            problems.append(f"a traceback on {stream}")
    lines = stderr.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) != case.expect_lines:
        problems.append(f"{len(lines)} lines on stderr, expected {case.expect_lines}")
    not_error = [ln for ln in lines if not ln.startswith("error: ") or not ln[7:].strip()]
    if not_error:
        problems.append(f"a stderr line that is not 'error: <message>': {not_error[0]!r}")
    for needle in case.expect_names:
        if needle not in stderr:
            problems.append(f"the message does not name {needle!r}")
    if case.expect_exit == 2 and stdout:
        problems.append("output on stdout (it carries only results)")
    if (workdir / MARKER).exists():
        problems.append("the pickled code ran (weights_only must refuse it)")
    return problems


@contextlib.contextmanager
def _in_workdir(workdir: Path) -> Iterator[None]:
    """cwd and XDT_RUNS_DIR as a subprocess would get them (this process's, restored after)."""
    before_cwd, before_env = os.getcwd(), os.environ.get("XDT_RUNS_DIR")
    os.chdir(workdir)
    os.environ["XDT_RUNS_DIR"] = str(workdir / "runs")
    try:
        yield
    finally:
        os.chdir(before_cwd)
        if before_env is None:
            os.environ.pop("XDT_RUNS_DIR", None)
        else:
            os.environ["XDT_RUNS_DIR"] = before_env


# What a fresh interpreter ignores by default (the `warnings` module's default filters).
PROCESS_IGNORES = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _invoke_in_process(argv: list[str]) -> tuple[int, str, str]:
    """`xdt ARGV` through Typer's CliRunner: the same `_Group.main` and `sys.exit` path as
    the console script. A Python warning is printed on stderr as a fresh process prints it;
    an exception that escapes is written out as the traceback a process would print."""
    from typer.testing import CliRunner

    from xdt_cli.cli import app

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.resetwarnings()  # the filters of a fresh `python` without -W options
        warnings.simplefilter("default")
        for category in PROCESS_IGNORES:
            warnings.simplefilter("ignore", category)
        warnings.showwarning = show
        result = CliRunner().invoke(app, argv)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        stderr += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return result.exit_code, result.stdout, stderr


def _invoke_subprocess(argv: list[str], workdir: Path, timeout: float) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "XDT_RUNS_DIR": str(workdir / "runs"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        ),
        "OMP_NUM_THREADS": "1",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "xdt_cli", *argv],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return -1, out, err + f"\n(timed out after {timeout} s)"
    return proc.returncode, proc.stdout, proc.stderr


def run_case(
    case: Case,
    workdir: Path,
    *,
    tiny_run: Path | None = None,
    mode: str = "in-process",
    timeout: float = 180,
) -> Result:
    """Prepare `case` in `workdir` (an empty folder), run `xdt <argv>` there, judge it.

    `mode`: "in-process" (Typer's CliRunner, fast) or "subprocess" (`python -m xdt_cli`, the
    real process). `tiny_run`: a finished run (make_tiny_run) for cases with fixture `run`.
    """
    if mode not in ("in-process", "subprocess"):
        raise ValueError(f"mode: {mode!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(case, workdir, tiny_run)
    argv = [a.replace("{workdir}", str(workdir)) for a in case.argv]
    started = time.perf_counter()
    if mode == "subprocess":
        code, out, err = _invoke_subprocess(argv, workdir, timeout)
    else:
        with _in_workdir(workdir):
            code, out, err = _invoke_in_process(argv)
    seconds = time.perf_counter() - started
    return Result(
        case=case.name,
        subcommand=case.subcommand,
        why=case.why,
        argv=argv,
        mode=mode,
        exit_code=code,
        stdout=out,
        stderr=err,
        seconds=seconds,
        expected_exit=case.expect_exit,
        expected_names=list(case.expect_names),
        known_bug=case.known_bug,
        problems=judge(case, code, out, err, workdir),
    )


def run_corpus(
    root: Path, cases: list[Case] | None = None, *, mode: str = "in-process"
) -> list[Result]:
    """Run every case (default: the whole corpus) under `root`, each in its own folder; the
    tiny run is trained once, in `root/_tiny_run`, when a case needs it."""
    cases = load_cases() if cases is None else cases
    root = Path(root)
    tiny = make_tiny_run(root / "_tiny_run") if any(c.needs_run for c in cases) else None
    return [run_case(c, root / c.name, tiny_run=tiny, mode=mode) for c in cases]
