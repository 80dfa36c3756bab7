"""`xdt plot`: learning curves of real tiny runs and hand-made ones, written as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from tests.conftest import TINY, write_config
from tests.test_report import eval_row, hand_config, write_run
from xdt_cli.api import start_run
from xdt_cli.plotting import plot_metrics, run_labels
from xdt_cli.progress import Reporter
from xdt_cli.report import collect_runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """Two tiny real runs that differ only by optim.lr."""
    root = tmp_path_factory.mktemp("plot")
    config = write_config(root / "tiny.yaml", TINY)
    for name, lr in [("a", 1e-3), ("b", 3e-3)]:
        start_run(
            "train-source",
            config,
            [f"optim.lr={lr}", "train.log_every=5"],
            name=name,
            runs_dir=root / "runs",
            reporter=Reporter(quiet=True),
        )
    return root / "runs"


def read_png(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 200 and image.shape[1] > 400
    rgb = image[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert (rgb.mean(axis=2) < 0.9).mean() > 0.01  # some ink on the white page
    return image


def test_plot_two_real_runs(cli, two_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "curves.png"
    result = cli("plot", two_runs / "a", two_runs / "b", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    image = read_png(out)
    assert image.shape[1] > image.shape[0]  # two subplots side by side, legend below
    records = collect_runs([two_runs / "a", two_runs / "b"])
    assert run_labels(records) == ["optim.lr=0.001", "optim.lr=0.003"]
    assert plot_metrics(records, None) == ["train/loss", "digits/val/acc"]
    # a folder of runs stands for all of them; several metrics make a grid of subplots
    grid = tmp_path / "grid.png"
    many = cli("plot", two_runs, "--metric", "train/*", "--metric", "digits/*/acc", "--out", grid)
    assert many.exit_code == 0, many.stderr
    assert plot_metrics(records, ["train/*", "digits/*/acc"]) == [
        "train/loss",
        "train/acc",
        "train/lr",
        "digits/val/acc",
        "digits/test/acc",
    ]
    assert read_png(grid).shape[0] > image.shape[0]


def test_unknown_metric_and_bad_output_exit_2(cli, two_runs: Path, tmp_path: Path) -> None:
    result = cli("plot", two_runs / "a", "--metric", "digits/val/acc", "--metric",
                 "digitz/val/acc", "--out", tmp_path / "x.png")  # fmt: skip
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "digitz/val/acc" in result.stderr and "did you mean 'digits/val/acc'" in result.stderr
    assert not (tmp_path / "x.png").exists()
    odd = cli("plot", two_runs / "a", "--out", tmp_path / "x.docx")
    assert odd.exit_code == 2 and ".docx" in odd.stderr
    missing = cli("plot", tmp_path / "nothing", "--out", tmp_path / "y.png")
    assert missing.exit_code == 2 and "nothing" in missing.stderr
    no_out = cli("plot", two_runs / "a")
    assert no_out.exit_code == 2 and "--out" in no_out.stderr


def test_task_weights_by_glob_and_labels_of_equal_configs(cli, tmp_path: Path) -> None:
    def train_rows(seed: int) -> list[dict]:
        return [
            {
                "step": step,
                "split": "train",
                "train/loss": 2.0 / step,
                "train/weight_left": 0.5 + 0.01 * step * (seed + 1),
                "train/weight_right": 0.5 - 0.01 * step * (seed + 1),
            }
            for step in (5, 10, 15, 20)
        ]

    for seed in (0, 1):
        write_run(tmp_path / "mt" / f"s{seed}", hand_config(seed=seed),
                  [eval_row(20, 0.9, 0.8)], train_rows=train_rows(seed))  # fmt: skip
    write_run(tmp_path / "same" / "x", hand_config(), [eval_row(20, 0.9, 0.8)], status=None)
    write_run(tmp_path / "same" / "y", hand_config(), [eval_row(20, 0.9, 0.8)])

    records = collect_runs([tmp_path / "mt"])
    assert plot_metrics(records, ["train/weight_*"]) == ["train/weight_left", "train/weight_right"]
    assert run_labels(records) == ["seed=0", "seed=1"]
    out = tmp_path / "weights.png"
    result = cli("plot", tmp_path / "mt", "--metric", "train/weight_*", "--out", out)
    assert result.exit_code == 0, result.stderr
    read_png(out)
    # identical configs (one still unfinished, which is plotted too): named by folder
    assert run_labels(collect_runs([tmp_path / "same"])) == ["x", "y"]
    assert cli("plot", tmp_path / "same", "--out", tmp_path / "same.png").exit_code == 0
