"""`xdt generalize`: the derived data sets, config checks, held-out domains that never reach
the optimizer or the selection, a tiny run of every generalize method, --leave-one-out, and
the weight average (train.ema) with resume."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from tests.test_engine import assert_resume_is_exact
from xdt_cli.api import start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.data import load_domain
from xdt_cli.leave_one_out import start_leave_one_out
from xdt_cli.methods import METHODS
from xdt_cli.methods.erm import ERM
from xdt_cli.progress import Reporter
from xdt_cli.selection import select

QUIET = Reporter(quiet=True)
TRAIN = {"steps": 6, "batch_size": 8, "eval_every": 3, "log_every": 3, "eval_batch_size": 512}
DG = {
    "data": {
        "dataset": "rotated_mnist5k",
        "domains": ["rot0", "rot15", "rot30"],
        "test_domains": ["rot30"],
    },
    "model": {"backbone": "lenet"},
    "train": TRAIN,
}
DG_METHODS = sorted(n for n, m in METHODS.items() if "generalize" in m.regimes)


def start(tmp_path: Path, config: dict, name: str, *overrides: str) -> dict:
    path = write_config(tmp_path / f"{name}.yaml", config)
    return start_run(
        "generalize", path, list(overrides), name=name, runs_dir=tmp_path / "runs", reporter=QUIET
    )


def test_derived_sets_are_deterministic_and_held_out_domains_split_20_80() -> None:
    a, b = load_domain("rotated_mnist5k", "rot45"), load_domain("rotated_mnist5k", "rot45")
    assert torch.equal(a.splits["train"].x, b.splits["train"].x)
    sizes = [
        sum(len(s) for s in load_domain("rotated_mnist5k", d).splits.values())
        for d in ("rot0", "rot75")
    ]
    assert sum(sizes) <= 5000 and min(sizes) >= 833
    colored = load_domain("colored_mnist5k", "env90")
    assert colored.input_shape == (2, 28, 28) and colored.num_classes == 2
    x, y = colored.splits["train"].x, colored.splits["train"].y
    colour = (x[:, 1].sum((1, 2)) > x[:, 0].sum((1, 2))).long()
    assert 0.85 < (colour == y).float().mean().item() < 0.95
    from xdt_cli.config import DomainConfig
    from xdt_cli.data import load_configured_domain

    held = load_configured_domain(
        DomainConfig(dataset="rotated_mnist5k", domain="rot75"),
        split_seed=0,
        key="k",
        held_out=True,
    )
    n_val, n_test = len(held.splits["val"]), len(held.splits["test"])
    assert len(held.splits["train"]) == 0 and abs(n_val / (n_val + n_test) - 0.2) < 0.01
    assert load_domain("digits_dg", "digits").num_classes == 10


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.test_domains=[rot80]", "data.test_domains: rotated_mnist5k has no domain 'rot80'"),
        ("data.domains=[rot0, rot15]", "data.test_domains: rot30 not in data.domains"),
        ("data.test_domains=[rot0, rot15, rot30]", "data.test_domains: holds out every domain"),
        ("data.domain_weights={rot30: 2.0}", "data.domain_weights: rot30 is not a training"),
        ("data.domain_weights={rot0: -1}", "data.domain_weights.rot0"),
        ("data.sample_weights=balanced", "data.sample_weights"),
        ("data.sample_weights=inverse_domain_size", "'inverse_domain_size' was removed"),
        ("data.sample_weights=missing.npy", "data.sample_weights: missing.npy not found"),
        ("selection.rule=source_val", "selection.rule"),
        ("selection.metric=rot30/val/acc", "selection.metric"),
        ("selection.rule=leave_one_domain_out", "selection.rule: leave_one_domain_out compares"),
        ("selection.metric=test_domains/val/acc", "is not read by rule training_domain_val"),
        ("method.name=dann", "method.name"),
        ("data.dataset=mnist5k", "data.dataset: mnist5k has one domain"),
    ],
)
def test_bad_generalize_settings_name_their_key(
    cli, tmp_path: Path, override: str, key: str
) -> None:
    path = write_config(tmp_path / "dg.yaml", DG)
    result = cli("generalize", path, override, "-q")
    assert result.exit_code == 2, result.stderr
    assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_generalize_keys_are_refused_elsewhere(cli, tmp_path: Path) -> None:
    path = write_config(tmp_path / "src.yaml", {"data": {"source": {"dataset": "digits"}}})
    result = cli("train-source", path, "data.test_domains=[rot0]")
    assert result.exit_code == 2 and "data.test_domains: only used by generalize" in result.stderr
    result = cli("train-source", path, "selection.rule=oracle")
    assert result.exit_code == 2 and "selection.rule" in result.stderr


@pytest.mark.parametrize("method", DG_METHODS)
def test_every_generalize_method_runs(cli, tmp_path: Path, method: str) -> None:
    path = write_config(tmp_path / "dg.yaml", {**DG, "method": {"name": method}})
    result = cli("generalize", path, "--json", "-q", "--name", method)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["subcommand"] == "generalize"
    assert summary["selection"]["rule"] == "training_domain_val"
    assert summary["selection"]["metric"] == "train_domains/val/acc"
    assert {"rot30/test/acc", "test_domains/test/acc", "train_domains/val/acc"} <= summary[
        "final"
    ].keys()
    run = tmp_path / "runs" / method
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = [r["train/loss"] for r in rows if r["split"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((run / "weights.json").read_text())["held_out"] == ["rot30"]


class _Spy(ERM):
    """ERM that records which domains each step's batches came from."""

    name = "dg_spy"
    regimes = frozenset({"generalize"})
    seen: list = []

    def training_step(self, batch, step):
        _Spy.seen.append([b.domain for b in batch])
        return super().training_step(batch, step)


