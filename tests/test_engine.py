"""The engine: determinism, resume, the non-finite guard, early stopping, schedules, parity."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY, write_config
from xdt_cli.api import resume_run, start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.config import deep_merge
from xdt_cli.engine import Engine, lr_factor
from xdt_cli.errors import RunInterrupted
from xdt_cli.methods.erm import ERM
from xdt_cli.progress import Reporter
from xdt_cli.regimes import build_experiment
from xdt_cli.resolve import load_config
from xdt_cli.runtime import Runtime

QUIET = Reporter(quiet=True)


def run(config: Path, name: str, runs: Path, overrides=()) -> dict:
    return start_run(
        "train-source", config, list(overrides), name=name, runs_dir=runs, reporter=QUIET
    )


def metrics_text(runs: Path, name: str) -> str:
    return (runs / name / "metrics.jsonl").read_text()


def test_same_seed_gives_bit_identical_metrics(tiny_config: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    a = run(tiny_config, "a", runs)
    b = run(tiny_config, "b", runs)
    assert metrics_text(runs, "a") == metrics_text(runs, "b")
    assert a["final"] == b["final"] and a["best"] == b["best"]
    run(tiny_config, "c", runs, ["seed=1"])
    assert metrics_text(runs, "c") != metrics_text(runs, "a")


def test_run_learns_and_records_every_eval(tiny_config: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    summary = run(tiny_config, "learn", runs, ["train.steps=200", "train.eval_every=50"])
    rows = [json.loads(line) for line in metrics_text(runs, "learn").splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [50, 100, 150, 200]
    assert {"digits/val/acc", "digits/val/loss", "digits/test/acc"} <= set(evals[0])
    trains = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in trains] == list(range(10, 201, 10))
    assert trains[-1]["train/loss"] < trains[0]["train/loss"]
    assert summary["final"]["digits/test/acc"] > 0.8  # 10 classes: chance is 0.1
    best = max(evals, key=lambda r: r["digits/val/acc"])  # first maximum wins ties
    assert summary["best_step"] == best["step"]
    assert summary["best"] == {k: v for k, v in best.items() if k not in ("step", "split")}
    ckpt = load_checkpoint(runs / "learn" / "checkpoints" / "best.pt")
    assert ckpt["step"] == best["step"]


# A config whose state has everything a resume must restore: dropout (RNG), batch norm,
# momentum, a warm-up + cosine schedule, gradient clipping, and a target domain.
RESUMABLE = deep_merge(
    TINY,
    {
        "data": {"target": {"dataset": "mnist5k"}},
        "model": {"backbone": "cnn"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "train": {"steps": 30, "eval_every": 10, "log_every": 4, "grad_clip": 1.0},
    },
)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int) -> None:
    """Deliver a real signal to this process right after optimizer step `step`."""
    original = Engine._accumulate

    def accumulate(self, out):
        original(self, out)
        if self.step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Engine, "_accumulate", accumulate)


def assert_resume_is_exact(
    monkeypatch: pytest.MonkeyPatch, runs: Path, run: Callable[[str], dict], step: int
) -> tuple[dict, dict]:
    """`run(name)` trains a run `runs/<name>`. Train "straight"; train "cut", stopped by
    SIGINT after step `step`, and resume it: its metrics.jsonl must be byte-identical to the
    straight run's and its final metrics equal. Returns (straight, resumed) summaries."""
    straight = run("straight")
    with monkeypatch.context() as patch:
        _interrupt_at(patch, step, signal.SIGINT)
        with pytest.raises(RunInterrupted):
            run("cut")
    resumed, _ = resume_run(runs / "cut", reporter=QUIET)
    assert metrics_text(runs, "cut") == metrics_text(runs, "straight")
    assert resumed["final"] == straight["final"]
    return straight, resumed


