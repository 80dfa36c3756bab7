"""Transforms: the config schema (transforms.train / transforms.eval) and the batched ops."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torchvision.transforms.v2 import functional as TF

from xdt_cli.config import NORMALIZE_PRESETS, DomainConfig, TransformsConfig, error_lines
from xdt_cli.data.transforms import (
    Pipeline,
    _hsv_to_rgb,
    _rgb_to_hsv,
    build_pipeline,
    build_pipelines,
    to_float,
)
from xdt_cli.errors import ConfigError

torch.set_num_threads(1)


def pipeline(*steps) -> Pipeline:
    return build_pipeline(TransformsConfig.model_validate({"train": list(steps)}).train)


def problems(section: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        DomainConfig.model_validate({"dataset": "digits", **section})
    return error_lines(info.value, DomainConfig)


# --------------------------------------------------------------------------- schema
def test_shorthands_bare_names_and_full_mappings_mean_the_same() -> None:
    short = TransformsConfig.model_validate(
        {
            "train": [
                {"resize": 32},
                {"random_crop": 32},
                "horizontal_flip",
                {"grayscale": 3},
                {"normalize": "imagenet"},
            ]
        }
    )
    full = TransformsConfig.model_validate(
        {
            "train": [
                {"resize": {"size": 32}},
                {"random_crop": {"size": 32, "padding": 0}},
                {"horizontal_flip": {"p": 0.5}},
                {"grayscale": {"channels": 3}},
                {"normalize": {"preset": "imagenet"}},
            ]
        }
    )
    assert short == full
    assert [s.op[0] for s in short.train] == [
        "resize",
        "random_crop",
        "horizontal_flip",
        "grayscale",
        "normalize",
    ]


def test_the_dumped_section_reads_back_the_same_and_names_only_the_transform() -> None:
    cfg = DomainConfig.model_validate(
        {
            "dataset": "stl10",
            "transforms": {
                "train": [{"resize": [32, 32]}, {"random_crop": {"size": 32, "padding": 4}}],
                "eval": [{"resize": [32, 32]}, {"normalize": {"mean": [0.5], "std": [0.25]}}],
            },
        }
    )
    dumped = cfg.model_dump(mode="json")
    assert dumped["transforms"]["train"][0] == {"resize": {"size": [32, 32]}}
    assert dumped["transforms"]["eval"][1] == {"normalize": {"mean": [0.5], "std": [0.25]}}
    assert DomainConfig.model_validate(dumped) == cfg


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"transforms": {"train": [{"rotate": 30}]}}, "transforms.train.0: unknown transform"),
        ({"transforms": {"train": [{"resize": 32, "flip": 1}]}}, "transforms.train.0: each"),
        ({"transforms": {"train": [{"resize": "big"}]}}, "transforms.train.0.resize.size"),
        ({"transforms": {"train": [{"resize": [32, 0]}]}}, "transforms.train.0.resize.size"),
        ({"transforms": {"train": [{"random_crop": {"size": 3, "pad": 4}}]}}, "random_crop.pad"),
        ({"transforms": {"train": [{"random_crop": {"size": 3, "padding": -1}}]}}, "padding"),
        ({"transforms": {"train": [{"horizontal_flip": 2}]}}, "horizontal_flip.p"),
        ({"transforms": {"train": [{"color_jitter": {"hue": 0.7}}]}}, "color_jitter.hue"),
        ({"transforms": {"train": [{"color_jitter": {"contrast": [2, 1]}}]}}, "jitter.contrast"),
        ({"transforms": {"train": [{"color_jitter": {"brightness": -1}}]}}, "jitter.brightness"),
        ({"transforms": {"train": [{"color_jitter": {"hue": [-0.6, 0]}}]}}, "color_jitter.hue"),
        ({"transforms": {"train": [{"random_affine": {"degrees": 200}}]}}, "affine.degrees"),
        ({"transforms": {"train": [{"random_affine": {"translate": [2, 0]}}]}}, "translate"),
        ({"transforms": {"train": [{"random_affine": {"scale": [0, 1]}}]}}, "scale"),
        ({"transforms": {"train": [{"random_affine": {"shear": 90}}]}}, "affine.shear"),
        ({"transforms": {"eval": [{"random_affine": {"degrees": 5}}]}}, "random_affine is random"),
        ({"transforms": {"train": [{"levels": {"low": 0.7, "high": 0.3}}]}}, "expected low < high"),
        ({"transforms": {"train": [{"levels": {"high": 1.5}}]}}, "levels.high"),
        ({"transforms": {"train": [{"levels": {"low": -0.1}}]}}, "levels.low"),
        ({"transforms": {"train": [{"levels": {"black": 0.2}}]}}, "levels.black"),
        ({"transforms": {"train": [{"normalize": "imagenett"}]}}, "normalize.preset"),
        ({"transforms": {"train": ["normalize"]}}, "give a preset"),
        ({"transforms": {"train": [{"normalize": {"mean": [0.5], "std": [0]}}]}}, "std"),
        (
            {"transforms": {"train": [{"random_resized_crop": {"size": 8, "scale": [0.9, 0.1]}}]}},
            "scale",
        ),
        ({"transforms": {"eval": [{"random_crop": 28}]}}, "random_crop is random"),
        ({"transforms": {"eval": ["horizontal_flip"]}}, "horizontal_flip is random"),
        ({"transforms": {"valid": []}}, "transforms.valid: unknown key"),
    ],
)
def test_a_bad_transform_is_one_line_naming_its_key(section: dict, needle: str) -> None:
    lines = problems(section)
    assert len(lines) == 1 and needle in lines[0], lines


# --------------------------------------------------------------------------- ops
def test_an_empty_pipeline_passes_float_images_through_untouched() -> None:
    x = torch.rand(4, 1, 28, 28)
    assert Pipeline()(x) is x
    b = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(Pipeline()(b), b.float() / 255)
    assert to_float(b).dtype == torch.float32


def test_resize_to_a_size_or_the_shorter_side() -> None:
    x = torch.rand(2, 3, 96, 96)
    assert pipeline({"resize": [32, 32]})(x).shape == (2, 3, 32, 32)
    assert pipeline({"resize": 32})(torch.rand(1, 3, 40, 80)).shape == (1, 3, 32, 64)
    # STL-10's 96x96 becomes CIFAR's 32x32, and the shape is known before any data is read
    assert pipeline({"resize": [32, 32]}).output_shape((3, 96, 96)) == (3, 32, 32)


def test_geometric_ops_keep_uint8_and_the_result_is_float_in_0_1() -> None:
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    ops = pipeline({"random_crop": {"size": 32, "padding": 4}}, "horizontal_flip").ops
    y = x
    for op in ops:
        y = op(y)
        assert y.dtype == torch.uint8
    out = pipeline({"random_crop": 32}, {"center_crop": 16})(x)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1


def test_a_padded_random_crop_moves_each_image_within_its_padding() -> None:
    torch.manual_seed(0)
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) / 128
    out = pipeline({"random_crop": {"size": 8, "padding": 2}})(x.repeat(16, 1, 1, 1))
    padded = torch.nn.functional.pad(x.repeat(16, 1, 1, 1), [2] * 4)
    moved = 0
    for i in range(len(out)):
        # every output is one 8x8 window of its own padded image
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # [1, 5, 5, 8, 8]
        hits = (windows == out[i].view(1, 1, 1, 8, 8)).flatten(3).all(-1)
        assert hits.any()
        moved += int(not torch.equal(out[i], x[i % 2]))
    assert moved > 8  # a 32-pixel crop of a 32-pixel image without padding would do nothing
    same = pipeline({"random_crop": 8})(x)  # the brief's crop: the identity
    assert torch.equal(same, x)


def test_reflect_padding_works_on_byte_images() -> None:
    x = torch.randint(0, 256, (3, 3, 10, 10), dtype=torch.uint8)
    out = pipeline({"random_crop": {"size": 10, "padding": 3, "padding_mode": "reflect"}})(x)
    assert out.shape == (3, 3, 10, 10) and out.dtype == torch.float32


def test_flip_probability_one_and_zero() -> None:
    x = torch.rand(5, 3, 4, 6)
    assert torch.equal(pipeline({"horizontal_flip": 1.0})(x), x.flip(-1))
    assert torch.equal(pipeline({"horizontal_flip": 0.0})(x), x)
    torch.manual_seed(1)
    half = pipeline("horizontal_flip")(x.repeat(20, 1, 1, 1))
    flipped = sum(torch.equal(half[i], x[i % 5].flip(-1)) for i in range(100))
    assert 30 < flipped < 70


def test_random_ops_follow_the_global_rng_exactly() -> None:
    p = pipeline(
        {"random_resized_crop": {"size": 16}},
        {"random_crop": {"size": 16, "padding": 2}},
        "horizontal_flip",
        {"random_affine": {"degrees": 10, "translate": [0.1, 0.1], "scale": [0.9, 1.1]}},
        {"color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}},
    )
    x = torch.randint(0, 256, (8, 3, 24, 20), dtype=torch.uint8)
    torch.manual_seed(7)
    a = p(x)
    torch.manual_seed(7)
    b = p(x)
    c = p(x)
    assert a.shape == (8, 3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_random_resized_crop_boxes_stay_inside_the_image_and_respect_the_area() -> None:
    op = pipeline({"random_resized_crop": {"size": 8, "scale": [0.25, 0.5]}}).ops[0]
    torch.manual_seed(0)
    boxes = op.boxes(200, 40, 60)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 40).all() and (left + w <= 60).all()
    share = (h * w).float() / (40 * 60)
    assert share.min() > 0.2 and share.max() < 0.55


def test_color_jitter_with_no_spread_is_the_identity_and_hue_matches_torchvision() -> None:
    x = torch.rand(3, 3, 6, 6)
    assert torch.allclose(pipeline({"color_jitter": {}})(x), x)
    hsv = _rgb_to_hsv(x)
    assert torch.allclose(_hsv_to_rgb(hsv), x, atol=1e-5)
    h, s, v = hsv.unbind(-3)
    shifted = _hsv_to_rgb(torch.stack([(h + 0.2) % 1.0, s, v], -3))
    assert torch.allclose(shifted, TF.adjust_hue(x, 0.2), atol=1e-5)


def test_color_jitter_ranges_are_torchvision_s_low_high_form() -> None:
    x = torch.rand(4, 1, 6, 6) * 0.5
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    doubled = pipeline({"color_jitter": {"contrast": [2.0, 2.0]}})(x)
    assert torch.allclose(doubled, (2 * x - mean).clamp(0, 1))
    assert torch.allclose(pipeline({"color_jitter": {"brightness": [1.5, 1.5]}})(x), 1.5 * x)
    # a spread s is the range [1 - s, 1 + s]: the same draws, the same images
    torch.manual_seed(3)
    spread = pipeline({"color_jitter": {"brightness": 0.3, "contrast": 0.5}})(x)
    torch.manual_seed(3)
    ranged = pipeline({"color_jitter": {"brightness": [0.7, 1.3], "contrast": [0.5, 1.5]}})(x)
    assert torch.equal(spread, ranged)


def test_levels_maps_low_to_black_and_high_to_white_without_drawing() -> None:
    x = torch.tensor([0.0, 0.2, 0.3, 0.5, 0.6, 0.7, 1.0]).view(1, 1, 1, 7)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.75, 1.0, 1.0]).view(1, 1, 1, 7)
    levels = pipeline({"levels": {"low": 0.3, "high": 0.7}})
    assert not levels.random
    state = torch.get_rng_state()
    assert torch.allclose(levels(x), expected)
    assert torch.equal(torch.get_rng_state(), state)  # deterministic: allowed in eval lists
    # bytes become floats first; the defaults (0, 1) leave an image as it is
    b = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(pipeline({"levels": {"low": 0.2}})(b), torch.tensor([0.0, 0.0, 1.0]))
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(pipeline("levels")(x), x)
    cfg = TransformsConfig.model_validate({"eval": [{"levels": {"low": 0.3, "high": 0.7}}]})
    assert cfg.eval[0].op == ("levels", cfg.eval[0].levels)


@pytest.mark.parametrize(
    "args",
    [
        {"degrees": 30},
        {"shear": 20},
        {"scale": [1.3, 1.3]},
        {"translate": [2 / 13, 3 / 11]},
        {"degrees": 30, "shear": 20, "scale": [0.8, 0.8], "translate": [2 / 13, 3 / 11]},
    ],
)
def test_random_affine_at_its_largest_draw_equals_torchvision_s_affine(
    args: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every draw at the top of its range: the map must be TF.affine's with those values."""
    import xdt_cli.data.transforms as transforms

    monkeypatch.setattr(transforms, "_uniform", lambda n, low, high: torch.full((n,), high))
    x = torch.rand(2, 3, 11, 13)
    out = pipeline({"random_affine": args})(x)
    scale = args.get("scale", [1.0, 1.0])[1]
    dx, dy = args.get("translate", [0.0, 0.0])
    expected = TF.affine(
        x,
        angle=float(args.get("degrees", 0.0)),
        translate=[round(dx * 13), round(dy * 11)],
        scale=scale,
        shear=[float(args.get("shear", 0.0)), 0.0],
        interpolation=TF.InterpolationMode.BILINEAR,
    )
    assert torch.allclose(out, expected, atol=1e-5)


