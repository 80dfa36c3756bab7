"""`xdt finetune` and `xdt transfer`: initialisation, theta_fix / theta_upd, few-shot targets,
the unlabelled target stream, selection, resume, and a tiny run of every transfer method."""

from __future__ import annotations

import functools
import json
import signal
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import write_config
from tests.test_engine import _interrupt_at, assert_resume_is_exact
from xdt_cli.api import resume_run, start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.config import deep_merge
from xdt_cli.data import load_domain
from xdt_cli.data.splits import labelled_subset
from xdt_cli.errors import ConfigError, RunInterrupted
from xdt_cli.freezing import blocks, plan_freezing
from xdt_cli.methods import METHODS
from xdt_cli.methods.erm import ERM
from xdt_cli.models import create_model
from xdt_cli.progress import Reporter
from xdt_cli.regimes import build_experiment
from xdt_cli.resolve import load_config, validate_config
from xdt_cli.runtime import Runtime

QUIET = Reporter(quiet=True)
TRAIN = {"steps": 12, "batch_size": 16, "eval_every": 6, "log_every": 3}
SOURCE_RUN = {
    "data": {"source": {"dataset": "digits"}},
    "model": {"backbone": "cnn"},
    "train": TRAIN,
}
TRANSFER = {
    "data": {"source": {"dataset": "digits"}, "target": {"dataset": "mnist5k"}},
    "model": {"backbone": "cnn"},
    "method": {"name": "source_only"},
    "train": TRAIN,
}


def start(subcommand: str, tmp_path: Path, config: dict, name: str, *overrides: str) -> dict:
    path = write_config(tmp_path / f"{name}.yaml", config)
    return start_run(
        subcommand, path, list(overrides), name=name, runs_dir=tmp_path / "runs", reporter=QUIET
    )


@pytest.fixture
def source_run(tmp_path: Path) -> Path:
    start("train-source", tmp_path, SOURCE_RUN, "src")
    return tmp_path / "runs" / "src"


def finetune_config(source_run: Path, **model) -> dict:
    return {
        "data": {"target": {"dataset": "mnist5k", "labels_per_class": 5}},
        "model": {"backbone": "cnn", **model},
        "init": {"from_run": str(source_run)},
        "train": TRAIN,
    }


def model_state(run: Path, which: str = "best.pt") -> dict[str, torch.Tensor]:
    state = load_checkpoint(run / "checkpoints" / which)["method"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


# --------------------------------------------------------------------------- finetune
def test_linear_probe_changes_only_the_head_to_the_bit(tmp_path: Path, source_run: Path) -> None:
    config = finetune_config(source_run, preset="linear_probe", freeze_bn=True)
    summary = start("finetune", tmp_path, config, "probe", "selection.rule=last")
    before, after = model_state(source_run), model_state(tmp_path / "runs" / "probe", "last.pt")
    assert before.keys() == after.keys()
    for key in before:
        if key.startswith("head."):
            assert not torch.equal(before[key], after[key]), key
        else:  # weights and, with freeze_bn, the batch-norm statistics too
            assert torch.equal(before[key], after[key]), key
    assert summary["parameters"]["trainable"] == 256 * 10 + 10
    assert summary["parameters"]["fixed"] > 100_000
    assert summary["selection"]["rule"] == "last"


def test_without_freeze_bn_the_statistics_follow_the_target(
    tmp_path: Path, source_run: Path
) -> None:
    start("finetune", tmp_path, finetune_config(source_run, preset="linear_probe"), "probe")
    before, after = model_state(source_run), model_state(tmp_path / "runs" / "probe", "last.pt")
    assert torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])
    assert not torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"])


