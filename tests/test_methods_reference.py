"""Methods checked against their reference implementation: MLDG's virtual step (DomainBed's
inner optimizer of the run's kind, hand-computed on a linear model, and not ERM on
rotated_mnist5k), FixMatch's defaults, its unlabelled batch ratio mu and the optional
ReMixMatch alignment (hand-computed), and the weight average (train.ema) with every method
of every subcommand."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import write_config
from xdt_cli.api import start_run
from xdt_cli.checkpoint import load_checkpoint
from xdt_cli.data.stream import DomainBatch
from xdt_cli.engine import Engine
from xdt_cli.methods import METHODS
from xdt_cli.methods.base import OptimizerStep
from xdt_cli.methods.mldg import MLDG, MLDGConfig
from xdt_cli.models import create_model
from xdt_cli.progress import Reporter
from xdt_cli.regimes import build_experiment
from xdt_cli.resolve import load_config
from xdt_cli.runtime import Runtime

QUIET = Reporter(quiet=True)


# --------------------------------------------------------------------------- MLDG
class RecordingStep(OptimizerStep):
    """An OptimizerStep that keeps the gradients the optimizer steps with."""

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]
        super().step()


def _softmax_ce_grad(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """d/d(w, b) of mean_i CE(w x_i + b, y_i), by the closed form (p - onehot) x / n."""
    p = torch.softmax(x @ w.T + b, dim=1)
    err = (p - torch.nn.functional.one_hot(y, w.shape[0]).double()) / len(x)
    return err.T @ x, err.sum(0)


def _adam_first_step(theta, g, lr, wd, eps=1e-8):
    """One step of a fresh torch Adam (L2 weight decay): with m = (1 - b1) g', v = (1 - b2) g'^2
    and bias correction, the update is lr * g' / (|g'| + eps), g' = g + wd * theta."""
    g = g + wd * theta
    return theta - lr * g / (g.abs() + eps)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_mldg_step_is_first_order_mldg_with_an_adam_virtual_step(beta: float) -> None:
    lr, wd = 0.1, 0.01
    model = nn.Linear(2, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.3], [0.2, 0.8], [-0.4, 0.1]]))
        model.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    x = [torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[-1.5, 0.5], [2.0, 1.0]])]
    y = [torch.tensor([0, 2]), torch.tensor([1, 1])]
    batch = [
        DomainBatch(x=xi.double(), y=yi, domain=d) for xi, yi, d in zip(x, y, "ab", strict=True)
    ]
    method = MLDG(model, MLDGConfig(beta=beta), total_steps=1)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = list(model.parameters())
    opt = RecordingStep(optimizer, scaler, contextlib.nullcontext(), params)
    method.manual_step(batch, step=0, opt=opt)

    # by hand: g = sum over the pairs (a, b), (b, a) of (G_i + beta G_j(theta'_i)) / 2
    expected_w, expected_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for i, j in ((0, 1), (1, 0)):
        gw_i, gb_i = _softmax_ce_grad(w0, b0, x[i].double(), y[i])
        w1 = _adam_first_step(w0, gw_i, lr, wd)
        b1 = _adam_first_step(b0, gb_i, lr, wd)
        gw_j, gb_j = _softmax_ce_grad(w1, b1, x[j].double(), y[j])
        expected_w += (gw_i + beta * gw_j) / 2
        expected_b += (gb_i + beta * gb_j) / 2
    torch.testing.assert_close(opt.grads[0], expected_w, rtol=1e-5, atol=1e-7)  # the CE is float32
    torch.testing.assert_close(opt.grads[1], expected_b, rtol=1e-5, atol=1e-7)  # the CE is float32
    # and the outer step is the run's Adam with those gradients
    torch.testing.assert_close(model.weight.detach(), _adam_first_step(w0, expected_w, lr, wd))
    torch.testing.assert_close(model.bias.detach(), _adam_first_step(b0, expected_b, lr, wd))


def _updates(tmp_path: Path, method: str, steps: int = 3) -> torch.Tensor:
    """The flat parameter change of `steps` generalize steps on rotated_mnist5k (lenet, Adam
    at 1e-3), from the seed's initial weights."""
    config = {
        "data": {
            "dataset": "rotated_mnist5k",
            "domains": ["rot0", "rot15", "rot30"],
            "test_domains": ["rot30"],
        },
        "model": {"backbone": "lenet"},
        "method": {"name": method},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"steps": steps, "batch_size": 16, "eval_every": steps, "log_every": steps},
    }
    path = write_config(tmp_path / f"{method}.yaml", config)
    cfg = load_config(path, [], subcommand="generalize")
    runtime = Runtime.from_env("cpu")
    exp = build_experiment("generalize", cfg, runtime)
    before = torch.cat([p.detach().flatten().clone() for p in exp.method.model.parameters()])
    Engine(cfg, exp, runtime, run=None, reporter=QUIET, evaluate=False).fit()
    after = torch.cat([p.detach().flatten() for p in exp.method.model.parameters()])
    return after - before