def test_held_out_domains_never_reach_the_optimizer_nor_the_selection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    METHODS.discover()
    monkeypatch.setattr(METHODS, "_entries", {**METHODS._entries, "dg_spy": _Spy})
    _Spy.seen = []
    config = {**DG, "method": {"name": "dg_spy"}, "train": {**TRAIN, "steps": 12}}
    first = start(tmp_path, config, "plain")
    assert _Spy.seen == [["rot0", "rot15"]] * 12

    import xdt_cli.regimes as regimes

    original = regimes.load_configured_domain

    def scrambled(domain_cfg, **kwargs):
        domain = original(domain_cfg, **kwargs)
        if kwargs.get("held_out"):  # scramble every image and label of the held-out domain
            gen = torch.Generator().manual_seed(1)
            for split in domain.splits.values():
                split.x = torch.rand(split.x.shape, generator=gen)
                split.y = torch.randint(0, 10, split.y.shape, generator=gen)
        return domain

    monkeypatch.setattr(regimes, "load_configured_domain", scrambled)
    second = start(tmp_path, config, "scrambled")
    assert second["best_step"] == first["best_step"]
    for key, value in second["best"].items():
        if not key.startswith(("rot30/", "test_domains/")):
            assert value == first["best"][key], key  # same training, same choice
    assert second["best"]["rot30/test/acc"] != first["best"]["rot30/test/acc"]
    plain = tmp_path / "runs" / "plain" / "checkpoints" / "last.pt"
    other = tmp_path / "runs" / "scrambled" / "checkpoints" / "last.pt"
    a, b = load_checkpoint(plain)["method"], load_checkpoint(other)["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_rules_recompute_the_run_s_choice(tmp_path: Path) -> None:
    summary = start(
        tmp_path, {**DG, "train": {**TRAIN, "steps": 9}}, "rules", "selection.rule=oracle"
    )
    run = tmp_path / "runs" / "rules"
    from xdt_cli.config import read_yaml

    config = read_yaml(run / "config.yaml")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").open() if '"eval"' in x]
    # DomainBed's oracle: the last checkpoint, whatever its held-out val accuracy
    assert select("oracle", config, rows)["step"] == summary["best_step"] == rows[-1]["step"]
    assert summary["best"] == {k: v for k, v in rows[-1].items() if k not in ("step", "split")}
    assert summary["selection"]["metric"] == "test_domains/val/acc"
    chosen = select("training_domain_val", config, rows)
    assert chosen["train_domains/val/acc"] == max(r["train_domains/val/acc"] for r in rows)


def test_leave_one_out_runs_every_domain_and_resumes(tmp_path: Path) -> None:
    config = {**DG, "data": {"dataset": "rotated_mnist5k", "domains": ["rot0", "rot15", "rot30"]}}
    path = write_config(tmp_path / "loo.yaml", config)
    runs = tmp_path / "runs"
    summary = start_leave_one_out(
        path, ["train.steps=3"], name="loo", runs_dir=runs, reporter=QUIET
    )
    parent = runs / "loo"
    assert summary["status"] == "completed" and summary["domains"] == ["rot0", "rot15", "rot30"]
    for domain in ("rot0", "rot15", "rot30"):
        child = json.loads((parent / domain / "summary.json").read_text())
        assert child["status"] == "completed"
        assert summary["best"][f"{domain}/test/acc"] == child["best"][f"{domain}/test/acc"]
    values = [summary["best"][f"{d}/test/acc"] for d in ("rot0", "rot15", "rot30")]
    assert summary["best"]["avg/test/acc"] == pytest.approx(sum(values) / 3)
    on_disk = json.loads((parent / "summary.json").read_text())
    assert on_disk["best"] == summary["best"]
    assert "training_domain_val (the run's rule)" in (parent / "table.md").read_text()
    assert {"oracle", "last"} <= on_disk["tables"].keys()

    # a second call skips the finished children; a child cut short is resumed
    (parent / "rot15" / "summary.json").unlink()
    stamp = (parent / "rot0" / "summary.json").stat().st_mtime_ns
    again = start_leave_one_out(path, ["train.steps=3"], name="loo", runs_dir=runs, reporter=QUIET)
    assert (parent / "rot0" / "summary.json").stat().st_mtime_ns == stamp
    assert again["best"] == summary["best"]


def test_leave_one_out_through_the_cli_with_leave_one_domain_out(cli, tmp_path: Path) -> None:
    config = {**DG, "data": {"dataset": "rotated_mnist5k", "domains": ["rot0", "rot15", "rot30"]}}
    path = write_config(tmp_path / "loo.yaml", config)
    result = cli(
        "generalize",
        path,
        "train.steps=2",
        "train.eval_every=1",
        "selection.rule=leave_one_domain_out",
        "--leave-one-out",
        "--name",
        "lodo",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    # D + D(D-1) children: [t] and [t, v] for every test domain t and other domain v
    assert len(summary["children"]) == 9 and {"rot0", "rot0-rot15"} <= summary["children"].keys()
    assert summary["selection"]["metric"] == "leave_one_domain_out/val/acc"
    assert set(summary["best_steps"]) == {"rot0", "rot15", "rot30"}
    assert summary["best"]["avg/test/acc"] is not None
    result = cli("generalize", path, "data.test_domains=[rot0]", "--leave-one-out")
    assert result.exit_code == 2 and "data.test_domains" in result.stderr


@pytest.mark.parametrize("method", ["groupdro", "mldg"])  # a stateful and a manual method
def test_ema_resume_equals_an_uninterrupted_run_and_best_holds_the_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    config = {
        **DG,
        "method": {"name": method},
        "train": {**TRAIN, "steps": 8, "eval_every": 4, "ema": 0.9},
        "selection": {"rule": "last"},
    }
    runs = tmp_path / "runs"
    run = functools.partial(start, tmp_path, config)
    straight, _ = assert_resume_is_exact(monkeypatch, runs, run, 5)
    assert straight["ema"] == 0.9
    last = load_checkpoint(runs / "straight" / "checkpoints" / "last.pt")
    best = load_checkpoint(runs / "straight" / "checkpoints" / "best.pt")
    assert best["step"] == 8  # rule last: the final step, whose average best.pt holds
    assert all(torch.equal(best["method"][k], last["ema"][k]) for k in last["ema"])
    assert any(not torch.equal(last["method"][k], last["ema"][k]) for k in last["ema"])
    cut = load_checkpoint(runs / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(cut["ema"][k], last["ema"][k]) for k in last["ema"])


def test_with_no_held_out_domain_every_domain_trains_and_the_worst_is_reported(
    cli, tmp_path: Path
) -> None:
    """Generalised learning without held-out domains: do well on all of them. The summary
    holds each domain's test acc, their mean and the worst one; report shows them."""
    config = {**DG, "data": {**DG["data"], "test_domains": []}}
    path = write_config(tmp_path / "all.yaml", config)
    result = cli("generalize", path, "--name", "all", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["selection"]["rule"] == "training_domain_val"
    best, domains = summary["best"], ("rot0", "rot15", "rot30")
    per_domain = [best[f"{d}/test/acc"] for d in domains]
    assert best["train_domains/test/acc"] == pytest.approx(sum(per_domain) / 3)
    assert best["worst_domain/test/acc"] == min(per_domain)
    assert best["worst_domain/val/acc"] == min(best[f"{d}/val/acc"] for d in domains)
    assert best["worst_domain/test/loss"] == max(best[f"{d}/test/loss"] for d in domains)
    assert not any(k.startswith("test_domains/") for k in best)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "all" / "metrics.jsonl").open()]
    for row in (r for r in rows if r["split"] == "eval"):
        assert row["worst_domain/test/acc"] == min(row[f"{d}/test/acc"] for d in domains)
    shown = cli("report", str(tmp_path / "runs"), "--format", "json")
    assert shown.exit_code == 0, shown.stderr
    (group,) = json.loads(shown.stdout)
    assert group["mean"]["worst_domain/test/acc"] == best["worst_domain/test/acc"]
    assert group["mean"]["train_domains/test/acc"] == best["train_domains/test/acc"]
    for rule in ("oracle", "leave_one_domain_out"):
        refused = cli("generalize", path, f"selection.rule={rule}", "-q")
        assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"selection.rule: {rule}" in refused.stderr
