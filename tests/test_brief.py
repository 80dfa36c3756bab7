"""The project brief's example done right, and the real-benchmark configs, on tiny fixtures.

configs/brief_cifar10.yaml and configs/brief_stl10_finetune.yaml run for 5 steps on CIFAR-10
and STL-10 files in torchvision's formats; the MNIST/USPS, SVHN/MNIST, Office-31 and
Office-Home configs pass `xdt validate` once (tiny) data are in place, and fail with one
line naming the missing files before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.data_fixtures import (
    no_checksums,  # noqa: F401  (fixture)
    write_cifar10,
    write_image_folder,
    write_mnist,
    write_stl10,
    write_svhn,
    write_usps,
)
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHORT = ["train.steps=5", "train.batch_size=8", "train.eval_every=5", "train.log_every=5"]


def test_the_briefs_cnn() -> None:
    torch.manual_seed(0)
    model = create_model("brief_cnn", (3, 32, 32), 10)
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    assert model.feature_dim == 512 and model.head.out_features == 10
    linear = [m for m in model.features.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(64 * 8 * 8, 512)]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.usefixtures("no_checksums")
def test_both_brief_configs_run_five_steps(cli, tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data")
    write_stl10(tmp_path / "data")
    runs = tmp_path / "runs"
    data = f"data.source.root={tmp_path / 'data'}"
    result = cli(
        "train-source", CONFIGS / "brief_cifar10.yaml", data, *SHORT,
        "--name", "brief_cifar10", "--runs-dir", runs, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert summary["selection"]["metric"] == "cifar10/val/acc"
    assert {"cifar10/val/acc", "cifar10/test/acc"} <= set(summary["final"])
    resolved = yaml.safe_load((runs / "brief_cifar10" / "config.yaml").read_text())
    assert resolved["data"]["source"]["transforms"]["train"][0] == {
        "random_crop": {"size": 32, "padding": 4, "padding_mode": "constant"}
    }

    result = cli(
        "finetune", CONFIGS / "brief_stl10_finetune.yaml", data,
        f"data.target.root={tmp_path / 'data'}", f"init.from_run={runs / 'brief_cifar10'}",
        *SHORT, "--name", "brief_stl10", "--runs-dir", runs, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert summary["selection"]["metric"] == "stl10/val/acc"
    assert {"stl10/test/acc", "cifar10/test/acc"} <= set(summary["final"])
    best = load_checkpoint(runs / "brief_stl10" / "checkpoints" / "best.pt")["method"]
    assert best["model.head.weight"].shape == (9, 512)  # 9 shared classes: a new head
    source = load_checkpoint(runs / "brief_cifar10" / "checkpoints" / "best.pt")["method"]
    conv = "model.features.0.0.weight"
    assert source[conv].shape == best[conv].shape  # the body carried over


def test_the_real_configs_need_their_files(cli) -> None:
    cases = [
        ("brief_cifar10.yaml", "train-source", "cifar10 not found"),
        ("transfer/mnist_to_usps_dann.yaml", "transfer", "mnist not found"),
        ("transfer/office31_amazon_to_webcam_dann.yaml", "transfer", "data/office31"),
    ]
    for name, subcommand, needle in cases:
        result = cli("validate", CONFIGS / name, "--subcommand", subcommand)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.usefixtures("no_checksums")
@pytest.mark.parametrize("name", ["mnist_to_usps_dann", "svhn_to_mnist_dann"])
def test_the_digit_benchmarks_validate_with_their_files(cli, tmp_path: Path, name: str) -> None:
    write_mnist(tmp_path)
    write_usps(tmp_path)
    write_svhn(tmp_path)
    result = cli(
        "validate", CONFIGS / "transfer" / f"{name}.yaml", "--subcommand", "transfer",
        f"data.source.root={tmp_path}", f"data.target.root={tmp_path}", "train.batch_size=8",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize(
    ("name", "domains", "nested"),
    [
        ("office31_amazon_to_webcam_dann", ("amazon", "dslr", "webcam"), True),
        ("office_home_art_to_clipart_dann", ("Art", "Clipart", "Product", "Real World"), False),
    ],
)
def test_the_office_benchmarks_validate_with_their_files(
    cli, tmp_path: Path, name: str, domains: tuple[str, ...], nested: bool
) -> None:
    classes = {"back_pack": 4, "bike": 4, "calculator": 4}
    for domain in domains:
        folder = tmp_path / domain / "images" if nested else tmp_path / domain
        write_image_folder(folder, {"": classes}, size=(20, 24))
    result = cli(
        "validate", CONFIGS / "transfer" / f"{name}.yaml", "--subcommand", "transfer",
        f"data.source.root={tmp_path}", f"data.target.root={tmp_path}", "train.batch_size=8",
        "init.pretrained=null",  # no network in tests: ImageNet weights are not fetched
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["model"]["backbone"] == "resnet50"
    assert resolved["data"]["target"]["loader"]["num_workers"] == 4