def test_mldg_is_not_erm_on_rotated_mnist5k_with_adam(tmp_path: Path) -> None:
    """With Adam at 1e-3 a plain-SGD virtual step (theta - 1e-3 grad) barely moves theta, so
    MLDG's update was ERM's to within about 1%; DomainBed's Adam virtual step is not."""
    erm, mldg = _updates(tmp_path, "erm"), _updates(tmp_path, "mldg")
    relative = ((mldg - erm).norm() / erm.norm()).item()
    assert relative > 0.1, relative


# --------------------------------------------------------------------------- self-training
def _self_training(**config):
    from xdt_cli.methods.self_training import SelfTraining, SelfTrainingConfig

    model = create_model("lenet", (1, 28, 28), 3)
    return SelfTraining(model, SelfTrainingConfig(**config), total_steps=10)  # type: ignore[arg-type]


def test_self_training_defaults_are_fixmatch() -> None:
    from xdt_cli.methods.self_training import SelfTrainingConfig

    cfg = SelfTrainingConfig()
    assert (cfg.threshold, cfg.unlabelled_weight, cfg.mu) == (0.95, 1.0, 7)
    assert cfg.distribution_alignment is False
    assert _self_training().unlabelled_batch_ratio == 7
    assert _self_training(mu=2).unlabelled_batch_ratio == 2


# log-probabilities: rows predict class 0 (p 0.96), class 1 (p 0.5) and class 2 (p 0.97)
LOGITS = torch.tensor([[0.96, 0.02, 0.02], [0.3, 0.5, 0.2], [0.01, 0.02, 0.97]]).log()
SOURCE_Y = torch.tensor([0, 0, 0, 1])  # source frequencies (3/4, 1/4, 0)


def test_self_training_pseudo_labels_are_the_thresholded_argmax_by_default() -> None:
    method = _self_training()
    label, mask = method.pseudo_labels(LOGITS, SOURCE_Y)
    assert label.tolist() == [0, 1, 2]
    assert mask.tolist() == [1.0, 0.0, 1.0]  # 0.96 and 0.97 reach 0.95, 0.5 does not
    assert torch.equal(method.target_mean, torch.full((3,), 1 / 3))  # nothing updated


def test_self_training_distribution_alignment_is_remixmatch_s() -> None:
    method = _self_training(distribution_alignment=True, alignment_momentum=0.5)
    label, mask = method.pseudo_labels(LOGITS, SOURCE_Y)
    # by hand, momentum 0.5 from uniform: prior = (1/3 + (3/4, 1/4, 0)) / 2
    prior = torch.tensor([13 / 24, 7 / 24, 1 / 6])
    mean_p = torch.tensor([1.27 / 3, 0.54 / 3, 1.19 / 3])  # column means of the rows above
    target = (torch.full((3,), 1 / 3) + mean_p) / 2
    p = LOGITS.exp()
    aligned = p * prior / target
    aligned = aligned / aligned.sum(1, keepdim=True)
    torch.testing.assert_close(method.source_prior, prior)
    torch.testing.assert_close(method.target_mean, target)
    confidence, expected = aligned.max(1)
    assert label.tolist() == expected.tolist() == [0, 1, 2]
    # class 2, absent from the source, is damped: its 0.97 falls to about 0.92 < tau
    assert confidence[2].item() == pytest.approx(0.9229, abs=1e-4)
    assert mask.tolist() == (confidence >= 0.95).float().tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(("method", "ratio"), [("self_training", 7), ("dann", 1)])
def test_transfer_target_batch_is_mu_times_the_source_batch(
    tmp_path: Path, method: str, ratio: int
) -> None:
    config = {
        "data": {"source": {"dataset": "digits"}, "target": {"dataset": "mnist5k"}},
        "model": {"backbone": "lenet"},
        "method": {"name": method},
        "train": {"steps": 2, "batch_size": 4},
    }
    cfg = load_config(write_config(tmp_path / "t.yaml", config), [], subcommand="transfer")
    exp = build_experiment("transfer", cfg, Runtime.from_env("cpu"))
    source, target = (s.batch(0) for s in exp.streams)
    assert len(source.x) == 4 and len(target.x) == 4 * ratio and target.y is None
    out = exp.method.training_step([source, target], 0)
    assert torch.isfinite(out["loss"])


