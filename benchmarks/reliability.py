"""The kill matrix (issue 19, points 1 and 7): real xdt processes are killed with SIGKILL at
random moments, resumed, and must end exactly where an uninterrupted run ends.

Run from the repository root (about an hour on 2 cores for the default matrix):

    python benchmarks/reliability.py                    # 45 kill points, writes docs/RELIABILITY.md
    python benchmarks/reliability.py --quick --work /tmp/rel --out /tmp/rel/RELIABILITY.md
    python benchmarks/reliability.py --kinds sweep,torchrun --kills 10

Method
------
Nine kinds of xdt process are tried, each a short run of a real config from configs/ (40
steps, or 20 for the composites): the five training subcommands (train-source, finetune,
transfer, multitask, generalize), `generalize --leave-one-out` (one child run per held-out
domain, in one process), `multitask --single-task-baselines` (the baselines, then the
multitask run), `xdt sweep --jobs 2` (three runs, two processes at a time, each in its own
session) and a 2-process `torchrun` run (DistributedDataParallel over gloo). finetune and
transfer start from a source run trained once beforehand (`init.from_run`).

1. Reference. Each kind runs once, uninterrupted; its wall time is measured, and how often
   each fault point of xdt_cli/faults.py is reached in one process (a sitecustomize.py put
   on the reference's PYTHONPATH counts the calls; it changes nothing else).
2. Kill points. `--kills` of them (5 per kind by default), drawn from `random.Random` seeded
   by `--seed` and the kind's name. A kill point is either a timer (SIGKILL at a uniform
   moment within the reference's wall time; when a timed run ends before its moment, its
   duration becomes the wall time of the kind's later timers, since a busy machine can
   make the reference slow) or a fault point: `XDT_FAULT=NAME:N` with N
   uniform over the calls the reference made, so the process kills itself half-way through
   a checkpoint's temporary file (checkpoint.partial), between the two renames of last.pt
   (checkpoint.renamed), between two evaluated splits (evaluate) or half-way through a
   metrics row (metrics.append). The mechanisms follow one cycle over all kill points:
   timer, checkpoint.partial, evaluate, timer, checkpoint.renamed, metrics.append. A timer
   kill takes the whole process tree at once (a node dying: every descendant, found through
   /proc, sweep runs and torchrun ranks in their own sessions included); for the sweep, every
   other one kills only the sweep process, whose orphaned runs keep going and hold their run
   locks while the sweep is called again.
3. Readable. After the kill and before anything else, `xdt_cli.report.collect_runs` must read
   every run folder without a problem (and its metrics rows), and `xdt report FOLDER` must
   exit 0, or 2 with "no xdt runs found" when the kill came before any run folder held its
   config.
4. Resume, as a person would: `xdt resume RUN` (under torchrun for the torchrun kind), the
   same command again for the composites and the sweep, the same command with `--overwrite`
   for a run folder that the kill left without its config.yaml, nothing for a run that had
   ended before the kill came ("after the end"). The resuming call must exit 0.
5. Exact. Every run folder of the reference must exist, and no other; in each, metrics.jsonl
   must equal the reference's byte for byte, summary.json (and single_task.json, the
   leave-one-out parent's summary.json and table.md) must be equal but for wall times and
   the runs folder's own path, and checkpoints/last.pt and best.pt must hold bit-identical
   tensors and values (everything but the recorded elapsed time: model, optimizer,
   scheduler, RNG and data-stream state). No temporary file may be left in a run folder.

Every process runs with the environment of `xdt_cli.sweeps.child_env(2)` (the threads of a
sweep run with two jobs), since results differ bit-wise between thread counts; a sweep gives
its runs that environment itself.

Then the fault scenarios (each with its own checks, see `fault_scenarios`): SIGTERM mid-run,
an injected ENOSPC half-way through a checkpoint, an injected EIO half-way through a metrics
row, a real full file system (a tmpfs, where mounting is allowed: root on Linux), a
damaged last.pt (resume falls back to last.prev.pt and says so), both checkpoints damaged
(refused with one line), and a sweep killed while its last run trains alone (the sweep
called again then has fewer runs left than --jobs). Last, the corpus of bad inputs
(tests/bad_inputs/, run by tests/bad_input_corpus.py): each case must exit as its file says,
with one `error:` line naming the culprit.

Output: a progress line per kill point on stderr, `<work>/results.json` (everything), and the
markdown report (`--out`, default docs/RELIABILITY.md). Exit 0 only if every kill point left
its folders readable and resumed exactly, every fault scenario was survived and every bad
input that is not a known bug kept the contract; else 1, listing the failures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.bad_input_corpus

from xdt_cli import __version__  # noqa: E402
from xdt_cli.checkpoint import load_checkpoint  # noqa: E402
from xdt_cli.errors import XdtError  # noqa: E402
from xdt_cli.faults import ENV as FAULT_ENV  # noqa: E402
from xdt_cli.faults import POINTS  # noqa: E402
from xdt_cli.report import collect_runs, find_run_dirs  # noqa: E402
from xdt_cli.runs import git_sha, read_metrics  # noqa: E402
from xdt_cli.sweeps import child_env  # noqa: E402

PY = sys.executable
CONFIGS = REPO / "configs"
DEFAULT_OUT = REPO / "docs" / "RELIABILITY.md"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "xdt-reliability"
RUN = "run"  # the --name of every run the harness starts
STEPS = ("train.steps=40", "train.eval_every=10", "train.log_every=5")
SHORT = ("train.steps=20", "train.eval_every=10", "train.log_every=5")
THREE_DOMAINS = "data.domains=[rot0, rot15, rot30]"
# the mechanism of kill point g (over all kinds) is CYCLE[(g + seed) % len(CYCLE)]
CYCLE = ("timer", "checkpoint.partial", "evaluate", "timer", "checkpoint.renamed", "metrics.append")
MECHANISMS = ("timer", *POINTS)
COUNT_ENV = "XDT_RELIABILITY_COUNTS"  # where the instrumented reference writes its counts

# Put on the PYTHONPATH of a reference run only: every python process that imports it (the
# xdt process, a sweep's runs, torchrun's ranks) counts the calls of each fault point instead
# of checking XDT_FAULT, and writes the counts to $XDT_RELIABILITY_COUNTS/<pid>.json at exit.
# metrics.append is counted through `armed`, which append_metrics asks once per row.
SITECUSTOMIZE = '''\
"""Written by benchmarks/reliability.py: count the fault points of this process."""
import atexit
import json
import os
import sys

_folder = os.environ.get("XDT_RELIABILITY_COUNTS")
if _folder:
    from xdt_cli import faults as _faults

    def _count(name):
        _counts[name] = _counts.get(name, 0) + 1

    def _count_armed(name):
        _counts[name] = _counts.get(name, 0) + 1
        return False

    # the same function objects that other modules imported by name, with new code (its
    # globals stay those of xdt_cli.faults, where _counts lives)
    _faults.fault_point.__code__ = _count.__code__
    _faults.armed.__code__ = _count_armed.__code__

    def _dump():
        if _faults._counts:
            path = os.path.join(_folder, f"{os.getpid()}.json")
            with open(path, "w") as fh:
                json.dump({"argv": sys.argv, "counts": _faults._counts}, fh)

    atexit.register(_dump)
'''

# `python -c INJECT MODE N XDT-ARGS...`: xdt with an OSError injected into its N-th write of
# a checkpoint (MODE checkpoint: half the file written, then ENOSPC) or of a metrics row
# (MODE metrics: half the row written, then EIO); the rest of the process is the real CLI.
INJECT = """\
import errno, io, os, sys
from pathlib import Path

