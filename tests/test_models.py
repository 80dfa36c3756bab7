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
