"""`xdt evaluate`: a run's checkpoints scored again reproduce its summary exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY, write_config
from xdt_cli.api import start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.config import deep_merge
from xdt_cli.data import DATASETS, DatasetSpec, load_domain
from xdt_cli.evaluate_run import evaluate_run
from xdt_cli.progress import Reporter


def _train(tmp: Path, name: str, extra: dict) -> tuple[Path, dict]:
    config = write_config(tmp / f"{name}.yaml", deep_merge(TINY, extra))
    summary = start_run(
        "train-source", config, name=name, runs_dir=tmp / "runs", reporter=Reporter(quiet=True)
    )
    return Path(summary["run_dir"]), summary


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, dict]:
    """The 40-step LeNet on digits alone."""
    return _train(tmp_path_factory.mktemp("plain"), "plain", {})


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, dict]:
    """digits with mnist5k as an evaluated target, split with seed 3; the selection keeps
    the *worst* val acc, so that best.pt (an early step) and last.pt (step 40) differ."""
    extra = {
        "data": {"split_seed": 3, "target": {"dataset": "mnist5k"}},
        "train": {"eval_every": 10},
        "selection": {"mode": "min"},
    }
    return _train(tmp_path_factory.mktemp("pair"), "pair", extra)


def evaluate_json(cli, *args) -> dict:
    result = cli("evaluate", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def only(metrics: dict, part: str) -> dict:
    return {k: v for k, v in metrics.items() if f"/{part}/" in k}


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_help_has_an_example(cli) -> None:
    assert "evaluate" in cli("--help").stdout
    assert "Example: xdt evaluate" in " ".join(cli("evaluate", "--help").stdout.split())


def test_best_reproduces_the_summary_exactly(cli, plain, pair) -> None:
    for run_dir, summary in (plain, pair):
        printed = evaluate_json(cli, run_dir)
        assert printed["run_dir"] == str(run_dir)
        assert printed["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")
        assert printed["step"] == summary["best_step"]
        assert printed["metrics"] == only(summary["best"], "test")  # every bit
    plain_keys = set(evaluate_json(cli, plain[0])["metrics"])
    assert plain_keys == {"digits/test/acc", "digits/test/loss"}
    # the importable API gives the same result
    assert evaluate_run(pair[0]) == evaluate_json(cli, pair[0])


def test_last_reproduces_final_exactly(cli, pair) -> None:
    run_dir, summary = pair
    assert summary["best_step"] < summary["steps"] == 40  # best.pt and last.pt differ
    printed = evaluate_json(cli, run_dir, "--checkpoint", "last", "--split", "all")
    assert printed["step"] == 40
    assert printed["checkpoint"].endswith("last.pt")
    assert {k: printed["metrics"][k] for k in summary["final"]} == summary["final"]
    assert summary["final"] != summary["best"]


def test_splits(cli, pair) -> None:
    run_dir, summary = pair
    val = evaluate_json(cli, run_dir, "--split", "val")["metrics"]
    assert val == only(summary["best"], "val")
    every = evaluate_json(cli, run_dir, "--split", "all")["metrics"]
    assert list(every) == [
        f"{domain}/{split}/{metric}"
        for domain in ("digits", "mnist5k")
        for split in ("train", "val", "test")
        for metric in ("acc", "loss")
    ]
    assert {k: v for k, v in every.items() if "/train/" not in k} == summary["best"]
    assert 0.0 <= every["digits/train/acc"] <= 1.0 and every["digits/train/loss"] > 0


def test_other_data_sets_and_domains(cli, plain, pair) -> None:
    # a digits-only run scored on mnist5k, which it never saw
    other = evaluate_json(cli, plain[0], "--data", "mnist5k")["metrics"]
    assert set(other) == {"mnist5k/test/acc", "mnist5k/test/loss"}
    assert evaluate_json(cli, plain[0], "--data", "mnist5k:mnist5k")["metrics"] == other
    # on the run that did evaluate mnist5k, the numbers are the recorded ones
    run_dir, summary = pair
    target = evaluate_json(cli, run_dir, "--data", "mnist5k", "--split", "val")["metrics"]
    assert target == {k: v for k, v in summary["best"].items() if k.startswith("mnist5k/val/")}
    both = evaluate_json(cli, run_dir, "--data", "mnist5k", "--data", "digits")["metrics"]
    assert list(both) == [
        "mnist5k/test/acc",
        "mnist5k/test/loss",
        "digits/test/acc",
        "digits/test/loss",
    ]


def test_features(cli, pair, tmp_path: Path) -> None:
    run_dir, summary = pair
    out = tmp_path / "out" / "feats.npz"
    printed = evaluate_json(cli, run_dir, "--features", out)
    assert printed["features"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.npz"]  # no temp file left
    with np.load(out) as npz:  # plain arrays: loads without allow_pickle
        arrays = {k: npz[k] for k in npz.files}
    assert set(arrays) == {"features", "labels", "domains", "splits", "logits"}
    test = {name: load_domain(name, split_seed=3).splits["test"] for name in ("digits", "mnist5k")}
    labels = torch.cat([test["digits"].y, test["mnist5k"].y]).numpy()
    n = len(labels)
    assert arrays["features"].dtype == np.float32 and arrays["features"].shape == (n, 84)
    assert arrays["logits"].dtype == np.float32 and arrays["logits"].shape == (n, 10)
    assert arrays["labels"].dtype == np.int64 and (arrays["labels"] == labels).all()
    n_digits = len(test["digits"])
    assert list(arrays["domains"]) == ["digits"] * n_digits + ["mnist5k"] * (n - n_digits)
    assert set(arrays["splits"]) == {"test"}
    for domain in ("digits", "mnist5k"):
        rows = arrays["domains"] == domain
        logits, y = torch.from_numpy(arrays["logits"][rows]), torch.from_numpy(labels[rows])
        hits = (logits.argmax(1) == y).sum().item()
        assert hits / len(y) == printed["metrics"][f"{domain}/test/acc"]
        loss = F.cross_entropy(logits.double(), y).item()
        assert loss == pytest.approx(printed["metrics"][f"{domain}/test/loss"], rel=1e-6)
    # the features are the head's input: head(features) == logits
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")["method"]
    head = torch.from_numpy(arrays["features"]) @ state["model.head.weight"].T
    head += state["model.head.bias"]
    assert torch.allclose(head, torch.from_numpy(arrays["logits"]), atol=1e-5)

    # every split of one domain, in train, val, test order
    printed = evaluate_json(cli, run_dir, "--data", "digits", "--split", "all", "--features", out)
    with np.load(out) as npz:
        splits, got = npz["splits"], npz["labels"]
    digits = load_domain("digits", split_seed=3).splits
    assert list(splits) == [name for name in ("train", "val", "test") for _ in digits[name].y]
    assert (got == torch.cat([digits[s].y for s in ("train", "val", "test")]).numpy()).all()
    assert len(got) == 1797


def test_table_on_stdout(cli, pair) -> None:
    result = cli("evaluate", pair[0], "--split", "val")
    assert result.exit_code == 0, result.stderr
    assert "digits/val/acc" in result.stdout and "mnist5k/val/loss" in result.stdout
    assert f"step {pair[1]['best_step']}" in result.stdout and "best.pt" in result.stdout
    assert result.stderr == ""


def test_bad_checkpoints_exit_2(cli, plain, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(plain[0], run_dir)
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"\x80\x04 not a checkpoint")
    one_line_error(cli("evaluate", run_dir), str(run_dir / "checkpoints" / "best.pt"))
    assert evaluate_json(cli, run_dir, "--checkpoint", "last")["step"] == 40
    (run_dir / "checkpoints" / "last.pt").unlink()
    one_line_error(cli("evaluate", run_dir, "--checkpoint", "last"), "last.pt", "not found")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--data", "mnist4k"], ["--data", "unknown data set 'mnist4k'", "did you mean 'mnist5k'"]),
        (["--data", "digits:rot15"], ["--data", "no domain 'rot15'"]),
        (["--data", "digits:"], ["--data"]),
        (["--data", "rgb32"], ["--data", "rgb32", "(3, 32, 32)"]),
        (["--data", "five"], ["--data", "five", "5 classes"]),
        (["--split", "holdout"], ["--split"]),
        (["--checkpoint", "middle"], ["--checkpoint"]),
        (["--device", "tpu"], ["--device"]),
    ],
)
def test_bad_arguments_exit_2(cli, plain, request, args, needles) -> None:
    def never(domain):
        raise AssertionError("an incompatible data set must not be loaded")

    for name, shape, classes in (("rgb32", (3, 32, 32), 10), ("five", (1, 28, 28), 5)):
        DATASETS.register(name, DatasetSpec(name, "test only", (name,), classes, shape, never))
        request.addfinalizer(lambda name=name: DATASETS.unregister(name))
    one_line_error(cli("evaluate", plain[0], *args), *needles)


def test_not_a_run_exits_2(cli, tmp_path: Path) -> None:
    one_line_error(cli("evaluate", tmp_path / "missing"), "missing", "no such run folder")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("evaluate", tmp_path / "empty"), "empty", "not an xdt run folder")
    half = tmp_path / "half"
    half.mkdir()
    write_config(half / "config.yaml", TINY)  # a config, but no meta.json
    one_line_error(cli("evaluate", half), "meta.json")
