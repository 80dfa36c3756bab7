"""Selection rules (selection.py): each reads only the splits it declares, under every
subcommand; DomainBed's oracle and leave-one-domain-out on hand-made rows; a metric outside a
rule's splits is a one-line config error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from xdt_cli.api import start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.errors import ConfigError
from xdt_cli.progress import Reporter
from xdt_cli.report import collect_runs, leave_one_domain_out_rows
from xdt_cli.selection import RULES, Layout, leave_one_domain_out_choice, mode_of, select

QUIET = Reporter(quiet=True)
TRAIN = {"steps": 20, "batch_size": 8, "eval_every": 2, "log_every": 2, "eval_batch_size": 512}
PAIR = {"source": {"dataset": "digits"}, "target": {"dataset": "mnist5k"}}
CONFIGS = {
    "train-source": {"data": PAIR, "model": {"backbone": "lenet"}, "train": TRAIN},
    "transfer": {
        "data": PAIR,
        "model": {"backbone": "lenet"},
        "method": {"name": "source_only"},
        "train": TRAIN,
    },
    "finetune": {"data": PAIR, "model": {"backbone": "lenet"}, "train": TRAIN},
    "generalize": {
        "data": {
            "dataset": "rotated_mnist5k",
            "domains": ["rot0", "rot15", "rot30"],
            "test_domains": ["rot30"],
        },
        "model": {"backbone": "lenet"},
        "train": TRAIN,
    },
    "multitask": {
        "data": {
            "tasks": {
                "left": {"dataset": "multimnist5k", "label": "left"},
                "right": {"dataset": "multimnist5k", "label": "right"},
            }
        },
        "model": {"backbone": "lenet"},
        "train": TRAIN,
    },
}
# the (domain or task, split) pairs each rule may read, per subcommand; every other val and
# test split is scrambled
READS = {
    "source_val": {("digits", "val")},
    "target_val": {("mnist5k", "val")},
    "training_domain_val": {("rot0", "val"), ("rot15", "val")},
    "oracle": {("rot30", "val")},
    "task_val": {("left", "val"), ("right", "val")},
    "last": set(),
}
GROUP = {"training_domain_val": "train_domains", "oracle": "test_domains", "task_val": "avg"}
CASES = [
    (sub, rule)
    for sub in CONFIGS
    for rule in RULES
    if sub in RULES[rule].subcommands and RULES[rule].single_run
]


def _permuted(y: torch.Tensor) -> torch.Tensor:
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(7))]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("source")
    path = write_config(root / "src.yaml", CONFIGS["train-source"])
    start_run("train-source", path, [], name="src", runs_dir=root / "runs", reporter=QUIET)
    return root / "runs" / "src"


def _run(tmp_path: Path, sub: str, rule: str, name: str, source: Path) -> Path:
    config = dict(CONFIGS[sub])
    if sub == "finetune":
        config["init"] = {"from_run": str(source)}
    path = write_config(tmp_path / f"{name}.yaml", config)
    start_run(
        sub,
        path,
        [f"selection.rule={rule}"],
        name=name,
        runs_dir=tmp_path / "runs",
        reporter=QUIET,
    )
    return tmp_path / "runs" / name


def _scramble(monkeypatch: pytest.MonkeyPatch, keep: set[tuple[str, str]]) -> None:
    """Permute the labels of every val and test split not in `keep` (train is untouched)."""
    import xdt_cli.regimes as regimes

    load_domain, load_tasks = regimes.load_configured_domain, regimes.load_task_groups

    def domain(*args, **kwargs):
        d = load_domain(*args, **kwargs)
        for split in ("val", "test"):
            if (d.name, split) not in keep:
                d.splits[split].y = _permuted(d.splits[split].y)
        return d

    def tasks(*args, **kwargs):
        groups, specs = load_tasks(*args, **kwargs)
        for group in groups:
            for split in ("val", "test"):
                for task, y in list(group.labels[split].items()):
                    if (task, split) not in keep:
                        group.labels[split][task] = _permuted(y)
        return groups, specs

    monkeypatch.setattr(regimes, "load_configured_domain", domain)
    monkeypatch.setattr(regimes, "load_task_groups", tasks)


@pytest.mark.parametrize(("sub", "rule"), CASES)
def test_a_rule_reads_only_its_own_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source_run: Path, sub: str, rule: str
) -> None:
    """Scrambling every label a rule claims not to read changes neither the chosen step, nor
    best.pt, nor the row that `xdt report --selection` recomputes, nor the metrics it reads."""
    keep = READS[rule]
    plain = _run(tmp_path, sub, rule, "plain", source_run)
    _scramble(monkeypatch, keep)
    mixed = _run(tmp_path, sub, rule, "scrambled", source_run)
    a, b = (json.loads((r / "summary.json").read_text()) for r in (plain, mixed))
    assert a["selection"] == b["selection"] and a["selection"]["rule"] == rule
    assert a["best_step"] == b["best_step"]
    metric = a["selection"]["metric"]  # what it chose on is a split it may read
    assert metric is None or tuple(metric.split("/")[:2]) in {*keep, (GROUP.get(rule), "val")}
    best_a, best_b = (
        load_checkpoint(r / "checkpoints" / "best.pt")["method"] for r in (plain, mixed)
    )
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # the metrics of the splits it reads are the same; the scrambled ones did change
    read = [k for k in a["best"] if tuple(k.split("/")[:2]) in keep]
    assert all(a["best"][k] == b["best"][k] for k in read)
    scrambled = [k for k in a["best"] if k.count("/") == 2 and tuple(k.split("/")[:2]) not in keep]
    assert any(a["best"][k] != b["best"][k] for k in scrambled if k.split("/")[1] == "test")
    # `xdt report --selection RULE` recomputes the same row from either run
    for record in collect_runs([tmp_path / "runs"]):
        assert record.choose(rule)["step"] == a["best_step"], record.path


# --------------------------------------------------------------------------- hand-made rows
def rows(values: list[dict[str, float]]) -> list[dict]:
    return [{"step": 10 * (i + 1), "split": "eval", **v} for i, v in enumerate(values)]


DG_CONFIG = {
    "data": {"dataset": "rotated_mnist5k", "domains": ["a", "b", "c"], "test_domains": ["c"]},
    "selection": {"rule": "training_domain_val"},
}


def test_oracle_takes_the_last_checkpoint_as_domainbed() -> None:
    """DomainBed's OracleSelectionMethod: the last step, not the best test-domain val step."""
    eval_rows = rows(
        [
            {"test_domains/val/acc": 0.9, "c/val/acc": 0.9, "c/test/acc": 0.8},
            {"test_domains/val/acc": 0.5, "c/val/acc": 0.5, "c/test/acc": 0.4},
        ]
    )
    chosen = select("oracle", DG_CONFIG, eval_rows)
    assert chosen["step"] == 20 and chosen["c/test/acc"] == 0.4
    assert RULES["oracle"].criterion(Layout("generalize", held_out=("c",)))[0] == (
        "test_domains/val/acc"
    )