@pytest.mark.parametrize("stop_at", [13, 20])  # inside a log window / at an eval step
def test_interrupted_and_resumed_run_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int
) -> None:
    config = write_config(tmp_path / "resumable.yaml", RESUMABLE)
    runs = tmp_path / "runs"
    straight = run(config, "straight", runs)

    with monkeypatch.context() as patch:
        _interrupt_at(patch, stop_at, signal.SIGINT)
        with pytest.raises(RunInterrupted) as info:
            run(config, "cut", runs)
    assert info.value.exit_code == 130 and info.value.step == stop_at
    cut = runs / "cut"
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["step"] == stop_at

    resumed, trained = resume_run(cut, reporter=QUIET)
    assert trained
    assert metrics_text(runs, "cut") == metrics_text(runs, "straight")
    for key in ("final", "best", "best_step", "steps", "status"):
        assert resumed[key] == straight[key]
    for name in ("last.pt", "best.pt"):
        a = load_checkpoint(runs / "straight" / "checkpoints" / name)["method"]
        b = load_checkpoint(cut / "checkpoints" / name)["method"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sigterm_saves_and_exits_143(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    _interrupt_at(monkeypatch, 7, signal.SIGTERM)
    with pytest.raises(RunInterrupted) as info:
        run(tiny_config, "term", tmp_path / "runs")
    assert info.value.exit_code == 143
    assert load_checkpoint(tmp_path / "runs" / "term" / "checkpoints" / "last.pt")["step"] == 7


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ERM.training_step

    def poisoned(self, batch, step):
        out = original(self, batch, step)
        if step >= 25:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ERM, "training_step", poisoned)
    summary = run(tiny_config, "nan", tmp_path / "runs")
    assert summary["status"] == "failed"
    assert "non-finite" in summary["error"]
    assert summary["steps"] == 30  # caught at the log step after the first NaN
    last = load_checkpoint(tmp_path / "runs" / "nan" / "checkpoints" / "last.pt")
    assert last["step"] == 20
    assert all(torch.isfinite(v).all() for v in last["method"].values() if v.is_floating_point())
    on_disk = json.loads((tmp_path / "runs" / "nan" / "summary.json").read_text())
    assert on_disk["status"] == "failed"


def test_early_stopping_stops_after_patience(tiny_config: Path, tmp_path: Path) -> None:
    # With a vanishing learning rate the val accuracy cannot improve after the first eval.
    summary = run(
        tiny_config,
        "early",
        tmp_path / "runs",
        ["optim.lr=1e-12", "train.steps=200", "train.early_stopping=2"],
    )
    assert summary["early_stopped"] is True
    assert summary["steps"] == 60  # best at 20, no improvement at 40 and 60
    assert summary["best_step"] == 20


def test_selection_rule_last_picks_the_final_step(tiny_config: Path, tmp_path: Path) -> None:
    summary = run(tiny_config, "last", tmp_path / "runs", ["selection.rule=last"])
    assert summary["best_step"] == 40 and summary["best"] == summary["final"]
    assert summary["selection"] == {"rule": "last", "metric": None, "mode": "max"}


def test_engine_matches_a_plain_pytorch_loop(tiny_config: Path) -> None:
    """The engine adds no math: 30 SGD steps give bit-identical weights to a plain loop."""
    overrides = ["optim.name=sgd", "optim.lr=0.05", "train.steps=30"]
    cfg = load_config(tiny_config, overrides)
    runtime = Runtime.from_env("cpu")

    exp = build_experiment("train-source", cfg, runtime)
    Engine(cfg, exp, runtime, run=None, reporter=QUIET, evaluate=False).fit()

    plain = build_experiment("train-source", cfg, runtime)  # same seed: same initial weights
    model, data = plain.method.model, plain.streams[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    per_epoch = len(data.y) // 32
    for step in range(30):
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(epoch))
        idx = perm[i * 32 : (i + 1) * 32]
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    trained = exp.method.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("schedule", "checks"),
    [
        ({"name": "constant"}, {0: 1.0, 99: 1.0}),
        ({"name": "constant", "warmup_steps": 10}, {0: 0.1, 4: 0.5, 9: 1.0, 50: 1.0}),
        ({"name": "step", "step_size": 30, "gamma": 0.5}, {0: 1.0, 29: 1.0, 30: 0.5, 95: 0.125}),
        ({"name": "cosine", "min_lr_ratio": 0.1}, {0: 1.0, 50: 0.55, 100: 0.1}),
    ],
)
def test_lr_schedules(tiny_config: Path, schedule: dict, checks: dict) -> None:
    cfg = load_config(
        tiny_config, ["train.steps=100"] + [f"schedule.{k}={v}" for k, v in schedule.items()]
    )
    factor = lr_factor(cfg)
    for step, expected in checks.items():
        assert math.isclose(factor(step), expected, rel_tol=1e-9), (step, factor(step))


