"""torchvision's sets by name, read from tiny files in their real on-disk formats.

Each set's official training split is cut 85/15 into train/val (stratified, seeded) and its
official test split is the test split; images stay uint8 in memory and become floats in
[0, 1] per batch. Missing or broken files are one ConfigError line.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import (
    CIFAR10_NAMES,
    no_checksums,  # noqa: F401  (fixture)
    write_cifar10,
    write_cifar100,
    write_mnist,
    write_stl10,
    write_svhn,
    write_usps,
)
from xdt_cli.config import DomainConfig
from xdt_cli.data import DATASETS, Split, load_configured_domain, make_stream
from xdt_cli.errors import ConfigError
from xdt_cli.evaluation import evaluate_split
from xdt_cli.methods import METHODS
from xdt_cli.models import create_model

torch.set_num_threads(1)
CPU = torch.device("cpu")

WRITERS = {
    "mnist": write_mnist,
    "fashion_mnist": lambda root: write_mnist(root, folder="FashionMNIST"),
    "usps": write_usps,
    "svhn": write_svhn,
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "stl10": write_stl10,
}
SHAPES = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "usps": (1, 16, 16),
    "svhn": (3, 32, 32),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "stl10": (3, 96, 96),
}


def load(root: Path, key: str = "data.source", split_seed: int = 0, **section):
    cfg = DomainConfig.model_validate({"root": str(root), **section})
    return load_configured_domain(cfg, split_seed=split_seed, key=key)


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    assert len(info.value.lines) == 1, info.value.lines
    return info.value.lines[0]


@pytest.mark.usefixtures("no_checksums")
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_torchvision_set_reads_its_own_format_into_uint8_splits(tmp_path, name: str) -> None:
    written = WRITERS[name](tmp_path)
    domain = load(tmp_path, dataset=name)
    assert (domain.dataset, domain.name) == (name, name)
    assert domain.input_shape == SHAPES[name] == DATASETS[name].input_shape
    assert domain.num_classes == DATASETS[name].num_classes == len(domain.classes)
    splits = domain.splits
    for split in splits.values():
        assert isinstance(split, Split) and split.x.dtype == torch.uint8
        assert split.x.shape[1:] == SHAPES[name] and split.y.dtype == torch.int64
    # the official test split, pixel for pixel and in order (USPS stores [-1, 1] floats)
    x_test, y_test = written["test"]
    tol = 1 if name == "usps" else 0
    assert (splits["test"].x.int() - torch.from_numpy(x_test).int()).abs().max() <= tol
    assert splits["test"].y.tolist() == y_test.tolist()
    # train + val are exactly the official training split, cut 85/15 per class
    x_train, y_train = written["train"]
    assert len(splits["train"]) + len(splits["val"]) == len(y_train)
    both = torch.cat([splits["train"].y, splits["val"].y]).sort().values
    assert both.tolist() == sorted(y_train.tolist())
    per_class = np.bincount(y_train)
    in_train = torch.bincount(splits["train"].y, minlength=len(per_class)).numpy()
    assert in_train.tolist() == [round(0.85 * n) for n in per_class]


@pytest.mark.usefixtures("no_checksums")
def test_the_train_val_cut_is_seeded(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=40)
    a = load(tmp_path, dataset="cifar10", split_seed=0)
    b = load(tmp_path, dataset="cifar10", split_seed=0)
    c = load(tmp_path, dataset="cifar10", split_seed=1)
    assert torch.equal(a.splits["val"].x, b.splits["val"].x)
    assert not torch.equal(a.splits["val"].x, c.splits["val"].x)
    assert torch.equal(a.splits["test"].x, c.splits["test"].x)  # the official test split


def test_missing_files_name_where_they_were_looked_for_and_how_to_get_them(tmp_path) -> None:
    line = config_error(root=tmp_path / "nowhere", dataset="cifar10", key="data.target")
    assert line == (
        f"data.target.root: cifar10 not found: {tmp_path}/nowhere/cifar-10-batches-py/"
        "data_batch_1 does not exist; set data.target.download: true to fetch it, or unpack "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into {tmp_path}/nowhere"
    )
    line = config_error(root=tmp_path, dataset="mnist")
    assert f"{tmp_path}/MNIST/raw/train-images-idx3-ubyte does not exist" in line


def test_missing_files_exit_2_with_one_line(cli, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  source: {{dataset: usps, root: {tmp_path / 'none'}}}\n")
    result = cli("validate", config)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "data.source.root: usps not found" in result.stderr
    assert "data.source.download: true" in result.stderr


def test_a_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch) -> None:
    import xdt_cli.data.torchvision_sets as tv

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv, "_construct", offline)
    line = config_error(root=tmp_path, dataset="stl10", download=True)
    assert line.startswith(f"data.source.download: fetching stl10 into {tmp_path} failed")
    assert "URLError" in line and "stl10_binary.tar.gz" in line


@pytest.mark.usefixtures("no_checksums")
def test_a_corrupt_file_is_one_line(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    line = config_error(root=tmp_path, dataset="cifar10")
    assert line.startswith(f"data.source.root: the cifar10 files in {tmp_path} cannot be read")
    assert "download: true" in line


@pytest.mark.usefixtures("no_checksums")
def test_classes_and_class_map_pick_and_rename_shared_classes(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    write_stl10(tmp_path)
    shared = [c for c in CIFAR10_NAMES if c != "frog"]
    cifar = load(tmp_path, dataset="cifar10", classes=shared)
    stl = load(
        tmp_path,
        dataset="stl10",
        key="data.target",
        classes=shared,
        class_map={"car": "automobile"},
    )
    assert cifar.classes == stl.classes == tuple(shared) and cifar.num_classes == 9
    for domain in (cifar, stl):
        for split in domain.splits.values():
            assert split.y.max() <= 8
    # STL's monkey (label 7) is gone, its car (2) is automobile (1), horse (6) is 6
    stl_all = load(tmp_path, dataset="stl10")
    kept = stl_all.splits["test"].y != 7
    relabel = {0: 0, 1: 2, 2: 1, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7, 9: 8}
    expected = [relabel[v] for v in stl_all.splits["test"].y[kept].tolist()]
    assert stl.splits["test"].y.tolist() == expected
    assert torch.equal(stl.splits["test"].x, stl_all.splits["test"].x[kept])


@pytest.mark.usefixtures("no_checksums")
@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"classes": ["airplane", "automobil"]}, "data.source.classes: 'automobil' is not a class"),
        ({"classes": ["airplane", "automobil"]}, "(did you mean 'automobile'?)"),
        ({"class_map": {"car": "automobile"}}, "data.source.class_map: 'car' is not a class"),
        ({"skip_bad_images": True}, "data.source.skip_bad_images: cifar10 is not read from"),
        ({"loader": {"num_workers": 2}}, "data.source.loader: cifar10 is held in memory"),
        ({"domain": "cifar"}, "data.source.domain: data set 'cifar10' has no domain 'cifar'"),
    ],
)
def test_bad_keys_for_a_torchvision_set(tmp_path: Path, section: dict, needle: str) -> None:
    write_cifar10(tmp_path)
    assert needle in config_error(root=tmp_path, dataset="cifar10", **section)


def test_the_embedded_sets_take_no_root_or_download(tmp_path: Path) -> None:
    line = config_error(root=tmp_path, dataset="digits")
    assert line == "data.source.root: digits ships with a package and reads no files"
    with pytest.raises(ConfigError) as info:
        load_configured_domain(
            DomainConfig(dataset="mnist5k", download=True), split_seed=0, key="data.target"
        )
    assert info.value.lines[0].startswith("data.target.download: mnist5k ships with")


@pytest.mark.usefixtures("no_checksums")
def test_a_uint8_split_streams_and_evaluates_like_its_float_copy(tmp_path: Path) -> None:
    write_svhn(tmp_path, n_train=60)
    domain = load(tmp_path, dataset="svhn")
    stored = domain.splits["train"]
    as_float = Split(stored.x.float() / 255, stored.y)
    a = make_stream(stored, batch_size=8, seed=3, domain="svhn", device=CPU)
    b = make_stream(as_float, batch_size=8, seed=3, domain="svhn", device=CPU)
    for step in (0, 5, 11):
        x, y = a.batch(step), b.batch(step)
        assert x.x.dtype == torch.float32 and torch.equal(x.x, y.x) and torch.equal(x.y, y.y)
    assert a.state_dict() == b.state_dict()
    unlabelled = make_stream(
        stored, batch_size=8, seed=3, domain="svhn", device=CPU, labelled=False
    )
    assert unlabelled.batch(0).y is None

    torch.manual_seed(0)
    model = create_model("lenet", domain.input_shape, 10)
    method = METHODS["erm"](model, METHODS["erm"].Config(), total_steps=1)
    method.eval()
    test = domain.splits["test"]
    kwargs = {"batch_size": 7, "device": CPU, "autocast": torch.autocast("cpu", enabled=False)}
    scores = evaluate_split(method, test, **kwargs)
    assert scores == evaluate_split(method, Split(test.x.float() / 255, test.y), **kwargs)


@pytest.mark.usefixtures("no_checksums")
def test_transforms_apply_per_batch_to_stored_bytes(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    transforms = {
        "train": [{"resize": [32, 32]}, {"random_crop": {"size": 32, "padding": 4}}],
        "eval": [{"resize": [32, 32]}],
    }
    domain = load(tmp_path, dataset="stl10", transforms=transforms)
    assert domain.input_shape == (3, 32, 32)  # the model's input: after the transforms
    assert domain.splits["train"].x.shape[1:] == (3, 96, 96)  # storage: as read
    stream = make_stream(domain.splits["train"], batch_size=4, seed=0, domain="stl10", device=CPU)
    torch.manual_seed(0)
    first = stream.batch(2).x
    torch.manual_seed(0)
    assert torch.equal(stream.batch(2).x, first) and first.shape == (4, 3, 32, 32)
    x, _ = next(domain.splits["val"].batches(5, CPU))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32


def test_xdt_datasets_lists_the_torchvision_sets_without_their_files(cli) -> None:
    result = cli("datasets", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name in WRITERS:
        assert rows[name]["kind"] == "torchvision" and rows[name]["origin"] == "xdt"
        assert rows[name]["size"] is None and rows[name]["input_shape"] == list(SHAPES[name])
    assert rows["digits"]["size"] == 1797 and rows["digits"]["kind"] == "memory"
    assert np.all([rows[n]["origin"] == "xdt" for n in rows if n in DATASETS])


@pytest.mark.usefixtures("no_checksums")
def test_a_run_with_random_transforms_on_bytes_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from tests.conftest import write_config
    from tests.test_engine import QUIET, assert_resume_is_exact
    from xdt_cli.api import start_run

    write_cifar10(tmp_path / "data")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "data": {
                "source": {
                    "dataset": "cifar10",
                    "root": str(tmp_path / "data"),
                    "transforms": {
                        "train": [
                            {"random_crop": {"size": 32, "padding": 4}},
                            "horizontal_flip",
                            {"color_jitter": {"brightness": 0.3, "hue": 0.05}},
                            {"normalize": "cifar10"},
                        ],
                        "eval": [{"normalize": "cifar10"}],
                    },
                }
            },
            "model": {"backbone": "brief_cnn"},
            "optim": {"name": "sgd", "lr": 0.01},
            "train": {"steps": 10, "batch_size": 10, "eval_every": 5, "log_every": 2},
        },
    )
    runs = tmp_path / "runs"

    def run(name: str) -> dict:
        return start_run("train-source", config, [], name=name, runs_dir=runs, reporter=QUIET)

    assert_resume_is_exact(monkeypatch, runs, run, 7)
