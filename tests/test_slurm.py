"""`xdt sweep --launcher slurm`: a job array on a real Slurm cluster, status, requeue, errors.

The tests that submit need a Slurm cluster that answers `sinfo` (scripts/slurm_local.sh start
runs one on this machine; .ci/run starts it). Without one they are skipped, unless
XDT_REQUIRE_SLURM=1, where they fail. The tests of bad input need no cluster and always run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, write_config
from tests.test_sweep import cli, read_json, write_sweep
from xdt_cli.sweeps import load_sweep, plan

pytestmark = pytest.mark.slurm

XDT = [sys.executable, "-m", "xdt_cli"]
SHORT = ["train.steps=30", "train.eval_every=10", "train.log_every=10"]
# Long enough to be caught mid-way (a few seconds at one thread), with last.pt at every eval.
LONG = ["train.steps=500", "train.eval_every=20", "train.log_every=20"]
WAIT_S = 300


@pytest.fixture(scope="module")
def slurm() -> None:
    """A Slurm cluster that answers sinfo: else skip (fail under XDT_REQUIRE_SLURM=1)."""
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=60
        )
        why = done.stderr.strip() or "no node" if done.returncode or not done.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    if why:
        message = f"no Slurm cluster answers sinfo ({why}); run scripts/slurm_local.sh start"
        if os.environ.get("XDT_REQUIRE_SLURM") == "1":
            pytest.fail(f"XDT_REQUIRE_SLURM=1 but {message}")
        pytest.skip(message)


def status(sweep: Path, runs: Path) -> dict:
    result = cli("sweep", sweep, "--runs-dir", runs, "--status", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def wait_settled(sweep: Path, runs: Path) -> dict:
    """Poll `--status --json` until no run is pending or running."""
    deadline = time.monotonic() + WAIT_S
    while True:
        state = status(sweep, runs)
        if state["counts"]["pending"] == state["counts"]["running"] == 0:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(1)


def submit(sweep: Path, runs: Path, *flags) -> str:
    result = cli("sweep", sweep, "--launcher", "slurm", "--runs-dir", runs, *flags)
    assert result.exit_code == 0, result.stderr
    job_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9]+", job_id), result.stdout
    return job_id


# --------------------------------------------------------------------------- a 4-run array
def test_a_sweep_runs_as_one_job_array_and_a_second_call_submits_nothing(
    slurm, tmp_path: Path
) -> None:
    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = write_sweep(
        tmp_path / "four.yaml",
        config="tiny.yaml",
        overrides=SHORT,
        grid={"optim.lr": [0.001, 0.003]},
        seeds=[0, 1],
        launcher={"name": "local", "time": 10},  # --launcher slurm alone switches
    )
    runs = tmp_path / "runs"
    folder = runs / "four"
    job_id = submit(sweep, runs)

    # It returned at once: the runs are still waiting or starting (each takes seconds).
    first = status(sweep, runs)
    assert first["counts"]["done"] < 4
    record = read_json(folder / "slurm.json")
    assert [job["job_id"] for job in record["jobs"]] == [job_id]
    names = [run.name for run in plan(load_sweep(sweep), runs, validate=False).runs]
    assert record["jobs"][0]["tasks"] == {f"{job_id}_{i}": name for i, name in enumerate(names)}
    assert record["jobs"][0]["options"]["time"] == 10  # from the sweep file's launcher:

    settled = wait_settled(sweep, runs)
    assert settled["counts"] == {"pending": 0, "running": 0, "done": 4, "failed": 0,
                                 "not_queued": 0}  # fmt: skip
    for run in settled["runs"]:
        assert run["folder"] == "completed" and run["task"].startswith(f"{job_id}_"), run
        summary = read_json(Path(run["run_dir"]) / "summary.json")
        assert summary["status"] == "completed" and summary["steps"] == 30
        log = Path(run["log"]).read_text()
        assert f"# Slurm task {run['task']} on " in log and "$ xdt train-source " in log
    table = cli("sweep", sweep, "--runs-dir", runs, "--status")
    assert table.exit_code == 0 and table.stdout == ""
    assert "0 pending, 0 running, 4 done, 0 failed, 0 not queued" in table.stderr

    report = cli("report", folder, "--format", "json")
    assert report.exit_code == 0, report.stderr
    groups = json.loads(report.stdout)
    assert sorted((g["group"]["optim.lr"], g["n"]) for g in groups) == [(0.001, 2), (0.003, 2)]

    again = cli("sweep", sweep, "--launcher", "slurm", "--runs-dir", runs, "--json")
    assert again.exit_code == 0, again.stderr
    printed = json.loads(again.stdout)
    assert printed["job_id"] is None and printed["tasks"] == {}
    assert printed["skipped"] == {name: "completed" for name in names}
    assert "nothing to submit" in again.stderr
    assert len(read_json(folder / "slurm.json")["jobs"]) == 1
    dry = cli("sweep", sweep, "--launcher", "slurm", "--runs-dir", runs, "--dry-run")
    assert dry.stdout.splitlines() == ["# nothing to submit"] + [
        f"# skip {name}: completed" for name in names
    ]


# --------------------------------------------------------------------------- requeue
def test_preempted_and_requeued_tasks_resume_to_the_uninterrupted_metrics(
    slurm, tmp_path: Path
) -> None:
    from submitit.core.job_environment import JobEnvironment

    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = write_sweep(tmp_path / "cut.yaml", config="tiny.yaml", overrides=LONG, seeds=[0, 1])
    runs = tmp_path / "runs"
    job_id = submit(sweep, runs, "--time", "30")
    planned = plan(load_sweep(sweep), runs, validate=False).runs

    # The same runs, uninterrupted, here: one torch thread, as in each task (--cpus-per-run 1).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    references = [
        subprocess.Popen(
            [
                *XDT,
                "train-source",
                str(tmp_path / "tiny.yaml"),
                *run.overrides,
                "--runs-dir",
                str(tmp_path / "ref"),
                "--name",
                run.name,
                "--quiet",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for run in planned
    ]

    # As soon as a run has written an evaluation (and so a last.pt), interrupt it mid-way:
    # task 0 gets submitit's preemption signal (its checkpoint() requeues it as a resume),
    # task 1 is requeued by Slurm itself (its task finds the run folder and resumes it).
    signal_name = JobEnvironment.USR_SIG  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    interrupt = {
        planned[0].name: ["scancel", f"--signal={signal_name}", f"{job_id}_0"],
        planned[1].name: ["scontrol", "requeue", f"{job_id}_1"],
    }
    deadline = time.monotonic() + WAIT_S
    while interrupt:
        for run in planned:
            metrics = run.run_dir / "metrics.jsonl"
            if run.name in interrupt and metrics.exists() and '"eval"' in metrics.read_text():
                subprocess.run(interrupt.pop(run.name), check=True)
        assert time.monotonic() < deadline, f"never evaluated: {sorted(interrupt)}"
        time.sleep(0.05)

    settled = wait_settled(sweep, runs)
    assert settled["counts"]["done"] == 2, settled
    assert [proc.wait(timeout=WAIT_S) for proc in references] == [0, 0]
    for run in planned:
        ref = tmp_path / "ref" / run.name
        a, b = read_json(run.run_dir / "summary.json"), read_json(ref / "summary.json")
        for key in ("status", "final", "best", "best_step", "steps"):
            assert a[key] == b[key], (run.name, key)
        assert (run.run_dir / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
        resumed = read_json(run.run_dir / "meta.json")["resumed"]
        assert len(resumed) == 1 and 0 < resumed[0]["step"] < 500, resumed
        log = run.log_path.read_text()
        assert "interrupted at step" in log  # xdt saved last.pt on SIGTERM
        assert f"$ xdt resume {run.run_dir} --quiet --json" in log
    preempted, requeued = (run.log_path.read_text() for run in planned)
    assert "Slurm requeued this task" not in preempted  # checkpoint() asked for the resume
    assert "Slurm requeued this task" in requeued  # the task saw the folder and resumed it
    submitit_log = (runs / "cut" / "slurm" / f"{job_id}_0" / f"{job_id}_0_0_log.err").read_text()
    assert f"Caught signal SIG{signal_name}" in submitit_log


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def four(tmp_path: Path) -> Path:
    write_config(tmp_path / "tiny.yaml", TINY)
    return write_sweep(
        tmp_path / "four.yaml",
        config="tiny.yaml",
        overrides=SHORT,
        grid={"optim.lr": [0.001, 0.003]},
        seeds=[0, 1],
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--launcher", "pbs"], "--launcher: expected local or slurm (got 'pbs')"),
        (["--launcher", "slurm", "--time", "0"], "'--time'"),
        (["--launcher", "slurm", "--cpus-per-run", "0"], "'--cpus-per-run'"),
        (["--launcher", "slurm", "--array-parallelism", "0"], "'--array-parallelism'"),
        (["--launcher", "slurm", "--gpus-per-run", "-1"], "'--gpus-per-run'"),
        (["--partition", "gpu"], "--partition: a Slurm option; add --launcher slurm"),
        (["--gpus-per-run", "1", "--dry-run"], "--gpus-per-run: a Slurm option"),
        (["--launcher", "slurm", "--jobs", "2"], "--jobs: the local launcher's option"),
        (["--status", "--dry-run"], "--status: shows the sweep's state"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_them(four: Path, flags, needle) -> None:
    runs = four.parent / "runs"
    result = cli("sweep", four, "--runs-dir", runs, *flags)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
    assert result.stdout == "" and not runs.exists()


@pytest.mark.parametrize(
    ("launcher", "needle"),
    [
        ({"name": "pbs"}, "launcher.name: Input should be 'local' or 'slurm'"),
        ({"name": "slurm", "time": 0}, "launcher.time: Input should be greater than 0"),
        ({"name": "slurm", "time": "1h"}, "launcher.time: Input should be a valid integer"),
        ({"partiton": "gpu"}, "launcher.partiton: unknown key"),
        ({"gpus_per_run": -1}, "launcher.gpus_per_run: Input should be greater than or equal"),
    ],
)
def test_a_bad_launcher_section_exits_2_naming_the_key(tmp_path: Path, launcher, needle) -> None:
    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = write_sweep(tmp_path / "s.yaml", config="tiny.yaml", launcher=launcher)
    result = cli("sweep", sweep, "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {sweep}: ") and needle in result.stderr, result.stderr
    assert result.stdout == ""


def test_benchmark_refuses_a_sweep_meant_for_slurm(tmp_path: Path) -> None:
    write_config(tmp_path / "tiny.yaml", TINY)
    write_sweep(tmp_path / "s.yaml", config="tiny.yaml", launcher={"name": "slurm"})
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"sweeps": ["s.yaml"]}))
    result = cli("benchmark", suite, "--runs-dir", tmp_path / "runs", "--doc", tmp_path / "B.md")
    assert result.exit_code == 2
    assert "launcher.name: slurm, but xdt benchmark runs its sweeps on this machine" in (
        result.stderr
    )
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_the_dry_run_shows_the_array_with_file_settings_under_flags(four: Path) -> None:
    spec = yaml.safe_load(four.read_text())
    spec["launcher"] = {"name": "slurm", "time": 5, "cpus_per_run": 2, "partition": "big"}
    sweep = write_sweep(four, **spec)
    runs = four.parent / "runs"
    result = cli("sweep", sweep, "--runs-dir", runs, "--dry-run", "--time", "7")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        "#SBATCH --job-name=xdt-four",
        "#SBATCH --array=0-3%4",
        "#SBATCH --time=7",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --partition=big",
        lines[5],
    ]
    local = cli("sweep", sweep, "--runs-dir", runs, "--dry-run", "--launcher", "local")
    assert lines[5:] == local.stdout.splitlines()  # the same xdt command per array task
    assert len(lines[5:]) == 4 and not runs.exists()


def test_status_of_a_sweep_never_submitted(four: Path) -> None:
    runs = four.parent / "runs"
    result = cli("sweep", four, "--runs-dir", runs, "--status", "--json")
    assert result.exit_code == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["counts"] == {"pending": 0, "running": 0, "done": 0, "failed": 0,
                               "not_queued": 4}  # fmt: skip
    assert {(r["folder"], r["task"], r["scheduler"]) for r in state["runs"]} == {
        ("not started", None, None)
    }
    assert state["jobs"] == [] and "4 not queued" in result.stderr


def test_without_a_reachable_slurm_it_is_one_line(four: Path, monkeypatch) -> None:
    # A real Slurm client pointed at a controller that is not there (a closed loopback port).
    conf = four.parent / "nowhere.conf"
    conf.write_text(
        "ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=1\n"
        "MessageTimeout=1\nNodeName=localhost CPUs=1\nPartitionName=nowhere Nodes=localhost\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    result = cli("sweep", four, "--launcher", "slurm", "--runs-dir", four.parent / "runs")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--launcher slurm:" in result.stderr and "Slurm" in result.stderr
    assert "scripts/slurm_local.sh start" in result.stderr


def test_without_submitit_it_is_one_line(four: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    result = cli("sweep", four, "--launcher", "slurm", "--runs-dir", four.parent / "runs")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --launcher slurm: submitit is not installed (pip install 'xdt[slurm]')\n"
    )


def test_what_the_cluster_refuses_is_one_line(slurm, four: Path) -> None:
    runs = four.parent / "runs"
    result = cli("sweep", four, "--launcher", "slurm", "--runs-dir", runs, "--partition", "nope")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --partition: no partition 'nope' on this cluster")
    assert result.stderr.count("\n") == 1 and not runs.exists()


def test_help_shows_the_slurm_options() -> None:
    result = cli("sweep", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "--launcher slurm" in text and "--status" in text and "--array-parallelism" in text
