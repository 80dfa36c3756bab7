"""Image-folder sets (root/<domain>/<class>/<image>): loading, checks, the DataLoader-backed
stream (exact at any step, with or without workers), evaluation, and a transfer run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from tests.data_fixtures import three_domains, write_image_folder
from xdt_cli.config import DomainConfig
from xdt_cli.data import FileSplit, load_configured_domain, make_stream
from xdt_cli.errors import ConfigError

torch.set_num_threads(1)
CPU = torch.device("cpu")
TO_32 = {
    "train": [{"resize": [32, 32]}, {"random_crop": {"size": 32, "padding": 4}}, "horizontal_flip"],
    "eval": [{"resize": [32, 32]}],
}


def load(root: Path, domain: str | None = "a", dataset: str = "imagefolder", **section):
    cfg = DomainConfig.model_validate(
        {"dataset": dataset, "root": str(root), "domain": domain, **section}
    )
    return load_configured_domain(cfg, split_seed=0, key="data.source")


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(*args, **kwargs)
    assert len(info.value.lines) == 1, info.value.lines
    return info.value.lines[0]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return three_domains(tmp_path / "set", per_class=10)


def test_a_domain_loads_as_files_split_70_15_15_per_class(tree: Path) -> None:
    domain = load(tree, "b")
    assert (domain.dataset, domain.name) == ("imagefolder", "b")
    assert domain.classes == ("cat", "dog", "fox")
    assert domain.num_classes == 3 and domain.input_shape == (3, 40, 48) and domain.skipped == ()
    sizes = {name: len(split) for name, split in domain.splits.items()}
    assert sizes == {"train": 21, "val": 6, "test": 3}
    for split in domain.splits.values():
        assert isinstance(split, FileSplit)
        assert all(Path(f).parent.parent == tree / "b" for f in split.files)
        pairs = zip(split.files, split.y.tolist(), strict=True)
        assert all(Path(f).parent.name == domain.classes[y] for f, y in pairs)
    files = [f for s in domain.splits.values() for f in s.files]
    assert len(set(files)) == 30  # disjoint and complete


def test_transforms_decide_the_input_shape(tree: Path) -> None:
    domain = load(tree, transforms=TO_32)
    assert domain.input_shape == (3, 32, 32)
    x, y = next(domain.splits["test"].batches(2, CPU))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1


def test_evaluation_batches_read_every_file_in_order(tree: Path) -> None:
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    split = load(tree).splits["val"]
    xs, ys = zip(*split.batches(4, CPU), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(y, split.y)
    expected = torch.stack([pil_to_tensor(Image.open(f).convert("RGB")) for f in split.files])
    assert torch.equal(x, expected.float() / 255)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_is_a_pure_function_of_seed_and_step(tree: Path, workers: int) -> None:
    reference = load(tree, transforms=TO_32).splits["train"]
    split = load(tree, transforms=TO_32, loader={"num_workers": workers}).splits["train"]

    def stream(s=split):
        return make_stream(s, batch_size=5, seed=11, domain="a", device=CPU)

    run = stream()
    batches = [run.batch(step) for step in range(9)]  # 4 batches per epoch: crosses epochs
    assert batches[0].x.shape == (5, 3, 32, 32) and batches[0].domain == "a"
    # a resumed stream (a fresh one asked for step 6) gives exactly the same batches
    resumed = stream()
    for step in (6, 7, 8):
        again = resumed.batch(step)
        assert torch.equal(again.x, batches[step].x) and torch.equal(again.y, batches[step].y)
    # so does a jump back, and the same stream without workers
    assert torch.equal(run.batch(2).x, batches[2].x)
    plain = stream(reference)
    assert all(torch.equal(plain.batch(s).x, batches[s].x) for s in (0, 5))
    # the random crops and flips differ between batches, the global RNG is untouched
    before = torch.get_rng_state()
    stream().batch(0)
    assert torch.equal(torch.get_rng_state(), before)
    assert run.state_dict() == {"domain": "a", "seed": 11, "size": 21, "batch_size": 5}
    other = make_stream(split, batch_size=5, seed=12, domain="a", device=CPU, labelled=False)
    assert not torch.equal(other.batch(0).x, batches[0].x) and other.batch(0).y is None


def test_office31_looks_through_its_images_folder_and_named_sets_match_loosely(tmp_path) -> None:
    classes = {"back_pack": 4, "bike": 4}
    root = tmp_path / "office31"
    for domain in ("amazon", "dslr", "webcam"):
        write_image_folder(root / domain / "images", {"": classes}, size=(12, 12))
    domain = load(root, "webcam", dataset="office31")
    assert domain.name == "webcam" and domain.classes == ("back_pack", "bike")
    assert "images" in Path(domain.splits["train"].files[0]).parts

    home = tmp_path / "home"
    for folder in ("Art", "Clipart", "Product", "Real World"):
        write_image_folder(home, {folder: {"Alarm_Clock": 3, "Bike": 3}}, size=(8, 8))
    assert load(home, "Real_World", dataset="office_home").name == "Real_World"
    line = config_error(home, "real", dataset="office_home")
    assert line.startswith("data.source.domain: data set 'office_home' has no domain 'real'")


@pytest.mark.parametrize(
    ("domain", "dataset", "needle"),
    [
        ("d", "imagefolder", "{root} has no folder for domain 'd' (domains found: a, b, c)"),
        (None, "imagefolder", "data.source.domain: imagefolder has several domains; choose one"),
        (None, "pacs", "choose one (one of art_painting, cartoon, photo, sketch)"),
        ("photo", "pacs", "data.source.domain: {root} has no folder for domain 'photo'"),
    ],
)
def test_choosing_a_domain(tree: Path, domain, dataset: str, needle: str) -> None:
    assert needle.format(root=tree) in config_error(tree, domain, dataset=dataset)


def test_domains_with_different_classes_are_one_line(tmp_path: Path) -> None:
    root = write_image_folder(
        tmp_path / "set",
        {"a": {"cat": 2, "dog": 2}, "b": {"cat": 2, "dog": 2}, "c": {"cat": 2, "cow": 2}},
        size=(8, 8),
    )
    line = config_error(root, "a")
    assert line == (
        f"data.source.root: the domains of {root} have different class folders (c lacks dog; "
        "c has cow that a lacks); every domain needs the same classes"
    )


def test_an_empty_domain_is_one_line(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "set", {"a": {"cat": 2, "dog": 2}}, size=(8, 8))
    for cls in ("cat", "dog"):
        (root / "b" / cls).mkdir(parents=True)
        (root / "b" / cls / "notes.txt").write_text("not an image")
    assert config_error(root, "b") == (
        f"data.source.domain: {root}/b holds no readable images (extensions .jpg, .jpeg, .png, "
        ".ppm, .bmp, .pgm, .tif, .tiff, .webp)"
    )
    assert config_error(tmp_path / "absent", "a").startswith(
        f"data.source.root: {tmp_path}/absent is not a folder"
    )


def test_a_corrupt_image_is_named_or_skipped_and_counted(tree: Path) -> None:
    bad = tree / "a" / "dog" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    truncated = tree / "a" / "fox" / "zz_truncated.png"
    truncated.write_bytes((tree / "a" / "fox" / "000.png").read_bytes()[:120])
    line = config_error(tree, "a")
    assert line.startswith(f"data.source: cannot decode image {bad} (")
    assert line.endswith("remove it or set data.source.skip_bad_images: true")
    domain = load(tree, "a", skip_bad_images=True)
    assert domain.skipped == (str(bad), str(truncated))
    assert sum(len(s) for s in domain.splits.values()) == 30
    assert load(tree, "b").skipped == ()  # other domains are unaffected


def test_a_file_that_breaks_when_read_stops_the_run_naming_it(tree: Path) -> None:
    split = load(tree, loader={"num_workers": 1}).splits["train"]
    Path(split.files[3]).write_bytes(b"gone bad after the check")
    stream = make_stream(split, batch_size=21, seed=0, domain="a", device=CPU)
    with pytest.raises(ConfigError) as info:
        stream.batch(0)
    assert info.value.lines == [
        f"data.source: cannot decode image {split.files[3]} (UnidentifiedImageError: cannot "
        f"identify image file '{split.files[3]}'); remove or replace it"
    ]


def test_images_of_different_sizes_need_a_resize(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "set", {"a": {"cat": 3, "dog": 3}}, size=(8, 8))
    write_image_folder(tmp_path / "more", {"a": {"cat": 3, "dog": 3}}, size=(9, 12))
    for f in (tmp_path / "more" / "a" / "dog").iterdir():
        f.rename(root / "a" / "dog" / f"big_{f.name}")
    split = load(root).splits["train"]
    with pytest.raises(ConfigError) as info:
        make_stream(split, batch_size=len(split), seed=0, domain="a", device=CPU).batch(0)
    assert info.value.lines[0].startswith("data.source.transforms: images of different sizes")
    fixed = load(root, transforms={"train": [{"resize": [8, 8]}], "eval": [{"resize": [8, 8]}]})
    stream = make_stream(fixed.splits["train"], batch_size=6, seed=0, domain="a", device=CPU)
    assert stream.batch(0).x.shape[1:] == (3, 8, 8)


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"download": True}, "data.source.download: xdt does not download image-folder sets"),
        ({"classes": ["cat", "cow"]}, "data.source.classes: 'cow' is not a class of imagefolder"),
    ],
)
def test_keys_that_do_not_apply(tree: Path, section: dict, needle: str) -> None:
    assert needle in config_error(tree, "a", **section)


def test_a_class_subset_of_a_domain(tree: Path) -> None:
    domain = load(tree, "c", classes=["fox", "cat"])
    assert domain.classes == ("fox", "cat") and domain.num_classes == 2
    for split in domain.splits.values():
        names = {Path(f).parent.name for f in split.files}
        assert names <= {"fox", "cat"}
        assert all(
            Path(f).parent.name == ("fox", "cat")[y]
            for f, y in zip(split.files, split.y.tolist(), strict=True)
        )


def test_transfer_between_generated_domains_with_a_random_resnet18(cli, tmp_path: Path) -> None:
    root = three_domains(tmp_path / "set", per_class=6)
    section = {
        "dataset": "imagefolder",
        "root": str(root),
        "transforms": {
            "train": [{"resize": [32, 32]}, "horizontal_flip", {"normalize": "imagenet"}],
            "eval": [{"resize": [32, 32]}, {"normalize": "imagenet"}],
        },
        "loader": {"num_workers": 1, "persistent_workers": True},
    }
    config = write_config(
        tmp_path / "folders.yaml",
        {
            "name": "folders",
            "data": {"source": {**section, "domain": "a"}, "target": {**section, "domain": "c"}},
            "model": {"backbone": "resnet18"},
            "method": {"name": "dann"},
            "optim": {"name": "sgd", "lr": 0.01},
            "train": {"steps": 3, "batch_size": 6, "eval_every": 3, "log_every": 1},
        },
    )
    result = cli("transfer", config, "--json", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert {"a/val/acc", "a/test/acc", "c/val/acc", "c/test/acc"} <= set(summary["final"])


def test_an_interrupted_image_folder_run_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random crops and flips decoded by a worker process, two streams: resuming at step 5
    replays steps 6..10 exactly as the uninterrupted run did."""

    from tests.test_engine import QUIET, assert_resume_is_exact
    from xdt_cli.api import start_run

    root = three_domains(tmp_path / "set", per_class=6)
    section = {
        "dataset": "imagefolder",
        "root": str(root),
        "transforms": {
            "train": [{"resize": [16, 16]}, {"random_crop": {"size": 16, "padding": 2}}],
            "eval": [{"resize": [16, 16]}],
        },
    }
    workers = {"loader": {"num_workers": 1}}
    config = write_config(
        tmp_path / "resume.yaml",
        {
            "data": {
                "source": {**section, **workers, "domain": "a"},
                "target": {**section, "domain": "b"},
            },
            "model": {"backbone": "cnn"},
            "method": {"name": "dann"},
            "train": {"steps": 10, "batch_size": 4, "eval_every": 5, "log_every": 2},
        },
    )
    runs = tmp_path / "runs"

    def run(name: str) -> dict:
        return start_run("transfer", config, [], name=name, runs_dir=runs, reporter=QUIET)

    assert_resume_is_exact(monkeypatch, runs, run, 5)


