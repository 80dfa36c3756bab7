"""The multitask weightings' math (`xdt multitask`): hand-computed losses, weights, gradient
projections and min-norm points, masked tasks, and one real step of every weighting on the
hps and mmoe models."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xdt_cli.data.stream import DomainBatch
from xdt_cli.methods import METHODS
from xdt_cli.methods._shared_mtl import TaskSpec, task_loss
from xdt_cli.methods.base import OptimizerStep
from xdt_cli.methods.dwa import dwa_weights
from xdt_cli.methods.gradnorm import gradnorm_loss
from xdt_cli.methods.mgda import min_norm_weights
from xdt_cli.methods.pcgrad import project_conflicting
from xdt_cli.models import MultiTaskModel

MTL = sorted(name for name, cls in METHODS.items() if "multitask" in cls.regimes)
SPECS = [TaskSpec("a", "ce", 3, weight=0.3), TaskSpec("b", "mse", 1, weight=2.0)]


def _model(arch: str = "hps") -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel("lenet", (1, 28, 28), {"a": 3, "b": 1}, arch=arch, experts=2)


def _batch(seed: int = 1, n: int = 8, missing: str | None = None) -> list[DomainBatch]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    ya = torch.randint(0, 3, (n,), generator=g)
    yb = torch.randn(n, generator=g)
    if missing == "a":
        ya = torch.full_like(ya, -1)
    if missing == "b":
        yb = torch.full_like(yb, float("nan"))
    # the SAME x object for both tasks: one encoder pass
    return [
        DomainBatch(x=x, y=ya, domain="d", task="a"),
        DomainBatch(x=x, y=yb, domain="d", task="b"),
    ]


def _build(name: str, arch: str = "hps", lr: float = 0.1, model=None, **config):
    cls = METHODS[name]
    method = cls(model or _model(arch), cls.Config(**config), total_steps=10)
    method.setup_tasks(SPECS)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    opt = OptimizerStep(
        optimizer, torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext(), params
    )
    return method, opt


def _step(method, opt: OptimizerStep, batch: list[DomainBatch], step: int = 0) -> dict:
    if method.manual_optimization:
        return method.manual_step(batch, step, opt)
    with opt.autocast:
        out = method.training_step(batch, step)
    opt.backward(out["loss"])
    opt.step()
    return out


def _hand_losses(model: MultiTaskModel, batch: list[DomainBatch]):
    out = model(batch[0].x)
    la = F.cross_entropy(out["a"], batch[0].y)
    lb = ((out["b"].squeeze(-1) - batch[1].y) ** 2).mean()
    return la, lb


# --------------------------------------------------------------------------- static, equal
def test_static_and_equal_reproduce_the_weighted_sum() -> None:
    batch = _batch()
    static, _ = _build("static")
    la, lb = _hand_losses(static.model, batch)
    out = static.training_step(batch, 0)
    assert out["loss"].item() == pytest.approx((0.3 * la + 2.0 * lb).item(), rel=1e-6)
    assert out["weight_a"].item() == pytest.approx(0.3)
    assert out["weight_b"].item() == pytest.approx(2.0)
    assert out["loss_a"].item() == pytest.approx(la.item(), rel=1e-6)
    equal, _ = _build("equal")
    assert equal.training_step(batch, 0)["loss"].item() == pytest.approx((la + lb).item(), rel=1e-6)


# --------------------------------------------------------------------------- masking
def test_a_task_without_labels_has_zero_loss_and_zero_gradient() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    loss, count = task_loss("ce", logits, torch.full((5,), -1))
    loss.backward()
    assert count.item() == 0 and loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    pred = torch.randn(5, 1, requires_grad=True)
    loss, count = task_loss("mse", pred, torch.full((5,), float("nan")))
    loss.backward()
    assert count.item() == 0 and loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    # a partly labelled batch is the mean over its labelled samples only
    y = torch.tensor([0, -1, 2, -1, 1])
    loss, count = task_loss("ce", logits.detach(), y)
    keep = y >= 0
    assert count.item() == 3
    assert loss.item() == pytest.approx(F.cross_entropy(logits.detach()[keep], y[keep]).item())


@pytest.mark.parametrize("name", MTL)
def test_every_weighting_steps_when_a_task_has_no_labels(name: str) -> None:
    method, opt = _build(name)
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    out = _step(method, opt, _batch(missing="b"))
    assert torch.isfinite(out["loss"])
    assert out["loss_b"].item() == 0.0
    if name not in ("static", "equal"):  # those two keep their nominal weight on a zero loss
        assert out["weight_b"].item() == 0.0
    assert out["weight_a"].item() > 0
    after = dict(method.model.named_parameters())
    for n in ("heads.b.weight", "heads.b.bias"):  # no gradient from the empty task
        assert torch.equal(after[n], before[n])
    assert not torch.equal(after["heads.a.weight"], before["heads.a.weight"])


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "gradnorm"])
def test_gradient_methods_with_one_labelled_task_step_like_its_plain_loss(name: str) -> None:
    # with task b unlabelled the combination is L_a alone (weight 1: w_a starts at 1)
    batch = _batch(missing="b")
    method, opt = _build(name)
    reference, ref_opt = _build("equal", model=copy.deepcopy(method.model))
    _step(method, opt, batch)
    _step(reference, ref_opt, batch)
    for (n, p), q in zip(
        method.model.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------- every weighting
@pytest.mark.parametrize("arch", ["hps", "mmoe"])
@pytest.mark.parametrize("name", MTL)
def test_one_step_of_every_weighting(name: str, arch: str) -> None:
    assert len(MTL) == 8
    method, opt = _build(name, arch)
    shared = method.shared_parameters()
    before = [p.detach().clone() for p in shared]
    out = _step(method, opt, _batch())
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    for task in ("a", "b"):
        assert torch.isfinite(out[f"weight_{task}"]) and torch.isfinite(out[f"loss_{task}"])
    assert any(not torch.equal(p, q) for p, q in zip(shared, before, strict=True))
    assert all(torch.isfinite(p).all() for p in method.parameters())


@pytest.mark.parametrize("name", MTL)
def test_a_restored_weighting_continues_exactly(name: str) -> None:
    """All the state that steers the next steps (parameters, buffers: loss history, L(0),
    log-variances; the RNG) is in what a checkpoint keeps."""
    config = {"window": 2} if name == "dwa" else {}
    method, opt = _build(name, **config)
    for k in range(3):
        _step(method, opt, _batch(seed=k), k)
    saved = copy.deepcopy(method.state_dict())
    saved_opt = copy.deepcopy(opt.optimizer.state_dict())
    rng = torch.get_rng_state()
    outs = [_step(method, opt, _batch(seed=k), k) for k in range(3, 6)]
    torch.manual_seed(123)  # what the restore must undo
    again, again_opt = _build(name, **config)
    again.load_state_dict(saved)
    again_opt.optimizer.load_state_dict(saved_opt)
    torch.set_rng_state(rng)
    outs_again = [_step(again, again_opt, _batch(seed=k), k) for k in range(3, 6)]
    for o, p in zip(outs, outs_again, strict=True):
        for key in ("loss", "weight_a", "weight_b"):
            assert o[key].item() == p[key].item(), key
    for p, q in zip(method.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", MTL)
def test_a_grad_scaler_changes_nothing_but_the_scale(name: str) -> None:
    """The manual steps unscale what they take from autograd and hand `opt.step()` scaled
    gradients: with a power-of-two loss scale the steps are bit-identical to unscaled ones."""
    method, opt = _build(name, "mmoe", lr=0.05)
    scaled = copy.deepcopy(method)
    params = [p for p in scaled.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled_opt = OptimizerStep(
        torch.optim.SGD(params, lr=0.05), scaler, contextlib.nullcontext(), params
    )
    for k in range(2):
        torch.manual_seed(k)
        a = _step(method, opt, _batch(seed=k), k)
        torch.manual_seed(k)
        b = _step(scaled, scaled_opt, _batch(seed=k), k)
        assert a["weight_a"].item() == b["weight_a"].item()
    for p, q in zip(method.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- uncertainty
def test_uncertainty_loss_and_log_variance_gradients() -> None:
    batch = _batch()
    method, _ = _build("uncertainty")
    assert method.log_vars.tolist() == [0.0, 0.0]
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.3, -0.2]))
    la, lb = _hand_losses(method.model, batch)
    out = method.training_step(batch, 0)
    s = [0.3, -0.2]
    hand = math.exp(-s[0]) / 2 * la + s[0] / 2 + math.exp(-s[1]) / 2 * lb + s[1] / 2
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert out["weight_a"].item() == pytest.approx(math.exp(-0.3) / 2, rel=1e-6)
    out["loss"].backward()
    grad = method.log_vars.grad
    assert grad is not None and (grad.abs() > 1e-6).all()
    # d/ds_i = -exp(-s_i)/2 L_i + 1/2
    expected = [-math.exp(-s[0]) / 2 * la.item() + 0.5, -math.exp(-s[1]) / 2 * lb.item() + 0.5]
    torch.testing.assert_close(grad, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    # a task without labels: no term at all, so its s_i gets no gradient
    method.zero_grad()
    method.training_step(_batch(missing="b"), 0)["loss"].backward()
    assert method.log_vars.grad[1].item() == 0.0 and method.log_vars.grad[0].item() != 0.0


# --------------------------------------------------------------------------- dwa
def test_dwa_weights_by_hand() -> None:
    w = dwa_weights(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), 2.0)
    e1, e2 = math.exp(2.0 / 2), math.exp(1.0 / 2)
    torch.testing.assert_close(w, torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]))
    assert w.sum().item() == pytest.approx(2.0)
    # a task with no history has ratio 1
    w = dwa_weights(torch.tensor([0.5, 3.0]), torch.tensor([1.0, 0.0]), 2.0)
    e1, e2 = math.exp(0.5 / 2), math.exp(1.0 / 2)
    torch.testing.assert_close(w, torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]))


def test_dwa_weighs_one_for_two_windows_then_from_the_window_means() -> None:
    method, opt = _build("dwa", lr=0.0, window=2)  # lr 0: each batch's losses are fixed
    logged = []
    for step in range(4):  # windows 0 and 1: weights 1
        out = _step(method, opt, _batch(seed=step), step)
        assert out["weight_a"].item() == 1.0 and out["weight_b"].item() == 1.0
        logged.append(torch.stack([out["loss_a"], out["loss_b"]]))
        if step == 1:
            torch.testing.assert_close(method.mean_previous, torch.stack(logged).mean(0))
            assert method.mean_before.tolist() == [0.0, 0.0]
    first, second = torch.stack(logged[:2]).mean(0), torch.stack(logged[2:]).mean(0)
    torch.testing.assert_close(method.mean_previous, second)
    torch.testing.assert_close(method.mean_before, first)
    assert method.window_count.tolist() == [0, 0]
    out = method.training_step(_batch(seed=4), 4)  # window 2: lambda from windows 1 and 0
    w = torch.stack([out["weight_a"], out["weight_b"]])
    ratio = second / first
    torch.testing.assert_close(w, 2 * torch.softmax(ratio / 2, 0))
    assert not torch.allclose(w, torch.ones(2))
    # hand-set history: Lbar(t-1) = [2, 1], Lbar(t-2) = [1, 1]
    method.mean_previous.copy_(torch.tensor([2.0, 1.0]))
    method.mean_before.copy_(torch.tensor([1.0, 1.0]))
    out = method.training_step(_batch(seed=5), 5)
    e1, e2 = math.exp(1.0), math.exp(0.5)
    assert out["weight_a"].item() == pytest.approx(2 * e1 / (e1 + e2), rel=1e-6)
    assert out["weight_a"].item() + out["weight_b"].item() == pytest.approx(2.0)
    hand = out["weight_a"] * out["loss_a"] + out["weight_b"] * out["loss_b"]
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-6)
    assert {"window_sum", "window_count", "mean_previous", "mean_before"} <= set(
        method.state_dict()
    )


# --------------------------------------------------------------------------- rlw
def test_rlw_weights_are_a_reproducible_softmax() -> None:
    method, _ = _build("rlw")
    batch = _batch()
    torch.manual_seed(7)
    first = [method.training_step(batch, k) for k in range(3)]
    torch.manual_seed(7)
    second = [method.training_step(batch, k) for k in range(3)]
    torch.manual_seed(7)
    z = torch.randn(2)
    expected = torch.softmax(z, 0)
    assert first[0]["weight_a"].item() == pytest.approx(expected[0].item())
    for o, p in zip(first, second, strict=True):
        w = torch.stack([o["weight_a"], o["weight_b"]])
        assert (w > 0).all() and w.sum().item() == pytest.approx(1.0)
        assert torch.equal(w, torch.stack([p["weight_a"], p["weight_b"]]))
    assert first[0]["weight_a"].item() != first[1]["weight_a"].item()


# --------------------------------------------------------------------------- pcgrad
def test_pcgrad_projection_by_hand() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    out = project_conflicting([g1, g2], orders=[[1], [0]])
    # g1 - (g1.g2)/|g2|^2 g2 = [1, 0] + 1/2 [-1, 1]; g2 - (g2.g1)/|g1|^2 g1 = [-1, 1] + [1, 0]
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert torch.dot(out[0], g2).item() == pytest.approx(0.0)
    # agreeing gradients are left alone
    h1, h2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(project_conflicting([h1, h2]), torch.stack([h1, h2]))
    # three tasks: projections against the ORIGINAL gradients, in the given order
    g3 = torch.tensor([0.0, -1.0])
    out = project_conflicting([g1, g2, g3], orders=[[1, 2], [0, 2], [0, 1]])
    # task 0: g1 vs g2 -> [0.5, 0.5]; vs g3: dot -0.5 -> [0.5, 0]
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.0]))
    # task 2: g3 vs g1: dot 0 (kept); vs g2: dot -1 -> [0,-1] + 1/2 [-1, 1] = [-0.5, -0.5]
    torch.testing.assert_close(out[2], torch.tensor([-0.5, -0.5]))


def test_pcgrad_step_applies_the_projected_sum_to_the_shared_parameters() -> None:
    batch = _batch()
    method, opt = _build("pcgrad", lr=1.0)
    shared = method.shared_parameters()
    la, lb = _hand_losses(method.model, batch)
    flat = []
    for loss in (la, lb):
        parts = torch.autograd.grad(loss, shared, retain_graph=True)
        flat.append(torch.cat([g.flatten() for g in parts]))
    expected = project_conflicting(flat, orders=[[1], [0]]).sum(0)
    assert torch.dot(flat[0], flat[1]).item() != 0
    head_grad = torch.autograd.grad(la + lb, [method.model.heads["a"].weight])[0]
    before = torch.cat([p.detach().flatten() for p in shared])
    head_before = method.model.heads["a"].weight.detach().clone()
    out = method.manual_step(batch, 0, opt)
    after = torch.cat([p.detach().flatten() for p in shared])
    torch.testing.assert_close(before - after, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_before - method.model.heads["a"].weight, head_grad)
    assert out["weight_a"].item() == 1.0 and out["weight_b"].item() == 1.0


# --------------------------------------------------------------------------- mgda
def _segment_closed_form(g1: torch.Tensor, g2: torch.Tensor) -> float:
    d = g1 - g2
    return min(max(torch.dot(g2 - g1, g2).item() / torch.dot(d, d).item(), 0.0), 1.0)


def test_min_norm_weights_two_tasks_closed_form() -> None:
    w = min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # |c g1 + (1-c) g2|^2 = c^2 + 4 (1-c)^2, minimal at c = 4/5
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2]))
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        g1, g2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
        c = _segment_closed_form(g1, g2)
        torch.testing.assert_close(
            min_norm_weights(torch.stack([g1, g2])), torch.tensor([c, 1 - c])
        )
    # a vertex is the answer when one gradient lies beyond the other's foot
    torch.testing.assert_close(
        min_norm_weights(torch.tensor([[1.0, 0.0], [2.0, 0.0]])), torch.tensor([1.0, 0.0])
    )
    # identical gradients: any valid weights, the same point
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    for grads in (same[:2], same):
        w = min_norm_weights(grads)
        assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(w @ grads, torch.tensor([1.0, 2.0]))
    assert min_norm_weights(torch.tensor([[3.0, 1.0]])).tolist() == [1.0]


def test_min_norm_weights_many_tasks_is_the_min_norm_point() -> None:
    g = torch.Generator().manual_seed(0)
    for k, p in ((3, 2), (5, 20), (4, 3)):
        grads = torch.randn(k, p, generator=g) + 0.3
        w = min_norm_weights(grads, max_iter=2000, tolerance=1e-9)
        assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-6)
        point = (w.double() @ grads.double()).norm().item()
        assert point <= grads.double().norm(dim=1).min().item() + 1e-9
        # optimality on the simplex: (M w)_i >= w^T M w for every i (up to the solver's tolerance)
        gram = grads.double() @ grads.double().T
        mw = gram @ w.double()
        assert (mw >= (w.double() @ mw) - 1e-3 * gram.diag().max()).all()
    # the origin in the hull: norm 0
    w = min_norm_weights(torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]]), 2000, 1e-10)
    assert (w @ torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])).norm().item() < 1e-2


def test_mgda_step_equals_backprop_of_the_alpha_weighted_loss() -> None:
    for arch in ("hps", "mmoe"):
        batch = _batch()
        method, opt = _build("mgda", arch, lr=1.0, normalization="none")
        reference = copy.deepcopy(method.model)
        out = method.manual_step(batch, 0, opt)
        alpha = torch.stack([out["weight_a"], out["weight_b"]])
        assert (alpha >= 0).all() and alpha.sum().item() == pytest.approx(1.0)
        # the alpha from the representation gradients, by hand
        x = batch[0].x
        rep = reference.encode(x).detach().requires_grad_()
        outs = reference.decode(rep, x, ["a", "b"])
        la = F.cross_entropy(outs["a"], batch[0].y)
        lb = ((outs["b"].squeeze(-1) - batch[1].y) ** 2).mean()
        ga = torch.autograd.grad(la, rep, retain_graph=True)[0].flatten()
        gb = torch.autograd.grad(lb, rep)[0].flatten()
        c = _segment_closed_form(ga, gb)
        torch.testing.assert_close(alpha, torch.tensor([c, 1 - c]), rtol=1e-4, atol=1e-6)
        # then one SGD step (lr 1) on alpha_a L_a + alpha_b L_b through the whole graph
        la, lb = _hand_losses(reference, batch)
        params = list(reference.parameters())
        grads = torch.autograd.grad(alpha[0] * la + alpha[1] * lb, params)
        for (n, p), q, g in zip(method.model.named_parameters(), params, grads, strict=True):
            torch.testing.assert_close(p, q - g, rtol=1e-4, atol=1e-6, msg=f"{arch} {n}")


def _closed_form(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """The two-task min-norm weights [alpha, 1 - alpha] (Sener & Koltun 2018, Algorithm 1)."""
    alpha = min(max(float((g2 - g1) @ g2) / float((g1 - g2) @ (g1 - g2)), 0.0), 1.0)
    return np.array([alpha, 1.0 - alpha])


def _hand_normalised(kind: str, g: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LibMTL's `_gradient_normalizers`: g / 1, g / ||g||, g / L, g / (L ||g||)."""
    norms = np.sqrt((g**2).sum(axis=1))
    scale = {"none": np.ones(len(g)), "l2": norms, "loss": losses, "loss+": losses * norms}
    return g / scale[kind][:, None]


