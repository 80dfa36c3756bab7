"""`xdt evaluate` on a run of every subcommand: the run is rebuilt through the construction
path training used, and its checkpoints scored again reproduce the metrics the run itself
recorded (summary.json and the eval rows of metrics.jsonl) to the bit, with features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_config
from tests.test_evaluate import evaluate_json, only
from xdt_cli.api import start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.config import deep_merge
from xdt_cli.data import load_domain
from xdt_cli.progress import Reporter
from xdt_cli.runs import read_metrics

TRAIN = {"steps": 6, "batch_size": 8, "eval_every": 2, "log_every": 2, "eval_batch_size": 512}
# the selection keeps the *worst* val score, so that best.pt (an early step) and last.pt
# (step 6) hold different weights and scoring the wrong one shows
BASE = {"model": {"backbone": "lenet"}, "train": TRAIN, "selection": {"mode": "min"}}
DIGITS_MNIST = {"source": {"dataset": "digits"}, "target": {"dataset": "mnist5k"}}
CONFIGS = {
    "train-source": {"data": DIGITS_MNIST},
    "finetune": {  # init.from_run: the train-source run, filled in by the fixture
        "data": {
            "source": {"dataset": "digits"},
            "target": {"dataset": "mnist5k", "labels_per_class": 5},
        },
    },
    "transfer": {"data": DIGITS_MNIST, "method": {"name": "dann"}},
    "multitask": {
        "data": {
            "tasks": {
                "left": {"dataset": "multimnist5k", "label": "left"},
                "right": {"dataset": "multimnist5k", "label": "right"},
            }
        },
    },
    "generalize": {
        "data": {
            "dataset": "rotated_mnist5k",
            "domains": ["rot0", "rot15", "rot30"],
            "test_domains": ["rot30"],
        },
        "method": {"name": "groupdro"},  # per-domain state, created before loading
    },
}
KINDS = list(CONFIGS)
# metric names each kind's evaluation must give on the test split (besides nothing else)
TEST_METRICS = {
    "train-source": [
        "digits/test/acc",
        "digits/test/loss",
        "mnist5k/test/acc",
        "mnist5k/test/loss",
    ],
    "finetune": ["digits/test/acc", "digits/test/loss", "mnist5k/test/acc", "mnist5k/test/loss"],
    "transfer": ["digits/test/acc", "digits/test/loss", "mnist5k/test/acc", "mnist5k/test/loss"],
    "multitask": [
        *(f"{t}/test/{m}" for t in ("left", "right") for m in ("acc", "loss")),
        "avg/test/acc",
        "avg/test/loss",
    ],
    "generalize": [
        *(f"{d}/test/{m}" for d in ("rot0", "rot15", "rot30") for m in ("acc", "loss")),
        *(f"{g}/test/{m}" for g in ("train_domains", "test_domains") for m in ("acc", "loss")),
        "worst_domain/test/acc",
        "worst_domain/test/loss",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One tiny run of every subcommand (the finetune run starts from the train-source one)."""
    tmp = tmp_path_factory.mktemp("kinds")
    out: dict[str, tuple[Path, dict]] = {}
    for kind, extra in CONFIGS.items():
        config = deep_merge(BASE, extra)
        if kind == "finetune":
            config["init"] = {"from_run": str(out["train-source"][0])}
        path = write_config(tmp / f"{kind}.yaml", config)
        summary = start_run(
            kind, path, name=kind, runs_dir=tmp / "runs", reporter=Reporter(quiet=True)
        )
        out[kind] = (Path(summary["run_dir"]), summary)
    return out