mode, nth = sys.argv[1], int(sys.argv[2])
calls = []
if mode == "checkpoint":
    import xdt_cli.checkpoint as checkpoint

    real = checkpoint.atomic_write_bytes

    def failing(path, writer, **kwargs):
        calls.append(path.name)
        if len(calls) != nth:
            return real(path, writer, **kwargs)

        def half_then_full(fh):
            buffer = io.BytesIO()
            writer(buffer)
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        return real(path, half_then_full, **kwargs)

    checkpoint.atomic_write_bytes = failing
elif mode == "metrics":
    real_open = Path.open

    class HalfThenEIO(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO), self.name)

    def open_(path, mode="r", *args, **kwargs):
        if path.name == "metrics.jsonl" and mode == "ab":
            calls.append(path)
            if len(calls) == nth:
                return HalfThenEIO(path, "ab")
        return real_open(path, mode, *args, **kwargs)

    Path.open = open_
from xdt_cli.cli import main

sys.argv = ["xdt", *sys.argv[3:]]
main()
"""

LIVE: set[subprocess.Popen] = set()  # processes to take down if the harness stops early


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the kinds
@dataclass(frozen=True)
class Kind:
    """One kind of xdt process: its arguments (without --runs-dir, --name, --quiet) and how it
    is launched and resumed (style: run, torchrun, leave-one-out, baselines or sweep)."""

    name: str
    what: str
    args: tuple[str, ...]
    style: str = "run"


KIND_NAMES = (
    "train-source",
    "finetune",
    "transfer",
    "multitask",
    "generalize",
    "leave-one-out",
    "baselines",
    "sweep",
    "torchrun",
)


def make_kinds(work: Path, source: Path | None) -> dict[str, Kind]:
    """The nine kinds; finetune and transfer start from `source` (a finished run)."""
    cfg = {
        "digits_cnn": CONFIGS / "train-source" / "digits_cnn.yaml",
        "finetune": CONFIGS / "transfer" / "digits_to_mnist5k_finetune_10shot.yaml",
        "dann": CONFIGS / "transfer" / "digits_to_mnist5k_dann.yaml",
        "dwa": CONFIGS / "multitask" / "multimnist5k_dwa.yaml",
        "static": CONFIGS / "multitask" / "multimnist5k_static.yaml",
        "groupdro": CONFIGS / "generalize" / "rotated_mnist5k_groupdro.yaml",
        "erm": CONFIGS / "generalize" / "rotated_mnist5k_erm.yaml",
        "quickstart": CONFIGS / "quickstart.yaml",
    }
    init = f"init.from_run={source}"
    warmup = "schedule.warmup_steps=5"  # the quick start's 50 would exceed the 40 steps
    sweep_file = work / "_sweep" / "sweep.yaml"
    return {
        k.name: k
        for k in [
            Kind(
                "train-source",
                "digits_cnn.yaml (cnn on digits, early stopping), 40 steps",
                ("train-source", str(cfg["digits_cnn"]), *STEPS, warmup),
            ),
            Kind(
                "finetune",
                "digits_to_mnist5k_finetune_10shot.yaml from a source run, 40 steps",
                ("finetune", str(cfg["finetune"]), *STEPS, init),
            ),
            Kind(
                "transfer",
                "digits_to_mnist5k_dann.yaml (DANN) from a source run, 40 steps",
                ("transfer", str(cfg["dann"]), *STEPS, init),
            ),
            Kind(
                "multitask",
                "multimnist5k_dwa.yaml (dynamic weight average), 40 steps",
                ("multitask", str(cfg["dwa"]), *STEPS),
            ),
            Kind(
                "generalize",
                "rotated_mnist5k_groupdro.yaml on rot0, rot15, rot30 (rot30 held out), 40 steps",
                ("generalize", str(cfg["groupdro"]), THREE_DOMAINS, "data.test_domains=[rot30]")
                + STEPS,
            ),
            Kind(
                "leave-one-out",
                "rotated_mnist5k_erm.yaml --leave-one-out on rot0, rot15, rot30: 3 child runs "
                "of 20 steps in one process",
                ("generalize", str(cfg["erm"]), THREE_DOMAINS, *SHORT, "--leave-one-out"),
                "leave-one-out",
            ),
            Kind(
                "baselines",
                "multimnist5k_static.yaml --single-task-baselines: 2 baselines, then the "
                "multitask run, 20 steps each, in one process",
                ("multitask", str(cfg["static"]), *SHORT, "--single-task-baselines"),
                "baselines",
            ),
            Kind(
                "sweep",
                "xdt sweep --jobs 2: the quick start (40 steps) x 3 seeds, 2 runs at a time",
                ("sweep", str(sweep_file), "--jobs", "2"),
                "sweep",
            ),
            Kind(
                "torchrun",
                "torchrun --nproc-per-node 2: the quick start, 40 steps (DDP over gloo)",
                ("train-source", str(cfg["quickstart"]), *STEPS, warmup),
                "torchrun",
            ),
        ]
    }


def write_sweep_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    overrides = ", ".join([*STEPS, "schedule.warmup_steps=5"])
    path.write_text(
        "# written by benchmarks/reliability.py\n"
        "name: sweep\n"
        "subcommand: train-source\n"
        f"config: {CONFIGS / 'quickstart.yaml'}\n"
        f"overrides: [{overrides}]\n"
        "seeds: [0, 1, 2]\n",
        encoding="utf-8",
    )


def start_args(kind: Kind, root: Path, overwrite: bool = False) -> list[str]:
    """The xdt arguments that start `kind` in the runs folder `root`."""
    if kind.style == "sweep":
        return [*kind.args, "--runs-dir", str(root), "--quiet"]
    args = [*kind.args, "--runs-dir", str(root), "--name", RUN, "--quiet"]
    return args + (["--overwrite"] if overwrite else [])


def launch(kind: Kind, args: list[str]) -> list[str]:
    """The whole command line: `python -m xdt_cli ARGS`, or the same under torchrun."""
    if kind.style == "torchrun":
        runner = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        return [PY, *runner, "-m", "xdt_cli", *args]
    return [PY, "-m", "xdt_cli", *args]


def resume_step(kind: Kind, root: Path) -> tuple[str, list[str]] | None:
    """What a person does after the kill: (what, the xdt arguments), None when done."""
    run = root / RUN
    has_config = (run / "config.yaml").is_file() and (run / "meta.json").is_file()
    if kind.style == "sweep":
        return "the sweep again", start_args(kind, root)
    if kind.style == "leave-one-out":
        if _status(run / "summary.json") == "completed":
            return None
        if run.exists() and not (run / "leave_one_out.json").is_file():
            return "the command again with --overwrite", start_args(kind, root, overwrite=True)
        return "the command again", start_args(kind, root)
    if has_config:
        if _status(run / "summary.json") == "completed":
            return None
        resumer = "torchrun ... xdt resume" if kind.style == "torchrun" else "xdt resume"
        return resumer, ["resume", str(run), "--quiet"]
    if run.exists():  # killed before its config.yaml was written: start it over
        return "the command again with --overwrite", start_args(kind, root, overwrite=True)
    return "the command again", start_args(kind, root)


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- processes
def environment(fault: str | None = None, counts: Path | None = None) -> dict[str, str]:
    """child_env(2) (one thread each on 2 cores), XDT_FAULT only when given."""
    env = child_env(2)
    env.pop(FAULT_ENV, None)
    env.pop(COUNT_ENV, None)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if fault:
        env[FAULT_ENV] = fault
    if counts is not None:
        instrument = counts.parent / "instrument"
        instrument.mkdir(parents=True, exist_ok=True)
        (instrument / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(instrument), env.get("PYTHONPATH")) if p
        )
        env[COUNT_ENV] = str(counts)
    return env


def start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a process in a session of its own, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        fh.write(f"$ {shlex.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    LIVE.add(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait for the process; None (and the whole tree killed) when it outlives `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        return None
    finally:
        if proc.returncode is not None:
            LIVE.discard(proc)


def run_logged(argv: list[str], env: dict[str, str], log_path: Path, timeout: float) -> int | None:
    return finish(start(argv, env, log_path), timeout)


def run_captured(
    argv: list[str], env: dict[str, str], timeout: float
) -> tuple[int | None, str, str]:
    """(exit code or None on a timeout, stdout, stderr)."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    LIVE.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        code = None
    LIVE.discard(proc)
    return code, out, err


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from the parent links of /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant, as when the machine dies: the root is stopped
    first so that it starts nothing more while its tree is listed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# --------------------------------------------------------------------------- references