def test_inv_by_progress_is_ganins_annealing(tiny_config: Path) -> None:
    # DANN's paper: lr_p = lr_0 / (1 + 10 p) ** 0.75, p from 0 to 1 over the run
    cfg = load_config(tiny_config, ["train.steps=1500", "schedule.name=inv"])
    assert cfg.schedule.gamma == 10.0  # the default of unit progress, recorded in config.yaml
    factor = lr_factor(cfg)
    for step in (0, 1, 300, 750, 1499):
        expected = (1 + 10 * step / 1500) ** -0.75
        assert math.isclose(factor(step), expected, rel_tol=1e-12), step


def test_inv_by_step_is_the_transfer_learning_librarys_schedule(tiny_config: Path) -> None:
    # TLlib's examples: LambdaLR(opt, lambda x: lr * (1 + lr_gamma * x) ** -lr_decay) over
    # param groups whose "lr" is a multiplier (1.0), x the number of optimizer steps taken;
    # lr_gamma 0.001 and lr_decay 0.75 by default.
    overrides = ["train.steps=1500", "schedule.name=inv", "schedule.unit=step", "optim.lr=0.01"]
    cfg = load_config(tiny_config, overrides)
    assert cfg.schedule.gamma == 0.001
    factor = lr_factor(cfg)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": 1.0}], lr=0.01, momentum=0.9)
    reference = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda x: 0.01 * (1.0 + 0.001 * float(x)) ** (-0.75)
    )
    for step in range(1500):
        if step in (0, 1, 2, 250, 999, 1499):
            assert math.isclose(opt.param_groups[0]["lr"], 0.01 * factor(step), rel_tol=1e-12)
        opt.step()
        reference.step()
    assert math.isclose(factor(1499), (1 + 1.499) ** -0.75, rel_tol=1e-12)  # 0.503, not 0.17
    # the two units agree on a 10,000-step run only
    by_progress = lr_factor(load_config(tiny_config, ["train.steps=10000", "schedule.name=inv"]))
    by_step = lr_factor(load_config(tiny_config, ["train.steps=10000", *overrides[1:3]]))
    assert all(math.isclose(by_progress(k), by_step(k)) for k in (0, 5000, 9999))


def test_onecycle_matches_torch(tiny_config: Path) -> None:
    cfg = load_config(tiny_config, ["train.steps=100", "schedule.name=onecycle", "optim.lr=0.1"])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=100, cycle_momentum=False
    )
    factor = lr_factor(cfg)
    for step in range(100):
        assert math.isclose(opt.param_groups[0]["lr"], 0.1 * factor(step), rel_tol=1e-6), step
        opt.step()
        reference.step()


