"""`xdt multitask`: multimnist5k, task layouts and labels, config checks, evaluation with
missing labels, end-to-end runs (hps and mmoe), resume, single-task baselines with Delta_m,
and the benchmark's tasks table."""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import write_config
from tests.test_engine import assert_resume_is_exact
from xdt_cli.api import resume_run, start_run
from xdt_cli.baselines import delta_m, start_with_baselines
from xdt_cli.cli import app
from xdt_cli.config import TaskConfig
from xdt_cli.data import load_domain
from xdt_cli.data.embedded import load_mnist5k
from xdt_cli.data.multimnist import PAIRS, pair_sources
from xdt_cli.data.splits import stratified_split
from xdt_cli.data.tasks import TaskStream, load_task_groups
from xdt_cli.errors import ConfigError
from xdt_cli.evaluation import _task_sums
from xdt_cli.progress import Reporter

QUIET = Reporter(quiet=True)
TRAIN = {"steps": 6, "batch_size": 8, "eval_every": 3, "log_every": 3, "eval_batch_size": 512}
MM = {
    "data": {
        "tasks": {
            "left": {"dataset": "multimnist5k", "label": "left"},
            "right": {"dataset": "multimnist5k", "label": "right"},
        }
    },
    "model": {"backbone": "lenet"},
    "train": TRAIN,
}
TWO_SETS = {
    "data": {"tasks": {"digits": {"dataset": "digits"}, "mnist5k": {"dataset": "mnist5k"}}},
    "model": {"backbone": "lenet"},
    "train": TRAIN,
}


def start(
    tmp_path: Path, config: dict, name: str, *overrides: str, single_task_baselines=False
) -> dict:
    path = write_config(tmp_path / f"{name}.yaml", config)
    where = {"name": name, "runs_dir": tmp_path / "runs", "reporter": QUIET}
    if single_task_baselines:
        return start_with_baselines(path, list(overrides), **where)
    return start_run("multitask", path, list(overrides), **where)


# --------------------------------------------------------------------------- the data
def test_multimnist5k_pairs_stay_within_their_split_and_label_both_digits() -> None:
    _, y = load_mnist5k("mnist5k")
    parts = stratified_split(y, 0)
    sources = pair_sources(0)
    for (name, (a, b, _)), idx in zip(sources.items(), parts, strict=True):
        allowed = set(idx.tolist())
        assert len(a) == PAIRS[name] and set(a.tolist()) <= allowed and set(b.tolist()) <= allowed
        assert not bool((a == b).any())  # never a digit paired with itself
    domain = load_domain("multimnist5k")
    assert domain.input_shape == (1, 36, 36)
    assert {k: len(v) for k, v in domain.splits.items()} == PAIRS
    a, b, _ = sources["test"]
    assert torch.equal(domain.splits["test"].y, y[a] * 10 + y[b])
    again = load_domain("multimnist5k")  # deterministic: the same bytes every time
    assert torch.equal(again.splits["train"].x, domain.splits["train"].x)
    other = load_domain("multimnist5k", split_seed=1)
    assert not torch.equal(other.splits["test"].y, domain.splits["test"].y)


def test_the_left_digit_is_left_of_the_right_digit() -> None:
    """Ink of the left digit lies further left: its image alone overlaid on an empty right."""
    x = load_domain("multimnist5k").splits["val"].x.float()
    cols = torch.arange(36, dtype=torch.float32)
    centre = (x.sum(dim=(1, 2)) * cols).sum(1) / x.sum(dim=(1, 2, 3))
    assert 15 < float(centre.mean()) < 21  # both digits: around the canvas centre


