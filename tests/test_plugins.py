"""Plug-ins: a package written at test time (a module plus a dist-info folder with
entry_points.txt, put on sys.path) registers a method, a data set and a backbone through the
entry-point groups xdt.methods, xdt.datasets and xdt.backbones. Also the optional timm
backbones (`timm:<name>`), with a stand-in module where timm is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import xdt_cli
from tests.conftest import TINY, write_config
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.data import DATASETS
from xdt_cli.errors import ConfigError
from xdt_cli.methods import METHODS
from xdt_cli.models import BACKBONES, create_model

REGISTRIES = {"datasets": DATASETS, "methods": METHODS, "backbones": BACKBONES}

torch.set_num_threads(1)
DIST = "xdt-demo-plugins"

MODULE = '''
"""A tiny third-party package for xdt: one data set, one backbone, one method."""
import torch
from torch import nn

from xdt_cli.data import DatasetSpec
from xdt_cli.methods.erm import ERM


def _squares(domain):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.rand(90, 1, 12, 12, generator=g) * 0.4
    x[:, :, 4 * 0 : 4, :] += (y == 0).float().view(-1, 1, 1, 1) * 0.6
    x[:, :, 4:8, :] += (y == 1).float().view(-1, 1, 1, 1) * 0.6
    x[:, :, 8:12, :] += (y == 2).float().view(-1, 1, 1, 1) * 0.6
    return x, y


SQUARES = DatasetSpec(
    name="squares",
    description="bright rows in grey 12x12 noise, 3 classes",
    domains=("squares",),
    num_classes=3,
    input_shape=(1, 12, 12),
    load=_squares,
)


def tiny_mlp(channels):
    """A flat two-layer perceptron."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU())


class PluggedERM(ERM):
    """ERM, registered by a plug-in."""

    name = "plugged_erm"