# --------------------------------------------------------------------------- damage, NaN
class Messages(Reporter):
    """A quiet reporter that keeps the messages it is given."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_resume_falls_back_to_the_previous_last_pt_when_the_newest_is_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "resumable.yaml", RESUMABLE)
    runs = tmp_path / "runs"
    straight = run(config, "straight", runs)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 25, signal.SIGINT)  # last.pt at 10, 20 and 25
        with pytest.raises(RunInterrupted):
            run(config, "cut", runs)
    ckpts = runs / "cut" / "checkpoints"
    assert load_checkpoint(ckpts / "last.prev.pt")["step"] == 20
    raw = bytearray((ckpts / "last.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # damage it somewhere in the middle
    (ckpts / "last.pt").write_bytes(bytes(raw))

    reporter = Messages()
    resumed, trained = resume_run(runs / "cut", reporter=reporter)
    assert trained
    assert any(
        line.startswith("last.pt is unusable (") and line.endswith("resuming from last.prev.pt")
        for line in reporter.lines
    ), reporter.lines
    assert any("resuming" in line and "at step 20/30" in line for line in reporter.lines)
    assert metrics_text(runs, "cut") == metrics_text(runs, "straight")
    for key in ("final", "best", "best_step", "steps", "status"):
        assert resumed[key] == straight[key]
    a = load_checkpoint(runs / "straight" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(ckpts / "last.pt")["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _poison(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    original = ERM.training_step

    def poisoned(self, batch, step):
        out = original(self, batch, step)
        if steps(step):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ERM, "training_step", poisoned)


def test_on_nonfinite_skip_skips_the_step_without_touching_a_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "resumable.yaml", RESUMABLE)  # SGD with momentum
    _poison(monkeypatch, lambda step: step in (12, 13))  # 0-based: steps 13 and 14
    seen: dict[int, dict] = {}
    original = Engine._train_step

    def watched(self):
        before = _snapshot_state(self)
        out = original(self)
        seen[self.step] = {"changed": _snapshot_state(self) != before, "out": out}
        return out

    monkeypatch.setattr(Engine, "_train_step", watched)
    reporter = Messages()
    summary = start_run(
        "train-source",
        config,
        ["train.on_nonfinite=skip"],
        name="skip",
        runs_dir=tmp_path / "runs",
        reporter=reporter,
    )
    assert summary["status"] == "completed" and summary["nonfinite_skipped"] == 2
    assert [s for s, v in seen.items() if v["out"] is None] == [12, 13]
    assert not seen[12]["changed"] and not seen[13]["changed"]  # not even momentum moved
    assert seen[11]["changed"] and seen[14]["changed"]
    assert reporter.lines.count("step 13: non-finite loss; step skipped (1 in a row)") == 1
    assert "step 14: non-finite loss; step skipped (2 in a row)" in reporter.lines
    rows = [json.loads(line) for line in metrics_text(tmp_path / "runs", "skip").splitlines()]
    trains = [r for r in rows if r["split"] == "train"]
    assert all(math.isfinite(r["train/loss"]) for r in trains)
    assert [r["train/nonfinite_skipped"] for r in trains if r["step"] in (12, 16)] == [0, 2]


def _snapshot_state(engine: Engine) -> list[bytes]:
    state = engine.method.state_dict()
    momentum = [s["momentum_buffer"] for s in engine.optimizer.state.values() if s]
    return [t.numpy().tobytes() for t in [*state.values(), *momentum]]


def test_on_nonfinite_skip_stops_after_max_nonfinite_in_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "resumable.yaml", RESUMABLE)
    _poison(monkeypatch, lambda step: step >= 21)  # 1-based steps 22, 23, 24 ...
    overrides = ["train.on_nonfinite=skip", "train.max_nonfinite=3"]
    summary = run(config, "stop", tmp_path / "runs", overrides)
    assert summary["status"] == "failed" and summary["steps"] == 23
    assert summary["error"].startswith(
        "step 24: non-finite loss; 3 steps in a row skipped (train.max_nonfinite 3)"
    )
    last = load_checkpoint(tmp_path / "runs" / "stop" / "checkpoints" / "last.pt")
    assert last["step"] == 20 and last["nonfinite"] == {"in_a_row": 0, "total": 0}


def test_weights_that_turn_non_finite_under_a_finite_loss_are_never_saved(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight becomes NaN at step 25 while every loss stays finite (e.g. a batch-norm
    statistic or an optimizer step that overflowed): the evaluation at step 30 refuses to
    save it, names the parameter, and last.pt keeps step 20's finite weights."""
    original = Engine._accumulate

    def corrupt_after(self, out):  # after step 25's update
        original(self, out)
        if self.step == 25:  # a running statistic: training normalises with the batch's own
            model = self.method.model
            norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            norm.running_var[0] = float("nan")

    monkeypatch.setattr(Engine, "_accumulate", corrupt_after)
    overrides = ["train.eval_every=10", "model.backbone=cnn"]
    summary = run(tiny_config, "nanw", tmp_path / "runs", overrides)
    assert summary["status"] == "failed"
    assert summary["error"].startswith("the weights became non-finite by step 30 ("), summary
    assert "running_var" in summary["error"]
    last = load_checkpoint(tmp_path / "runs" / "nanw" / "checkpoints" / "last.pt")
    assert last["step"] == 20
    assert all(torch.isfinite(v).all() for v in last["method"].values() if v.is_floating_point())
    best = load_checkpoint(tmp_path / "runs" / "nanw" / "checkpoints" / "best.pt")
    assert best["step"] <= 20
