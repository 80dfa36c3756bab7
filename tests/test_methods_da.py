"""The unsupervised domain-adaptation methods (DANN, CDAN, DAN, Deep CORAL, MCC) on tiny
hand-built batches: each trains every part it owns, the shared statistics match their
formulas, and no method reads a target label."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xdt_cli.data.stream import DomainBatch
from xdt_cli.methods import METHODS
from xdt_cli.methods._shared_da import (
    GradientReverse,
    adversarial_ramp,
    coral_loss,
    domain_adversarial_loss,
    mk_mmd,
)
from xdt_cli.methods.base import Method, MethodConfig
from xdt_cli.methods.mcc import class_confusion_loss
from xdt_cli.models import Classifier, create_model

DA_METHODS = ["dann", "cdan", "dan", "deep_coral", "mcc"]
TOTAL_STEPS = 100
MID_STEP = 30  # lambda_p > 0 here, so the adversarial gradient reaches the features


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_method(name: str, seed: int = 0, **config) -> Method:
    torch.manual_seed(seed)  # the same seed gives the same model and discriminator
    model = create_model("cnn", (1, 28, 28), 10)
    cls = METHODS[name]
    return cls(model, cls.Config(**config), total_steps=TOTAL_STEPS)


def make_batch(target_y: torch.Tensor | None = None, n: int = 8) -> list[DomainBatch]:
    g = torch.Generator().manual_seed(1)
    source = DomainBatch(
        x=torch.rand(n, 1, 28, 28, generator=g),
        y=torch.randint(0, 10, (n,), generator=g),
        domain="digits",
    )
    # a shifted target, so that every transfer loss is clearly non-zero
    target = DomainBatch(
        x=0.5 * torch.rand(n, 1, 28, 28, generator=g) + 0.4, y=target_y, domain="mnist5k"
    )
    return [source, target]


def run_step(method: Method, batch: list[DomainBatch], step: int = MID_STEP) -> dict:
    torch.manual_seed(123)  # the backbone's dropout draws the same masks in every call
    return method.training_step(batch, step)


def grads(method: Method) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in method.named_parameters()}


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", DA_METHODS)
def test_registered_for_transfer_only(name):
    cls = METHODS[name]
    assert cls.name == name
    assert cls.regimes == frozenset({"transfer"})
    assert cls.paper and cls.__doc__
    assert issubclass(cls.Config, MethodConfig)
    for field, info in cls.Config.model_fields.items():
        assert info.description, f"{name}.{field} has no description"


def test_paper_defaults():
    dann = METHODS["dann"].Config()
    assert (dann.trade_off, dann.gamma, dann.hidden_dim) == (1.0, 10.0, 1024)
    cdan = METHODS["cdan"].Config()
    assert (cdan.trade_off, cdan.gamma, cdan.entropy) == (1.0, 10.0, False)
    assert (cdan.randomized_dim, cdan.multilinear_limit) == (1024, 4096)
    dan = METHODS["dan"].Config()
    assert (dan.trade_off, dan.kernel_multipliers) == (1.0, [0.125, 0.25, 0.5, 1.0, 2.0])
    coral = METHODS["deep_coral"].Config()
    assert (coral.trade_off, coral.layer) == (1.0, "logits")
    mcc = METHODS["mcc"].Config()
    assert (mcc.trade_off, mcc.temperature) == (1.0, 2.5)


# --------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", DA_METHODS)
def test_step_is_finite_and_trains_every_part(name):
    method = make_method(name)
    out = run_step(method, make_batch())
    assert {"loss", "cls_loss", "transfer_loss"} <= out.keys()
    for key, value in out.items():
        assert value.ndim == 0 and torch.isfinite(value), key
        assert key == "loss" or not value.requires_grad, f"{key} should be detached"
    assert out["transfer_loss"].abs() > 0
    out["loss"].backward()
    g = grads(method)
    parts = ["model.features.", "model.head."]
    if hasattr(method, "discriminator"):
        parts.append("discriminator.")
    for part in parts:
        owned = {k: v for k, v in g.items() if k.startswith(part)}
        assert owned, part
        assert all(v is not None for v in owned.values()), f"{part} got no gradient"
        assert any(v.abs().sum() > 0 for v in owned.values()), f"{part} got zero gradient"


@pytest.mark.parametrize("name", DA_METHODS)
def test_transfer_loss_reaches_the_features(name):
    """The transfer term changes the features' gradient: with trade_off 0 it is the source
    cross-entropy's alone."""
    feature_grads = []
    for trade_off in (0.0, 1.0):
        method = make_method(name, trade_off=trade_off)
        run_step(method, make_batch())["loss"].backward()
        feature_grads.append(method.model.features[0][0].weight.grad.clone())
    assert not torch.allclose(feature_grads[0], feature_grads[1])


