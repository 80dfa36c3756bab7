"""The domain-generalisation methods' maths against hand computation: DomainBed's CORAL and
MMD distances and their pairwise penalties, inter-domain Mixup with its random pairs, and
IRM's penalty with its annealed weight. Every expected number is computed here in numpy
(or by explicit arithmetic), never by the function under test; the model is a linear
4 -> 3 feature map and a 3 -> 2 head, so its outputs are two matrix products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xdt_cli.data.stream import DomainBatch
from xdt_cli.methods import METHODS
from xdt_cli.methods._shared_dg import coral_distance, gaussian_mmd, random_pairs
from xdt_cli.methods.irm import irm_penalty
from xdt_cli.models import Classifier

# DomainBed's AbstractMMD.gaussian_kernel, written out again here on purpose
GAMMAS = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


# --------------------------------------------------------------------------- helpers
def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Linear(4, 3), 3, 2)


def _method(name: str, **config):
    cls = METHODS[name]
    return cls(_model(), cls.Config(**config), total_steps=100).eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _forward(model: Classifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) by hand: two affine maps."""
    f = _np(x) @ _np(model.features.weight).T + _np(model.features.bias)
    return f, f @ _np(model.head.weight).T + _np(model.head.bias)


def _ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy: log sum exp z - z_y."""
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def _domains(n: int = 6, count: int = 3, weighted: bool = True) -> list[DomainBatch]:
    """`count` domains of `n` samples, shifted apart, the second with per-sample weights."""
    g = torch.Generator().manual_seed(5)
    out = []
    for d in range(count):
        x = torch.randn(n, 4, generator=g) * (1.0 + 0.5 * d) + d
        y = torch.randint(0, 2, (n,), generator=g)
        w = torch.rand(n, generator=g) + 0.5 if weighted and d == 1 else None
        out.append(DomainBatch(x=x, y=y, domain=f"d{d}", weight=w))
    return out


def _risk(model: Classifier, b: DomainBatch) -> float:
    _, z = _forward(model, b.x)
    ce = _ce(z, b.y.numpy())
    return float((ce * (1.0 if b.weight is None else _np(b.weight))).mean())


def _coral_np(x: np.ndarray, y: np.ndarray) -> float:
    """DomainBed's mean_cov: mean squared mean difference + mean squared difference of the
    unbiased covariances."""
    cx = (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)
    cy = (y - y.mean(0)).T @ (y - y.mean(0)) / (len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).mean() + ((cx - cy) ** 2).mean())


def _mmd_np(x: np.ndarray, y: np.ndarray, gammas: list[float] = GAMMAS) -> float:
    """DomainBed's gaussian MMD: mean Kxx + mean Kyy - 2 mean Kxy, K = sum_g exp(-g d^2)."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        total = 0.0
        for i in range(len(a)):
            for j in range(len(b)):
                d2 = float(((a[i] - b[j]) ** 2).sum())
                total += sum(np.exp(-g * d2) for g in gammas)
        return total / (len(a) * len(b))

    return k(x, x) + k(y, y) - 2 * k(x, y)


# --------------------------------------------------------------------------- CORAL, MMD
X3 = np.array([[0.0, 0.0], [0.03, 0.0], [1.0, 0.5]])
Y3 = np.array([[0.0, 0.3], [2.0, 0.0], [0.1, 0.1]])


