"""`xdt report` and the selection rules: hand-made run folders with known numbers, and real
tiny runs whose summary the rules must reproduce."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, write_config
from xdt_cli.api import start_run
from xdt_cli.errors import XdtError
from xdt_cli.progress import Reporter
from xdt_cli.report import collect_runs, render, summarize
from xdt_cli.selection import RULES, get_rule, select

# test accuracies (digits, mnist5k) of the 2x2 grid's runs, for seeds 0 and 1
GRID = {
    ("lenet", 0.001): [(0.80, 0.30), (0.84, 0.36)],
    ("lenet", 0.01): [(0.90, 0.40), (0.91, 0.45)],
    ("cnn", 0.001): [(0.70, 0.20), (0.75, 0.21)],
    ("cnn", 0.01): [(0.60, 0.10), (0.66, 0.19)],
}


def hand_config(*, lr=0.001, backbone="lenet", seed=0, rule="source_val", metric=None):
    """A resolved config as a train-source run writes it (the keys that matter here)."""
    return {
        "name": "hand",
        "seed": seed,
        "device": "auto",
        "data": {
            "split_seed": 0,
            "source": {"dataset": "digits"},
            "target": {"dataset": "mnist5k"},
        },
        "model": {"backbone": backbone},
        "method": {"name": "erm", "label_smoothing": 0.0},
        "optim": {"name": "adam", "lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "train": {"steps": 40, "batch_size": 32, "eval_every": 20, "log_every": 10},
        "selection": {"rule": rule, "metric": metric, "mode": None},
    }


def eval_row(step, val, test, target_test=0.5, val_loss=None):
    return {
        "step": step,
        "split": "eval",
        "digits/val/acc": val,
        "digits/val/loss": 1 - val if val_loss is None else val_loss,
        "digits/test/acc": test,
        "digits/test/loss": 1 - test,
        "mnist5k/val/acc": target_test,
        "mnist5k/val/loss": 1 - target_test,
        "mnist5k/test/acc": target_test,
        "mnist5k/test/loss": 1 - target_test,
    }


def write_run(
    path: Path,
    config: dict,
    evals: list[dict],
    *,
    best_step: int | None = None,
    status: str | None = "completed",
    train_rows: list[dict] | None = None,
    own_rule: str = "source_val",
) -> Path:
    """A run folder written by hand: config.yaml, meta.json, metrics.jsonl, summary.json.

    `best_step` is what the run's summary says it chose (default: the last eval);
    `status=None` leaves summary.json out, as for a run that is still going or was killed.
    """
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    meta = {"xdt": "0.1.0", "subcommand": "train-source", "device": "cpu"}
    (path / "meta.json").write_text(json.dumps(meta))
    if train_rows is None:
        train_rows = [{"step": r["step"], "split": "train", "train/loss": 1.0} for r in evals]
    rows = sorted([*train_rows, *evals], key=lambda r: (r["step"], r["split"] == "eval"))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        best_step = evals[-1]["step"] if best_step is None else best_step
        best = next(r for r in evals if r["step"] == best_step)
        summary = {
            "status": status,
            "subcommand": "train-source",
            "final": {k: v for k, v in evals[-1].items() if k not in ("step", "split")},
            "best": {k: v for k, v in best.items() if k not in ("step", "split")},
            "best_step": best_step,
            "selection": {"rule": own_rule, "metric": "digits/val/acc", "mode": "max"},
            "steps": 40,
            "wall_time_s": 1.0,
        }
        if status == "failed":
            summary["error"] = "the training loss became non-finite"
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """A sweep-like folder: the 2x2 grid x 2 seeds, plus runs that must not be averaged."""
    root = tmp_path / "sweeps" / "grid"
    for (backbone, lr), accs in GRID.items():
        for seed, (acc, target) in enumerate(accs):
            config = hand_config(lr=lr, backbone=backbone, seed=seed)
            evals = [eval_row(20, 0.5, 0.4), eval_row(40, 0.9, acc, target_test=target)]
            write_run(root / f"{backbone}-{lr}-s{seed}", config, evals)
    # same config as a grid cell, but not finished: never averaged in
    config = hand_config(lr=0.001, backbone="lenet", seed=2)
    write_run(root / "failed", config, [eval_row(40, 0.1, 0.0)], status="failed")
    write_run(root / "killed", config | {"seed": 3}, [eval_row(20, 0.1, 0.0)], status=None)
    write_run(
        root / "stopped", config | {"seed": 4}, [eval_row(20, 0.1, 0.0)], status="interrupted"
    )
    (root / "sweep.json").write_text("{}")
    (root / "logs").mkdir()
    (root / "logs" / "x.log").write_text("log\n")
    return root


def expected_grid() -> list[dict]:
    out = []
    for backbone, lr in sorted(GRID):  # cnn before lenet, then lr ascending
        accs = GRID[(backbone, lr)]
        entry = {
            "group": {"model.backbone": backbone, "optim.lr": lr},
            "n": 2,
            "mean": {},
            "std": {},
        }
        for i, metric in enumerate(["digits/test/acc", "mnist5k/test/acc"]):
            values = [a[i] for a in accs]
            entry["mean"][metric] = statistics.mean(values)
            entry["std"][metric] = statistics.stdev(values)
        out.append(entry)
    return out


def test_grid_report_json(cli, grid: Path) -> None:
    result = cli("report", grid.parent, "--format", "json")
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    expected = expected_grid()
    assert [g["group"] for g in groups] == [e["group"] for e in expected]
    for got, want in zip(groups, expected, strict=True):
        assert set(got) == {"group", "n", "mean", "std"}
        assert got["n"] == 2
        assert list(got["mean"]) == ["digits/test/acc", "mnist5k/test/acc"]
        assert got["mean"] == pytest.approx(want["mean"], abs=1e-12)
        assert got["std"] == pytest.approx(want["std"], abs=1e-12)
    # the failed, interrupted and unfinished runs are named on stderr, one line each
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("not reported: ") for line in lines)
    assert any("failed" in line and "failed:" in line for line in lines)
    assert any("killed (unfinished" in line for line in lines)
    assert any("stopped (interrupted" in line for line in lines)


def test_group_by_and_metric_options(cli, grid: Path) -> None:
    result = cli("report", grid, "--group-by", "optim.lr", "--metric", "digits/test/acc",
                 "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    assert [g["group"] for g in groups] == [{"optim.lr": 0.001}, {"optim.lr": 0.01}]
    assert [g["n"] for g in groups] == [4, 4]
    low = [a[0] for (_, lr), accs in GRID.items() if lr == 0.001 for a in accs]
    assert groups[0]["mean"] == {"digits/test/acc": pytest.approx(statistics.mean(low))}
    assert groups[0]["std"] == {"digits/test/acc": pytest.approx(statistics.stdev(low))}
    # by seed too, and a glob for the metrics
    by_seed = json.loads(
        cli(
            "report",
            grid,
            "--group-by",
            "optim.lr,seed",
            "--metric",
            "*/val/acc",
            "--format",
            "json",
        ).stdout  # fmt: skip
    )
    assert len(by_seed) == 4 and {g["n"] for g in by_seed} == {2}
    assert list(by_seed[0]["mean"]) == ["digits/val/acc", "mnist5k/val/acc"]
    assert by_seed[0]["group"] == {"optim.lr": 0.001, "seed": 0}
    bad = cli("report", grid, "--group-by", "optim.lrr")
    assert bad.exit_code == 2 and "did you mean 'optim.lr'" in bad.stderr
    unknown = cli("report", grid, "--metric", "digits/test/ac")
    assert unknown.exit_code == 2 and "digits/test/ac" in unknown.stderr
    assert unknown.stderr.count("\n") == 1


def test_every_format(cli, grid: Path) -> None:
    groups = summarize(collect_runs([grid]))
    assert groups == json.loads(render(groups, "json"))

    rows = list(csv.DictReader(io.StringIO(cli("report", grid, "--format", "csv").stdout)))
    assert len(rows) == 4
    assert list(rows[0]) == [
        "model.backbone",
        "optim.lr",
        "n",
        "digits/test/acc mean",
        "digits/test/acc std",
        "mnist5k/test/acc mean",
        "mnist5k/test/acc std",
    ]
    assert rows[0]["model.backbone"] == "cnn" and float(rows[0]["optim.lr"]) == 0.001
    assert float(rows[0]["digits/test/acc mean"]) == pytest.approx(0.725)
    assert rows[0]["n"] == "2"

    markdown = cli("report", grid, "--format", "markdown").stdout.splitlines()
    assert markdown[0] == "| model.backbone | optim.lr | n | digits/test/acc | mnist5k/test/acc |"
    assert markdown[1] == "| --- | --- | ---: | ---: | ---: |"
    assert markdown[2] == "| cnn | 0.001 | 2 | 0.7250 ± 0.0354 | 0.2050 ± 0.0071 |"
    assert len([line for line in markdown if line.startswith("|")]) == 6
    assert "selection: each run's own rule" in markdown[-1]

    latex = cli("report", grid, "--format", "latex").stdout
    assert r"\begin{tabular}{llrrr}" in latex and latex.rstrip().endswith(r"\end{tabular}")
    assert r"cnn & 0.001 & 2 & 0.7250 $\pm$ 0.0354 & 0.2050 $\pm$ 0.0071 \\" in latex
    assert r"model.backbone & optim.lr & n" in latex

    table = cli("report", grid)
    assert table.exit_code == 0
    assert "selection: each run's own rule (source_val on digits/val/acc)" in table.stdout
    assert "0.7250 ± 0.0354" in table.stdout and "lenet" in table.stdout
    assert "not reported" in table.stderr and "not reported" not in table.stdout

    bad = cli("report", grid, "--format", "markdwn")
    assert bad.exit_code == 2 and "did you mean 'markdown'" in bad.stderr


def test_one_group_shows_no_keys_and_std_zero(cli, tmp_path: Path) -> None:
    write_run(tmp_path / "r" / "a", hand_config(), [eval_row(40, 0.9, 0.8)])
    write_run(
        tmp_path / "r" / "b", hand_config(seed=1) | {"name": "other"}, [eval_row(40, 0.9, 0.6)]
    )
    write_run(tmp_path / "single", hand_config(lr=0.5), [eval_row(40, 0.9, 0.8)])
    (groups,) = json.loads(cli("report", tmp_path / "r", "--format", "json").stdout)
    assert groups["group"] == {} and groups["n"] == 2  # `name` does not split a group
    assert groups["mean"]["digits/test/acc"] == pytest.approx(0.7)
    (single,) = json.loads(cli("report", tmp_path / "single", "--format", "json").stdout)
    assert single["n"] == 1 and single["std"] == {"digits/test/acc": 0.0, "mnist5k/test/acc": 0.0}


def test_selection_rules_on_a_hand_written_file(cli, tmp_path: Path) -> None:
    evals = [eval_row(20, 0.90, 0.80), eval_row(40, 0.85, 0.70)]
    write_run(tmp_path / "runs" / "own", hand_config(), evals, best_step=20)
    # trained with rule `last`: its own choice is step 40
    last_cfg = hand_config(rule="last", lr=0.01)
    write_run(tmp_path / "runs" / "lastrule", last_cfg, evals, best_step=40, own_rule="last")

    def accs(rule: str) -> list[float]:
        result = cli("report", tmp_path / "runs", "--selection", rule, "--format", "json")
        assert result.exit_code == 0, result.stderr
        return [g["mean"]["digits/test/acc"] for g in json.loads(result.stdout)]

    assert accs("summary") == [0.80, 0.70]
    assert accs("source_val") == [0.80, 0.80]
    assert accs("last") == [0.70, 0.70]
    assert "selection: last" in cli("report", tmp_path / "runs", "--selection", "last").stdout
    bad = cli("report", tmp_path / "runs", "--selection", "source-val")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    assert "did you mean 'source_val'" in bad.stderr


def test_source_val_ties_nulls_and_the_runs_own_metric() -> None:
    cfg = hand_config()
    tie = [eval_row(20, 0.9, 0.8), eval_row(40, 0.9, 0.7), eval_row(60, 0.5, 0.1)]
    assert select("source_val", cfg, tie)["step"] == 20  # first best wins, as in the engine
    assert select("last", cfg, tie)["step"] == 60
    assert select("source_val", cfg, []) is None and select("last", cfg, []) is None
    # a null (non-finite) value is never better; a later finite value beats a finite one
    nulls = [eval_row(20, 0.5, 0.1), {**eval_row(40, 0.9, 0.2), "digits/val/acc": None}]
    assert select("source_val", cfg, nulls)["step"] == 20
    # the run's own selection.metric (a loss: minimised) when the rule is its own ...
    by_loss = [eval_row(20, 0.9, 0.8, val_loss=0.5), eval_row(40, 0.85, 0.7, val_loss=0.3)]
    own = hand_config(metric="digits/val/loss")
    assert select("source_val", own, by_loss)["step"] == 40
    assert select("source_val", own | {"selection": {**own["selection"], "mode": "max"}},
                  by_loss)["step"] == 20  # fmt: skip
    # ... but not when the run was trained under another rule
    other = hand_config(rule="last", metric="digits/val/loss")
    assert select("source_val", other, by_loss)["step"] == 20
    assert set(RULES) >= {"source_val", "last"} and get_rule("summary") is None
    with pytest.raises(XdtError, match="no eval row holds 'usps/val/acc'"):
        select("source_val", {"data": {"source": {"dataset": "usps"}}}, tie)


def test_folders_without_runs_exit_2(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cli("report", tmp_path / "empty")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(tmp_path / "empty") in result.stderr
    missing = cli("report", tmp_path / "missing")
    assert missing.exit_code == 2 and "missing: no such folder" in missing.stderr
    # the default folder is $XDT_RUNS_DIR (set by conftest to tmp_path/runs, which is absent)
    default = cli("report")
    assert default.exit_code == 2 and str(tmp_path / "runs") in default.stderr


def test_unreadable_and_only_incomplete_runs(cli, tmp_path: Path) -> None:
    run = write_run(tmp_path / "r" / "a", hand_config(), [eval_row(40, 0.9, 0.8)])
    (run / "summary.json").write_text("{not json")
    write_run(tmp_path / "r" / "b", hand_config(), [eval_row(20, 0.9, 0.8)], status=None)
    result = cli("report", tmp_path / "r", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert "a (unreadable: " in result.stderr and "b (unfinished" in result.stderr
    assert cli("report", tmp_path / "r").exit_code == 0


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> Path:
    """Three tiny real runs: two seeds of one config, and a learning rate that diverges."""
    root = tmp_path_factory.mktemp("real")
    config = write_config(root / "tiny.yaml", TINY)
    quiet = Reporter(quiet=True)
    for name, overrides in [("s0", []), ("s1", ["seed=1"]), ("hot", ["optim.lr=0.05"])]:
        start_run(
            "train-source",
            config,
            ["train.eval_every=10", *overrides],
            name=name,
            runs_dir=root / "runs",
            reporter=quiet,
        )
    return root / "runs"


def test_source_val_recomputed_from_real_runs_equals_their_summary(real_runs: Path) -> None:
    records = collect_runs([real_runs])
    assert len(records) == 3
    for record in records:
        assert record.completed and len(record.eval_rows()) == 4
        row = record.choose("source_val")
        assert row["step"] == record.summary["best_step"], record.path
        assert {k: v for k, v in row.items() if k not in ("step", "split")} == record.summary[
            "best"
        ]
        assert record.choose("summary") == row
        assert record.choose("last")["step"] == 40


def test_report_of_real_runs_groups_the_seeds(cli, real_runs: Path) -> None:
    result = cli("report", real_runs, "--selection", "source_val", "--format", "json")
    assert result.exit_code == 0, result.stderr
    hot, cool = sorted(json.loads(result.stdout), key=lambda g: -g["group"]["optim.lr"])
    assert hot["group"] == {"optim.lr": 0.05} and hot["n"] == 1
    assert cool["group"] == {"optim.lr": 0.003} and cool["n"] == 2
    accs = [
        json.loads((real_runs / name / "summary.json").read_text())["best"]["digits/test/acc"]
        for name in ("s0", "s1")
    ]
    assert cool["mean"]["digits/test/acc"] == pytest.approx(statistics.mean(accs))
    assert cool["std"]["digits/test/acc"] == pytest.approx(statistics.stdev(accs))
    assert result.stderr == ""


def test_help_has_an_example(cli) -> None:
    for command in ("report", "plot"):
        help_text = cli(command, "--help").stdout
        assert "Example: xdt " + command in " ".join(help_text.split()), command