# --------------------------------------------------------------------------- train.ema
EMA_TRAIN = {"steps": 3, "batch_size": 8, "eval_every": 3, "log_every": 3, "ema": 0.99}
EMA_DATA = {
    "train-source": {"source": {"dataset": "digits"}},
    "finetune": {"target": {"dataset": "digits", "labels_per_class": 2}},
    "transfer": {"source": {"dataset": "digits"}, "target": {"dataset": "mnist5k"}},
    "generalize": {
        "dataset": "rotated_mnist5k",
        "domains": ["rot0", "rot15", "rot30"],
        "test_domains": ["rot30"],
    },
    "multitask": {"tasks": {"digits": {"dataset": "digits"}, "mnist5k": {"dataset": "mnist5k"}}},
}
EMA_CASES = sorted((n, r) for n, m in METHODS.items() for r in m.regimes)


@pytest.mark.parametrize(("method", "subcommand"), EMA_CASES)
def test_ema_works_with_every_method_of_every_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, subcommand: str
) -> None:
    config: dict = {
        "data": EMA_DATA[subcommand],
        # cnn: batch norm, so the integer batch counts are in the state too
        "model": {"backbone": "cnn" if subcommand in ("finetune", "transfer") else "lenet"},
        "method": {"name": method},
        "train": EMA_TRAIN,
    }
    if subcommand == "finetune":  # finetune starts from trained weights: any will do here
        torch.manual_seed(0)
        torch.save(create_model("cnn", (1, 28, 28), 10).state_dict(), tmp_path / "w.pt")
        config["init"] = {"weights": str(tmp_path / "w.pt")}
    # record the live value of the head's weight at each step, and the average's start
    seen: dict[str, list] = {"live": [], "start": [], "key": []}
    original = Engine._update_ema

    def recording(engine: Engine) -> None:
        assert engine.ema is not None
        if not seen["start"]:  # the last trainable parameter of the model: its head
            trained = [n for n, p in engine.method.model.named_parameters() if p.requires_grad]
            seen["key"].append(f"model.{trained[-1]}")
            seen["start"].append(engine.ema[seen["key"][0]].clone())
        key = seen["key"][0]
        seen["live"].append((engine.step, engine.method.state_dict()[key].clone()))
        original(engine)

    monkeypatch.setattr(Engine, "_update_ema", recording)
    path = write_config(tmp_path / "c.yaml", config)
    summary = start_run(subcommand, path, [], name="r", runs_dir=tmp_path / "runs", reporter=QUIET)
    assert summary["status"] == "completed" and summary["ema"] == 0.99
    last = load_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "best.pt")
    key = seen["key"][0]
    average = seen["start"][0]
    for step, live in seen["live"]:  # avg <- d avg + (1 - d) theta, d = min(0.99, (1+k)/(10+k))
        decay = min(0.99, (1 + step) / (10 + step))
        average = decay * average + (1 - decay) * live
    torch.testing.assert_close(last["ema"][key], average)
    assert torch.equal(best["method"][key], last["ema"][key])  # best.pt holds the average
    assert not torch.equal(last["method"][key], last["ema"][key])  # last.pt the live ones too
    assert last["method"].keys() == last["ema"].keys()


@pytest.mark.parametrize("method", ["l2sp", "delta"])  # methods with non-tensor extra state
def test_ema_resume_of_a_method_with_extra_state_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    from tests.test_engine import assert_resume_is_exact

    torch.manual_seed(0)
    torch.save(create_model("cnn", (1, 28, 28), 10).state_dict(), tmp_path / "w.pt")
    config = {
        "data": EMA_DATA["finetune"],
        "model": {"backbone": "cnn"},
        "init": {"weights": str(tmp_path / "w.pt")},
        "method": {"name": method},
        "train": {**EMA_TRAIN, "steps": 6},
    }
    path = write_config(tmp_path / "c.yaml", config)

    def run(name: str) -> dict:
        return start_run(
            "finetune", path, [], name=name, runs_dir=tmp_path / "runs", reporter=QUIET
        )

    assert_resume_is_exact(monkeypatch, tmp_path / "runs", run, 4)
    last = load_checkpoint(tmp_path / "runs" / "cut" / "checkpoints" / "last.pt")
    extra, live = last["ema"]["_extra_state"], last["method"]["_extra_state"]
    assert extra["head_kept"] is live["head_kept"] is True  # copied, not averaged
    attention = extra.get("attention", {})
    assert (len(attention) > 0) == (method == "delta")
    assert attention.keys() == live.get("attention", {}).keys()
    assert all(torch.equal(attention[k], live["attention"][k]) for k in attention)