def test_coral_distance_on_3x2_matrices_by_hand() -> None:
    # X3: mean [1.03/3, 0.5/3]; Y3: mean [2.1/3, 0.4/3]; mean diff^2 mean:
    #   ((1.07/3)^2 + (0.1/3)^2) / 2
    mean_part = ((1.07 / 3) ** 2 + (0.1 / 3) ** 2) / 2
    expected = _coral_np(X3, Y3)
    assert mean_part < expected  # the covariances count as well
    got = coral_distance(torch.tensor(X3, dtype=torch.float32), torch.tensor(Y3).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # both terms are there: a pure shift leaves only the means, a scaling the covariances
    shift = coral_distance(torch.tensor(X3).float(), torch.tensor(X3 + 1.0).float())
    assert shift.item() == pytest.approx(1.0, rel=1e-5)
    centred = X3 - X3.mean(0)
    scaled = coral_distance(torch.tensor(centred).float(), torch.tensor(2 * centred).float())
    assert scaled.item() == pytest.approx(_coral_np(centred, 2 * centred), rel=1e-5)
    cov = centred.T @ centred / 2
    assert scaled.item() == pytest.approx(((3 * cov) ** 2).mean(), rel=1e-5)


def test_gaussian_mmd_on_3x2_matrices_by_hand() -> None:
    # squared distances from 9e-4 to 4: every gamma from 1e-3 to 1e3 changes the value
    expected = _mmd_np(X3, Y3)
    got = gaussian_mmd(torch.tensor(X3).float(), torch.tensor(Y3).float())
    assert got.item() == pytest.approx(expected, rel=1e-5)
    for k in range(len(GAMMAS)):  # the test can tell each gamma apart
        other = GAMMAS[:k] + [GAMMAS[k] * 2] + GAMMAS[k + 1 :]
        assert abs(_mmd_np(X3, Y3, other) - expected) > 1e-4 * abs(expected), k
    # identical samples: 0; the kernel's value at distance 0 is 7 (one per gamma)
    assert gaussian_mmd(torch.tensor(X3).float(), torch.tensor(X3).float()).item() == (
        pytest.approx(0.0, abs=1e-6)
    )


@pytest.mark.parametrize(("name", "distance"), [("coral", _coral_np), ("mmd", _mmd_np)])
def test_coral_and_mmd_losses_are_erm_plus_lambda_times_the_mean_pair_penalty(
    name: str, distance
) -> None:
    """DomainBed's AbstractMMD.update: objective = mean_d CE_d, penalty = sum over pairs
    i < j of the distance / (D (D - 1) / 2), loss = objective + gamma * penalty."""
    batch = _domains()
    method = _method(name, penalty_weight=2.5)
    out = method.training_step(batch, 0)
    feats = [_forward(method.model, b.x)[0] for b in batch]
    nll = np.mean([_risk(method.model, b) for b in batch])
    pairs = [(0, 1), (0, 2), (1, 2)]
    penalty = sum(distance(feats[i], feats[j]) for i, j in pairs) / 3
    assert penalty > 1e-3
    assert out["nll"].item() == pytest.approx(nll, rel=1e-5)
    assert out["penalty"].item() == pytest.approx(penalty, rel=1e-4)
    assert out["loss"].item() == pytest.approx(nll + 2.5 * penalty, rel=1e-5)
    # one domain: no pair, no penalty
    single = method.training_step(batch[:1], 0)
    assert single["penalty"].item() == 0.0
    assert single["loss"].item() == pytest.approx(_risk(method.model, batch[0]), rel=1e-5)


# --------------------------------------------------------------------------- Mixup
def test_random_pairs_are_domainbeds_cycle() -> None:
    for count in (1, 2, 3, 5):
        torch.manual_seed(11)
        perm = torch.randperm(count).tolist()
        # random_pairs_of_minibatches: perm[i] with perm[i + 1], the last with perm[0]
        expected = [(perm[i], perm[i + 1 if i < count - 1 else 0]) for i in range(count)]
        torch.manual_seed(11)
        assert random_pairs(count) == expected


def test_mixup_loss_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """DomainBed's Mixup.update: for each pair (i, j) of the random cycle, lam ~
    Beta(alpha, alpha), x = lam x_i + (1 - lam) x_j, objective += lam CE(f(x), y_i) +
    (1 - lam) CE(f(x), y_j); divided by the number of domains."""
    draws = iter([0.3, 0.85, 0.6])
    seen: list[tuple[float, float]] = []

    def fixed_sample(self, sample_shape=torch.Size()):  # noqa: B008
        seen.append((float(self.concentration1), float(self.concentration0)))
        return torch.tensor(next(draws))

    monkeypatch.setattr(torch.distributions.Beta, "sample", fixed_sample)
    batch = _domains()
    method = _method("mixup", alpha=0.4)
    torch.manual_seed(3)
    perm = torch.randperm(3).tolist()
    torch.manual_seed(3)
    out = method.training_step(batch, 0)
    assert seen == [(pytest.approx(0.4), pytest.approx(0.4))] * 3

    def by_hand(pairs: list[tuple[int, int]]) -> float:
        total = 0.0
        for (i, j), lam in zip(pairs, [0.3, 0.85, 0.6], strict=True):
            a, b = batch[i], batch[j]
            _, z = _forward(method.model, lam * a.x + (1 - lam) * b.x)
            wa = 1.0 if a.weight is None else _np(a.weight)
            wb = 1.0 if b.weight is None else _np(b.weight)
            total += lam * (_ce(z, a.y.numpy()) * wa).mean()
            total += (1 - lam) * (_ce(z, b.y.numpy()) * wb).mean()
        return total / 3

    cycle = [(perm[k], perm[(k + 1) % 3]) for k in range(3)]
    expected = by_hand(cycle)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    # the pairing and the side lam falls on both change the number on this batch
    assert abs(by_hand([(j, i) for i, j in cycle]) - expected) > 1e-3
    assert abs(by_hand([(k, (k + 1) % 3) for k in range(3)][::-1]) - expected) > 1e-3


# --------------------------------------------------------------------------- IRM
def _irm_np(z: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """DomainBed's _irm_penalty by hand: d/ds CE(s z_i, y_i) at s = 1 is sum_c p_ic z_ic -
    z_{i,y_i}; the penalty is the product of its (weighted) means on the even and the odd
    samples."""
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    per_sample = (p * z).sum(1) - z[np.arange(len(y)), y]
    if w is not None:
        per_sample = per_sample * w
    return float(per_sample[0::2].mean() * per_sample[1::2].mean())


def test_irm_penalty_by_hand() -> None:
    z = np.array([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 1.0], [1.5, 0.2]])
    y = np.array([0, 1, 0, 1, 1])
    w = np.array([0.5, 2.0, 1.0, 1.5, 0.8])
    # sample 0 by hand: p = softmax([2, -1]) = [e^3, 1] / (e^3 + 1); p.z - z_0 = -3 / (e^3 + 1)
    p0 = np.exp(3) / (np.exp(3) + 1)
    assert (p0 * 2 + (1 - p0) * -1) - 2 == pytest.approx(-3 / (np.exp(3) + 1))
    expected = _irm_np(z, y)
    assert abs(expected) > 1e-3
    got = irm_penalty(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got_w = irm_penalty(torch.tensor(z).float(), torch.tensor(y), torch.tensor(w).float())
    assert got_w.item() == pytest.approx(_irm_np(z, y, w), rel=1e-5)
    assert abs(_irm_np(z, y, w) - expected) > 1e-3


@pytest.mark.parametrize("weight", [100.0, 0.5])
def test_irm_loss_around_the_end_of_the_anneal(weight: float) -> None:
    """Before `anneal_steps`: nll + 1 * penalty (DomainBed: irm_lambda only from
    update_count >= irm_penalty_anneal_iters). From it on: nll + lambda * penalty, divided by
    lambda when lambda > 1 (the IRM authors' code; DomainBed resets Adam there instead, the
    difference the class docstring names)."""
    batch = _domains(n=6)
    method = _method("irm", penalty_weight=weight, anneal_steps=4)
    nll = np.mean([_risk(method.model, b) for b in batch])
    penalty = np.mean(
        [
            _irm_np(
                _forward(method.model, b.x)[1],
                b.y.numpy(),
                None if b.weight is None else _np(b.weight),
            )
            for b in batch
        ]
    )
    assert abs(penalty) > 1e-4
    for step, expected in (
        (0, nll + penalty),
        (3, nll + penalty),
        (4, (nll + weight * penalty) / max(weight, 1.0)),
        (50, (nll + weight * penalty) / max(weight, 1.0)),
    ):
        out = method.training_step(batch, step)
        assert out["nll"].item() == pytest.approx(nll, rel=1e-5)
        assert out["penalty"].item() == pytest.approx(penalty, rel=1e-4, abs=1e-7)
        assert out["loss"].item() == pytest.approx(expected, rel=1e-5), step