# hand numbers: g1 = [3, 0], g2 = [0, 1], L = [2, 0.5]
#   none:  (g2-g1).g2 = 1,  ||g1-g2||^2 = 10              -> alpha = 0.1
#   loss:  [1.5, 0], [0, 2]:  4 / (2.25 + 4)              -> alpha = 0.64
#   l2:    [1, 0], [0, 1]: any two unit vectors            -> alpha = 0.5
#   loss+: [0.5, 0], [0, 2]:  4 / (0.25 + 4)              -> alpha = 16/17
MGDA_BY_HAND = {"none": 0.1, "loss": 0.64, "l2": 0.5, "loss+": 16 / 17}


@pytest.mark.parametrize("kind", sorted(MGDA_BY_HAND))
def test_mgda_normalisation_and_solve_by_hand(kind: str) -> None:
    method, _ = _build("mgda", normalization=kind)
    grads = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    losses = [torch.tensor(2.0), torch.tensor(0.5)]
    alpha = MGDA_BY_HAND[kind]
    w = min_norm_weights(method._normalise(grads, losses))
    torch.testing.assert_close(w, torch.tensor([alpha, 1 - alpha]), rtol=1e-6, atol=1e-7)
    # l2 ignores a gradient's length; loss ignores a loss scaled with its gradient; none
    # and loss+ do not (loss+ divides by L ||g||: a 10x longer g2 is a 10x shorter vector)
    w10 = min_norm_weights(method._normalise(grads * torch.tensor([[1.0], [10.0]]), losses))
    scaled = min_norm_weights(
        method._normalise(grads * torch.tensor([[1.0], [10.0]]), [losses[0], 10 * losses[1]])
    )
    g10 = np.array([[3.0, 0.0], [0.0, 10.0]])
    expected = _closed_form(*_hand_normalised(kind, g10, np.array([2.0, 0.5])))
    torch.testing.assert_close(w10, torch.tensor(expected, dtype=torch.float32))
    if kind == "l2":
        torch.testing.assert_close(w10, torch.tensor([0.5, 0.5]))
    if kind in ("loss", "l2"):
        torch.testing.assert_close(scaled, w, rtol=1e-6, atol=1e-7)
    if kind == "none":
        assert abs(w10[0].item() - alpha) > 0.05


