"""The domain-generalisation methods' math: IRM's and V-REx's penalties, GroupDRO's weights,
and how the per-domain and per-sample weights reach the loss (hand-computed cases)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xdt_cli.config import validate_config
from xdt_cli.data.registry import Domain, Split
from xdt_cli.data.stream import DomainBatch
from xdt_cli.methods.erm import ERM, ERMConfig
from xdt_cli.methods.groupdro import GroupDRO, GroupDROConfig
from xdt_cli.methods.irm import irm_penalty
from xdt_cli.methods.vrex import VREx, VRExConfig, risk_variance
from xdt_cli.models import create_model
from xdt_cli.regimes import loss_weights


def test_irm_penalty_is_zero_for_a_classifier_optimal_in_every_domain() -> None:
    # Logits [0, log 3] predict class 1 with p = 0.75: optimal (no rescaling helps) exactly
    # where 3 of 4 labels are 1, in each half of the batch.
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(8, 1)
    y_optimal = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0])  # halves [1,1,1,0] and [1,1,1,0]
    assert abs(irm_penalty(logits, y_optimal).item()) < 1e-7
    y_other = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1])  # here p = 1 would be better
    y_under = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1])  # here p = 0.5 would be better
    assert irm_penalty(logits, y_other).item() > 1e-3
    assert irm_penalty(logits, y_under).item() > 1e-3
    # the IRMv1 quantity itself: (d/dw R(w z))^2, here from the halves' product
    scale = torch.ones((), requires_grad=True)
    grad = torch.autograd.grad(F.cross_entropy(logits * scale, y_other), [scale])[0]
    assert irm_penalty(logits, y_other).item() == pytest.approx(grad.item() ** 2, rel=1e-5)


def _batches(x: torch.Tensor, ys: list[torch.Tensor], names=("a", "b")) -> list[DomainBatch]:
    n = len(ys[0])
    return [
        DomainBatch(x=x[i * n : (i + 1) * n], y=y, domain=d)
        for i, (y, d) in enumerate(zip(ys, names, strict=True))
    ]


def test_vrex_penalty_is_the_variance_of_the_domain_risks() -> None:
    assert risk_variance(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(2 / 3)
    torch.manual_seed(0)
    model = create_model("lenet", (1, 28, 28), 10)
    method = VREx(model, VRExConfig(), total_steps=10)
    x = torch.rand(8, 1, 28, 28)
    batch = _batches(x, [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])])
    method.eval()  # no dropout / batch statistics: one forward gives the same logits
    out = method.training_step(batch, step=0)
    logits = model(x)
    risks = torch.stack(
        [F.cross_entropy(logits[:4], batch[0].y), F.cross_entropy(logits[4:], batch[1].y)]
    )
    assert out["penalty"].item() == pytest.approx(torch.var(risks, unbiased=False).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((risks.mean() + out["penalty"]).item(), rel=1e-5)


def test_groupdro_weights_move_toward_the_worst_domain() -> None:
    torch.manual_seed(0)
    model = create_model("lenet", (1, 28, 28), 10)
    method = GroupDRO(model, GroupDROConfig(eta=0.5), total_steps=10)
    method.setup_domains(["easy", "hard"])
    method.eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    easy_y = predicted[:4]  # what the model says: low risk
    hard_y = (predicted[4:] + 5) % 10  # never what it says: high risk
    batch = _batches(x, [easy_y, hard_y], ("easy", "hard"))
    previous = 0.5
    for step in range(3):
        out = method.training_step(batch, step)
        assert method.q.sum().item() == pytest.approx(1.0)
        assert method.q[1] > method.q[0] and method.q[1].item() > previous
        previous = method.q[1].item()
        risks = [F.cross_entropy(model(x[:4]), easy_y), F.cross_entropy(model(x[4:]), hard_y)]
        expected = method.q[0] * risks[0] + method.q[1] * risks[1]
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(method.state_dict()) >= {"q"}  # checkpoints keep the weights


def test_per_sample_weights_reach_the_loss_as_the_formula_says() -> None:
    """sum_d sum_i lambda_{d,i} L_{d,i}, by hand: two domains of 2 and 4 training samples."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    ya, yb = torch.tensor([0, 1]), torch.tensor([0, 0, 1, 2])
    domains = [
        Domain("toy", "a", 3, (1, 28, 28), {"train": Split(x[:2], ya)}),
        Domain("toy", "b", 3, (1, 28, 28), {"train": Split(x[2:], yb)}),
    ]
    cfg = validate_config(
        {"data": {"dataset": "rotated_mnist5k", "test_domains": ["rot75"]}},
        source="t",
        subcommand="generalize",
    )
    cfg.data.domain_weights = {"a": 2.0}
    cfg.data.sample_weights = "class_balanced"
    weights, record = loss_weights(cfg, domains)
    # class_balanced: pooled counts {0: 3, 1: 2, 2: 1}, N = 6, 3 classes: N / (3 n_y)
    sample = {0: 6 / 9, 1: 6 / 6, 2: 6 / 3}
    lam = [[2.0 * sample[int(c)] for c in ya], [1.0 * sample[int(c)] for c in yb]]
    # the batch weight: lambda_{d,i} * D * n_d / N
    expected_a = [v * 2 * 2 / 6 for v in lam[0]]
    expected_b = [v * 2 * 4 / 6 for v in lam[1]]
    assert weights[0].tolist() == pytest.approx(expected_a)
    assert weights[1].tolist() == pytest.approx(expected_b)
    assert record["domains"]["a"]["lambda_d"] == 2.0

    # The expected step loss over every possible batch (b = 1 per domain) equals
    # (1/N) sum_d sum_i lambda_{d,i} loss_{d,i}, for any per-sample losses.
    losses = [torch.tensor([0.3, 1.7]), torch.tensor([0.2, 0.9, 2.5, 1.1])]
    target = sum((torch.tensor(w) * s).sum() for w, s in zip(lam, losses, strict=True)) / 6
    steps = [
        (weights[0][i] * losses[0][i] + weights[1][j] * losses[1][j]) / 2
        for i in range(2)
        for j in range(4)
    ]
    assert torch.stack(steps).mean().item() == pytest.approx(target.item(), rel=1e-6)

    # ERM's loss of one step: mean over the step's samples of weight * cross-entropy
    model = create_model("lenet", (1, 28, 28), 3)
    method = ERM(model, ERMConfig(), total_steps=1)
    method.eval()
    batch = [
        DomainBatch(x=x[:2], y=ya, domain="a", weight=weights[0]),
        DomainBatch(x=x[2:4], y=yb[:2], domain="b", weight=weights[1][:2]),
    ]
    out = method.training_step(batch, 0)
    ce = F.cross_entropy(model(x[:4]), torch.cat([ya, yb[:2]]), reduction="none")
    hand = (ce * torch.cat([weights[0], weights[1][:2]])).sum() / 4
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-6)


def test_inverse_domain_size_gives_every_domain_the_same_share() -> None:
    domains = [
        Domain(
            "toy",
            "a",
            2,
            (1, 28, 28),
            {"train": Split(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))},
        ),
        Domain(
            "toy",
            "b",
            2,
            (1, 28, 28),
            {"train": Split(torch.zeros(6, 1, 28, 28), torch.tensor([0, 1] * 3))},
        ),
    ]
    cfg = validate_config(
        {
            "data": {
                "dataset": "rotated_mnist5k",
                "test_domains": ["rot75"],
                "sample_weights": "inverse_domain_size",
            }
        },
        source="t",
        subcommand="generalize",
    )
    weights, record = loss_weights(cfg, domains)
    assert weights == [None, None]  # every batch weight is exactly 1: DomainBed's ERM
    assert record["domains"]["a"]["share_of_loss"] == pytest.approx(0.5)
    cfg.data.sample_weights = "none"
    weights, record = loss_weights(cfg, domains)
    assert record["domains"]["b"]["share_of_loss"] == pytest.approx(0.75)
    assert weights[0].tolist() == pytest.approx([0.5, 0.5])  # 2 * 2 / 8