@pytest.mark.parametrize("name", DA_METHODS)
def test_target_labels_are_never_read(name):
    class NoLabels:
        """A target batch whose labels raise when touched."""

        def __init__(self, batch: DomainBatch) -> None:
            self.x, self.domain, self.task = batch.x, batch.domain, batch.task

        @property
        def y(self):
            raise AssertionError("a transfer method read the target labels")

    source, target = make_batch()
    run_step(make_method(name), [source, NoLabels(target)])

    results = []
    for target_y in (None, torch.randint(0, 10, (8,))):
        method = make_method(name)
        out = run_step(method, make_batch(target_y))
        out["loss"].backward()
        results.append((out, grads(method)))
    (out_a, grads_a), (out_b, grads_b) = results
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    for key in grads_a:
        assert torch.equal(grads_a[key], grads_b[key]), key


# --------------------------------------------------------------------------- DANN and CDAN
def test_ramp_formula():
    assert adversarial_ramp(0, TOTAL_STEPS) == 0.0
    assert adversarial_ramp(TOTAL_STEPS, TOTAL_STEPS) == pytest.approx(
        2 / (1 + math.exp(-10)) - 1, abs=1e-12
    )
    assert adversarial_ramp(50, 100, gamma=4.0) == pytest.approx(2 / (1 + math.exp(-2)) - 1)
    assert adversarial_ramp(2 * TOTAL_STEPS, TOTAL_STEPS) == adversarial_ramp(
        TOTAL_STEPS, TOTAL_STEPS
    )
    out = run_step(make_method("dann"), make_batch(), step=MID_STEP)
    expected = 2 / (1 + math.exp(-10 * MID_STEP / TOTAL_STEPS)) - 1
    assert out["grl_lambda"].item() == pytest.approx(expected, rel=1e-6)


def test_gradient_reverse_function():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = GradientReverse.apply(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * w, rtol=0, atol=0)


def test_dann_reverses_the_domain_gradient_at_the_features():
    """features.grad = d(cls)/df - lambda d(domain)/df, while the discriminator descends its
    own loss: checked against a hand-built computation without the reversal."""
    method = make_method("dann")
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    method.model.features.register_forward_hook(keep)
    source, target = make_batch()
    out = run_step(method, [source, target])
    out["loss"].backward()
    features = captured[0]
    lam = adversarial_ramp(MID_STEP, TOTAL_STEPS)
    n = source.x.shape[0]

    f = features.detach().requires_grad_(True)
    cls_loss = F.cross_entropy(method.model.head(f)[:n], source.y)
    (g_cls,) = torch.autograd.grad(cls_loss, f)
    f = features.detach().requires_grad_(True)
    d = method.discriminator(f)  # no reversal
    domain_loss, _ = domain_adversarial_loss(d[:n], d[n:])
    disc_params = list(method.discriminator.parameters())
    g_dom, *g_disc = torch.autograd.grad(domain_loss, [f, *disc_params])

    assert g_dom.abs().sum() > 0 and lam > 0
    torch.testing.assert_close(features.grad, g_cls - lam * g_dom, rtol=1e-5, atol=1e-7)
    for p, g in zip(disc_params, g_disc, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def _tiny_cdan(entropy: bool) -> Method:
    """CDAN on a linear 4 -> 3 feature map and a 3 -> 2 head, its weights set by hand so
    that the predictions range from nearly certain to nearly uniform."""
    torch.manual_seed(0)
    model = Classifier(torch.nn.Linear(4, 3), 3, 2)
    with torch.no_grad():
        model.features.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))
        model.features.bias.zero_()
        model.head.weight.copy_(torch.tensor([[2.0, -1.0, 0.5], [-1.0, 2.0, -0.5]]))
        model.head.bias.copy_(torch.tensor([0.1, -0.1]))
    method = METHODS["cdan"](
        model, METHODS["cdan"].Config(entropy=entropy, trade_off=0.7, hidden_dim=8), total_steps=10
    )
    with torch.no_grad():  # a discriminator whose outputs differ clearly between samples
        for layer in method.discriminator:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(4.0)
    return method.eval()  # batch norm on running statistics: the discriminator is a function