@pytest.mark.parametrize("kind", ["none", "l2", "loss", "loss+"])
def test_mgda_step_weights_are_the_closed_form_of_the_normalised_gradients(kind: str) -> None:
    """A real step (hps): the logged weights equal the closed form computed in numpy from the
    representation gradients and the loss values of an untouched copy of the model."""
    batch = _batch()
    method, opt = _build("mgda", normalization=kind)
    reference = copy.deepcopy(method.model)
    out = method.manual_step(batch, 0, opt)
    x = batch[0].x
    rep = reference.encode(x).detach().requires_grad_()
    outs = reference.decode(rep, x, ["a", "b"])
    la = F.cross_entropy(outs["a"], batch[0].y)
    lb = ((outs["b"].squeeze(-1) - batch[1].y) ** 2).mean()
    ga = torch.autograd.grad(la, rep, retain_graph=True)[0].flatten().double().numpy()
    gb = torch.autograd.grad(lb, rep)[0].flatten().double().numpy()
    losses = np.array([la.item(), lb.item()])
    expected = _closed_form(*_hand_normalised(kind, np.stack([ga, gb]), losses))
    got = np.array([out["weight_a"].item(), out["weight_b"].item()])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([out["loss_a"].item(), out["loss_b"].item()], losses, rtol=1e-5)
    # the normalisations really differ on this batch (else the check above proves little)
    others = {
        k: _closed_form(*_hand_normalised(k, np.stack([ga, gb]), losses))[0]
        for k in ("none", "l2", "loss", "loss+")
        if k != kind
    }
    assert all(abs(v - expected[0]) > 1e-3 for v in others.values()), (kind, others)