'''


def make_package(site: Path, entry_points: str, module: str = MODULE) -> Path:
    """A module and its dist-info, as pip would install them, in `site`."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "xdt_demo_plugins.py").write_text(textwrap.dedent(module))
    info = site / "xdt_demo_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return site


ALL_THREE = """
    [xdt.datasets]
    squares = xdt_demo_plugins:SQUARES

    [xdt.backbones]
    tiny_mlp = xdt_demo_plugins:tiny_mlp

    [xdt.methods]
    plugged_erm = xdt_demo_plugins:PluggedERM
"""


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch):
    """Registries and the plug-in loader as they were before the test."""
    import xdt_cli.data.registry as registry

    for table in REGISTRIES.values():
        table.discover()
        monkeypatch.setattr(table, "_entries", dict(table._entries))
        monkeypatch.setattr(table, "_origins", dict(table._origins))
        monkeypatch.setattr(table, "_plugins_loaded", False)
        monkeypatch.setattr(table, "_points_loaded", set())
    yield
    registry._load_raw.cache_clear()
    sys.modules.pop("xdt_demo_plugins", None)


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated) -> Path:
    site = make_package(tmp_path / "site", ALL_THREE)
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entry_points_register_a_data_set_a_backbone_and_a_method(installed) -> None:
    REGISTRIES["datasets"].load_plugins()
    REGISTRIES["backbones"].load_plugins()
    REGISTRIES["methods"].load_plugins()
    assert DATASETS.origin("squares") == DIST
    assert BACKBONES.origin("tiny_mlp") == DIST
    assert BACKBONES["tiny_mlp"].description == "A flat two-layer perceptron."
    assert METHODS.origin("plugged_erm") == DIST
    assert METHODS.origin("erm") == "xdt" and DATASETS.origin("digits") == "xdt"
    model = create_model("tiny_mlp", (1, 12, 12), 3)
    assert model.feature_dim == 16 and model(torch.rand(2, 1, 12, 12)).shape == (2, 3)


def test_plugins_are_loaded_once(installed) -> None:
    REGISTRIES["datasets"].load_plugins()
    REGISTRIES["datasets"].load_plugins()  # no "registered twice"
    assert list(DATASETS).count("squares") == 1


def test_the_listings_show_each_entry_with_its_origin(cli, installed) -> None:
    datasets = {r["name"]: r for r in json.loads(cli("datasets", "--json").stdout)}
    assert datasets["squares"]["origin"] == DIST and datasets["squares"]["size"] == 90
    assert datasets["mnist5k"]["origin"] == "xdt"
    methods = {r["name"]: r for r in json.loads(cli("methods", "--json").stdout)}
    assert methods["plugged_erm"]["origin"] == DIST and methods["erm"]["origin"] == "xdt"
    assert methods["plugged_erm"]["subcommands"] == sorted(METHODS["erm"].regimes)


def test_a_run_on_a_plugged_data_set_and_backbone(cli, installed, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "plugged.yaml",
        {
            "data": {"source": {"dataset": "squares"}},
            "model": {"backbone": "tiny_mlp"},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"steps": 20, "batch_size": 16, "eval_every": 20, "log_every": 10},
        },
    )
    result = cli("train-source", config, "--json", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and "squares/test/acc" in summary["final"]


def test_a_run_with_a_plugged_method(cli, installed, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "method.yaml",
        {
            "data": {"source": {"dataset": "squares"}},
            "model": {"backbone": "tiny_mlp"},
            "method": {"name": "plugged_erm", "label_smoothing": 0.1},
            "train": {"steps": 10, "batch_size": 16, "eval_every": 10, "log_every": 10},
        },
    )
    result = cli("train-source", config, "--json", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "completed"


@pytest.mark.parametrize(
    ("entry_points", "module", "needle"),
    [
        (
            "[xdt.datasets]\nbroken = xdt_demo_plugins:SQUARES\n",
            "raise ImportError('numpy 3 is required')\n",
            f"plug-in 'broken' ({DIST}; xdt.datasets = xdt_demo_plugins:SQUARES) failed to "
            "load (ImportError: numpy 3 is required)",
        ),
        (
            "[xdt.datasets]\nmissing = xdt_demo_plugins:NOTHING\n",
            MODULE,
            "plug-in 'missing' (xdt-demo-plugins; xdt.datasets = xdt_demo_plugins:NOTHING) "
            "failed to load (AttributeError",
        ),
        (
            "[xdt.datasets]\nwrong = xdt_demo_plugins:tiny_mlp\n",
            MODULE,
            "gave function; expected a DatasetSpec",
        ),
        (
            "[xdt.backbones]\nlenet = xdt_demo_plugins:tiny_mlp\n",
            MODULE,
            "plug-in 'lenet' (xdt-demo-plugins; xdt.backbones = xdt_demo_plugins:tiny_mlp): "
            "backbone 'lenet' is registered twice",
        ),
    ],
)
def test_a_broken_plugin_is_one_line_naming_it(
    tmp_path, monkeypatch, isolated, entry_points: str, module: str, needle: str
) -> None:
    monkeypatch.syspath_prepend(str(make_package(tmp_path / "site", entry_points, module)))
    kind = "backbones" if "xdt.backbones" in entry_points else "datasets"
    with pytest.raises(ConfigError) as info:
        REGISTRIES[kind].load_plugins()
    (line,) = info.value.lines
    assert needle in line, line


def test_a_broken_plugin_makes_xdt_datasets_exit_2(cli, tmp_path, monkeypatch, isolated) -> None:
    site = make_package(
        tmp_path / "site", "[xdt.datasets]\nbroken = xdt_demo_plugins:X\n", "import nonexistent\n"
    )
    monkeypatch.syspath_prepend(str(site))
    result = cli("datasets")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "plug-in 'broken'" in result.stderr and "ModuleNotFoundError" in result.stderr


def test_a_separately_installed_package_is_found_by_the_xdt_command(tmp_path: Path) -> None:
    """The real thing: a new process whose path holds the package, as after pip install."""
    site = make_package(tmp_path / "site", ALL_THREE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-m", "xdt_cli", "datasets", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["squares"]["origin"] == DIST and rows["squares"]["classes"] == 3


# --------------------------------------------------------------------------- timm
def fake_timm() -> types.ModuleType:
    """What xdt uses of timm: is_model, list_models and create_model(num_classes=0)."""
    module = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3):
        assert num_classes == 0
        model = nn.Sequential(nn.Conv2d(in_chans, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model.num_features = 8
        if pretrained:  # "ImageNet weights": recognisable values, or no network
            if name == "offline_net":
                raise OSError("We couldn't connect to 'https://huggingface.co'")
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.fill_(0.5 + i)
        return model

    module.is_model = lambda name: name in ("tiny_vit", "offline_net")
    module.list_models = lambda: ["tiny_vit", "resnet18"]
    module.create_model = create_model
    return module


def test_a_timm_backbone_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", fake_timm())
    model = create_model("timm:tiny_vit", (1, 16, 16), 4)
    assert model.feature_dim == 8 and model(torch.rand(3, 1, 16, 16)).shape == (3, 4)
    with pytest.raises(ConfigError) as info:
        create_model("timm:tiny_vitt", (3, 16, 16), 4)
    assert info.value.lines == [
        "model.backbone: timm has no model 'tiny_vitt' (did you mean 'timm:tiny_vit'?)"
    ]


def test_timm_imagenet_weights_fill_the_features_or_fail_in_one_line(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "timm", fake_timm())
    config = {
        "data": {"target": {"dataset": "digits"}},
        "model": {"backbone": "timm:tiny_vit", "freeze": ["features"]},
        "init": {"pretrained": "imagenet"},
        "train": {"steps": 1, "batch_size": 8, "eval_every": 1},
    }
    path = write_config(tmp_path / "ft.yaml", config)
    result = cli("finetune", path, "--name", "timm", "-q", "--json")
    assert result.exit_code == 0, result.stderr
    state = load_checkpoint(tmp_path / "runs" / "timm" / "checkpoints" / "best.pt")["method"]
    assert bool((state["model.features.0.weight"] == 0.5).all())  # 1 channel, as timm adapts
    assert bool((state["model.features.0.bias"] == 1.5).all())
    offline = cli("finetune", path, "model.backbone=timm:offline_net", "-q")
    assert offline.exit_code == 2 and offline.stderr.count("\n") == 1, offline.stderr
    assert "init.pretrained: ImageNet weights of timm:offline_net" in offline.stderr


def test_timm_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError) as info:
        create_model("timm:resnet18", (3, 32, 32), 10)
    assert info.value.lines == [
        "model.backbone: 'timm:resnet18' needs the optional package timm (pip install timm)"
    ]


def test_an_unknown_backbone_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("brief_cn", (3, 32, 32), 10)
    (line,) = info.value.lines
    assert line.startswith(
        "model.backbone: unknown backbone 'brief_cn' (did you mean 'brief_cnn'?)"
    )
    assert "lenet, cnn, brief_cnn, timm:<name> or a torchvision" in line


DROPPED_METHOD = '''
"""A method dropped into a copy of the package: plain cross-entropy at half the weight."""