def _cdan_batch() -> list[DomainBatch]:
    xs = torch.tensor([[3.0, 0, 0, 0], [0, 0.1, 0, 0], [0, 4, 0, 0], [1, 1, 0.5, 0.5]])
    xt = torch.tensor([[0.2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 1], [5, -1, 0, 0]])
    return [
        DomainBatch(x=xs, y=torch.tensor([0, 1, 1, 0]), domain="s"),
        DomainBatch(x=xt, y=None, domain="t"),
    ]


def test_cdan_and_cdan_e_losses_by_hand():
    """CDAN's discriminator reads the outer products p (x) f; CDAN+E weights each sample's
    BCE by w = 1 + exp(-H(p)) normalised within each domain, as the authors' code does:
    weight = w_s / sum(w_s) + w_t / sum(w_t), loss = sum(weight * bce) / sum(weight)
    (Transfer-Learning-Library instead normalises over the joint batch). Numpy by hand."""
    batch = _cdan_batch()
    for entropy in (False, True):
        method = _tiny_cdan(entropy)
        out = method.training_step(batch, MID_STEP)
        w1 = method.model.features.weight.detach().double().numpy()
        w2 = method.model.head.weight.detach().double().numpy()
        b2 = method.model.head.bias.detach().double().numpy()
        x = torch.cat([b.x for b in batch]).double().numpy()
        f = x @ w1.T
        z = f @ w2.T + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        h = np.stack([np.outer(p[i], f[i]).ravel() for i in range(8)])  # row c*3+k: p_c f_k
        with torch.no_grad():
            d = method.discriminator(torch.tensor(h, dtype=torch.float32)).double().numpy()
        bce = np.concatenate([np.log1p(np.exp(-d[:4])), np.log1p(np.exp(d[4:]))])
        y = np.array([0, 1, 1, 0])
        cls = np.mean(np.log(np.exp(z[:4]).sum(1)) - z[np.arange(4), y])
        if entropy:
            w = 1.0 + np.exp(np.sum(p * np.log(p + 1e-5), axis=1))  # 1 + exp(-H)
            weight = np.concatenate([w[:4] / w[:4].sum(), w[4:] / w[4:].sum()])
            transfer = np.sum(weight * bce) / np.sum(weight)
            # the entropy weights matter here, and the per-domain normalisation too
            joint = np.sum(w * bce) / np.sum(w)  # TLLib's w / sum(w) * N, then the mean
            assert abs(transfer - bce.mean()) > 1e-3 and abs(transfer - joint) > 1e-4
        else:
            transfer = 0.5 * (bce[:4].mean() + bce[4:].mean())
        assert out["cls_loss"].item() == pytest.approx(cls, rel=1e-5)
        assert out["transfer_loss"].item() == pytest.approx(transfer, rel=1e-5), entropy
        assert out["loss"].item() == pytest.approx(cls + 0.7 * transfer, rel=1e-5)