@dataclass
class Reference:
    """An uninterrupted run of a kind: where, how long, and how often each fault point was
    reached in one process (the most over its processes)."""

    kind: str
    argv: list[str]
    root: str
    wall_s: float
    counts: dict[str, int]
    runs: list[str]


def run_reference(kind: Kind, work: Path, reuse: bool, timeout: float) -> Reference:
    folder = work / kind.name
    root = folder / "reference"
    argv = launch(kind, start_args(kind, root))
    saved = folder / "reference.json"
    if reuse and saved.is_file():
        ref = Reference(**json.loads(saved.read_text(encoding="utf-8")))
        if ref.argv == argv and all_completed(root):
            log(f"reference {kind.name}: reused ({ref.wall_s:.1f} s)")
            return ref
    shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True)
    counts_dir = folder / "counts"
    counts_dir.mkdir()
    started = time.monotonic()
    code = run_logged(argv, environment(counts=counts_dir), folder / "reference.log", timeout)
    wall = time.monotonic() - started
    if code != 0 or not all_completed(root):
        raise HarnessError(
            f"the reference run of {kind.name} failed (exit {code}): "
            f"{tail(folder / 'reference.log', 5)}"
        )
    counts: dict[str, int] = dict.fromkeys(POINTS, 0)
    for path in counts_dir.glob("*.json"):
        for name, n in json.loads(path.read_text(encoding="utf-8"))["counts"].items():
            counts[name] = max(counts.get(name, 0), int(n))
    runs = [str(p.relative_to(root)) for p in find_run_dirs(root)]
    ref = Reference(kind.name, argv, str(root), round(wall, 2), counts, runs)
    saved.write_text(json.dumps(asdict(ref), indent=2) + "\n", encoding="utf-8")
    log(f"reference {kind.name}: {wall:.1f} s, {len(runs)} run(s), fault points reached {counts}")
    return ref


def all_completed(root: Path) -> bool:
    runs = find_run_dirs(root) if root.is_dir() else []
    return bool(runs) and all(_status(r / "summary.json") == "completed" for r in runs)


class HarnessError(Exception):
    """The harness could not set up what it measures (a reference run failed)."""


# --------------------------------------------------------------------------- checks
def check_readable(root: Path, timeout: float) -> list[str]:
    """Problems that `xdt report` would have with what a kill left in `root` (none: fine)."""
    problems = []
    found = find_run_dirs(root) if root.is_dir() else []
    if found:
        try:
            records = collect_runs([root])
        except XdtError as exc:
            problems.extend(f"collect_runs: {line}" for line in exc.lines)
            records = []
        for record in records:
            if record.problem is not None:
                problems.append(f"{record.path}: {record.problem}")
                continue
            try:
                record.rows()
            except XdtError as exc:
                problems.extend(f"{record.path}: {line}" for line in exc.lines)
    code, _, err = run_captured([PY, "-m", "xdt_cli", "report", str(root)], environment(), timeout)
    if "Traceback" in err:
        problems.append(f"xdt report printed a traceback: {err.strip().splitlines()[-1]}")
    if found and code != 0:
        problems.append(f"xdt report exited {code}: {err.strip()[-300:]}")
    elif not found and (code != 2 or "no xdt runs found" not in err):
        problems.append(f"xdt report on a folder without runs exited {code}: {err.strip()[-300:]}")
    return problems


def where_it_landed(root: Path) -> str:
    """The state a kill left: each run folder's last metrics step, or where none is yet."""
    runs = find_run_dirs(root) if root.is_dir() else []
    if not runs:
        entries = [p for p in root.rglob("*") if p.is_dir() and p.name not in ("logs", ".claims")]
        return "before config.yaml" if entries else "before the run folder"
    parts = []
    for run in runs:
        rel = str(run.relative_to(root))
        if _status(run / "summary.json") == "completed":
            parts.append(f"{rel} done")
            continue
        rows = read_metrics(run / "metrics.jsonl")
        parts.append(f"{rel} at step {rows[-1]['step'] if rows else 0}")
    return ", ".join(parts)