def test_last_k_blocks_counts_whole_blocks() -> None:
    model = create_model("cnn", (1, 28, 28), 10)
    assert [b[0].split(".")[1] for b in blocks(model)] == ["0", "2", "4", "7"]
    cfg = load_config_from({"model": {"backbone": "cnn", "preset": "last_k_blocks", "k_blocks": 2}})
    plan_freezing(model, cfg.model)
    trains = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"4", "7", "weight", "bias"}  # block 4, the dense block, the head
    resnet = create_model("resnet18", (3, 32, 32), 5)
    assert [b[0].split(".")[1] for b in blocks(resnet)][-2:] == ["layer3", "layer4"]


def load_config_from(data: dict, subcommand: str = "train-source"):
    base = {"data": {"source": {"dataset": "digits"}}}
    return validate_config(deep_merge(base, data), source="test", subcommand=subcommand)


def test_freeze_trainable_and_lr_mult_build_the_optimizer_groups(
    tmp_path: Path, source_run: Path
) -> None:
    config = finetune_config(source_run, freeze=["features"], trainable=["features.7.*"])
    config["optim"] = {"name": "sgd", "lr": 0.1, "lr_mult": {"features": 0.1}}
    cfg = load_config(write_config(tmp_path / "ft.yaml", config), subcommand="finetune")
    exp = build_experiment("finetune", cfg, Runtime.from_env("cpu"))
    trainable = {n for n, p in exp.method.model.named_parameters() if p.requires_grad}
    assert trainable == {"features.7.0.weight", "features.7.0.bias", "head.weight", "head.bias"}
    lrs = sorted((g["lr_mult"], len(g["params"])) for g in exp.param_groups)
    assert lrs == [(0.1, 2), (1.0, 2)]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.freeze=[featurs]", "model.freeze"),
        ("optim.lr_mult={backbone: 0.1}", "optim.lr_mult.backbone"),
        ("model.k_blocks=2", "model.k_blocks"),
        ("init.from_run=/nonexistent/run", "init.from_run"),
        ("init={checkpoint: /nonexistent/best.pt}", "init.checkpoint"),
        ("init.weights=w.pt", "init: give at most one of"),
        ("model.backbone=lenet", "init.from_run"),  # the source run trained a cnn
    ],
)
def test_bad_finetune_settings_name_their_key(
    cli, tmp_path: Path, source_run: Path, override: str, key: str
) -> None:
    path = write_config(tmp_path / "ft.yaml", finetune_config(source_run))
    result = cli("finetune", path, override, "-q")
    assert result.exit_code == 2, result.stderr
    assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_finetune_needs_init_and_transfer_refuses_target_labels(cli, tmp_path: Path) -> None:
    path = write_config(tmp_path / "ft.yaml", {**TRANSFER, "method": {"name": "erm"}})
    result = cli("finetune", path)
    assert result.exit_code == 2 and "init: finetune starts from trained weights" in result.stderr
    path = write_config(tmp_path / "tr.yaml", TRANSFER)
    result = cli("transfer", path, "data.target.labels_per_class=5")
    assert result.exit_code == 2 and "data.target.labels_per_class" in result.stderr
    result = cli("transfer", path, "method.name=erm")
    assert result.exit_code == 2 and "does not serve transfer" in result.stderr


def test_gradual_unfreezing_releases_parameters_at_their_step(
    tmp_path: Path, source_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = finetune_config(source_run, preset="linear_probe", unfreeze={"features.7": 8})
    config["train"] = {**TRAIN, "eval_every": 4}
    straight = start("finetune", tmp_path, config, "straight")
    runs, src = tmp_path / "runs", model_state(source_run)
    # every eval writes last.pt: at step 4 the dense block is still the source's
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 4, signal.SIGINT)
        with pytest.raises(RunInterrupted):
            start("finetune", tmp_path, config, "cut")
    at4 = model_state(runs / "cut", "last.pt")
    assert torch.equal(at4["features.7.0.weight"], src["features.7.0.weight"])
    resumed, _ = resume_run(runs / "cut", reporter=QUIET)
    end = model_state(runs / "straight", "last.pt")
    assert not torch.equal(end["features.7.0.weight"], src["features.7.0.weight"])
    assert torch.equal(end["features.4.0.weight"], src["features.4.0.weight"])
    assert resumed["final"] == straight["final"]
    assert straight["parameters"]["unfrozen_later"] == 576 * 256 + 256