def test_generalize_over_generated_image_folder_domains(cli, tmp_path: Path) -> None:
    """A disk set as the domains of generalize (PACS's layout, 3 of its 7 classes, a few
    tiny images): `data.files` says where and how to read every domain."""
    classes = {"dog": 5, "guitar": 5, "house": 5}
    pacs = ("art_painting", "cartoon", "photo", "sketch")
    root = write_image_folder(tmp_path / "PACS", dict.fromkeys(pacs, classes))
    config = write_config(
        tmp_path / "dg.yaml",
        {
            "data": {
                "dataset": "pacs",
                "test_domains": ["sketch"],
                "files": {
                    "root": str(root),
                    "transforms": {"train": [{"resize": [16, 16]}], "eval": [{"resize": [16, 16]}]},
                },
            },
            "model": {"backbone": "cnn"},
            "method": {"name": "coral"},
            "train": {"steps": 3, "batch_size": 4, "eval_every": 3, "log_every": 1},
        },
    )
    result = cli("generalize", config, "--json", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    expected = {"photo/val/acc", "cartoon/test/acc", "sketch/test/acc", "train_domains/val/acc"}
    assert expected <= set(summary["final"])
    missing = cli("generalize", config, "data.files.root=/nonexistent", "-q")
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1
    assert "data.files.root" in missing.stderr


def test_image_folder_domains_as_the_tasks_of_multitask(cli, tmp_path: Path) -> None:
    """Each domain of a disk set as a task of its own (one data set per task, as LibMTL
    treats Office-31's domains), plus a second task on one domain's images (same batch)."""
    root = three_domains(tmp_path / "set", per_class=6)
    data = {
        "dataset": "imagefolder",
        "root": str(root),
        "transforms": {"train": [{"resize": [16, 16]}], "eval": [{"resize": [16, 16]}]},
    }
    config = write_config(
        tmp_path / "mt.yaml",
        {
            "data": {
                "tasks": {
                    "a": {**data, "domain": "a"},
                    "b": {**data, "domain": "b"},
                    "a_too": {**data, "domain": "a", "label": "class", "loss": "ce"},
                }
            },
            "model": {"backbone": "cnn"},
            "train": {"steps": 3, "batch_size": 4, "eval_every": 3, "log_every": 1},
        },
    )
    result = cli("multitask", config, "--json", "--runs-dir", tmp_path / "runs", "--name", "mt")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"a/test/acc", "b/test/acc", "a_too/val/acc", "avg/val/acc"} <= set(summary["final"])
    tasks = json.loads((tmp_path / "runs" / "mt" / "tasks.json").read_text())["tasks"]
    assert tasks["a"]["inputs"] == tasks["a_too"]["inputs"] == "a"
    assert tasks["b"]["splits"]["test"]["samples"] == len(load(root, "b").splits["test"])
    parity = cli("multitask", config, "data.tasks.a_too.label=parity", "-q")
    assert parity.exit_code == 2 and "data.tasks.a_too.label: parity" in parity.stderr
