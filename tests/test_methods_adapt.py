"""Source-only, AdaBN and self-training (transfer) and L2-SP, BSS and DELTA (finetune) on tiny
hand-built batches, plus the batched augmentations self-training uses: each loss is finite
and trains what it should, each penalty matches a hand computation, frozen weights stay out,
and no transfer method reads a target label."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from xdt_cli import augment
from xdt_cli.data.stream import DomainBatch
from xdt_cli.errors import ConfigError
from xdt_cli.methods import METHODS
from xdt_cli.methods.adabn import frozen_bn_statistics
from xdt_cli.methods.base import Method, MethodConfig
from xdt_cli.methods.delta import attention_from_loss_increase
from xdt_cli.models import create_model

TRANSFER = ["source_only", "adabn", "self_training"]
FINETUNE = ["l2sp", "bss", "delta"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_method(name: str, seed: int = 0, head_from_source: bool | None = None, **config):
    torch.manual_seed(seed)
    model = create_model("cnn", (1, 28, 28), 10)
    if head_from_source is not None:
        model.head_from_source = head_from_source  # what `init` records for a finetune run
    cls = METHODS[name]
    method = cls(model, cls.Config(**config), total_steps=100)
    return method.train()


def batch_for(name: str, target_y: torch.Tensor | None = None, n: int = 8):
    g = torch.Generator().manual_seed(1)
    labelled = DomainBatch(
        x=torch.rand(n, 1, 28, 28, generator=g),
        y=torch.randint(0, 10, (n,), generator=g),
        domain="digits",
    )
    if "finetune" in METHODS[name].regimes:
        return [labelled]
    # a shifted target domain
    target_x = 0.5 * torch.rand(n, 1, 28, 28, generator=g) + 0.3
    target = DomainBatch(x=target_x, y=target_y, domain="mnist5k")
    return [labelled, target]


def run_step(method: Method, batch, step: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # the same dropout masks and augmentations in every call
    return method.training_step(batch, step)


def trainable(method: Method) -> dict[str, torch.Tensor]:
    return {n: p for n, p in method.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", TRANSFER + FINETUNE)
def test_registered_with_paper_defaults(name):
    cls = METHODS[name]
    assert cls.name == name
    assert cls.regimes == frozenset({"transfer" if name in TRANSFER else "finetune"})
    assert cls.paper and cls.__doc__
    assert issubclass(cls.Config, MethodConfig)
    for field, info in cls.Config.model_fields.items():
        assert info.description, f"{name}.{field} has no description"


def test_paper_defaults():
    assert METHODS["self_training"].Config().threshold == 0.95
    assert METHODS["self_training"].Config().unlabelled_weight == 1.0
    assert METHODS["self_training"].Config().flip is False
    l2sp = METHODS["l2sp"].Config()
    assert (l2sp.alpha, l2sp.beta) == (0.1, 0.01)
    bss = METHODS["bss"].Config()
    assert (bss.eta, bss.k) == (0.001, 1)
    delta = METHODS["delta"].Config()
    assert (delta.alpha, delta.beta, delta.attention) == (0.01, 0.01, True)


def test_erm_serves_finetune_and_source_only_reuses_it():
    assert {"train-source", "finetune", "generalize"} <= METHODS["erm"].regimes
    assert issubclass(METHODS["source_only"], METHODS["erm"])
    assert METHODS["source_only"].Config is METHODS["erm"].Config


@pytest.mark.parametrize("name", TRANSFER + FINETUNE)
def test_loss_is_finite_and_reaches_every_trainable_parameter(name):
    method = make_method(name)
    out = run_step(method, batch_for(name))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    for key, value in out.items():
        assert value.ndim == 0 and torch.isfinite(value), key
    out["loss"].backward()
    for pname, p in trainable(method).items():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", TRANSFER)
def test_no_target_label_is_read(name):
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(7))
    results = []
    for target_y in (None, labels):
        method = make_method(name)
        out = run_step(method, batch_for(name, target_y))
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in trainable(method).items()}))
    (out_a, grads_a), (out_b, grads_b) = results
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    for pname in grads_a:
        assert torch.equal(grads_a[pname], grads_b[pname]), pname


# --------------------------------------------------------------------------- source only
def test_source_only_is_the_source_cross_entropy():
    method = make_method("source_only")
    source, target = batch_for("source_only")
    out = run_step(method, [source, target])
    torch.manual_seed(123)
    expected = torch.nn.functional.cross_entropy(method.model(source.x), source.y)
    assert torch.allclose(out["loss"], expected)


# --------------------------------------------------------------------------- AdaBN
def _bn_buffers(method: Method) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{b}": getattr(module, b).clone()
        for name, module in method.model.named_modules()
        if isinstance(module, _BatchNorm)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }


def test_adabn_target_forward_moves_only_batch_norm_statistics():
    method = make_method("adabn")
    _, target = batch_for("adabn")
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.adapt_statistics(target.x)
    after = method.state_dict()
    bn_keys = {f"model.{k}" for k in _bn_buffers(method)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == bn_keys  # every running statistic moved, and nothing else
    for p in method.parameters():
        assert p.grad is None


def test_adabn_source_forward_leaves_running_statistics_unchanged():
    method = make_method("adabn")
    source, target = batch_for("adabn")
    before = _bn_buffers(method)
    with frozen_bn_statistics(method.model):
        method.model(source.x)
    for key, value in _bn_buffers(method).items():
        assert torch.equal(value, before[key]), key

    # a whole step leaves exactly the statistics of the target forward alone
    reference = make_method("adabn")
    out = run_step(method, [source, target])
    with torch.no_grad():
        reference.model.features(target.x)
    expected = _bn_buffers(reference)
    for key, value in _bn_buffers(method).items():
        assert torch.equal(value, expected[key]), key
    for module in method.model.modules():
        if isinstance(module, _BatchNorm):
            assert module.track_running_stats  # restored after the source forward
    assert out["loss"].requires_grad


def test_adabn_loss_is_source_only():
    adabn, source_only = make_method("adabn"), make_method("source_only")
    batch = batch_for("adabn")
    assert torch.equal(run_step(adabn, batch)["loss"], run_step(source_only, batch)["loss"])


# --------------------------------------------------------------------------- self-training
def test_self_training_with_threshold_one_is_just_source_cross_entropy():
    method = make_method("self_training", threshold=1.0)
    out = run_step(method, batch_for("self_training"))
    assert out["mask_rate"] == 0
    assert out["unlabelled_loss"] == 0
    assert torch.equal(out["loss"], out["cls_loss"])


def test_self_training_pseudo_labels_train_the_strong_view():
    method = make_method("self_training", threshold=1e-6)  # every prediction passes
    out = run_step(method, batch_for("self_training"))
    assert out["mask_rate"] == 1
    assert out["unlabelled_loss"] > 0
    assert torch.allclose(out["loss"], out["cls_loss"] + out["unlabelled_loss"])


# --------------------------------------------------------------------------- L2-SP
def test_l2sp_is_zero_at_the_start():
    method = make_method("l2sp")
    out = run_step(method, batch_for("l2sp"))
    assert out["sp_loss"] == 0 and out["head_loss"] == 0
    assert torch.equal(out["loss"], out["cls_loss"])


def test_l2sp_matches_a_hand_computation():
    method = make_method("l2sp")
    with torch.no_grad():
        method.model.features[0][0].weight[0, 0, 0, 0] += 0.5
        method.model.head.weight[3, 7] -= 0.25  # the kept head is anchored too
        method.model.features[0][1].bias += 1.0  # a batch-norm shift: not a kernel
    sp, head = method.penalties()
    assert sp.item() == pytest.approx(0.5 * (0.5**2 + 0.25**2))
    assert head.item() == 0
    out = run_step(method, batch_for("l2sp"))
    assert (out["loss"] - out["cls_loss"]).item() == pytest.approx(0.1 * sp.item(), rel=1e-5)

    everything = make_method("l2sp", weights_only=False)
    with torch.no_grad():
        everything.model.features[0][1].bias += 1.0
    assert everything.penalties()[0].item() == pytest.approx(0.5 * 32)


def test_l2sp_decays_a_new_head_toward_zero():
    method = make_method("l2sp", head_from_source=False)
    sp, head = method.penalties()
    assert sp.item() == 0
    assert head.item() == pytest.approx(0.5 * method.model.head.weight.pow(2).sum().item())


def test_l2sp_leaves_frozen_parameters_out():
    method = make_method("l2sp")
    frozen = method.model.features[0][0].weight
    frozen.requires_grad_(False)
    with torch.no_grad():
        frozen.add_(1.0)  # far from the starting point, but it does not train
    sp, _ = method.penalties()
    assert sp.item() == 0
    out = run_step(method, batch_for("l2sp"))
    out["loss"].backward()
    assert frozen.grad is None
    assert method.model.features[2][0].weight.grad is not None


def test_l2sp_keeps_its_reference_through_a_resume():
    method = make_method("l2sp", head_from_source=False)
    with torch.no_grad():
        method.model.features[0][0].weight.add_(0.1)  # training moved the weights
    state = method.state_dict()
    resumed = make_method("l2sp", seed=5)  # rebuilt from scratch: random weights, no mark
    resumed.load_state_dict(state)
    assert resumed.head_kept is False
    for name, a, b in zip(("sp", "head"), method.penalties(), resumed.penalties(), strict=True):
        assert a.item() > 0 and torch.equal(a, b), name


# --------------------------------------------------------------------------- BSS
@pytest.mark.parametrize("k", [1, 2])
def test_bss_penalty_is_the_smallest_squared_singular_values(k):
    method = make_method("bss", k=k)
    (target,) = batch_for("bss")
    out = run_step(method, [target])
    torch.manual_seed(123)  # the same dropout mask as inside the step
    with torch.no_grad():
        features = method.model.features(target.x).double().numpy()
    singular = np.linalg.svd(features, compute_uv=False)
    expected = float(np.sum(np.sort(singular)[:k] ** 2))
    assert out["bss_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert (out["loss"] - out["cls_loss"]).item() == pytest.approx(0.001 * expected, rel=1e-3)


# --------------------------------------------------------------------------- DELTA
@pytest.mark.parametrize("attention", [True, False])
def test_delta_is_zero_before_any_update_and_never_trains_its_source_copy(attention):
    method = make_method("delta", attention=attention)
    assert all(not p.requires_grad for p in method.source.parameters())
    source_ids = {id(p) for p in method.source.parameters()}
    assert not source_ids & {id(p) for p in trainable(method).values()}

    out = run_step(method, batch_for("delta"))
    assert out["reg_loss"] == 0
    assert torch.equal(out["loss"], out["cls_loss"])  # kept head: no head penalty either
    out["loss"].backward()
    assert all(p.grad is None for p in method.source.parameters())

    # one optimizer step moves the model, not the copy; now the feature maps differ
    snapshot = copy.deepcopy(method.source.state_dict())
    torch.optim.SGD(trainable(method).values(), lr=0.5).step()
    for key, value in method.source.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert run_step(method, batch_for("delta"), step=1)["reg_loss"] > 0


def test_delta_attention_is_a_distribution_per_layer_and_survives_a_resume():
    method = make_method("delta", head_from_source=False)  # new head: fitted for the estimate
    out = run_step(method, batch_for("delta"))
    assert out["head_loss"] > 0
    assert method.layers == ["0", "2", "4"]  # cnn: one conv block per resolution
    channels = {"0": 32, "2": 64, "4": 64}
    for layer, weights in method.attention.items():
        assert weights.shape == (channels[layer],)
        assert torch.isfinite(weights).all() and (weights > 0).all()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)

    resumed = make_method("delta", seed=5)
    resumed.load_state_dict(method.state_dict())
    assert resumed.head_kept is False
    assert set(resumed.attention) == set(method.attention)
    for layer in method.attention:
        assert torch.equal(resumed.attention[layer], method.attention[layer])


def test_delta_attention_weights():
    uniform = attention_from_loss_increase(torch.zeros(4))
    assert torch.equal(uniform, torch.full((4,), 0.25))
    weights = attention_from_loss_increase(torch.tensor([0.0, 0.1, 2.0]))
    assert weights.argmax() == 2 and weights.sum().item() == pytest.approx(1.0)


def test_delta_rejects_an_unknown_layer():
    with pytest.raises(ConfigError, match="method.layers"):
        make_method("delta", layers=["9"])
    method = make_method("delta", layers=["2"], attention=False)
    run_step(method, batch_for("delta"))
    assert method.layers == ["2"]


# --------------------------------------------------------------------------- augmentations
def _images(n: int = 16) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 8:20, 10:18] = torch.rand(n, 1, 12, 8, generator=torch.Generator().manual_seed(3))
    return x


@pytest.mark.parametrize(
    "fn",
    [augment.weak, lambda x: augment.weak(x, flip=True), augment.strong, augment.cutout],
    ids=["weak", "weak_flip", "strong", "cutout"],
)
def test_augmentations_are_seeded_batched_and_keep_the_format(fn):
    x = _images()
    torch.manual_seed(0)
    a = fn(x)
    torch.manual_seed(0)
    b = fn(x)
    assert torch.equal(a, b)  # only the global torch RNG
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    changed = (a != x).flatten(1).any(1)
    assert changed.float().mean() >= 0.5  # per-sample draws, not one for the whole batch
    assert not torch.equal(a[0], a[1])


def test_weak_is_a_whole_pixel_shift():
    x = _images(32)
    torch.manual_seed(1)
    shifted = augment.weak(x)
    # the content stays away from the border, so a shift of at most 4 pixels keeps all of it
    assert torch.allclose(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    pad = round(0.125 * 28)
    assert pad == 4
    found = 0
    for i in range(len(x)):
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                if torch.equal(torch.roll(x[i], (dy, dx), dims=(1, 2)), shifted[i]):
                    found += 1
                    break
            else:
                continue
            break
    assert found == len(x)


@pytest.mark.parametrize("fn", [augment.weak, augment.strong], ids=["weak", "strong"])
def test_augmentations_take_colour_and_non_square_images(fn):
    x = torch.rand(4, 3, 20, 40, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    out = fn(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