def test_tasks_on_the_same_inputs_share_one_batch_and_labels_are_derived() -> None:
    tasks = {
        "left": TaskConfig(dataset="multimnist5k", label="left"),
        "total": TaskConfig(dataset="multimnist5k", label="sum", loss="mse"),
        "odd": TaskConfig(dataset="digits", label="parity", loss="bce"),
    }
    groups, specs = load_task_groups(tasks, 0)
    assert [g.tasks for g in groups] == [["left", "total"], ["odd"]]
    assert [(s.name, s.loss, s.outputs) for s in specs] == [
        ("left", "ce", 10),
        ("total", "mse", 1),
        ("odd", "bce", 1),
    ]
    code = load_domain("multimnist5k").splits["train"].y
    assert torch.equal(groups[0].labels["train"]["left"], code // 10)
    assert torch.equal(groups[0].labels["train"]["total"], (code // 10 + code % 10).float())
    digits = load_domain("digits").splits["train"].y
    assert torch.equal(groups[1].labels["train"]["odd"], (digits % 2).float())
    stream = TaskStream(groups[0], batch_size=16, seed=0, device=torch.device("cpu"))
    left, total = stream.batch(3)
    assert left.x is total.x and left.task == "left" and total.task == "total"
    assert torch.equal(total.y, (left.y + (total.y - left.y)).float())


def test_missing_labels_are_hidden_in_train_only_and_seeded() -> None:
    tasks = {"d": TaskConfig(dataset="digits", missing_labels=0.5)}
    groups, _ = load_task_groups(tasks, 0)
    train = groups[0].labels["train"]["d"]
    share = float((train == -1).float().mean())
    assert 0.4 < share < 0.6
    assert bool((groups[0].labels["test"]["d"] >= 0).all())
    again, _ = load_task_groups(tasks, 0)
    assert torch.equal(again[0].labels["train"]["d"], train)


def test_evaluation_does_not_count_missing_labels() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    count, correct, _ = _task_sums("ce", logits, torch.tensor([0, -1, 1])).tolist()
    assert (count, correct) == (2, 1)
    out = torch.tensor([[1.0], [5.0], [3.0]])
    count, squared, absolute = _task_sums("mse", out, torch.tensor([2.0, math.nan, 3.0])).tolist()
    assert (count, squared, absolute) == (2, 1.0, 1.0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.name=equal", "data.tasks.left.weight"),
        ("data.tasks.left.label=colour", "data.tasks.left.label"),
        ("data.tasks.left.loss=bce", "data.tasks.left.loss"),
        ("data.tasks.avg={dataset: digits}", "data.tasks.avg"),
        ("selection.rule=source_val", "selection.rule"),
        ("selection.metric=left/test/acc", "selection.metric"),
        ("model.preset=linear_probe", "model.preset"),
        ("data.source={dataset: digits}", "data.source"),
        ("model.experts=2", "model.experts"),
    ],
)
def test_bad_multitask_settings_exit_2_naming_their_key(
    cli, tmp_path: Path, override: str, key: str
) -> None:
    config = {**MM, "data": {"tasks": {**MM["data"]["tasks"]}}}
    config["data"]["tasks"]["left"] = {**config["data"]["tasks"]["left"], "weight": 2.0}
    path = write_config(tmp_path / "mt.yaml", config)
    result = cli("multitask", path, override, "-q")
    assert result.exit_code == 2, result.stderr
    assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_multitask_keys_are_refused_elsewhere(cli, tmp_path: Path) -> None:
    path = write_config(tmp_path / "src.yaml", {"data": {"source": {"dataset": "digits"}}})
    for override, key in [
        ("data.tasks={a: {dataset: digits}}", "data.tasks"),
        ("model.arch=mmoe", "model.arch"),
        ("model.heads={a: [4]}", "model.heads"),
        ("selection.rule=task_val", "selection.rule"),
    ]:
        result = cli("train-source", path, override)
        assert result.exit_code == 2 and key in result.stderr, result.stderr
    with pytest.raises(ConfigError, match="data.tasks: required"):
        start(tmp_path, {"train": TRAIN}, "none")


# --------------------------------------------------------------------------- runs
@pytest.mark.parametrize("arch", ["hps", "mmoe"])
def test_a_multitask_run_logs_task_metrics_and_weights(cli, tmp_path: Path, arch: str) -> None:
    config = {**TWO_SETS, "model": {"backbone": "lenet", "arch": arch}}
    path = write_config(tmp_path / "mt.yaml", config)
    result = cli("multitask", path, "--json", "-q", "--name", arch, "method.name=equal")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["subcommand"] == "multitask" and summary["status"] == "completed"
    assert summary["selection"] == {"rule": "task_val", "metric": "avg/val/acc", "mode": "max"}
    best = summary["best"]
    assert best["avg/test/acc"] == pytest.approx(
        (best["digits/test/acc"] + best["mnist5k/test/acc"]) / 2
    )
    run = tmp_path / "runs" / arch
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(r["train/weight_digits"] == 1.0 for r in train)
    assert all(math.isfinite(r["train/loss_mnist5k"]) for r in train)
    tasks = json.loads((run / "tasks.json").read_text())["tasks"]
    assert tasks["digits"]["inputs"] == "digits" and tasks["mnist5k"]["outputs"] == 10


def test_static_weights_scale_the_task_losses_in_the_logged_total(tmp_path: Path) -> None:
    config = {**MM, "train": {**TRAIN, "steps": 1, "log_every": 1, "eval_every": 1}}
    config["data"] = {
        "tasks": {
            "left": {**MM["data"]["tasks"]["left"], "weight": 0.25},
            "right": {**MM["data"]["tasks"]["right"], "weight": 2.0},
        }
    }
    start(tmp_path, config, "static", "method.name=static")
    row = json.loads((tmp_path / "runs" / "static" / "metrics.jsonl").open().readline())
    expected = 0.25 * row["train/loss_left"] + 2.0 * row["train/loss_right"]
    assert row["train/loss"] == pytest.approx(expected, rel=1e-6)
    assert (row["train/weight_left"], row["train/weight_right"]) == (0.25, 2.0)


def test_a_mixed_loss_run_reports_mse_and_selects_on_the_classification_tasks(
    tmp_path: Path,
) -> None:
    config = {**MM, "data": {"tasks": {**MM["data"]["tasks"]}}}
    config["data"]["tasks"]["sum"] = {"dataset": "multimnist5k", "label": "sum", "loss": "mse"}
    summary = start(tmp_path, config, "mixed")
    assert summary["selection"]["metric"] == "avg/val/acc"
    assert {"sum/test/mse", "sum/test/mae", "left/test/acc"} <= summary["best"].keys()
    assert "sum/test/acc" not in summary["best"]


@pytest.mark.parametrize("method", ["uncertainty", "pcgrad"])  # a stateful and a manual one
def test_multitask_resume_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    config = {**MM, "method": {"name": method}, "train": {**TRAIN, "steps": 8, "eval_every": 4}}
    run = functools.partial(start, tmp_path, config)
    assert_resume_is_exact(monkeypatch, tmp_path / "runs", run, 5)


def test_single_task_baselines_are_trained_once_and_give_delta_m(tmp_path: Path) -> None:
    first = start(tmp_path, MM, "static", single_task_baselines=True)
    baselines = first["single_task"]
    assert set(baselines) == {"left", "right"}
    for task, base in baselines.items():
        single = json.loads((Path(base["run_dir"]) / "summary.json").read_text())
        assert single["best"][f"{task}/test/acc"] == base["value"]
        assert json.loads((Path(base["run_dir"]) / "tasks.json").read_text())["tasks"].keys() == {
            task
        }
    expected = {
        t: 100 * (first["best"][f"{t}/test/acc"] - b["value"]) / b["value"]
        for t, b in baselines.items()
    }
    assert first["delta_m"]["per_task"] == pytest.approx(expected, abs=1e-3)
    assert first["delta_m"]["overall"] == pytest.approx(
        statistics.mean(expected.values()), abs=1e-3
    )

    stamps = {
        t: (Path(b["run_dir"]) / "summary.json").stat().st_mtime_ns for t, b in baselines.items()
    }
    second = start(tmp_path, MM, "equal", "method.name=equal", single_task_baselines=True)
    assert second["single_task"] == baselines  # reused, not retrained
    assert stamps == {
        t: (Path(b["run_dir"]) / "summary.json").stat().st_mtime_ns for t, b in baselines.items()
    }
    assert sorted(p.name for p in (tmp_path / "runs" / "single_task").iterdir()) == sorted(
        Path(b["run_dir"]).name for b in baselines.values()
    )


def test_a_resumed_run_keeps_its_baselines_and_delta_m(tmp_path: Path) -> None:
    first = start(tmp_path, MM, "with", single_task_baselines=True)
    run = tmp_path / "runs" / "with"
    (run / "summary.json").unlink()  # as if killed before the summary was written
    resumed, _ = resume_run(run, reporter=QUIET)
    assert resumed["single_task"] == first["single_task"]
    assert resumed["delta_m"] == first["delta_m"]


def test_delta_m_flips_the_sign_of_lower_is_better_metrics() -> None:
    baselines = {
        "a": {"metric": "a/test/acc", "lower_is_better": False, "value": 0.8, "run_dir": "x"},
        "s": {"metric": "s/test/mse", "lower_is_better": True, "value": 2.0, "run_dir": "y"},
    }
    out = delta_m({"best": {"a/test/acc": 0.88, "s/test/mse": 2.5}}, baselines)
    assert out["per_task"] == {"a": pytest.approx(10.0), "s": pytest.approx(-25.0)}
    assert out["overall"] == pytest.approx(-7.5)


def test_the_tasks_table_of_a_multitask_suite(tmp_path: Path) -> None:
    write_config(tmp_path / "mm.yaml", MM)
    sweep = {
        "subcommand": "multitask",
        "config": "mm.yaml",
        "seeds": [0, 1],
        "single_task_baselines": True,
    }
    (tmp_path / "mm_static.yaml").write_text(yaml.safe_dump(sweep))
    suite = {
        "sweeps": ["mm_static.yaml"],
        "tables": [{"title": "mm", "kind": "tasks", "metric": "test", "rows": ["mm_static"]}],
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    runs, doc = tmp_path / "runs", tmp_path / "B.md"
    args = ["benchmark", str(tmp_path / "suite.yaml"), "--runs-dir", str(runs), "--doc", str(doc)]
    result = CliRunner().invoke(app, [*args, "-q", "--jobs", "2"])
    assert result.exit_code == 0, result.stderr
    summaries = [
        json.loads(p.read_text()) for p in sorted((runs / "mm_static").glob("*/summary.json"))
    ]
    assert len(summaries) == 2 and len(list((runs / "single_task").iterdir())) == 4
    left = [100 * s["best"]["left/test/acc"] for s in summaries]
    deltas = [s["delta_m"]["overall"] for s in summaries]
    text = doc.read_text()
    row = f"| `mm_static` | 2 | {statistics.mean(left):.1f} ± {statistics.stdev(left):.1f} | "
    assert row in text, text
    assert f"{statistics.mean(deltas):.2f} ± {statistics.stdev(deltas):.2f}" in text
    assert "| single-task baselines | 2 |" in text


def test_a_missing_class_stays_missing_in_every_derived_label() -> None:
    from xdt_cli.data.registry import Domain, Split
    from xdt_cli.data.tasks import derive_label

    y = torch.tensor([3, -1, 7])
    split = Split(torch.zeros(3, 1, 2, 2), y)
    domain = Domain(
        "digits", "digits", 10, (1, 2, 2), {"train": split}, classes=tuple("0123456789")
    )
    parity = derive_label(domain, TaskConfig(dataset="digits", label="parity"), y, "k")
    assert parity.tolist() == [1, -1, 1]
    odd = derive_label(domain, TaskConfig(dataset="digits", label="parity", loss="bce"), y, "k")
    assert odd[0] == 1 and math.isnan(odd[1])


def test_a_sweep_passes_single_task_baselines_only_for_multitask(tmp_path: Path) -> None:
    from xdt_cli.sweeps import load_sweep, plan

    write_config(tmp_path / "mm.yaml", MM)
    spec = {"subcommand": "multitask", "config": "mm.yaml", "single_task_baselines": True}
    (tmp_path / "a+b.yaml").write_text(yaml.safe_dump(spec))
    planned = plan(load_sweep(tmp_path / "a+b.yaml"), tmp_path / "runs")
    argv = planned.runs[0].argv
    shared = str(tmp_path / "runs" / "single_task")
    assert argv[-3:] == ["--single-task-baselines", "--baselines-dir", shared]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "subcommand": "train-source"}))
    with pytest.raises(ConfigError, match="single_task_baselines: only multitask"):
        load_sweep(tmp_path / "bad.yaml")