import torch.nn.functional as F

from xdt_cli.methods import register
from xdt_cli.methods.base import Method, MethodConfig


class HalfConfig(MethodConfig):
    pass


@register
class HalfERM(Method):
    """Half the cross-entropy of the labelled samples (a test of method discovery)."""

    name = "half_erm"
    regimes = frozenset({"train-source"})
    Config = HalfConfig
    paper = "none: a test"

    def training_step(self, batch, step):
        (source,) = [b for b in batch if b.y is not None]
        logits = self.model(source.x)
        return {"loss": 0.5 * F.cross_entropy(logits, source.y)}
'''


def test_adding_a_method_is_adding_one_file(tmp_path: Path) -> None:
    """A copy of the package with one more file in methods/ trains with it and lists it;
    nothing else of the copy is edited."""
    copy = tmp_path / "site" / "xdt_cli"
    shutil.copytree(
        Path(xdt_cli.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / "methods" / "half_erm.py").write_text(DROPPED_METHOD)
    config = write_config(tmp_path / "tiny.yaml", {**TINY, "method": {"name": "half_erm"}})
    env = {**os.environ, "PYTHONPATH": str(copy.parent)}

    def xdt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "xdt_cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )

    listed = xdt("methods", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["half_erm"]["subcommands"] == ["train-source"]
    assert rows["half_erm"]["origin"] == "xdt"
    run = xdt("train-source", str(config), "train.steps=4", "--runs-dir", "runs", "--json", "-q")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["status"] == "completed"
    written = yaml.safe_load((tmp_path / summary["run_dir"] / "config.yaml").read_text())
    assert written["method"]["name"] == "half_erm"
    # the installed package (no such file) does not know it
    assert "half_erm" not in {r["name"] for r in json.loads(_installed_methods())}


def _installed_methods() -> str:
    return subprocess.run(
        [sys.executable, "-m", "xdt_cli", "methods", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(xdt_cli.__file__).parents[1],
    ).stdout