def test_cdan_randomized_map_is_seeded_and_checkpointed():
    exact = make_method("cdan")  # 256 features x 10 classes = 2560 <= 4096: exact map
    assert not exact.randomized and exact.discriminator[0].in_features == 2560
    a = make_method("cdan", seed=0, multilinear_limit=1000, randomized_dim=64)
    b = make_method("cdan", seed=0, multilinear_limit=1000, randomized_dim=64)
    c = make_method("cdan", seed=1, multilinear_limit=1000, randomized_dim=64)
    assert a.randomized and a.discriminator[0].in_features == 64
    assert a.random_f.shape == (256, 64) and a.random_g.shape == (10, 64)
    assert torch.equal(a.random_f, b.random_f) and not torch.equal(a.random_f, c.random_f)
    c.load_state_dict(a.state_dict())  # the buffers travel with the checkpoint
    assert torch.equal(c.random_g, a.random_g)
    out = run_step(a, make_batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and a.model.features[0][0].weight.grad is not None


# --------------------------------------------------------------------------- statistics
def test_coral_loss_matches_hand_computation():
    xs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # C_s = [[1, .5], [.5, 1]]
    xt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # C_t = [[1, 0], [0, 0]]
    # ||C_s - C_t||_F^2 = .5^2 + .5^2 + 1^2 = 1.5; d = 2: 1.5 / (4 * 4)
    assert coral_loss(xs, xt).item() == pytest.approx(1.5 / 16)
    x = torch.randn(16, 5)
    assert coral_loss(x, x).item() == 0.0
    assert coral_loss(x, x + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # means do not count
    assert coral_loss(x, 2 * x).item() > 0


@pytest.mark.parametrize("layer", ["logits", "features"])
def test_deep_coral_aligns_the_layer_it_names(layer):
    """`layer: logits` (the default, the paper's fc8) aligns the class logits' covariances;
    `layer: features` the backbone output's. The logged transfer loss is the one of the
    named activations, and not the other's."""
    method = make_method("deep_coral", layer=layer)
    batch = make_batch()
    out = run_step(method, batch)
    torch.manual_seed(123)  # the same dropout masks as run_step
    features = method.model.embed(torch.cat([batch[0].x, batch[1].x]))
    logits = method.model.head(features)
    n = batch[0].x.shape[0]
    by_layer = {
        "logits": coral_loss(logits[:n], logits[n:]),
        "features": coral_loss(features[:n], features[n:]),
    }
    assert logits.shape[1] == 10 and features.shape[1] != 10
    assert out["transfer_loss"].item() == pytest.approx(by_layer[layer].item(), rel=1e-5)
    other = by_layer["features" if layer == "logits" else "logits"].item()
    assert out["transfer_loss"].item() != pytest.approx(other, rel=1e-2)


def test_mmd_zero_for_identical_positive_for_shifted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    same = torch.randn(32, 6, generator=g)
    assert mk_mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    same_distribution = mk_mmd(x, same).item()
    shifted = mk_mmd(x, same + 2.0).item()
    assert abs(same_distribution) < 0.1
    assert shifted > 0.5 and shifted > 10 * abs(same_distribution)


def test_class_confusion_extremes():
    confident = 100.0 * torch.eye(4)  # every sample certain of a different class
    assert class_confusion_loss(confident, 2.5).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(6, 4)  # every class pair equally confused: (C - 1) / C
    assert class_confusion_loss(uniform, 2.5).item() == pytest.approx(3 / 4)


# --------------------------------------------------------------------------- mixed precision
def test_statistics_stay_float32_under_autocast():
    """The engine runs training_step under autocast: the statistics must not drop to bf16."""
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g) + 0.5
    logits = torch.randn(16, 5, generator=g)
    exact = (coral_loss(xs, xt), mk_mmd(xs, xt), class_confusion_loss(logits, 2.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (coral_loss(xs, xt), mk_mmd(xs, xt), class_confusion_loss(logits, 2.5))
    for a, b in zip(exact, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", DA_METHODS)
def test_step_under_bf16_autocast(name):
    method = make_method(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_step(method, make_batch())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in method.parameters())
