"""Models: the features/head split of the built-in and torchvision backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xdt_cli.errors import ConfigError
from xdt_cli.models import BUILTIN_BACKBONES, Classifier, create_model

FEATURE_DIM = {"lenet": 84, "cnn": 256, "brief_cnn": 512}
SHAPES = [(1, 28, 28), (3, 32, 32)]


def test_the_builtin_backbones_are_lenet_cnn_and_the_briefs_cnn() -> None:
    assert set(BUILTIN_BACKBONES) == {"lenet", "cnn", "brief_cnn"}


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("backbone", sorted(BUILTIN_BACKBONES))
def test_a_builtin_backbone_maps_images_to_features_to_logits(
    backbone: str, shape: tuple[int, int, int]
) -> None:
    torch.manual_seed(0)
    model = create_model(backbone, shape, 7)
    assert isinstance(model, Classifier)
    assert model.feature_dim == FEATURE_DIM[backbone]
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (model.feature_dim, 7)
    # every lazy layer is materialised, so an optimizer can be built right away
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    # it is handed back in training mode
    assert all(module.training for module in model.modules())

    x = torch.rand(5, *shape)
    logits = model(x)
    assert logits.shape == (5, 7)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    model.eval()
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (5, model.feature_dim)
        assert torch.allclose(model.head(features), model(x))


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_building_leaves_batch_norm_statistics_untouched(shape: tuple[int, int, int]) -> None:
    model = create_model("cnn", shape, 10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3
    for norm in norms:
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert norm.num_batches_tracked.item() == 0
    # the check can fail: one training-mode forward pass does move them
    model(torch.rand(4, *shape))
    assert norms[0].num_batches_tracked.item() == 1
    assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))


@pytest.mark.parametrize("backbone", sorted(BUILTIN_BACKBONES))
def test_the_same_seed_gives_identical_initial_weights(backbone: str) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return create_model(backbone, (1, 28, 28), 10).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another seed: other conv and linear weights (batch norm starts at 1 and 0 whatever the seed)
    drawn = [k for k in a if a[k].dim() > 1]
    assert len(drawn) == {"lenet": 5, "cnn": 5, "brief_cnn": 4}[backbone]
    assert all(not torch.equal(a[k], c[k]) for k in drawn)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["grey", "rgb"])
def test_a_torchvision_resnet18_keeps_its_body_and_its_last_linear_becomes_the_head(
    shape: tuple[int, int, int],
) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", shape, 10)
    assert model.feature_dim == 512
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (512, 10)
    # resnet18's only Linear (fc) was replaced by the identity inside the features
    assert not any(isinstance(m, nn.Linear) for m in model.features.modules())
    assert any(isinstance(m, nn.Identity) for m in model.features.modules())
    model.eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert model.features(x).shape == (2, 512)
        assert model(x).shape == (2, 10)
        if shape[0] == 1:  # grey images are the same image on all three channels
            body = model.features[-1]
            assert torch.allclose(model.features(x), body(x.repeat(1, 3, 1, 1)))


def test_a_torchvision_backbone_refuses_other_channel_counts() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet18", (2, 28, 28), 10)
    assert info.value.lines[0].startswith("model.backbone: 'resnet18'")


def test_an_unknown_backbone_suggests_a_known_one() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("lenett", (1, 28, 28), 10)
    (line,) = info.value.lines
    assert line.startswith("model.backbone: unknown backbone 'lenett' (did you mean 'lenet'?)")


# --------------------------------------------------------------------------- model.bottleneck
def _model_config(**fields):
    from xdt_cli.config import ModelConfig

    return ModelConfig(backbone="lenet", **fields)


def test_a_bottleneck_is_linear_batch_norm_relu_between_features_and_head() -> None:
    torch.manual_seed(0)
    model = create_model("lenet", (1, 28, 28), 10, bottleneck=256)
    linear, norm, relu = model.bottleneck
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (84, 256)
    assert isinstance(norm, nn.BatchNorm1d) and norm.num_features == 256
    assert isinstance(relu, nn.ReLU)
    assert model.feature_dim == 256  # what the head reads and what the methods align
    assert (model.head.in_features, model.head.out_features) == (256, 10)
    model.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        embedded = model.embed(x)
        assert embedded.shape == (3, 256)
        assert torch.equal(embedded, torch.relu(norm(linear(model.features(x)))))
        assert torch.equal(model(x), model.head(embedded))
    added = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("bottleneck")}
    assert added == {
        "bottleneck.0.weight": (256, 84),
        "bottleneck.0.bias": (256,),
        "bottleneck.1.weight": (256,),
        "bottleneck.1.bias": (256,),
        "bottleneck.1.running_mean": (256,),
        "bottleneck.1.running_var": (256,),
        "bottleneck.1.num_batches_tracked": (),
    }


def test_without_a_bottleneck_the_model_and_its_random_draws_are_unchanged() -> None:
    torch.manual_seed(0)
    plain = create_model("lenet", (1, 28, 28), 10)
    assert isinstance(plain.bottleneck, nn.Identity) and plain.feature_dim == 84
    assert all(k.startswith(("features.", "head.")) for k in plain.state_dict())
    # the same weights as a model built the way it was before the option existed
    torch.manual_seed(0)
    features = BUILTIN_BACKBONES["lenet"](1)
    features(torch.zeros(1, 1, 28, 28))
    old = Classifier(features, 84, 10)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in old.state_dict().items())


@pytest.mark.parametrize(
    ("fields", "trained"),
    [
        ({}, {"features", "bottleneck", "head"}),
        ({"preset": "linear_probe"}, {"head"}),
        ({"preset": "last_k_blocks"}, {"bottleneck", "head"}),
        ({"preset": "last_k_blocks", "k_blocks": 2}, {"features.9", "bottleneck", "head"}),
    ],
)
def test_the_bottleneck_is_the_last_block_of_theta_upd(fields: dict, trained: set[str]) -> None:
    from xdt_cli.freezing import plan_freezing

    model = create_model("lenet", (1, 28, 28), 10, bottleneck=256)
    plan = plan_freezing(model, _model_config(bottleneck=256, **fields))
    upd = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in dict(model.named_parameters()) if n.startswith(tuple(trained))}
    assert upd == expected
    neck = sum(p.numel() for n, p in model.named_parameters() if n.startswith("bottleneck"))
    assert neck == 84 * 256 + 256 + 2 * 256
    assert plan.trainable == sum(p.numel() for n, p in model.named_parameters() if n in upd)


def test_weights_without_a_bottleneck_give_a_new_bottleneck_and_a_new_head() -> None:
    from xdt_cli.initialization import _load

    torch.manual_seed(0)
    source = create_model("lenet", (1, 28, 28), 10)
    torch.manual_seed(1)
    model = create_model("lenet", (1, 28, 28), 10, bottleneck=84)  # same head shape: not kept
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    note = _load(model, source.state_dict(), "init.run")
    assert note == "new bottleneck (84 wide), new head (10 -> 10 classes)"
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in source.state_dict().items() if "features" in k)
    assert all(torch.equal(mine[k], fresh[k]) for k in mine if k.startswith(("bottleneck", "head")))
    assert model.head_from_source is False
    # the other way round is refused, naming the option
    with pytest.raises(ConfigError, match="set model.bottleneck"):
        _load(create_model("lenet", (1, 28, 28), 10), model.state_dict(), "init.run")


@pytest.mark.parametrize("arch", ["hps", "mmoe"])
def test_multitask_encoders_end_in_a_bottleneck(arch: str) -> None:
    from xdt_cli.models import MultiTaskModel

    model = MultiTaskModel("lenet", (1, 28, 28), {"a": 10, "b": 1}, arch=arch, bottleneck=32)
    assert model.feature_dim == 32
    x = torch.rand(4, 1, 28, 28)
    rep = model.encode(x)
    assert rep.shape == ((4, 32) if arch == "hps" else (4, 3, 32))
    necks = [neck for _, neck in model.encoders()]
    assert len(necks) == (1 if arch == "hps" else 3)
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for neck in necks for p in neck.parameters())
    assert {t: tuple(y.shape) for t, y in model(x).items()} == {"a": (4, 10), "b": (4, 1)}