def test_leave_one_domain_out_reads_the_pairs_val_domains_and_the_single_run_s_test() -> None:
    """DomainBed's LeaveOneOutSelectionMethod for test domain t=a with domains a, b, c: the
    step maximising mean(b/test/acc in run [a, b], c/test/acc in run [a, c]); the result is
    a/test/acc of run [a], never that of the runs trained on D-2 domains."""
    test = rows([{"a/test/acc": 0.11}, {"a/test/acc": 0.22}, {"a/test/acc": 0.33}])
    val = {
        # run [a, b]: b's 80% split; its a/test/acc (a D-2 model) must never be read
        "b": rows(
            [
                {"b/test/acc": 0.5, "a/test/acc": 0.9, "b/val/acc": 0.0},
                {"b/test/acc": 0.9, "a/test/acc": 0.8, "b/val/acc": 0.0},
                {"b/test/acc": 0.6, "a/test/acc": 0.7, "b/val/acc": 1.0},
            ]
        ),
        "c": rows(
            [
                {"c/test/acc": 0.5, "a/test/acc": 0.9},
                {"c/test/acc": 0.7, "a/test/acc": 0.8},
                {"c/test/acc": 0.9, "a/test/acc": 0.7},
            ]
        ),
    }
    chosen = leave_one_domain_out_choice("a", test, val)
    assert chosen["step"] == 20 and chosen["a/test/acc"] == 0.22  # mean 0.8 beats 0.75
    assert chosen["leave_one_domain_out/val/acc"] == pytest.approx(0.8)
    # a step that a [t, v] run lacks is not a candidate; no [t, v] run at all: no choice
    assert leave_one_domain_out_choice("a", test, {"b": val["b"][:1], "c": val["c"]})["step"] == 10
    assert leave_one_domain_out_choice("a", test, {}) is None