def test_random_affine_draws_per_image_and_the_identity_leaves_images_alone() -> None:
    x = torch.rand(1, 1, 12, 12).expand(6, 1, 12, 12)
    assert torch.allclose(pipeline("random_affine")(x), x, atol=1e-5)
    torch.manual_seed(0)
    out = pipeline({"random_affine": {"degrees": 20, "translate": [0.1, 0.1]}})(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert len({tuple(img.flatten().tolist()) for img in out}) == 6  # six different draws
    assert out.min() >= 0 and out.max() <= 1


def test_grayscale_and_normalize_presets() -> None:
    rgb = torch.rand(2, 3, 5, 5)
    grey = pipeline({"grayscale": 1})(rgb)
    assert grey.shape == (2, 1, 5, 5)
    assert torch.allclose(grey, TF.rgb_to_grayscale(rgb), atol=1e-6)
    assert pipeline({"grayscale": 3})(torch.rand(2, 1, 5, 5)).shape == (2, 3, 5, 5)
    mean, std = NORMALIZE_PRESETS["imagenet"]
    out = pipeline({"normalize": "imagenet"})(rgb)
    expected = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected)
    half = pipeline({"normalize": "half"})(torch.zeros(1, 1, 2, 2))
    assert torch.equal(half, -torch.ones(1, 1, 2, 2))


