"""The domain-generalisation methods' math: IRM's and V-REx's penalties and GroupDRO's
weights (hand-computed cases). How the per-domain and per-sample weights reach the loss:
tests/test_dg_weights.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xdt_cli.data.stream import DomainBatch
from xdt_cli.methods.groupdro import GroupDRO, GroupDROConfig
from xdt_cli.methods.irm import irm_penalty
from xdt_cli.methods.vrex import VREx, VRExConfig, risk_variance
from xdt_cli.models import create_model


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
