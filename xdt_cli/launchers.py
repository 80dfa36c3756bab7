"""Run a sweep on a Slurm cluster as one job array through submitit, and say where it stands.

This module's one job: take the runs of a `sweeps.Plan` that are not completed (nor already
pending or running in the queue), submit them as ONE Slurm job array with
`submitit.AutoExecutor(cluster="slurm")`, record which array task holds which run in
`<sweep>/slurm.json`, and answer `xdt sweep --status` from the run folders and the queue
(`squeue`). The default launcher, the local process pool, stays in `sweeps.run_sweep`.

Each array task is a `SlurmRun`: it runs the run's xdt command (`PlannedRun.argv`) as a child
process `python -m xdt_cli ...` with `--quiet --json`, its output appended to
`<sweep>/logs/<run>.log` exactly as the local pool does, returns the run's summary, and
raises when the run did not complete (so Slurm and submitit see the task fail).

Requeue. submitit's sbatch file asks Slurm for a signal (`--signal=USR2@90`: SIGUSR2 unless
`SUBMITIT_PREEMPT_SIGNAL` names another) 90 s before the time limit; a preempting scheduler
or a person sends the same with `scancel --signal=USR2 JOB_TASK`. submitit's handler in the
task then calls `SlurmRun.checkpoint()`: it sends the xdt child SIGTERM (xdt saves
checkpoints/last.pt and exits 143), waits for it, and returns the same run with the command
`xdt resume RUN_DIR`; submitit pickles that into the task's folder and `scontrol requeue`s
the task, which starts again from last.pt and ends with the metrics of an uninterrupted run.
The child ignores that signal itself: Slurm signals every process of the job step, and
SIGUSR2's default action would kill xdt before it could save. A task that Slurm requeues on
its own (`scontrol requeue`, a node failure, preemption in REQUEUE mode) starts from its
first pickle, so a task also looks at its run folder when it starts: a run that xdt can
continue is resumed, a completed one is not run again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xdt_cli.errors import ConfigError, XdtError
from xdt_cli.files import atomic_write_text
from xdt_cli.sweeps import LauncherSpec, Plan, SweepReporter, on_disk

try:  # an optional dependency (`pip install 'xdt[slurm]'`); only --launcher slurm needs it
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # the class below still defines; require_slurm() says what is missing
    Checkpointable = object  # type: ignore[assignment,misc]
    DelayedSubmission = None  # type: ignore[assignment,misc]

RECORD_FILE = "slurm.json"
SLURM_KEYS = ("partition", "time", "gpus_per_run", "cpus_per_run", "array_parallelism")
STOP_WAIT_S = 120  # how long checkpoint() waits for xdt to save last.pt after SIGTERM
# A child stopped by SIGTERM may be followed by the preemption signal (submitit's own
# preemption sends SIGTERM, then SIGUSR2): wait this long for it before calling the run failed.
SIGNAL_GRACE_S = 5.0
# squeue states: a task in one of these is waiting for or holding a node; any other state
# (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) or none at all means it has left the queue.
PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
RUNNING_STATES = {
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
}
CATEGORIES = ("pending", "running", "done", "failed", "not_queued")


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class SlurmOptions:
    """What every array task asks Slurm for."""

    partition: str | None = None  # None: the cluster's default partition
    time: int = 60  # minutes per run; submitit's requeue signal comes 90 s before the end
    gpus_per_run: int = 0
    cpus_per_run: int = 1  # also the run's torch threads (OMP_NUM_THREADS)
    array_parallelism: int | None = None  # tasks at once; None: submitit's cap (256)


def flag(key: str) -> str:
    """The command-line flag of a launcher key: gpus_per_run -> --gpus-per-run."""
    return "--" + key.replace("_", "-")


def choose_launcher(
    spec: LauncherSpec | None, launcher: str | None, flags: dict[str, Any]
) -> tuple[str, SlurmOptions | None]:
    """The launcher and its Slurm options: the sweep file's `launcher:` section, overridden
    by the command line. A Slurm flag for a local sweep is an error, not silently dropped."""
    if launcher is not None and launcher not in ("local", "slurm"):
        raise ConfigError(f"--launcher: expected local or slurm (got '{launcher}')")
    name = launcher or (spec.name if spec is not None else "local")
    given = {k: v for k, v in flags.items() if v is not None}
    if name == "local":
        if given:
            raise ConfigError(
                f"{flag(next(iter(given)))}: a Slurm option; add --launcher slurm "
                "(or launcher: {name: slurm} in the sweep file)"
            )
        return "local", None
    from_file = {k: getattr(spec, k) for k in SLURM_KEYS if spec is not None}
    merged = {k: v for k, v in from_file.items() if v is not None} | given
    return "slurm", SlurmOptions(**merged)


# --------------------------------------------------------------------------- the scheduler
def slurm_command(argv: list[str], *, asked_by: str, timeout: float = 60) -> str:
    """Run a Slurm client command and return its stdout; one XdtError line, starting with
    the option that needed Slurm, when Slurm is not installed or does not answer."""
    hint = "start one (scripts/slurm_local.sh start) or use --launcher local"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise XdtError(f"{asked_by}: no Slurm here ({argv[0]} not found); {hint}") from None
    except subprocess.TimeoutExpired:
        raise XdtError(
            f"{asked_by}: Slurm does not answer ({argv[0]} timed out after {timeout:.0f} s)"
        ) from None
    if done.returncode != 0:
        why = (done.stderr.strip() or f"exit code {done.returncode}").splitlines()[-1]
        raise XdtError(f"{asked_by}: Slurm does not answer ({argv[0]}: {why}); {hint}")
    return done.stdout


def require_slurm(options: SlurmOptions) -> Any:
    """submitit and a Slurm that answers, with the partition asked for; else one line."""
    try:
        import submitit
    except ImportError:
        raise XdtError(
            "--launcher slurm: submitit is not installed (pip install 'xdt[slurm]')"
        ) from None
    listed = slurm_command(["sinfo", "-h", "-o", "%P"], asked_by="--launcher slurm")
    partitions = [name.rstrip("*") for name in listed.split()]
    if options.partition is not None and options.partition not in partitions:
        raise ConfigError(
            f"--partition: no partition '{options.partition}' on this cluster "
            f"(it has: {', '.join(partitions) or 'none'})"
        )
    return submitit


def queue_states(job_ids: set[str], asked_by: str) -> dict[str, str]:
    """{"<job>_<task>" (or "<job>"): squeue state} for this user's tasks of these jobs.

    A finished task stays in squeue for the cluster's MinJobAge (5 min by default); after
    that it is simply absent, which is all `--status` needs: the run folder says the rest.
    """
    if not job_ids:
        return {}
    out = slurm_command(
        ["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T"], asked_by=asked_by
    )
    states = {}
    for line in out.splitlines():
        task, _, state = line.strip().partition("|")
        if task.split("_", 1)[0] in job_ids:
            states[task] = state
    return states


def _category(state: str | None) -> str | None:
    if state in PENDING_STATES:
        return "pending"
    if state in RUNNING_STATES:
        return "running"
    return None


# --------------------------------------------------------------------------- slurm.json
def read_record(sweep_dir: Path) -> dict[str, Any]:
    """`<sweep>/slurm.json`: every job array this sweep submitted, oldest first."""
    try:
        data = json.loads((sweep_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"jobs": []}
    except (OSError, ValueError) as exc:
        raise XdtError(f"{sweep_dir / RECORD_FILE}: cannot be read ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise XdtError(f"{sweep_dir / RECORD_FILE}: not a record of Slurm jobs")
    return data


def latest_tasks(record: dict[str, Any]) -> dict[str, str]:
    """{run name: its Slurm task id} from the newest job that holds each run."""
    tasks: dict[str, str] = {}
    for job in record["jobs"]:
        for task, name in job.get("tasks", {}).items():
            tasks[name] = task
    return tasks


def _queued(p: Plan, record: dict[str, Any], asked_by: str) -> dict[str, tuple[str, str | None]]:
    """{run name: (task id, squeue state or None)} for every run some job array held."""
    tasks = latest_tasks(record)
    wanted = {run.name for run in p.runs}
    tasks = {name: task for name, task in tasks.items() if name in wanted}
    states = queue_states({task.split("_", 1)[0] for task in tasks.values()}, asked_by)
    return {name: (task, states.get(task)) for name, task in tasks.items()}


# --------------------------------------------------------------------------- submitting
def left_alone(p: Plan, queued: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """{run name: why a call does not submit it}: completed; failed (left alone, as the local
    launcher does: delete its folder to run it again); or pending or running in the queue.
    Every other run is submitted."""
    why = {}
    for run in p.runs:
        task, state = queued.get(run.name, ("", None))
        if run.action == "skip":  # completed or failed (its task may still be finishing)
            why[run.name] = str(run.found)
        elif _category(state) is not None:
            why[run.name] = f"{str(state).lower()} as Slurm task {task}"
    return why


def dry_run_lines(p: Plan, options: SlurmOptions) -> list[str]:
    """What `submit` would do, as `#SBATCH` lines and one shell line per array task (task i
    is the i-th command line), then `# skip` lines for the runs it leaves alone."""
    skipped = left_alone(p, _queued(p, read_record(p.sweep_dir), "--dry-run"))
    runs = [run for run in p.runs if run.name not in skipped]
    if not runs:
        lines = ["# nothing to submit"]
    else:
        lines = [f"#SBATCH --job-name={job_name(p)}"]
        if len(runs) > 1:  # submitit submits a single run as a plain job
            at_once = min(len(runs), options.array_parallelism or 256)
            lines.append(f"#SBATCH --array=0-{len(runs) - 1}%{at_once}")
        lines += [
            f"#SBATCH --time={options.time}",
            f"#SBATCH --cpus-per-task={options.cpus_per_run}",
        ]
        if options.gpus_per_run:
            lines.append(f"#SBATCH --gpus-per-node={options.gpus_per_run}")
        if options.partition:
            lines.append(f"#SBATCH --partition={options.partition}")
        lines += [shlex.join(["xdt", *run.argv]) for run in runs]
    for run in p.runs:
        if run.name in skipped:
            delete = f" (delete {run.run_dir} to run it again)" if run.found == "failed" else ""
            lines.append(f"# skip {run.name}: {skipped[run.name]}{delete}")
    return lines


def job_name(p: Plan) -> str:
    return f"xdt-{p.sweep.name}"


def submit(
    p: Plan, options: SlurmOptions, *, reporter: SweepReporter | None = None
) -> dict[str, Any]:
    """Submit the runs that need it as one job array; record and return what was submitted.

    The result: {"name", "runs_dir", "job_id" (None when nothing needed submitting),
    "tasks": {task id: run name}, "skipped": {run name: why}}.
    """
    reporter = reporter or SweepReporter()
    submitit = require_slurm(options)
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    record = read_record(p.sweep_dir)
    skipped = left_alone(p, _queued(p, record, "--launcher slurm"))
    runs = [run for run in p.runs if run.name not in skipped]
    result: dict[str, Any] = {
        "name": p.sweep.name,
        "runs_dir": str(p.sweep_dir),
        "job_id": None,
        "tasks": {},
        "skipped": skipped,
    }
    if not runs:
        reporter.message(
            f"sweep {p.sweep.name}: nothing to submit ({len(p.runs)} runs: "
            + ", ".join(f"{n} {why}" for why, n in _tally(skipped.values()).items())
            + ")"
        )
        return result

    existed = p.sweep_dir.exists()
    executor = submitit.AutoExecutor(folder=p.sweep_dir / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(
        name=job_name(p),
        timeout_min=options.time,
        cpus_per_task=options.cpus_per_run,
        gpus_per_node=options.gpus_per_run or None,  # no --gpus-per-node=0 on CPU clusters
        slurm_partition=options.partition,
        slurm_array_parallelism=options.array_parallelism,
    )
    # submitit prints sbatch's stderr before raising; it becomes our one error line instead.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), executor.batch():
            jobs = [executor.submit(SlurmRun(run.name, run.argv, run.run_dir, run.log_path))
                    for run in runs]  # fmt: skip
    except (FailedJobError, FailedSubmissionError) as exc:
        if not existed:  # leave no empty sweep folder behind a refused submission
            shutil.rmtree(p.sweep_dir, ignore_errors=True)
        why = (str(exc).strip() or printed.getvalue().strip() or "no message").splitlines()[-1]
        raise XdtError(f"--launcher slurm: sbatch refused the job array: {why}") from None
    job_id = str(jobs[0].job_id).split("_", 1)[0]
    tasks = {str(job.job_id): run.name for job, run in zip(jobs, runs, strict=True)}
    record["jobs"].append(
        {
            "job_id": job_id,
            "submitted": datetime.now(UTC).isoformat(timespec="seconds"),
            "options": asdict(options),
            "tasks": tasks,
        }
    )
    record = {"sweep": str(p.sweep.path), "name": p.sweep.name, "jobs": record["jobs"]}
    atomic_write_text(p.sweep_dir / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    result.update(job_id=job_id, tasks=tasks)
    reporter.message(
        f"sweep {p.sweep.name}: submitted {len(runs)} of {len(p.runs)} runs as Slurm job "
        f"array {job_id} ({job_name(p)}); logs in {p.sweep_dir / 'logs'}; "
        f"follow it with: xdt sweep {p.sweep.path} --runs-dir {p.sweep_dir.parent} --status"
    )
    return result


def _tally(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# --------------------------------------------------------------------------- status
FOLDER_STATES = {None: "not started", "killed": "unfinished", "incomplete": "unfinished"}


def status(p: Plan) -> dict[str, Any]:
    """Each run's state from its folder and the queue, and the counts per category.

    done: the folder's summary says completed; failed: it says failed; pending / running:
    squeue says so; not_queued: none of these (interrupted, killed or never submitted): the
    next `xdt sweep --launcher slurm` submits it.
    """
    record = read_record(p.sweep_dir)
    queued = _queued(p, record, "--status")
    runs = []
    for run in p.runs:
        _, found = on_disk(run.run_dir)
        folder = FOLDER_STATES.get(found, found)
        task, state = queued.get(run.name, (None, None))
        if folder in ("completed", "failed"):
            category = "done" if folder == "completed" else "failed"
        else:
            category = _category(state) or "not_queued"
        runs.append(
            {
                "name": run.name,
                "state": category,
                "folder": folder,
                "task": task,
                "scheduler": state,
                "run_dir": str(run.run_dir),
                "log": str(run.log_path),
            }
        )
    counts = {c: sum(r["state"] == c for r in runs) for c in CATEGORIES}
    jobs = [{k: job.get(k) for k in ("job_id", "submitted")} for job in record["jobs"]]
    return {
        "name": p.sweep.name,
        "runs_dir": str(p.sweep_dir),
        "counts": counts,
        "jobs": jobs,
        "runs": runs,
    }


def print_status(result: dict[str, Any], console: Any) -> None:
    """The status as a small table and one line of counts (on stderr)."""
    from rich.table import Table

    table = Table(title=f"sweep {result['name']} ({result['runs_dir']})", title_justify="left")
    for column in ("run", "state", "folder", "Slurm task", "squeue"):
        table.add_column(column)
    for run in result["runs"]:
        table.add_row(
            run["name"], run["state"], run["folder"], run["task"] or "-", run["scheduler"] or "-"
        )
    console.print(table)
    counts = result["counts"]
    console.print(", ".join(f"{counts[c]} {c.replace('_', ' ')}" for c in CATEGORIES), markup=False)


# --------------------------------------------------------------------------- the array task
class SlurmRun(Checkpointable):
    """One array task: run one xdt command as a child process; on a requeue signal, stop it
    (it saves last.pt) and requeue the task as `xdt resume RUN_DIR`."""

    def __init__(self, name: str, argv: list[str], run_dir: Path, log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.run_dir = Path(run_dir)
        self.log_path = Path(log_path)

    def __call__(self) -> dict[str, Any]:
        action, found = on_disk(self.run_dir)
        if found in ("completed", "failed"):  # a task requeued after its run had ended
            return self._outcome(None)
        argv, note = self.argv, None
        if action == "resume" and argv[0] != "resume":  # requeued by Slurm, not by checkpoint()
            argv = ["resume", str(self.run_dir), "--quiet", "--json"]
            note = f"{self.run_dir} holds a run to continue (Slurm requeued this task)"
        elif action == "restart" and "--overwrite" not in argv:
            argv = [*argv, "--overwrite"]
            note = f"{self.run_dir} holds no config yet: starting it over"
        self._exit_code: int | None = None
        self._child = self._launch(argv, note)
        # The child is reaped on a thread and the main thread only sleeps, so submitit's
        # signal handler (which runs on the main thread, between two of its bytecodes) can
        # call checkpoint() without meeting a lock that Popen.wait holds.
        threading.Thread(target=self._reap, daemon=True).start()
        try:
            while self._exit_code is None:
                time.sleep(0.1)
            if self._exit_code in (130, 143):  # stopped by a signal: perhaps a preemption
                time.sleep(SIGNAL_GRACE_S)
        finally:
            if self._exit_code is None:
                self._child.kill()
        return self._outcome(self._exit_code)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on the requeue signal: stop xdt (SIGTERM: it saves last.pt and
        exits 143) and requeue this run as `xdt resume RUN_DIR`."""
        child = getattr(self, "_child", None)
        if child is not None and self._exit_code is None:
            child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_WAIT_S
            while self._exit_code is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._exit_code is None:  # it did not stop: resume from the last evaluation
                child.kill()
        action, _ = on_disk(self.run_dir)
        if action == "resume":
            argv = ["resume", str(self.run_dir), "--quiet", "--json"]
        else:  # no folder to resume (or the run has ended): __call__ decides again on restart
            argv = self.argv
        return DelayedSubmission(SlurmRun(self.name, argv, self.run_dir, self.log_path))

    def __getstate__(self) -> dict[str, Any]:
        """Only the run's identity is pickled, never the child process or its thread."""
        return {k: self.__dict__[k] for k in ("name", "argv", "run_dir", "log_path")}

    def _launch(self, argv: list[str], note: str | None) -> subprocess.Popen:
        requeue_signal = _requeue_signal()
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or "1"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"# Slurm task {_task_id()} on {os.uname().nodename}\n")
            if note:
                log.write(f"# {note}\n")
            log.write(f"$ {shlex.join(['xdt', *argv])}\n")
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "xdt_cli", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # An ignored signal stays ignored across exec: xdt never sees it.
                preexec_fn=lambda: signal.signal(requeue_signal, signal.SIG_IGN),
            )

    def _reap(self) -> None:
        self._exit_code = self._child.wait()

    def _outcome(self, code: int | None) -> dict[str, Any]:
        """The summary of a completed run; otherwise an error that fails the task. `code` is
        xdt's exit code, None when this task ran nothing."""
        try:
            summary = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {}
        if code in (0, None) and summary.get("status") == "completed":
            return summary
        why = summary.get("status", "no summary.json")
        why += f", xdt exit code {code}" if code is not None else ""
        raise RuntimeError(f"run {self.name} did not complete ({why}); log: {self.log_path}")


def _requeue_signal() -> signal.Signals:
    """The signal on which submitit checkpoints and requeues (SIGUSR2 unless the environment
    variable SUBMITIT_PREEMPT_SIGNAL names another)."""
    from submitit.core.job_environment import JobEnvironment

    return signal.Signals["SIG" + JobEnvironment.USR_SIG]


def _task_id() -> str:
    """This task's Slurm id as squeue shows it: JOB_TASK in an array, else JOB."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if job is None:
        return os.environ.get("SLURM_JOB_ID", "?")
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