def test_one_image_at_a_time_equals_the_batch_for_deterministic_ops() -> None:
    """Disk sets run the pipeline per image in workers: the same ops, the same result."""
    p = pipeline({"resize": [20, 24]}, {"center_crop": 16}, {"normalize": "cifar10"})
    x = torch.randint(0, 256, (4, 3, 37, 41), dtype=torch.uint8)
    one_by_one = torch.cat([p(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(p(x), one_by_one, atol=1e-6)


def test_pipelines_check_shapes_against_the_data() -> None:
    def build(transforms: dict, shape=(1, 28, 28)):
        return build_pipelines(TransformsConfig.model_validate(transforms), shape, "data.target")

    train, eval_, shape = build({"train": [{"resize": [32, 32]}], "eval": [{"resize": 32}]})
    assert shape == (1, 32, 32) and not eval_.random and not train.random
    with pytest.raises(ConfigError) as info:
        build({"train": [{"resize": 32}]})
    assert info.value.lines == [
        "data.target.transforms: train gives images of shape 1x32x32 but eval gives 1x28x28; "
        "one model reads both"
    ]
    with pytest.raises(ConfigError) as info:
        build({"eval": [{"normalize": "imagenet"}], "train": [{"normalize": "imagenet"}]})
    assert info.value.lines[0].startswith("data.target.transforms.train: cannot transform")
    assert "3 mean/std values for images with 1 channels" in info.value.lines[0]
    with pytest.raises(ConfigError) as info:
        build({"train": [{"random_crop": 40}], "eval": [{"center_crop": 40}]})
    assert "larger than the (padded) image 28x28" in info.value.lines[0]


def test_levels_gives_the_embedded_digits_mnist_s_stroke_contrast() -> None:
    """The figures in docs/DATA.md: the share of ink pixels (> 0.1) above 0.9."""
    from xdt_cli.data.embedded import load_digits, load_mnist5k

    def saturated(x: torch.Tensor) -> float:
        ink = x[x > 0.1]
        return (ink > 0.9).float().mean().item()

    layout = pipeline({"resize": 20}, {"center_crop": 28})
    digits = layout(load_digits("digits")[0])
    leveled = pipeline({"levels": {"low": 0.35, "high": 0.75}})(digits)
    assert saturated(digits) == pytest.approx(0.07, abs=0.005)
    assert saturated(load_mnist5k("mnist5k")[0]) == pytest.approx(0.50, abs=0.005)
    assert saturated(leveled) == pytest.approx(0.44, abs=0.005)