def test_labels_per_class_is_a_seeded_stratified_subset() -> None:
    y = load_domain("mnist5k").splits["train"].y
    a, b = labelled_subset(y, 10, 0), labelled_subset(y, 10, 0)
    assert torch.equal(a, b) and len(a) == 100
    assert torch.bincount(y[a]).tolist() == [10] * 10
    assert not torch.equal(a, labelled_subset(y, 10, 1))


def test_labels_seed_draws_other_labelled_images_and_keeps_val_and_test() -> None:
    from xdt_cli.config import DomainConfig
    from xdt_cli.data.registry import load_configured_domain

    def target(**keys) -> dict[str, torch.Tensor]:
        cfg = DomainConfig(dataset="mnist5k", labels_per_class=5, **keys)
        domain = load_configured_domain(cfg, split_seed=0, key="data.target")
        return {name: split.x for name, split in domain.splits.items()}

    default, same, other = target(), target(labels_seed=0), target(labels_seed=1)
    assert all(torch.equal(default[k], same[k]) for k in default)  # default: data.split_seed
    assert len(other["train"]) == 50 and not torch.equal(default["train"], other["train"])
    assert torch.equal(default["val"], other["val"]) and torch.equal(default["test"], other["test"])


def test_labels_seed_without_labels_per_class_is_a_config_error(tmp_path: Path) -> None:
    target = {"dataset": "mnist5k", "labels_seed": 1}
    data = {"data": {"source": {"dataset": "digits"}, "target": target}}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "fewshot.yaml", data), subcommand="finetune")
    assert len(info.value.lines) == 1 and "data.target" in info.value.lines[0]
    assert "labels_seed" in info.value.lines[0]


# --------------------------------------------------------------------------- init
def test_init_weights_accepts_our_state_dict_and_torchvision_s(tmp_path: Path) -> None:
    from xdt_cli.initialization import initialize

    tv = torchvision.models.resnet18(num_classes=7)
    torch.save(tv.state_dict(), tmp_path / "resnet18.pt")
    cfg = load_config_from(
        {"model": {"backbone": "resnet18"}, "init": {"weights": str(tmp_path / "resnet18.pt")}}
    )
    model = create_model("resnet18", (3, 32, 32), 10)
    note = initialize(model, cfg)
    assert "new head (7 -> 10 classes)" in note
    assert torch.equal(model.features.conv1.weight, tv.conv1.weight)
    grey = create_model("resnet18", (1, 32, 32), 7)  # channel-repeat wrapper: features.1.*
    assert "head kept" in initialize(grey, cfg)
    assert torch.equal(grey.head.weight, tv.fc.weight)
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    bad = load_config_from(
        {"model": {"backbone": "cnn"}, "init": {"weights": str(tmp_path / "bad.pt")}}
    )
    with pytest.raises(ConfigError, match="init.weights"):
        initialize(create_model("cnn", (1, 28, 28), 10), bad)


