"""Composite runs over the core: what leave-one-out and single-task baselines add to a run
goes in through `regimes.build_experiment` (an Experiment is never patched afterwards), and
the CLI dispatches to them. tests/test_layers.py checks that the core never imports them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.conftest import write_config
from xdt_cli.engine import Experiment
from xdt_cli.errors import XdtError
from xdt_cli.regimes import build_experiment
from xdt_cli.resolve import load_config
from xdt_cli.runtime import Runtime


def test_an_experiment_is_built_complete() -> None:
    assert Experiment.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert {"summary_extra", "finish_summary", "run_files"} <= {
        f.name for f in dataclasses.fields(Experiment)
    }


def test_single_task_baselines_are_only_for_multitask(tmp_path: Path) -> None:
    config = write_config(tmp_path / "src.yaml", {"data": {"source": {"dataset": "digits"}}})
    cfg = load_config(config, subcommand="train-source")
    with pytest.raises(XdtError, match="only multitask runs have tasks"):
        build_experiment("train-source", cfg, Runtime.from_env("cpu"), single_task={})


def test_the_cli_takes_baselines_dir_only_with_the_baselines(cli, tmp_path: Path) -> None:
    config = write_config(tmp_path / "mm.yaml", {"data": {"tasks": {"a": {"dataset": "digits"}}}})
    result = cli("multitask", config, "--baselines-dir", tmp_path / "b")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "error: --baselines-dir: only used with --single-task-baselines\n"
    assert not (tmp_path / "runs").exists()