# --------------------------------------------------------------------------- gradnorm
def test_gradnorm_loss_gradient_sign_by_hand() -> None:
    # equal gradient norms, task 0's loss falls more slowly (ratio 2 vs 1): its weight must
    # rise (dL_grad/dw_0 < 0) and task 1's fall
    w = torch.ones(2, requires_grad=True)
    loss = gradnorm_loss(w, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0]), alpha=1.5)
    r = torch.tensor([2.0, 1.0]) / 1.5
    target = r**1.5  # mean(G) = 1
    assert loss.item() == pytest.approx((target - 1).abs().sum().item(), rel=1e-6)
    loss.backward()
    assert w.grad[0].item() == pytest.approx(-1.0) and w.grad[1].item() == pytest.approx(1.0)


def test_gradnorm_step_keeps_the_sum_and_favours_the_slower_task() -> None:
    method, opt = _build("gradnorm", lr=0.01)
    batch = _batch()
    # by hand: ||grad_W L_i|| on the last shared matrix; r_i = 1 at the first step, so
    # w <- w - lr dL_grad/dw (L_grad alone reaches w), renormalised to sum 2
    la, lb = _hand_losses(method.model, batch)
    layer = method.model.features[9].weight
    norms = torch.stack(
        [torch.autograd.grad(loss, layer, retain_graph=True)[0].norm() for loss in (la, lb)]
    )
    w = torch.ones(2, requires_grad=True)
    gradnorm_loss(w, norms, torch.ones(2), 1.5).backward()
    expected = 1 - 0.01 * w.grad
    expected = expected * 2 / expected.sum()
    first = method.manual_step(batch, 0, opt)
    torch.testing.assert_close(method.loss_weights.detach(), expected)
    assert not torch.allclose(expected, torch.ones(2))
    assert method.initial_set.all()
    torch.testing.assert_close(method.initial_loss, torch.stack([first["loss_a"], first["loss_b"]]))
    assert method.loss_weights.sum().item() == pytest.approx(2.0, rel=1e-6)
    # pretend task a's loss started far lower: it now trains much more slowly than b
    method.initial_loss[0] = method.initial_loss[0] * 1e-3
    before = method.loss_weights.detach().clone()
    out = method.manual_step(batch, 1, opt)
    after = method.loss_weights.detach()
    assert after.sum().item() == pytest.approx(2.0, rel=1e-6)
    assert after[0] > before[0] and after[1] < before[1]
    assert out["weight_a"].item() == pytest.approx(before[0].item())  # this step's stopgrad(w)
    hand = before[0] * out["loss_a"] + before[1] * out["loss_b"]
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-6)
    # W: the last shared weight matrix by default, every shared parameter with layer: all
    assert method.norm_parameters() == [method.model.features[9].weight]
    every, _ = _build("gradnorm", layer="all")
    assert len(every.norm_parameters()) == len(every.shared_parameters())
