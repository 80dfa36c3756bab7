"""`xdt sweep`: expansion, run folders, skip and resume on a second call, dry run, errors."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import TINY, write_config
from xdt_cli.cli import app
from xdt_cli.config import deep_merge, parse_override
from xdt_cli.errors import ConfigError
from xdt_cli.sweeps import child_env, cpu_count, load_sweep, plan, render_value, run_hash

REPO = Path(__file__).resolve().parents[1]
XDT = [sys.executable, "-m", "xdt_cli"]
SHORT = ["train.steps=10", "train.eval_every=5", "train.log_every=5"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_sweep(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- a 2x2x2 sweep
@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    """A 2 x 2 grid over 2 seeds (8 ten-step runs), run once for the tests below."""
    root = tmp_path_factory.mktemp("grid")
    write_config(root / "tiny.yaml", TINY)
    sweep = write_sweep(
        root / "grid.yaml",
        config="tiny.yaml",
        overrides=SHORT,
        grid={"optim.lr": [0.001, 0.003], "train.batch_size": [16, 32]},
        seeds=[0, 1],
    )
    result = cli("sweep", sweep, "--jobs", "2", "--runs-dir", root / "runs")
    return sweep, root / "runs", result


def test_a_grid_with_seeds_runs_every_point_in_its_own_folder(grid) -> None:
    sweep, runs, result = grid
    assert result.exit_code == 0, result.stderr
    folder = runs / "grid"
    assert result.stdout.strip() == str(folder)  # stdout: the sweep folder only
    record = read_json(folder / "sweep.json")
    assert record["status"] == "completed" and record["counts"]["completed"] == 8
    assert record["sweep"] == str(sweep) and record["subcommand"] == "train-source"
    names = [entry["name"] for entry in record["runs"]]
    assert len(set(names)) == 8
    assert names[0].startswith("lr0.001-batch_size16-seed0-")
    assert sorted(p.name for p in folder.iterdir() if p.name in names) == sorted(names)
    points = set()
    for entry in record["runs"]:
        assert entry["status"] == "completed" and entry["action"] == "start", entry
        run = Path(entry["run_dir"])
        assert read_json(run / "summary.json")["status"] == "completed"
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["train"]["steps"] == 10
        point = (resolved["optim"]["lr"], resolved["train"]["batch_size"], resolved["seed"])
        assert point == (entry["values"]["optim.lr"], entry["values"]["train.batch_size"],
                         entry["values"]["seed"])  # fmt: skip
        points.add(point)
        assert Path(entry["log"]).is_file() and entry["wall_time_s"] > 0
        assert entry["overrides"][: len(SHORT)] == SHORT
    assert len(points) == 8
    # one line per finished run on stderr (not a terminal: no bar)
    assert result.stderr.count(" done ") == 8 and "[8/8] done" in result.stderr
    assert "\r" not in result.stderr


def test_a_second_call_skips_every_completed_run(grid) -> None:
    sweep, runs, first = grid
    assert first.exit_code == 0
    folder = runs / "grid"
    files = [p for p in folder.glob("*/*") if p.is_file()] + list(folder.glob("*/checkpoints/*"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    again = cli("sweep", sweep, "--jobs", "2", "--runs-dir", runs, "--json", "--quiet")
    assert again.exit_code == 0, again.stderr
    assert again.stderr == ""  # --quiet
    printed = json.loads(again.stdout)
    assert printed == read_json(folder / "sweep.json")
    assert printed["counts"]["skipped"] == 8
    assert {e["status"] for e in printed["runs"]} == {"skipped"}
    assert {e["action"] for e in printed["runs"]} == {"skip"}
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    dry = cli("sweep", sweep, "--runs-dir", runs, "--dry-run")
    assert dry.exit_code == 0
    lines = dry.stdout.splitlines()
    assert len(lines) == 8 and all(ln.startswith("# skip ") for ln in lines)
    assert all(ln.endswith(": completed") for ln in lines)


def test_a_changed_base_config_is_refused_for_existing_runs(grid, tmp_path: Path) -> None:
    sweep, runs, _ = grid
    moved = tmp_path / "tiny.yaml"  # same file name, one value changed
    write_config(moved, deep_merge(TINY, {"train": {"eval_batch_size": 256}}))
    spec = yaml.safe_load(sweep.read_text())
    changed = write_sweep(tmp_path / "grid.yaml", **{**spec, "config": str(moved)})
    result = cli("sweep", changed, "--runs-dir", runs, "--dry-run")
    assert result.exit_code == 2
    assert "train.eval_batch_size" in result.stderr and "another config" in result.stderr
    assert result.stdout == ""


def test_a_finetune_sweep_from_a_relative_run_is_skipped_on_a_second_call(grid) -> None:
    """`init.from_run=../grid/RUN` is resolved against the sweep's folder and recorded as an
    absolute path in config.yaml; a second call compares the resolved configs, so it skips
    the finished run instead of refusing it as 'made from another config'."""
    sweep, runs, first = grid
    assert first.exit_code == 0
    source = read_json(runs / "grid" / "sweep.json")["runs"][0]["name"]
    root = sweep.parent
    write_config(
        root / "ft.yaml",
        {
            "data": {"target": {"dataset": "mnist5k", "labels_per_class": 2}},
            "model": {"backbone": "lenet"},
            "train": {"steps": 4, "batch_size": 8, "eval_every": 4, "log_every": 2},
        },
    )
    ft = write_sweep(
        root / "ft_sweep.yaml",
        subcommand="finetune",
        config="ft.yaml",
        overrides=[f"init.from_run=../grid/{source}"],
        seeds=[0],
    )
    once = cli("sweep", ft, "--runs-dir", runs, "--json", "--quiet")
    assert once.exit_code == 0, once.stderr
    (run,) = json.loads(once.stdout)["runs"]
    recorded = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
    assert recorded["init"]["from_run"] == str((runs / "grid" / source).resolve())
    again = cli("sweep", ft, "--runs-dir", runs, "--json", "--quiet")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["counts"]["skipped"] == 1


# --------------------------------------------------------------------------- stop and resume
# Long enough that Ctrl-C lands mid-run (~1.5 s of training at one thread).
LONG = ["train.steps=300", "train.eval_every=10", "train.log_every=10"]


def test_interrupted_and_killed_runs_resume_to_the_same_metrics(tmp_path: Path) -> None:
    write_config(tmp_path / "tiny.yaml", TINY)
    spec = {"config": "tiny.yaml", "overrides": LONG, "seeds": [0, 1]}
    ref = write_sweep(tmp_path / "ref.yaml", **spec)
    cut = write_sweep(tmp_path / "cut.yaml", **spec)
    runs = tmp_path / "runs"
    straight = cli("sweep", ref, "--jobs", "2", "--runs-dir", runs, "-q")
    assert straight.exit_code == 0, straight.stderr

    # Ctrl-C to the sweep: it sends each running run SIGTERM; they save last.pt and stop.
    proc = subprocess.Popen(
        [*XDT, "sweep", str(cut), "--jobs", "2", "--runs-dir", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    planned = plan(load_sweep(cut), runs, validate=False).runs
    deadline = time.monotonic() + 120
    while not all((r.run_dir / "checkpoints" / "last.pt").exists() for r in planned):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no last.pt"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "again to resume" in stderr
    record = read_json(runs / "cut" / "sweep.json")
    assert record["status"] == "interrupted" and record["interrupted"] == signal.SIGINT
    for entry in record["runs"]:
        assert entry["status"] == "interrupted" and entry["exit_code"] == 143, entry
        summary = read_json(Path(entry["run_dir"]) / "summary.json")
        assert summary["status"] == "interrupted" and summary["steps"] < 300

    # The second run as if killed hard: no summary.json at all.
    (planned[1].run_dir / "summary.json").unlink()
    dry = cli("sweep", cut, "--runs-dir", runs, "--dry-run")
    assert dry.stdout.splitlines() == [
        shlex.join(["xdt", "resume", str(r.run_dir), "--quiet", "--json"]) for r in planned
    ]

    resumed = cli("sweep", cut, "--jobs", "2", "--runs-dir", runs, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    record = json.loads(resumed.stdout)
    assert [e["action"] for e in record["runs"]] == ["resume", "resume"]
    assert {e["status"] for e in record["runs"]} == {"completed"}
    for run in planned:
        a = read_json(run.run_dir / "summary.json")
        b = read_json(runs / "ref" / run.name / "summary.json")
        for key in ("status", "final", "best", "best_step", "steps"):
            assert a[key] == b[key], (run.name, key)
        rows = (run.run_dir / "metrics.jsonl").read_text()
        assert rows == (runs / "ref" / run.name / "metrics.jsonl").read_text()


# --------------------------------------------------------------------------- two calls at once
def test_two_calls_of_one_sweep_share_the_runs_and_run_none_twice(tmp_path: Path) -> None:
    """Two people start the same sweep at the same moment: every run is launched by exactly
    one of them (its log holds one command), and both calls end with all runs completed."""
    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = write_sweep(
        tmp_path / "both.yaml", config="tiny.yaml", overrides=SHORT, seeds=[0, 1, 2, 3]
    )
    runs = tmp_path / "runs"
    argv = [*XDT, "sweep", str(sweep), "--jobs", "1", "--runs-dir", str(runs), "--json"]
    env = child_env(2)
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    records = [json.loads(out) for out, _ in outs]
    launched_by = {}
    for record in records:
        assert record["status"] == "completed", record
        for entry in record["runs"]:
            assert entry["status"] in ("completed", "skipped"), entry
            if entry["exit_code"] is not None:  # this call launched it
                assert entry["name"] not in launched_by, entry["name"]
                launched_by[entry["name"]] = record
    planned = plan(load_sweep(sweep), runs, validate=False).runs
    assert sorted(launched_by) == sorted(r.name for r in planned)
    for run in planned:
        commands = [ln for ln in run.log_path.read_text().splitlines() if ln.startswith("$ xdt")]
        assert len(commands) == 1, (run.name, commands)
        assert "resumed" not in read_json(run.run_dir / "meta.json")
        assert read_json(run.run_dir / "summary.json")["status"] == "completed"


def test_a_held_run_waits_and_a_dead_holder_leaves_nothing_stuck(tmp_path: Path) -> None:
    """A run whose folder lock another process holds (an `xdt resume` by hand) is not
    launched until it is free; a holder that dies leaves the run to this call, which
    resumes it."""
    import fcntl
    import threading

    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = write_sweep(tmp_path / "held.yaml", config="tiny.yaml", overrides=SHORT)
    runs = tmp_path / "runs"
    first = cli("sweep", sweep, "--runs-dir", runs)
    assert first.exit_code == 0, first.stderr
    (run,) = plan(load_sweep(sweep), runs, validate=False).runs
    (run.run_dir / "summary.json").unlink()  # as if killed before its end: to resume
    with (run.run_dir / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        released = threading.Timer(2.0, held.close)  # the holder dies 2 s from now
        released.start()
        started = time.monotonic()
        result = cli("sweep", sweep, "--runs-dir", runs, "--json")
        waited = time.monotonic() - started
        released.join()
    assert result.exit_code == 0, result.stderr
    assert waited >= 2.0  # it did not launch the run while the lock was held
    assert f"waiting: {run.name} is being run by another process" in result.stderr
    (entry,) = json.loads(result.stdout)["runs"]
    assert (entry["action"], entry["status"], entry["exit_code"]) == ("resume", "completed", 0)
    assert "another xdt process" not in run.log_path.read_text()


# --------------------------------------------------------------------------- failures, dry run
def test_failed_runs_dry_run_commands_and_no_rerun(tmp_path: Path) -> None:
    write_config(tmp_path / "tiny.yaml", TINY)
    # lr 1e30 makes the loss non-finite: that run fails (exit 1, status "failed").
    sweep = write_sweep(
        tmp_path / "mixed.yaml",
        config="tiny.yaml",
        overrides=SHORT,
        grid={"optim.lr": [0.003, 1.0e30]},
    )
    runs = tmp_path / "runs"
    result = cli("sweep", sweep, "--jobs", "2", "--runs-dir", runs)
    assert result.exit_code == 1
    record = read_json(runs / "mixed" / "sweep.json")
    ok, bad = record["runs"]
    assert (ok["status"], bad["status"]) == ("completed", "failed")
    assert bad["name"].startswith("lr1e_30-seed0-") and "non-finite" in bad["error"]
    assert f"error: run {bad['name']} failed" in result.stderr and bad["log"] in result.stderr
    assert ok["name"] not in result.stderr.replace("done " + ok["name"], "")

    # The dry run's commands, executed by hand elsewhere, make the same folders.
    other = tmp_path / "other"
    dry = cli("sweep", sweep, "--runs-dir", other, "--dry-run")
    assert dry.exit_code == 0 and not other.exists()  # a dry run writes nothing
    lines = dry.stdout.splitlines()
    assert len(lines) == 2
    procs = []
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["xdt", "train-source"]
        procs.append(
            subprocess.Popen([*XDT, *argv[1:]], env=child_env(2), stdout=subprocess.DEVNULL)
        )
    assert [proc.wait(timeout=300) for proc in procs] == [0, 1]
    made = sorted(p.name for p in (other / "mixed").iterdir())
    assert made == sorted([ok["name"], bad["name"]])

    # Called again: the completed run is skipped and the failed one is reported, not rerun.
    log_before = Path(bad["log"]).read_text()
    again = cli("sweep", sweep, "--runs-dir", runs, "--json")
    assert again.exit_code == 1
    statuses = [(e["action"], e["status"]) for e in json.loads(again.stdout)["runs"]]
    assert statuses == [("skip", "skipped"), ("skip", "failed")]
    assert "failed in an earlier call" in again.stderr and "not rerun" in again.stderr
    assert Path(bad["log"]).read_text() == log_before
    dry = cli("sweep", sweep, "--runs-dir", runs, "--dry-run").stdout.splitlines()
    assert dry[0].endswith(": completed") and ": failed" in dry[1]


# --------------------------------------------------------------------------- bad input
def test_a_bad_grid_key_exits_2_naming_it_before_anything_starts(tiny_config: Path) -> None:
    sweep = write_sweep(
        tiny_config.parent / "bad.yaml",
        config=tiny_config.name,
        grid={"optim.lrr": [0.001, 0.003]},
        seeds=[0, 1],
    )
    runs = tiny_config.parent / "runs"
    result = cli("sweep", sweep, "--runs-dir", runs)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr  # one problem, one line, no traceback
    assert "optim.lrr" in result.stderr and "bad.yaml" in result.stderr
    assert not runs.exists()


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ({"grdi": {}}, ["grdi: unknown key", "did you mean 'grid'"]),
        ({"subcommand": "resume"}, ["subcommand: unknown subcommand 'resume'"]),
        ({"grid": {"seed": [1, 2]}}, ["grid.seed: set the run seeds with seeds:"]),
        ({"grid": {"optim.lr": [0.1, 0.1]}}, ["grid.optim.lr: a value appears twice"]),
        ({"grid": {"optim.lr": 0.1}}, ["grid.optim.lr: Input should be a valid list"]),
        (
            {"overrides": ["optim.lr=0.1"], "grid": {"optim": [{"name": "sgd"}]}},
            ["grid.optim: 'optim' is also set by overrides[0]"],
        ),
        ({"seeds": [0, True]}, ["seeds.1: Input should be a valid integer"]),
        ({"name": "../up"}, ["name: '../up' is the sweep's folder"]),
        ({"config": "missing.yaml"}, ["config: config file", "missing.yaml not found"]),
        (
            {"random": {"n": 2, "params": {"optim.lr": {"normal": [0, 1]}}}},
            ["random.params.optim.lr: expected one of {choice"],
        ),
        (
            {"random": {"n": 2, "params": {"optim.lr": {"loguniform": [0, 1]}}}},
            ["random.params.optim.lr: loguniform: the bounds must be positive"],
        ),
        ({"random": {"n": 2, "bogus": 1, "params": {"a": {"choice": [1]}}}}, ["random.bogus"]),
    ],
)
def test_sweep_file_errors_name_the_file_and_key(tiny_config: Path, spec, needles) -> None:
    sweep = write_sweep(tiny_config.parent / "s.yaml", **{"config": "tiny.yaml", **spec})
    result = cli("sweep", sweep, "--dry-run")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"error: {sweep}: "), first
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_the_sweep_file_is_read_safely(tmp_path: Path) -> None:
    bad = tmp_path / "evil.yaml"
    bad.write_text("!!python/object/apply:os.system ['touch hacked']\n")
    result = cli("sweep", bad, "--dry-run")
    assert result.exit_code == 2 and "evil.yaml" in result.stderr
    assert not (tmp_path / "hacked").exists()


# --------------------------------------------------------------------------- names and values
def test_the_hash_depends_on_the_overrides_not_their_order() -> None:
    overrides = ["train.steps=10", "optim.lr=0.001", "seed=0"]
    assert run_hash(overrides) == run_hash(list(reversed(overrides))) == "85599a35"
    assert run_hash(["train.steps=10", "optim.lr=0.003", "seed=0"]) != run_hash(overrides)


@pytest.mark.parametrize(
    "value",
    [
        0,
        -3,
        0.001,
        1e-5,
        1e30,
        0.1 + 0.2,
        "1e-3",
        "true",
        "",
        "a b",
        None,
        True,
        [1, 2],
        {"dataset": "digits"},
        "x: y",
    ],  # fmt: skip
)
def test_values_are_written_so_yaml_reads_them_back(value) -> None:
    text = render_value(value)
    assert "\n" not in text
    assert parse_override(f"k={text}") == (["k"], value)


def test_random_draws_are_reproducible_and_crossed_with_the_grid(tiny_config: Path) -> None:
    spec = {
        "config": "tiny.yaml",
        "overrides": SHORT,
        "grid": {"train.batch_size": [16, 32]},
        "random": {
            "n": 3,
            "seed": 7,
            "params": {
                "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                "optim.weight_decay": {"uniform": [0, 0.1]},
                "data.split_seed": {"randint": [1, 3]},
                "model.backbone": {"choice": ["lenet", "cnn"]},
            },
        },
        "seeds": [0, 1],
    }
    sweep = write_sweep(tiny_config.parent / "rand.yaml", **spec)
    first = plan(load_sweep(sweep), tiny_config.parent / "runs").runs
    second = plan(load_sweep(sweep), tiny_config.parent / "runs").runs
    assert [r.overrides for r in first] == [r.overrides for r in second]
    assert [r.name for r in first] == [r.name for r in second]
    assert len(first) == 2 * 3 * 2 and len({r.name for r in first}) == 12
    draws = {tuple((k, r.values[k]) for k in spec["random"]["params"]) for r in first}
    assert len(draws) == 3  # the same 3 draws under each grid point and seed
    for run in first:
        v = run.values
        assert 1e-4 <= v["optim.lr"] <= 1e-2 and 0 <= v["optim.weight_decay"] <= 0.1
        assert v["data.split_seed"] in (1, 2, 3) and v["model.backbone"] in ("lenet", "cnn")
        assert re.fullmatch(r"[A-Za-z0-9._=-]{1,60}-[0-9a-f]{8}", run.name), run.name
    other = write_sweep(
        tiny_config.parent / "rand2.yaml",
        **{**spec, "random": {**spec["random"], "seed": 8}},
    )
    assert [r.values for r in plan(load_sweep(other), validate=False).runs] != [
        r.values for r in first
    ]


def test_repeated_draws_become_one_run(tiny_config: Path) -> None:
    sweep = write_sweep(
        tiny_config.parent / "choice.yaml",
        config="tiny.yaml",
        random={"n": 20, "params": {"optim.lr": {"choice": [0.001, 0.003]}}},
    )
    runs = plan(load_sweep(sweep)).runs
    assert sorted(r.values["optim.lr"] for r in runs) == [0.001, 0.003]


def test_the_example_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    seeds = cli("sweep", "configs/sweeps/quickstart_seeds.yaml", "--dry-run", "--runs-dir", "r")
    assert seeds.exit_code == 0, seeds.stderr
    lines = seeds.stdout.splitlines()
    assert len(lines) == 3
    for seed, line in enumerate(lines):
        assert line.startswith(f"xdt train-source configs/quickstart.yaml seed={seed} ")
        assert f"--runs-dir r/quickstart_seeds --name seed{seed}-" in line
    lr = cli("sweep", "configs/sweeps/quickstart_lr.yaml", "--dry-run", "--runs-dir", "r")
    assert lr.exit_code == 0, lr.stderr
    assert len(lr.stdout.splitlines()) == 4 and "optim.lr=0.003 seed=1" in lr.stdout
    assert not (REPO / "r").exists()


def test_help_has_an_example() -> None:
    result = cli("sweep", "--help")
    assert result.exit_code == 0
    assert "Example: xdt sweep" in " ".join(result.stdout.split())
    assert "--jobs" in result.stdout and "--dry-run" in result.stdout


def test_runs_share_the_cores() -> None:
    env = child_env(cpu_count())
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert child_env(1)["OMP_NUM_THREADS"] == str(cpu_count())
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "1", out.stderr


def test_load_sweep_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
