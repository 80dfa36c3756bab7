"""The command line through Typer's test runner: output streams, files, exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY, write_config
from xdt_cli import __version__
from xdt_cli.engine import Engine

RUN_FILES = [
    "config.yaml",
    "meta.json",
    "metrics.jsonl",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "summary.json",
]


def test_help_and_version(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    commands = (
        "train-source",
        "resume",
        "validate",
        "datasets",
        "methods",
        "sweep",
        "report",
        "plot",
        "evaluate",
        "benchmark",
    )
    for command in commands:
        assert command in result.stdout
    assert cli("--version").stdout.strip() == f"xdt {__version__}"
    for command in commands:
        help_text = cli(command, "--help").stdout
        assert "Example: xdt " + command in " ".join(help_text.split()), command


def test_train_source_writes_the_run_folder(cli, tiny_config: Path, tmp_path: Path) -> None:
    result = cli("train-source", tiny_config, "--quiet")
    assert result.exit_code == 0, result.stderr
    run_dir = Path(result.stdout.strip())
    # the default name: <runs-dir>/<subcommand>/<config name>-<YYYYmmdd-HHMMSS>
    assert run_dir.parent == tmp_path / "runs" / "train-source"
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", run_dir.name)
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["subcommand"] == "train-source"
    assert summary["steps"] == 40
    assert set(summary) >= {"final", "best", "best_step", "selection", "wall_time_s"}
    assert summary["selection"]["rule"] == "source_val"
    assert summary["selection"]["metric"] == "digits/val/acc"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu"
    assert meta["subcommand"] == "train-source"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 40 and resolved["method"]["name"] == "erm"
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert isinstance(row["step"], int) and row["split"] in ("train", "eval")


def test_json_prints_the_summary_on_stdout(cli, tiny_config: Path, tmp_path: Path) -> None:
    result = cli("train-source", tiny_config, "train.steps=20", "--name", "j", "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    on_disk = json.loads((tmp_path / "runs" / "j" / "summary.json").read_text())
    assert printed == on_disk
    assert printed["steps"] == 20
    assert "step" in result.stderr  # eval lines are logs: stderr, not stdout


def test_flags_overrides_and_runs_dir(cli, tiny_config: Path, tmp_path: Path) -> None:
    result = cli(
        "train-source",
        tiny_config,
        "train.steps=10",
        "train.eval_every=5",
        "seed=3",
        "--seed",
        "4",
        "--runs-dir",
        tmp_path / "elsewhere",
        "--name",
        "x",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # --quiet
    resolved = yaml.safe_load((tmp_path / "elsewhere" / "x" / "config.yaml").read_text())
    assert resolved["seed"] == 4  # the flag wins over the override
    assert resolved["train"]["steps"] == 10 and resolved["device"] == "cpu"


def test_existing_name_needs_overwrite(cli, tiny_config: Path, tmp_path: Path) -> None:
    assert cli("train-source", tiny_config, "train.steps=5", "--name", "n", "-q").exit_code == 0
    again = cli("train-source", tiny_config, "train.steps=5", "--name", "n", "-q")
    assert again.exit_code == 2
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr
    over = cli("train-source", tiny_config, "train.steps=6", "--name", "n", "-q", "--overwrite")
    assert over.exit_code == 0
    assert json.loads((tmp_path / "runs" / "n" / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--name", "../escape"], "--name"),
        (["--name", "a/b"], "--name"),
        (["optim.lrr=1"], "optim.lrr"),
        (["trainsteps"], "trainsteps"),
        (["--device", "cuda:7"], "device"),
        (["--device", "tpu"], "device"),
        (["--bogus"], "--bogus"),
        (["method.name=dann"], "method.name"),
        (["data.source.dataset=mnist4k"], "data.source.dataset"),
        (["model.backbone=resnet1"], "model.backbone"),
        (["train.batch_size=100000"], "train.batch_size"),
        (["selection.metric=digits/test/acc"], "selection.metric"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, tiny_config: Path, args, needle: str) -> None:
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    result = cli("train-source", tiny_config, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_config_and_no_run_folder_left(cli, tmp_path: Path) -> None:
    result = cli("train-source", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "missing.yaml" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_runtime_failure_exits_1_with_a_hint(cli, tiny_config: Path, monkeypatch) -> None:
    def broken(self, trackers=()):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(Engine, "fit", broken)
    result = cli("train-source", tiny_config, "-q")
    assert result.exit_code == 1
    assert "the disk caught fire" in result.stderr and "--debug" in result.stderr
    assert "Traceback" not in result.stderr
    debug = cli("train-source", tiny_config, "-q", "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_validate(cli, tiny_config: Path) -> None:
    result = cli("validate", tiny_config, "optim.lr=1e-4")
    assert result.exit_code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"] == {
        "name": "adam",
        "lr": 0.0001,
        "weight_decay": 0.0,
        "lr_mult": {},
        "betas": [0.9, 0.999],
    }
    assert resolved["schedule"]["name"] == "constant" and "base" not in resolved
    bad = cli("validate", tiny_config, "optim.lrr=1", "train.stepz=2")
    assert bad.exit_code == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "did you mean 'optim.lr'" in lines[0] and "did you mean 'train.steps'" in lines[1]


def test_datasets_and_methods(cli) -> None:
    rows = json.loads(cli("datasets", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["mnist5k"]["size"] == 5000 and by_name["digits"]["size"] == 1797
    assert by_name["mnist5k"]["splits"]["mnist5k"] == {"train": 3500, "val": 750, "test": 750}
    assert by_name["digits"]["domains"] == ["digits"]
    table = cli("datasets")
    assert table.exit_code == 0 and "mnist5k" in table.stdout and "5000" in table.stdout
    methods = {r["name"]: r for r in json.loads(cli("methods", "--json").stdout)}
    assert methods["erm"]["subcommands"] == ["finetune", "generalize", "train-source"]
    assert methods["dann"]["subcommands"] == ["transfer"]
    assert methods["erm"]["defaults"] == {"label_smoothing": 0.0}
    assert "erm" in cli("methods").stdout


def test_methods_lists_the_selection_rules() -> None:
    from xdt_cli.listing import rule_rows

    rows = {r["rule"]: r for r in rule_rows()}
    assert rows["oracle"]["chooses"] == "the last checkpoint"  # DomainBed's oracle
    assert rows["source_val"]["chooses"] == "the best checkpoint"
    assert rows["training_domain_val"]["default of"] == ["generalize"]
    assert rows["task_val"]["subcommands"] == ["multitask"]


def test_resume_a_finished_run_does_nothing(cli, tiny_config: Path, tmp_path: Path) -> None:
    assert cli("train-source", tiny_config, "--name", "done", "-q").exit_code == 0
    run_dir = tmp_path / "runs" / "done"
    before = (run_dir / "metrics.jsonl").read_text()
    result = cli("resume", run_dir)
    assert result.exit_code == 0 and "already finished" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_refuses_bad_folders_and_checkpoints(cli, tiny_config: Path, tmp_path) -> None:
    missing = cli("resume", tmp_path / "nothing")
    assert missing.exit_code == 2 and "nothing" in missing.stderr
    assert cli("train-source", tiny_config, "--name", "r", "-q").exit_code == 0
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "summary.json").unlink()  # as if it had been killed
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"\x80\x04 not a checkpoint")
    (run_dir / "checkpoints" / "last.prev.pt").write_bytes(b"")  # its fallback, damaged too
    result = cli("resume", run_dir)
    assert result.exit_code == 2 and "last.pt" in result.stderr
    assert "last.prev.pt is unusable too" in result.stderr
    assert result.stderr.count("\n") == 1


def test_resume_without_last_pt_trains_from_scratch(cli, tiny_config: Path, tmp_path) -> None:
    assert cli("train-source", tiny_config, "--name", "s", "-q").exit_code == 0
    run_dir = tmp_path / "runs" / "s"
    expected = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "last.pt").unlink()
    (run_dir / "checkpoints" / "last.prev.pt").unlink()  # else resume would start there
    result = cli("resume", run_dir, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "completed"
    assert (run_dir / "metrics.jsonl").read_text() == expected
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["resumed"][0]["step"] == 0


def test_failed_run_exits_1(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hot.yaml", {**TINY, "optim": {"name": "sgd", "lr": 1e30}})
    result = cli("train-source", config, "--name", "hot", "-q")
    assert result.exit_code == 1 and "non-finite" in result.stderr
    summary = json.loads((tmp_path / "runs" / "hot" / "summary.json").read_text())
    assert summary["status"] == "failed"
    again = cli("resume", tmp_path / "runs" / "hot")
    assert again.exit_code == 1