def test_pretrained_reads_torch_s_cache_and_fails_cleanly_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xdt_cli.initialization import initialize

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config_from({"model": {"backbone": "resnet18"}, "init": {"pretrained": "imagenet"}})

    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match=r"init.pretrained: ImageNet weights of resnet18 .*cache"):
        initialize(create_model("resnet18", (3, 32, 32), 10), cfg)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), cache / url.rsplit("/", 1)[1])
    model = create_model("resnet18", (3, 32, 32), 10)
    assert "new head (1000 -> 10 classes)" in initialize(model, cfg)
    assert torch.equal(model.features.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


# --------------------------------------------------------------------------- transfer
class _Spy(ERM):
    """Source cross-entropy that records what the target batches held."""

    name = "spy"
    regimes = frozenset({"transfer"})
    seen: list = []

    def training_step(self, batch, step):
        _Spy.seen.append([(b.domain, b.y is None) for b in batch])
        return super().training_step(batch[:1], step)


def test_no_target_label_reaches_a_transfer_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    METHODS.discover()
    monkeypatch.setattr(METHODS, "_entries", {**METHODS._entries, "spy": _Spy})
    _Spy.seen = []
    start("transfer", tmp_path, {**TRANSFER, "method": {"name": "spy"}}, "spy")
    assert len(_Spy.seen) == TRAIN["steps"]
    assert all(seen == [("digits", False), ("mnist5k", True)] for seen in _Spy.seen)


def test_selection_never_reads_the_target_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under every rule, scrambling the target's test labels changes the reported test
    accuracy but not a single choice: not the best step, not any val metric."""
    config = {**TRANSFER, "train": {**TRAIN, "steps": 24}}
    rules = ("source_val", "target_val", "last")
    plain = {
        r: start("transfer", tmp_path, config, f"plain-{r}", f"selection.rule={r}") for r in rules
    }
    import xdt_cli.regimes as regimes

    original = regimes.load_configured_domain

    def scrambled(domain_cfg, **kwargs):
        domain = original(domain_cfg, **kwargs)
        if kwargs["key"] == "data.target":
            test = domain.splits["test"]
            test.y = test.y[torch.randperm(len(test.y), generator=torch.Generator().manual_seed(1))]
        return domain

    monkeypatch.setattr(regimes, "load_configured_domain", scrambled)
    for rule in rules:
        first = plain[rule]
        second = start("transfer", tmp_path, config, f"scrambled-{rule}", f"selection.rule={rule}")
        assert second["selection"] == first["selection"] and second["selection"]["rule"] == rule
        assert second["best_step"] == first["best_step"]
        assert second["best"]["mnist5k/test/acc"] != first["best"]["mnist5k/test/acc"]
        for key, value in second["best"].items():
            assert "mnist5k/test/" in key or value == first["best"][key], key


def test_transfer_resume_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {**TRANSFER, "method": {"name": "dann"}}
    run = functools.partial(start, "transfer", tmp_path, config)
    assert_resume_is_exact(monkeypatch, tmp_path / "runs", run, 7)


TRANSFER_METHODS = sorted(n for n, m in METHODS.items() if "transfer" in m.regimes)
FINETUNE_METHODS = sorted(n for n, m in METHODS.items() if "finetune" in m.regimes)


@pytest.mark.parametrize("method", TRANSFER_METHODS)
def test_every_transfer_method_runs(cli, tmp_path: Path, method: str) -> None:
    path = write_config(tmp_path / "tr.yaml", {**TRANSFER, "method": {"name": method}})
    result = cli("transfer", path, "--json", "-q", "--name", method)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["subcommand"] == "transfer"
    assert {"digits/test/acc", "mnist5k/test/acc"} <= summary["final"].keys()
    rows = [json.loads(line) for line in (tmp_path / "runs" / method / "metrics.jsonl").open()]
    losses = [r["train/loss"] for r in rows if r["split"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("method", FINETUNE_METHODS)
def test_every_finetune_method_runs(cli, tmp_path: Path, source_run: Path, method: str) -> None:
    config = finetune_config(source_run)
    config["data"]["source"] = {"dataset": "digits"}  # evaluated: forgetting is measured
    config["method"] = {"name": method}
    path = write_config(tmp_path / "ft.yaml", config)
    result = cli("finetune", path, "--json", "-q", "--name", f"ft-{method}")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["selection"] == {
        "rule": "target_val",
        "metric": "mnist5k/val/acc",
        "mode": "max",
    }
    assert {"digits/test/acc", "mnist5k/test/acc"} <= summary["final"].keys()