def eval_rows(run_dir: Path) -> dict[int, dict]:
    """The run's own eval rows of metrics.jsonl, by step (without "step" and "split")."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {
        r["step"]: {k: v for k, v in r.items() if k not in ("step", "split")}
        for r in rows
        if r["split"] == "eval"
    }


@pytest.mark.parametrize("kind", KINDS)
def test_best_reproduces_the_runs_own_test_metrics(cli, runs, kind) -> None:
    run_dir, summary = runs[kind]
    assert summary["status"] == "completed"
    assert summary["best_step"] < summary["steps"] == 6  # best.pt and last.pt differ
    recorded = eval_rows(run_dir)[summary["best_step"]]
    assert only(recorded, "test") != only(eval_rows(run_dir)[6], "test")

    printed = evaluate_json(cli, run_dir)
    assert printed["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
    assert printed["step"] == summary["best_step"]
    assert list(printed["metrics"]) == TEST_METRICS[kind]
    assert printed["metrics"] == only(summary["best"], "test") == only(recorded, "test")


@pytest.mark.parametrize("kind", KINDS)
def test_last_reproduces_final_on_every_split(cli, runs, kind) -> None:
    run_dir, summary = runs[kind]
    printed = evaluate_json(cli, run_dir, "--checkpoint", "last", "--split", "all")
    assert printed["step"] == 6 and printed["checkpoint"].endswith("last.pt")
    metrics = printed["metrics"]
    # val and test: exactly the final eval row, averages included
    assert {k: v for k, v in metrics.items() if "/train/" not in k} == summary["final"]
    assert summary["final"] == eval_rows(run_dir)[6]
    trained = {
        "train-source": "digits",
        "finetune": "mnist5k",
        "transfer": "digits",
        "multitask": "left",
        "generalize": "rot0",
    }[kind]
    assert 0.0 <= metrics[f"{trained}/train/acc"] <= 1.0
    if kind == "generalize":  # a held-out domain has no train split
        assert not any(k.startswith("rot30/train/") for k in metrics)
        assert "train_domains/train/acc" in metrics and "test_domains/train/acc" not in metrics


def _features(cli, run_dir: Path, out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    printed = evaluate_json(cli, run_dir, "--features", out)
    assert printed["features"] == str(out)
    with np.load(out) as npz:  # plain arrays: loads without allow_pickle
        return printed["metrics"], {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("kind", ["train-source", "finetune", "transfer", "generalize"])
def test_features_of_a_run_with_one_model(cli, runs, kind, tmp_path: Path) -> None:
    run_dir, _ = runs[kind]
    metrics, arrays = _features(cli, run_dir, tmp_path / "f.npz")
    assert set(arrays) == {"features", "labels", "domains", "splits", "logits"}
    if kind == "generalize":  # per domain, held-out included (20% val / 80% test)
        names = ["rot0", "rot15", "rot30"]
        sizes = {d: len(load_domain("rotated_mnist5k", d).splits["test"]) for d in names[:2]}
        held = load_domain("rotated_mnist5k", "rot30")
        sizes["rot30"] = round(0.8 * sum(len(s) for s in held.splits.values()))
    else:
        names = ["digits", "mnist5k"]
        sizes = {d: len(load_domain(d).splits["test"]) for d in names}
    n = sum(sizes.values())
    assert arrays["features"].shape == (n, 84) and arrays["features"].dtype == np.float32
    assert arrays["logits"].shape == (n, 10) and arrays["labels"].shape == (n,)
    assert list(arrays["domains"]) == [d for d in names for _ in range(sizes[d])]
    assert set(arrays["splits"]) == {"test"}
    for domain in names:  # the logits are the ones scored
        rows = arrays["domains"] == domain
        hits = (arrays["logits"][rows].argmax(1) == arrays["labels"][rows]).mean()
        assert hits == pytest.approx(metrics[f"{domain}/test/acc"], abs=1e-12)
    # the features are the head's input: head(features) == logits, with best.pt's head
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")["method"]
    head = torch.from_numpy(arrays["features"]) @ state["model.head.weight"].T
    head += state["model.head.bias"]
    assert torch.allclose(head, torch.from_numpy(arrays["logits"]), atol=1e-5)


def test_features_of_a_multitask_run(cli, runs, tmp_path: Path) -> None:
    run_dir, _ = runs["multitask"]
    metrics, arrays = _features(cli, run_dir, tmp_path / "f.npz")
    assert set(arrays) == {"features", "labels", "tasks", "domains", "splits", "logits"}
    n = len(load_domain("multimnist5k").splits["test"])  # both tasks read the same images
    assert arrays["features"].shape == (2 * n, 84) and arrays["features"].dtype == np.float32
    assert arrays["logits"].shape == (2 * n, 10) and arrays["labels"].dtype == np.int64
    assert list(arrays["tasks"]) == ["left"] * n + ["right"] * n
    assert set(arrays["domains"]) == {"multimnist5k"} and set(arrays["splits"]) == {"test"}
    # one shared encoder (hps): the same features for both tasks of an image
    assert np.array_equal(arrays["features"][:n], arrays["features"][n:])
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")["method"]
    for task in ("left", "right"):
        rows = arrays["tasks"] == task
        hits = (arrays["logits"][rows].argmax(1) == arrays["labels"][rows]).mean()
        assert hits == pytest.approx(metrics[f"{task}/test/acc"], abs=1e-12)
        head = torch.from_numpy(arrays["features"][rows]) @ state[f"model.heads.{task}.weight"].T
        head += state[f"model.heads.{task}.bias"]
        assert torch.allclose(head, torch.from_numpy(arrays["logits"][rows]), atol=1e-5)


def test_data_is_refused_for_a_multitask_run(cli, runs) -> None:
    result = cli("evaluate", runs["multitask"][0], "--data", "digits")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--data" in result.stderr, result.stderr


def test_a_generalize_run_scored_on_another_domain(cli, runs) -> None:
    run_dir, _ = runs["generalize"]
    printed = evaluate_json(cli, run_dir, "--data", "rotated_mnist5k:rot45")
    assert list(printed["metrics"]) == ["rot45/test/acc", "rot45/test/loss"]  # no averages


def test_last_scores_the_weight_average_that_final_recorded(cli, tmp_path: Path) -> None:
    config = deep_merge(BASE, {"data": {"source": {"dataset": "digits"}}, "train": {"ema": 0.9}})
    path = write_config(tmp_path / "ema.yaml", config)
    summary = start_run(
        "train-source", path, name="ema", runs_dir=tmp_path / "runs", reporter=Reporter(quiet=True)
    )
    run_dir = Path(summary["run_dir"])
    last = evaluate_json(cli, run_dir, "--checkpoint", "last", "--split", "all")["metrics"]
    assert {k: v for k, v in last.items() if "/train/" not in k} == summary["final"]
    assert evaluate_json(cli, run_dir)["metrics"] == only(summary["best"], "test")