def normalise(value: Any, roots: tuple[str, ...]) -> Any:
    """A summary as compared: wall times dropped, the runs folder's path replaced."""
    if isinstance(value, dict):
        return {k: normalise(v, roots) for k, v in value.items() if k != "wall_time_s"}
    if isinstance(value, list):
        return [normalise(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<runs>")
    return value


def state_diff(a: Any, b: Any, where: str) -> list[str]:
    """Where two checkpoint states differ: tensors bit for bit, everything else by ==."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bits(a), _bits(b))
        )
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys {sorted(map(str, a.keys() ^ b.keys()))[:4]})"]
        return [d for k in a for d in state_diff(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in state_diff(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [where]


def _bits(tensor: Any) -> Any:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def compare_runs(ref_root: Path, root: Path) -> list[str]:
    """Every way in which the runs under `root` differ from the reference's (empty: exact)."""
    diffs = []
    roots = tuple({str(root.resolve()), str(root)}) + tuple(
        {str(ref_root.resolve()), str(ref_root)}
    )
    mine = {str(p.relative_to(root)) for p in find_run_dirs(root)}
    theirs = {str(p.relative_to(ref_root)) for p in find_run_dirs(ref_root)}
    if mine != theirs:
        diffs.append(f"run folders: missing {sorted(theirs - mine)}, extra {sorted(mine - theirs)}")
    for rel in sorted(mine & theirs):
        diffs.extend(_compare_run(ref_root / rel, root / rel, rel))
    # composite files outside the run folders (the leave-one-out parent)
    for ref_file in sorted([*ref_root.rglob("summary.json"), *ref_root.rglob("table.md")]):
        rel = str(ref_file.relative_to(ref_root))
        if any(rel.startswith(run + "/") for run in theirs):
            continue
        diffs.extend(_compare_file(ref_file, root / rel, rel, roots))
    return diffs


def _compare_run(ref: Path, run: Path, rel: str) -> list[str]:
    diffs = []
    roots = (str(run.parent.resolve()), str(run.parent), str(ref.parent.resolve()), str(ref.parent))
    a = (ref / "metrics.jsonl").read_text(encoding="utf-8")
    b = (
        (run / "metrics.jsonl").read_text(encoding="utf-8")
        if (run / "metrics.jsonl").is_file()
        else ""
    )
    if a != b:
        la, lb = a.splitlines(), b.splitlines()
        pairs = enumerate(zip(la, lb, strict=False))
        first = next((i for i, (x, y) in pairs if x != y), min(len(la), len(lb)))
        diffs.append(
            f"{rel}/metrics.jsonl: differs from line {first + 1} ({len(lb)} vs {len(la)} lines)"
        )
    for name in ("summary.json", "single_task.json"):
        if (ref / name).is_file() or (run / name).is_file():
            diffs.extend(_compare_file(ref / name, run / name, f"{rel}/{name}", roots))
    for name in ("last.pt", "best.pt"):
        path_a, path_b = ref / "checkpoints" / name, run / "checkpoints" / name
        if not path_a.is_file() and not path_b.is_file():
            continue
        try:
            x, y = load_checkpoint(path_a), load_checkpoint(path_b)
        except XdtError as exc:
            diffs.append(f"{rel}/checkpoints/{name}: {exc.lines[0]}")
            continue
        x.pop("elapsed", None)
        y.pop("elapsed", None)
        differ = state_diff(x, y, name)
        if differ:
            shown = ", ".join(differ[:4]) + (
                f", +{len(differ) - 4} more" if len(differ) > 4 else ""
            )
            diffs.append(f"{rel}/checkpoints/{name}: differs at {shown}")
    left = [str(p.relative_to(run)) for p in run.rglob("*.tmp")]
    if left:
        diffs.append(f"{rel}: temporary files left behind: {left}")
    return diffs


def _compare_file(ref: Path, mine: Path, rel: str, roots: tuple[str, ...]) -> list[str]:
    if not mine.is_file():
        return [f"{rel}: missing"]
    if not ref.is_file():
        return [f"{rel}: not in the reference"]
    if ref.suffix != ".json":
        same = ref.read_text(encoding="utf-8") == mine.read_text(encoding="utf-8")
        return [] if same else [f"{rel}: differs"]
    a = normalise(json.loads(ref.read_text(encoding="utf-8")), roots)
    b = normalise(json.loads(mine.read_text(encoding="utf-8")), roots)
    if a == b:
        return []
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [f"{rel}: differs in {', '.join(keys[:6])}"]


# --------------------------------------------------------------------------- kill points
@dataclass
class KillPoint:
    """One planned kill and, once tried, what came of it."""

    index: int
    kind: str
    mechanism: str  # "timer" or a fault point
    fraction: float | None = None  # timer: the moment, as a fraction of the reference's time
    moment_s: float | None = None
    nth: int | None = None  # fault point: the call that kills
    mode: str = "tree"  # timer: "tree" (every process) or "sweep only"
    # outcome
    killed: bool | None = None
    exit_code: int | None = None
    landed: str = ""  # before the run folder | before config.yaml | mid-run | after the end
    state: str = ""  # each run folder's step when killed
    readable: bool | None = None
    readable_problems: list[str] = field(default_factory=list)
    resumed_by: str = ""
    resume_exit: int | None = None
    exact: bool | None = None
    diffs: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.readable and self.exact and not self.error)

    def how(self) -> str:
        if self.mechanism == "timer":
            mode = ", sweep process only" if self.mode == "sweep only" else ""
            return f"timer at {self.moment_s:.1f} s ({self.fraction:.2f}){mode}"
        return f"{FAULT_ENV}={self.mechanism}:{self.nth}"


def plan_kills(
    kinds: list[str], per_kind: dict[str, int], refs: dict[str, Reference], seed: int
) -> list[KillPoint]:
    """The seeded kill points of every kind (module docstring, step 2)."""
    plan: list[KillPoint] = []
    g = 0
    for name in kinds:
        rng = random.Random(f"{seed}/{name}")
        timers = 0
        for _ in range(per_kind[name]):
            mechanism = CYCLE[(g + seed) % len(CYCLE)]
            g += 1
            ref = refs.get(name)
            point = KillPoint(index=len(plan) + 1, kind=name, mechanism=mechanism)
            fraction, nth_draw = rng.random(), rng.random()
            if ref is not None and mechanism != "timer" and ref.counts.get(mechanism, 0) < 1:
                point.mechanism = mechanism = "timer"  # never reached by this kind
            if mechanism == "timer":
                point.fraction = round(fraction, 4)
                if name == "sweep" and timers % 2 == 1:  # every other timer of the sweep
                    point.mode = "sweep only"
                timers += 1
            else:
                point.nth = 1 + int(nth_draw * ref.counts[mechanism]) if ref else None
            plan.append(point)
    return plan


def try_kill_point(
    point: KillPoint, kind: Kind, ref: Reference, work: Path, timeout: float
) -> None:
    """Start the kind, kill it, check the folder, resume it, compare (module docstring)."""
    started = time.monotonic()
    folder = work / kind.name
    root = folder / f"kill{point.index:02d}"
    log_path = folder / f"kill{point.index:02d}.log"
    shutil.rmtree(root, ignore_errors=True)
    log_path.unlink(missing_ok=True)
    root.mkdir(parents=True)
    argv = launch(kind, start_args(kind, root))
    if point.mechanism == "timer":
        assert point.fraction is not None
        point.moment_s = round(point.fraction * ref.wall_s, 2)
        launched = time.monotonic()
        proc = start(argv, environment(), log_path)
        try:
            point.exit_code = proc.wait(timeout=point.moment_s)
            point.killed = False
            if point.exit_code == 0:  # a faster uninterrupted run: the later timers use it
                ref.wall_s = round(time.monotonic() - launched, 2)
        except subprocess.TimeoutExpired:
            if point.mode == "sweep only":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            else:
                kill_tree(proc.pid)
            point.exit_code = proc.wait()
            point.killed = True
        LIVE.discard(proc)
    else:
        fault = f"{point.mechanism}:{point.nth}"
        point.exit_code = run_logged(argv, environment(fault), log_path, timeout)
        if point.exit_code is None:
            point.error = f"the run with {FAULT_ENV}={fault} hung for {timeout:.0f} s"
        point.killed = point.exit_code != 0
    if point.killed:
        point.state = where_it_landed(root)
        point.landed = point.state if point.state.startswith("before") else "mid-run"
        runs = {str(p.relative_to(root)) for p in find_run_dirs(root)}
        finished = resume_step(kind, root) is None or kind.style == "sweep"
        if runs == set(ref.runs) and all_completed(root) and finished:
            point.landed = "after the end"  # every run had written its summary.json
    else:
        point.landed = "after the end"
        point.state = "ended before the kill" if point.mechanism == "timer" else "fault not reached"
        if point.exit_code != 0:
            point.error = f"ended by itself with exit {point.exit_code}: {tail(log_path, 6)}"
    point.readable_problems = check_readable(root, timeout)
    point.readable = not point.readable_problems
    step = resume_step(kind, root) if point.killed else None
    if step is not None:
        point.resumed_by, args = step
        point.resume_exit = run_logged(launch(kind, args), environment(), log_path, timeout)
        if point.resume_exit != 0:
            point.error = f"{point.resumed_by} exited {point.resume_exit}: {tail(log_path, 6)}"
    else:
        point.resumed_by = "nothing to resume"
    if not point.error:
        point.diffs = compare_runs(Path(ref.root), root)
        after = check_readable(root, timeout)
        point.diffs += [f"after the resume: {p}" for p in after]
        not_done = [
            str(r.relative_to(root))
            for r in find_run_dirs(root)
            if _status(r / "summary.json") != "completed"
        ]
        point.diffs += [f"{r}: not completed after the resume" for r in not_done]
        point.exact = not point.diffs
    point.seconds = round(time.monotonic() - started, 1)


# --------------------------------------------------------------------------- fault scenarios
@dataclass
class Scenario:
    """One injected fault outside the kill matrix and whether the run survived it."""

    name: str
    injected: str
    expected: str
    survived: bool | None = None  # None: skipped (the machine does not allow it)
    outcome: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def fault_scenarios(
    kinds: dict[str, Kind], refs: dict[str, Reference], work: Path, seed: int, timeout: float
) -> list[Scenario]:
    """The faults beyond the kill matrix, each compared with its kind's reference: on the
    train-source kind SIGTERM, injected write errors, a full file system and damaged
    checkpoints; on the sweep, a kill while its last run trains alone."""
    scenarios = []
    if "train-source" in refs:
        scenarios += _train_source_faults(
            kinds["train-source"], refs["train-source"], work, seed, timeout
        )
    if "sweep" in refs:
        scenarios.append(_sweep_last_run(kinds["sweep"], refs["sweep"], work, timeout))
    return scenarios


def _train_source_faults(
    kind: Kind, ref: Reference, work: Path, seed: int, timeout: float
) -> list[Scenario]:
    rng = random.Random(f"{seed}/faults")
    rows = read_metrics(Path(ref.root) / RUN / "metrics.jsonl")
    return [
        _sigterm(kind, ref, work, timeout),
        _injected(
            kind,
            ref,
            work,
            "checkpoint",
            2 + int(rng.random() * (ref.counts["checkpoint.partial"] - 1)),
            timeout,
        ),
        _injected(kind, ref, work, "metrics", 2 + int(rng.random() * (len(rows) - 1)), timeout),
        _full_disk(kind, ref, work, timeout),
        *_damaged(kind, ref, work, timeout),
    ]


def _scenario_root(work: Path, name: str) -> Path:
    root = work / "faults" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def _resume_and_compare(
    scenario: Scenario, kind: Kind, ref: Reference, root: Path, timeout: float, quiet: bool = True
) -> str:
    """xdt resume the run under `root`, compare it with the reference; returns stderr."""
    args = ["resume", str(root / RUN)] + (["--quiet"] if quiet else [])
    code, _, err = run_captured(launch(kind, args), environment(), timeout)
    if code != 0:
        scenario.problems.append(f"xdt resume exited {code}: {err.strip()[-400:]}")
        return err
    scenario.problems.extend(compare_runs(Path(ref.root), root))
    return err


def _intact(scenario: Scenario, ref: Reference, run: Path) -> None:
    """What a stopped run must leave: no summary, a loadable last.pt, whole metrics rows
    that begin the reference's, no temporary file."""
    if (run / "summary.json").exists():
        scenario.problems.append("summary.json written: the run is not resumable")
    if (run / "checkpoints" / "last.pt").exists():
        try:
            load_checkpoint(run / "checkpoints" / "last.pt")
        except XdtError as exc:
            scenario.problems.append(f"last.pt: {exc.lines[0]}")
    mine = (
        (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if (run / "metrics.jsonl").exists()
        else []
    )
    reference = (Path(ref.root) / RUN / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    if mine != reference[: len(mine)]:
        scenario.problems.append("metrics.jsonl is not a prefix of the reference's")
    left = [p.name for p in run.rglob("*.tmp")]
    if left:
        scenario.problems.append(f"temporary files left: {left}")


def _one_error_line(scenario: Scenario, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        scenario.problems.append(f"expected one 'error:' line, got {lines[-3:]}")
    for needle in needles:
        if needle not in err:
            scenario.problems.append(f"the message does not say {needle!r}")
    if "Traceback" in err:
        scenario.problems.append("a traceback")


def _start_until_last_pt(kind: Kind, root: Path, timeout: float) -> subprocess.Popen:
    """Start the kind's run under `root` and return once its first last.pt is on disk (or
    it ended, or `timeout` passed): the moment a fault scenario strikes."""
    proc = subprocess.Popen(
        launch(kind, start_args(kind, root)),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    LIVE.add(proc)
    last = root / RUN / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc


def _finish_scenario_run(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for a scenario's run (killing its tree after `timeout`); its stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        _, err = proc.communicate()
    LIVE.discard(proc)
    return err


def _sigterm(kind: Kind, ref: Reference, work: Path, timeout: float) -> Scenario:
    s = Scenario(
        "SIGTERM mid-run",
        "SIGTERM once the first last.pt is on disk (a scheduler's preemption, Ctrl-C's cousin)",
        "exit 143, summary.json status interrupted; xdt resume ends exactly as the reference",
    )
    began = time.monotonic()
    root = _scenario_root(work, "sigterm")
    proc = _start_until_last_pt(kind, root, timeout)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    err = _finish_scenario_run(proc, timeout)
    status = _status(root / RUN / "summary.json")
    s.outcome = f"exit {proc.returncode}, status {status}"
    if proc.returncode != 143 or status != "interrupted":
        s.problems.append(f"{s.outcome}: {err.strip()[-300:]}")
    else:
        _resume_and_compare(s, kind, ref, root, timeout)
        s.outcome += "; resumed"
    s.survived = not s.problems
    s.seconds = round(time.monotonic() - began, 1)
    return s


def _injected(
    kind: Kind, ref: Reference, work: Path, mode: str, nth: int, timeout: float
) -> Scenario:
    if mode == "checkpoint":
        s = Scenario(
            f"ENOSPC in checkpoint write {nth}",
            f"OSError(ENOSPC) after half of checkpoint file {nth} (of the run) is written",
            "exit 1, one 'error: cannot write ... No space left on device' line naming the run "
            "and `xdt resume`; the last complete checkpoint kept; resume exact",
        )
        needle = "No space left on device"
    else:
        s = Scenario(
            f"EIO in metrics row {nth}",
            f"OSError(EIO) after half of metrics.jsonl row {nth} is written",
            "exit 1, one 'error: cannot write ... Input/output error' line; the half row cut "
            "off again; resume exact",
        )
        needle = "Input/output error"
    began = time.monotonic()
    root = _scenario_root(work, f"inject-{mode}")
    argv = [PY, "-c", INJECT, mode, str(nth), *start_args(kind, root)]
    code, _, err = run_captured(argv, environment(), timeout)
    s.outcome = f"exit {code}"
    if code != 1:
        s.problems.append(f"exit {code}, expected 1: {err.strip()[-300:]}")
    else:
        _one_error_line(s, err, "error: cannot write", needle, f"xdt resume {root / RUN}")
        _intact(s, ref, root / RUN)
        _resume_and_compare(s, kind, ref, root, timeout)
        s.outcome += "; resumed"
    s.survived = not s.problems
    s.seconds = round(time.monotonic() - began, 1)
    return s


def _full_disk(kind: Kind, ref: Reference, work: Path, timeout: float) -> Scenario:
    s = Scenario(
        "full file system",
        "the run's folder on a small tmpfs, filled up by a ballast file once last.pt exists",
        "exit 1, one 'error: cannot write ... No space left on device' line; space freed; "
        "xdt resume exact",
    )
    began = time.monotonic()
    if sys.platform != "linux" or os.geteuid() != 0:
        s.outcome = "skipped: mounting a tmpfs needs root on Linux"
        return s
    mount = _scenario_root(work, "full-disk") / "small"
    mount.mkdir()
    size = (Path(ref.root) / RUN / "checkpoints" / "last.pt").stat().st_size
    mib = 1 + (6 * size) // 2**20  # last.pt, last.prev.pt, best.pt, a temporary file and more
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        s.outcome = f"skipped: cannot mount a tmpfs here ({made.stderr.strip()})"
        return s
    try:
        root = mount / "runs"
        proc = _start_until_last_pt(kind, root, timeout)
        ballast = mount / "ballast"
        with ballast.open("wb") as fh:  # every free block, until the file system is full
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        err = _finish_scenario_run(proc, timeout)
        s.outcome = f"{mib} MiB tmpfs, exit {proc.returncode}"
        if proc.returncode != 1:
            s.problems.append(f"exit {proc.returncode}, expected 1: {err.strip()[-300:]}")
        else:
            _one_error_line(
                s, err, "error: cannot write", "No space left on device", f"xdt resume {root / RUN}"
            )
            _intact(s, ref, root / RUN)
            ballast.unlink()
            _resume_and_compare(s, kind, ref, root, timeout)
            s.outcome += "; space freed, resumed"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
    s.survived = not s.problems
    s.seconds = round(time.monotonic() - began, 1)
    return s


def _damaged(kind: Kind, ref: Reference, work: Path, timeout: float) -> list[Scenario]:
    """A run killed after two saves of last.pt; then last.pt cut in half (resume falls back
    to last.prev.pt and says so), or both cut (resume refuses with one line)."""
    one = Scenario(
        "damaged last.pt",
        "SIGKILL after two saves of last.pt, then last.pt truncated to half",
        "xdt resume says it resumes from last.prev.pt, exits 0 and ends exactly as the reference",
    )
    both = Scenario(
        "damaged last.pt and last.prev.pt",
        "the same, with last.prev.pt truncated too",
        "xdt resume exits 2 with one line naming both; the folder stays readable by xdt report",
    )
    began = time.monotonic()
    rows = read_metrics(Path(ref.root) / RUN / "metrics.jsonl")
    evals = [i for i, row in enumerate(rows) if row["split"] == "eval"]
    if len(evals) < 2 or evals[1] + 1 >= len(rows):
        for s in (one, both):
            s.outcome = "skipped: the reference has fewer than two evaluations before its last row"
        return [one, both]
    nth = evals[1] + 2  # the row after the second evaluation (and its last.pt)
    root = _scenario_root(work, "damaged")
    code = run_logged(
        launch(kind, start_args(kind, root)),
        environment(f"metrics.append:{nth}"),
        root / "kill.log",
        timeout,
    )
    checkpoints = root / RUN / "checkpoints"
    if code != -signal.SIGKILL or not (checkpoints / "last.prev.pt").is_file():
        for s in (one, both):
            s.problems.append(
                f"setting up: exit {code}, "
                f"last.prev.pt present: {(checkpoints / 'last.prev.pt').is_file()}"
            )
            s.survived = False
        return [one, both]
    twin = work / "faults" / "damaged-both"
    shutil.rmtree(twin, ignore_errors=True)
    shutil.copytree(root, twin)
    for path in (
        checkpoints / "last.pt",
        twin / RUN / "checkpoints" / "last.pt",
        twin / RUN / "checkpoints" / "last.prev.pt",
    ):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    err = _resume_and_compare(one, kind, ref, root, timeout, quiet=False)
    note = "last.pt is unusable"
    if note not in err or "resuming from last.prev.pt" not in err:
        one.problems.append("stderr does not say that it resumes from last.prev.pt")
    one.outcome = next((ln for ln in err.splitlines() if note in ln), "no note")
    one.survived = not one.problems
    one.seconds = round(time.monotonic() - began, 1)

    began = time.monotonic()
    code, _, err = run_captured(
        launch(kind, ["resume", str(twin / RUN), "--quiet"]), environment(), timeout
    )
    both.outcome = f"exit {code}: {err.strip()}"
    if code != 2:
        both.problems.append(f"exit {code}, expected 2")
    _one_error_line(both, err, "last.prev.pt is unusable too")
    both.problems.extend(check_readable(twin, timeout))
    both.survived = not both.problems
    both.seconds = round(time.monotonic() - began, 1)
    return [one, both]


def _sweep_last_run(kind: Kind, ref: Reference, work: Path, timeout: float) -> Scenario:
    """The sweep's whole tree killed while its third run trains alone (the first two done),
    then the sweep called again: the one run it resumes must end as in the reference."""
    s = Scenario(
        "sweep killed during its last run",
        "SIGKILL of the sweep's whole tree once two of its three runs are done and the third "
        "has saved last.pt (the sweep again then has one run left of --jobs 2)",
        "the sweep again exits 0 and every run ends exactly as in the uninterrupted sweep",
    )
    began = time.monotonic()
    root = _scenario_root(work, "sweep-last-run")
    sweep = root / "sweep"
    proc = start(launch(kind, start_args(kind, root)), environment(), root.parent / "sweep.log")
    deadline = time.monotonic() + timeout

    def alone() -> bool:  # two runs done, the third with a last.pt and no summary yet
        done = [r for r in sweep.glob("*/summary.json") if _status(r) == "completed"]
        last = [
            r
            for r in sweep.glob("*/checkpoints/last.pt")
            if not (r.parents[1] / "summary.json").exists()
        ]
        return len(done) == 2 and len(last) == 1

    while proc.poll() is None and time.monotonic() < deadline and not alone():
        time.sleep(0.01)
    if proc.poll() is not None:
        s.outcome = "skipped: the sweep ended before its last run could be caught alone"
        LIVE.discard(proc)
        return s
    kill_tree(proc.pid)
    proc.wait()
    LIVE.discard(proc)
    s.outcome = f"killed: {where_it_landed(root)}"
    s.problems.extend(check_readable(root, timeout))
    code = run_logged(
        launch(kind, start_args(kind, root)), environment(), root.parent / "sweep.log", timeout
    )
    if code != 0:
        s.problems.append(f"the sweep again exited {code}: {tail(root.parent / 'sweep.log', 5)}")
    else:
        threads = [
            json.loads((r / "sweep" / "sweep.json").read_text(encoding="utf-8"))["threads_per_run"]
            for r in (Path(ref.root), root)
        ]
        s.outcome += (
            f"; the sweep again ran it at {threads[1]} thread(s), the uninterrupted sweep "
            f"at {threads[0]}"
        )
        s.problems.extend(compare_runs(Path(ref.root), root))
    s.survived = not s.problems
    s.seconds = round(time.monotonic() - began, 1)
    return s


# --------------------------------------------------------------------------- bad inputs
def bad_inputs(work: Path) -> dict[str, Any]:
    """The project's corpus (tests/bad_inputs/), every case in-process as its test runs it."""
    from tests.bad_input_corpus import run_corpus

    folder = work / "bad_inputs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    began = time.monotonic()
    results = run_corpus(folder)
    cases = [
        {
            "case": r.case,
            "subcommand": r.subcommand,
            "why": r.why,
            "argv": r.argv,
            "exit_code": r.exit_code,
            "expected_exit": r.expected_exit,
            "message": r.message.splitlines()[0] if r.message else "",
            "ok": r.ok,
            "problems": r.problems,
            "known_bug": r.known_bug,
        }
        for r in results
    ]
    return {"seconds": round(time.monotonic() - began, 1), "cases": cases}


# --------------------------------------------------------------------------- the report
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xdt": __version__,
        "git_sha": git_sha(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "threads_per_process": int(child_env(2)["OMP_NUM_THREADS"]),
    }


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    kills = [KillPoint(**k) for k in results["kills"]]
    lines = [
        "# Reliability: kills, faults and bad inputs",
        "",
        "<!-- generated by benchmarks/reliability.py from its own run; do not edit by hand -->",
        "Generated by `benchmarks/reliability.py` from its own run, not written by hand "
        "(issue 19, points 1 and 7). To regenerate it, from the repository root:",
        "",
        f"    {results['command']}",
        "",
        f"Run on {results['date']}, in {results['seconds'] / 60:.1f} minutes: {m['cpus']} CPUs "
        f"({m['cpu']}), Python {m['python']}, torch {m['torch']}, xdt {m['xdt']}"
        + (f" (git {m['git_sha'][:10]})" if m.get("git_sha") else "")
        + f", {m['platform']}; every xdt process at {m['threads_per_process']} thread(s), seed "
        f"{results['seed']}.",
        "",
        "The method is in the docstring of benchmarks/reliability.py. In short: each kind of "
        "xdt process runs once uninterrupted (the reference), then again for each kill point, "
        "killed with SIGKILL either by a timer at a uniform moment within the reference's wall "
        "time or by a fault point of xdt_cli/faults.py at its N-th call (N uniform over the "
        "reference's calls); what the kill left must be readable by `xdt report`; the run is "
        "resumed as a person would (`xdt resume`, or the same command again) and its "
        "metrics.jsonl, summary.json and checkpoints (last.pt, best.pt: weights, optimizer, "
        "RNG and data state) must equal the reference's bit for bit.",
        "",
        "## Kill points",
        "",
    ]
    lines += _kinds_table(results, kills)
    lines += ["", "Every kill point:", ""]
    lines += [
        "| # | kind | kill | landed | resumed by | exact | readable | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in kills:
        state = k.state if len(k.state) < 80 else k.state[:77] + "..."
        lines.append(
            f"| {k.index} | {k.kind} | {k.how()} | {state} | {k.resumed_by} | "
            f"{_yes(k.exact)} | {_yes(k.readable)} | {k.seconds:.0f} |"
        )
    lines += ["", "## Faults injected", ""]
    lines += _faults_table(results, kills)
    lines += ["", "## Bad inputs", ""]
    lines += _bad_inputs_section(results.get("bad_inputs"))
    lines += ["", "## Failures", ""]
    lines += [f"- {f}" for f in results["failures"]] or ["None."]
    return "\n".join(lines) + "\n"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def _kinds_table(results: dict[str, Any], kills: list[KillPoint]) -> list[str]:
    head = ["kind", "what runs", "reference s", "kill points", *MECHANISMS]
    head += [
        "before the folder",
        "before config",
        "mid-run",
        "after the end",
        "resumed exactly",
        "left readable",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def row(label: str, what: str, ref_s: str, mine: list[KillPoint]) -> str:
        by = Counter(k.mechanism for k in mine)
        landed = Counter(k.landed for k in mine)
        cells = [label, what, ref_s, str(len(mine)), *(str(by[m]) for m in MECHANISMS)]
        cells += [
            str(landed[x])
            for x in ("before the run folder", "before config.yaml", "mid-run", "after the end")
        ]
        cells += [
            f"{sum(bool(k.exact) and not k.error for k in mine)}/{len(mine)}",
            f"{sum(bool(k.readable) for k in mine)}/{len(mine)}",
        ]
        return "| " + " | ".join(cells) + " |"

    for name, info in results["kinds"].items():
        mine = [k for k in kills if k.kind == name]
        ref_s = f"{info['reference_s']:.1f}" if info.get("reference_s") is not None else "failed"
        lines.append(row(f"`{name}`", info["what"], ref_s, mine))
    lines.append(row("**total**", "", "", kills))
    return lines


def _faults_table(results: dict[str, Any], kills: list[KillPoint]) -> list[str]:
    lines = [
        "Fault points of the kill matrix (the process kills itself with SIGKILL at that place):",
        "",
        "| fault point | where | injected | survived (resumed exactly) |",
        "| --- | --- | --- | --- |",
    ]
    where = {
        "checkpoint.partial": "a checkpoint's temporary file written, not yet fsynced or renamed",
        "checkpoint.renamed": "last.pt moved to last.prev.pt, the new one not yet in place",
        "evaluate": "between two evaluated splits",
        "metrics.append": "half a metrics.jsonl row written",
    }
    for point in POINTS:
        mine = [k for k in kills if k.mechanism == point]
        lines.append(
            f"| `{point}` | {where[point]} | {len(mine)} | {sum(k.ok for k in mine)}/{len(mine)} |"
        )
    lines += [
        "",
        "Other faults (on the `train-source` kind, the last on the `sweep`; each run compared "
        "with the reference of its kind):",
        "",
        "| fault | injected | expected | outcome | survived |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in results.get("faults") or []:
        survived = "skipped" if s["survived"] is None else _yes(s["survived"])
        outcome = s["outcome"].replace("|", "\\|").replace("\n", " ")
        outcome = outcome if len(outcome) <= 200 else outcome[:197] + "..."
        lines.append(
            f"| {s['name']} | {s['injected']} | {s['expected']} | {outcome} | {survived} |"
        )
    if results.get("faults") is None:
        lines.append("| (not run) | | | | |")
    return lines


def _bad_inputs_section(corpus: dict[str, Any] | None) -> list[str]:
    if corpus is None:
        return ["Not run (`--no-bad-inputs`)."]
    cases = corpus["cases"]
    exit2 = [c for c in cases if c["expected_exit"] == 2]
    good2 = [c for c in exit2 if c["ok"]]
    other = [c for c in cases if c["expected_exit"] != 2]
    known = [c for c in cases if c["known_bug"]]
    text = (
        f"The project's corpus, tests/bad_inputs/ (run by tests/bad_input_corpus.py, each case "
        f"in-process in a fresh folder, as tests/test_bad_inputs.py runs it): {len(cases)} cases "
        f"over {len({c['subcommand'] for c in cases})} subcommands, the training commands and "
        f"the tools that read runs (report, plot, evaluate, benchmark, ...), in "
        f"{corpus['seconds']:.0f} s. {len(good2)} of the {len(exit2)} cases that expect exit 2 "
        "gave exit 2 with exactly one `error:` line naming the culprit, nothing on stdout and "
        "no traceback."
    )
    if other:
        text += (
            f" {sum(c['ok'] for c in other)} of the {len(other)} cases that expect another exit "
            "code gave it with the same one-line message."
        )
    if known:
        text += f" {len(known)} case(s) are marked as known bugs (strict xfails in the tests)."
    lines = [
        text,
        "",
        "| subcommand | cases | kept the contract | did not |",
        "| --- | --- | --- | --- |",
    ]
    by = Counter(c["subcommand"] for c in cases)
    for sub in sorted(by):
        mine = [c for c in cases if c["subcommand"] == sub]
        ok = sum(c["ok"] for c in mine)
        lines.append(f"| `{sub}` | {len(mine)} | {ok} | {len(mine) - ok} |")
    lines.append(
        f"| **total** | {len(cases)} | {sum(c['ok'] for c in cases)} | "
        f"{sum(not c['ok'] for c in cases)} |"
    )
    bad = [c for c in cases if not c["ok"]]
    if other:
        lines += ["", "Cases that expect an exit code other than 2:", ""]
        lines += [f"- `{c['case']}` (exit {c['expected_exit']}): {c['why']}" for c in other]
    lines += ["", "Cases that did not keep the contract:", ""]
    for c in bad:
        known = f" (known bug: {c['known_bug']})" if c["known_bug"] else ""
        lines.append(
            f"- `{c['case']}`{known}: `xdt {shlex.join(c['argv'])}` gave exit {c['exit_code']}: "
            f"{'; '.join(c['problems'])}"
        )
    if not bad:
        lines.append("None.")
    return lines


def failures(results: dict[str, Any]) -> list[str]:
    out = [
        f"reference of {name}: {info['error']}"
        for name, info in results["kinds"].items()
        if info.get("error")
    ]
    for k in results["kills"]:
        point = KillPoint(**k)
        if point.ok:
            continue
        why = [point.error] if point.error else []
        why += [f"not readable after the kill: {p}" for p in point.readable_problems]
        why += point.diffs
        out.append(
            f"kill point {point.index} ({point.kind}, {point.how()}, landed {point.state}): "
            f"{'; '.join(why)}"
        )
    for s in results.get("faults") or []:
        if s["survived"] is False:
            out.append(f"fault {s['name']}: {'; '.join(s['problems'])}")
    corpus = results.get("bad_inputs")
    for c in (corpus or {}).get("cases", []):
        if not c["ok"] and not c["known_bug"]:
            out.append(f"bad input {c['case']}: {'; '.join(c['problems'])}")
    return out


# --------------------------------------------------------------------------- main
def command_line(args: argparse.Namespace) -> str:
    """The command that regenerates the report (the defaults left out)."""
    parts = ["python", "benchmarks/reliability.py", "--seed", str(args.seed)]
    parts += ["--quick"] if args.quick else ["--kills", str(args.kills)]
    if args.kinds != ",".join(KIND_NAMES):
        parts += ["--kinds", args.kinds]
    if Path(args.out).resolve() != DEFAULT_OUT:
        parts += ["--out", str(args.out)]
    parts += ["--no-faults"] if args.no_faults else []
    parts += ["--no-bad-inputs"] if args.no_bad_inputs else []
    return shlex.join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed", type=int, default=0, help="seeds every kill point's draw")
    p.add_argument(
        "--kills", type=int, default=45, help="kill points in all (default 45: 5 per kind)"
    )
    p.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"scratch folder (default {DEFAULT_WORK})"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report")
    p.add_argument("--quick", action="store_true", help="one kill point per kind (development)")
    p.add_argument(
        "--kinds",
        default=",".join(KIND_NAMES),
        help="comma-separated subset of: " + ", ".join(KIND_NAMES),
    )
    p.add_argument("--no-faults", action="store_true", help="skip the fault scenarios")
    p.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input corpus")
    p.add_argument(
        "--reuse-references",
        action="store_true",
        help="reuse finished reference runs found in --work",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the folders of kill points that passed"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds any one process may take")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KIND_NAMES]
    if unknown or not kinds:
        p.error(f"--kinds: unknown {unknown}; known: {', '.join(KIND_NAMES)}")
    args.kind_list = [k for k in KIND_NAMES if k in kinds]
    if args.kills < len(args.kind_list) and not args.quick:
        p.error(f"--kills: at least one per kind ({len(args.kind_list)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names: list[str] = args.kind_list
    per_kind = {
        n: 1 if args.quick else args.kills // len(names) + (i < args.kills % len(names))
        for i, n in enumerate(names)
    }
    results: dict[str, Any] = {
        "command": command_line(args),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": args.seed,
        "machine": machine(),
        "kinds": {},
        "kills": [],
        "faults": None,
        "bad_inputs": None,
    }

    def save() -> None:
        results["seconds"] = round(time.monotonic() - began, 1)
        results["failures"] = failures(results)
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    source = None
    if {"finetune", "transfer"} & set(names):
        source = source_run(work, args.reuse_references, args.timeout)
    kinds = make_kinds(work, source)
    write_sweep_file(work / "_sweep" / "sweep.yaml")
    refs: dict[str, Reference] = {}
    total = sum(per_kind.values())
    try:
        for name in names:
            kind = kinds[name]
            results["kinds"][name] = {"what": kind.what, "reference_s": None}
            try:
                refs[name] = run_reference(kind, work, args.reuse_references, args.timeout)
            except HarnessError as exc:
                results["kinds"][name]["error"] = str(exc)
                log(f"reference {name}: FAILED: {exc}")
                save()
                continue
            results["kinds"][name].update(
                reference_s=refs[name].wall_s, counts=refs[name].counts, runs=refs[name].runs
            )
        plan = plan_kills(names, per_kind, refs, args.seed)
        for point in plan:
            if point.kind not in refs:
                continue
            try_kill_point(point, kinds[point.kind], refs[point.kind], work, args.timeout)
            results["kills"].append(asdict(point))
            results["kinds"][point.kind]["timer_base_s"] = refs[point.kind].wall_s
            verdict = "ok" if point.ok else "FAILED"
            log(
                f"[{point.index:2d}/{total}] {point.kind:13s} {point.how():32s} "
                f"-> {point.state}; "
                f"{point.resumed_by}; exact {_yes(point.exact)}, readable {_yes(point.readable)} "
                f"({point.seconds:.0f} s) {verdict}"
            )
            if not point.ok:
                for line in failures(
                    {
                        **results,
                        "kills": [asdict(point)],
                        "kinds": {},
                        "faults": None,
                        "bad_inputs": None,
                    }
                ):
                    log(f"    {line}")
            elif not args.keep:
                shutil.rmtree(work / point.kind / f"kill{point.index:02d}", ignore_errors=True)
            save()
        if not args.no_faults and {"train-source", "sweep"} & set(refs):
            log("fault scenarios ...")
            scenarios = fault_scenarios(kinds, refs, work, args.seed, args.timeout)
            results["faults"] = [asdict(s) for s in scenarios]
            for s in scenarios:
                state = (
                    "skipped" if s.survived is None else ("survived" if s.survived else "FAILED")
                )
                log(f"  {s.name}: {s.outcome} -> {state} {'; '.join(s.problems)}")
        elif not args.no_faults:
            results["faults"] = []
            log("fault scenarios: need the train-source or sweep kind; not run")
        if not args.no_bad_inputs:
            log("bad inputs ...")
            results["bad_inputs"] = bad_inputs(work)
            cases = results["bad_inputs"]["cases"]
            log(f"  {len(cases)} cases, {sum(c['ok'] for c in cases)} kept the contract")
    finally:
        for proc in list(LIVE):
            kill_tree(proc.pid)
        save()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results), encoding="utf-8")
    log(f"wrote {out} and {work / 'results.json'} in {results['seconds'] / 60:.1f} min")
    if results["failures"]:
        log(f"{len(results['failures'])} failure(s):")
        for line in results["failures"]:
            log(f"  - {line}")
        return 1
    return 0


def source_run(work: Path, reuse: bool, timeout: float) -> Path:
    """The finished source run that finetune and transfer start from."""
    root = work / "_source"
    run = root / "src"
    config = CONFIGS / "transfer" / "digits_source_mnist_layout.yaml"
    args = [
        "train-source",
        str(config),
        "train.steps=20",
        "train.eval_every=10",
        "train.log_every=10",
    ]
    args += ["--runs-dir", str(root), "--name", "src", "--quiet"]
    if reuse and _status(run / "summary.json") == "completed":
        return run
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    code = run_logged([PY, "-m", "xdt_cli", *args], environment(), work / "_source.log", timeout)
    if code != 0:
        raise SystemExit(f"the source run failed (exit {code}): {tail(work / '_source.log')}")
    return run


if __name__ == "__main__":
    sys.exit(main())