def test_report_leave_one_domain_out_over_hand_made_run_folders(tmp_path: Path) -> None:
    """`xdt report --selection leave_one_domain_out` finds run [t]'s [t, v] siblings."""
    import yaml

    def run(held: list[str], values: list[dict[str, float]]) -> None:
        path = tmp_path / "-".join(held)
        path.mkdir()
        data = {"dataset": "rotated_mnist5k", "domains": ["a", "b", "c"], "test_domains": held}
        (path / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "data": data}))
        (path / "meta.json").write_text(json.dumps({"subcommand": "generalize"}))
        (path / "summary.json").write_text(json.dumps({"status": "completed", "best": {}}))
        lines = [json.dumps(r) for r in rows(values)]
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    run(["a"], [{"a/test/acc": 0.1}, {"a/test/acc": 0.2}])
    run(["a", "b"], [{"b/test/acc": 0.9, "a/test/acc": 0.9}, {"b/test/acc": 0.1}])
    run(["a", "c"], [{"c/test/acc": 0.9, "a/test/acc": 0.9}, {"c/test/acc": 0.1}])
    run(["b"], [{"b/test/acc": 0.5}])  # no [b, v] runs: left out
    records = sorted(collect_runs([tmp_path]), key=lambda r: r.path.name)
    picked = leave_one_domain_out_rows(records)
    assert [r and r["step"] for r in picked] == [10, None, None, None]
    assert picked[0]["a/test/acc"] == 0.1


# --------------------------------------------------------------------------- definitions
def test_a_metric_outside_a_rule_s_splits_is_refused_with_what_it_allows() -> None:
    transfer = Layout("transfer", source="digits", target="mnist5k")
    with pytest.raises(ConfigError) as err:
        RULES["source_val"].criterion(transfer, "mnist5k/val/acc")
    (line,) = err.value.lines
    assert "rule source_val" in line and "digits/val/acc, digits/val/loss" in line
    assert "mnist5k" not in line.split("reads", 1)[1] and "/test/" not in line.split("reads")[1]
    dg = Layout("generalize", training=("a", "b"), held_out=("c",))
    with pytest.raises(ConfigError) as err:
        RULES["training_domain_val"].criterion(dg, "test_domains/val/acc")
    allowed = err.value.lines[0].split("reads", 1)[1]
    assert (
        "train_domains/val/acc" in allowed and "c/" not in allowed and "test_domains" not in allowed
    )
    with pytest.raises(ConfigError, match="a test split is never chosen on"):
        RULES["training_domain_val"].criterion(dg, "a/test/acc")
    assert RULES["target_val"].note(transfer)  # summary.json says target labels were read
    with pytest.raises(ConfigError, match="needs held-out domains"):
        RULES["oracle"].criterion(Layout("generalize", training=("a", "b")))
    with pytest.raises(ConfigError, match="--leave-one-out"):
        RULES["leave_one_domain_out"].criterion(dg)
    regression = Layout("multitask", tasks=(("x", "mse"), ("y", "mse")))
    assert RULES["task_val"].criterion(regression) == ("avg/val/mse", "min")
    assert RULES["task_val"].criterion(regression, "y/val/mae") == ("y/val/mae", "min")
    assert [mode_of(m) for m in ("a/val/loss", "a/val/mse", "a/val/mae", "a/val/acc")] == [
        "min",
        "min",
        "min",
        "max",
    ]