def test_task_heads_are_towers_and_baselines_keep_only_their_own(tmp_path: Path) -> None:
    from xdt_cli.baselines import baseline_config, baseline_name
    from xdt_cli.resolve import load_config

    config = {**MM, "model": {"backbone": "lenet", "heads": {"left": [32, 16]}}}
    path = write_config(tmp_path / "mt.yaml", config)
    summary = start(tmp_path, config, "towers")
    assert summary["status"] == "completed"
    state = torch.load(tmp_path / "runs" / "towers" / "checkpoints" / "best.pt", weights_only=True)[
        "method"
    ]
    assert state["model.heads.left.0.weight"].shape == (32, 84)  # lenet's 84 features
    assert state["model.heads.left.4.weight"].shape == (10, 16)
    assert state["model.heads.right.weight"].shape == (10, 84)  # linear by default
    cfg = load_config(path, subcommand="multitask")
    assert baseline_config(cfg, "left").model.heads == {"left": [32, 16]}
    assert baseline_config(cfg, "right").model.heads == {}
    plain = load_config(write_config(tmp_path / "p.yaml", MM), subcommand="multitask")
    assert baseline_name(baseline_config(plain, "right"), "right") == baseline_name(
        baseline_config(cfg, "right"), "right"
    )  # another task's head does not change this task's baseline
    with pytest.raises(ConfigError, match="model.heads.lft: not a task"):
        load_config(path, ["model.heads={lft: [8]}"], subcommand="multitask")
