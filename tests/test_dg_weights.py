"""Generalize's loss weights and the disk-set configs end to end.

By default the objective is DomainBed's (Gulrajani & Lopez-Paz 2021): the mean over training
domains of each domain's plain mean loss, whatever the domains' sizes, and batches carry no
weights; `data.domain_weights` and `data.sample_weights` change that only when set. Weights
travel with their samples' indices through image-file streams (with and without DataLoader
workers). PACS-, Office-31- and Office-Home-like trees (their class counts and their domains'
relative sizes, a few tiny images) run the shipped configs and every generalize method.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.data_fixtures import write_image_folder
from xdt_cli.config import DomainConfig
from xdt_cli.data import load_configured_domain, make_stream
from xdt_cli.data.registry import Domain, Split
from xdt_cli.data.stream import DomainBatch
from xdt_cli.errors import ConfigError
from xdt_cli.methods import METHODS
from xdt_cli.methods.erm import ERM, ERMConfig
from xdt_cli.methods.irm import irm_penalty
from xdt_cli.models import create_model
from xdt_cli.regimes import build_experiment, loss_weights
from xdt_cli.resolve import load_config, validate_config
from xdt_cli.runtime import Runtime

torch.set_num_threads(1)
CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DG_METHODS = sorted(n for n, m in METHODS.items() if "generalize" in m.regimes)

# Images per class, in the real sets' proportions (PACS: art_painting 2,048, cartoon 2,344,
# photo 1,670, sketch 3,929 images; Office-31: amazon 2,817, dslr 498, webcam 795;
# Office-Home: Art 2,427, Clipart 4,365, Product 4,439, Real World 4,357). Six is the least
# that leaves every 70/15/15 split non-empty.
PACS = {"art_painting": 7, "cartoon": 8, "photo": 6, "sketch": 14}
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
OFFICE31 = {"amazon": 34, "dslr": 6, "webcam": 10}
OFFICE_HOME = {"Art": 6, "Clipart": 11, "Product": 11, "Real World": 11}
SMALL = [  # tiny backbone, no downloads, two steps
    "model.backbone=cnn",
    "init.pretrained=null",
    "train.steps=2",
    "train.batch_size=4",
    "train.eval_every=2",
    "train.log_every=1",
]
# pacs_erm.yaml's own transforms at 16 pixels instead of 224, and no worker processes
PACS_16 = [
    "data.files.transforms.train=[{random_resized_crop: 16}, horizontal_flip, "
    "{color_jitter: {brightness: 0.3, contrast: 0.3, saturation: 0.3}}, {normalize: imagenet}]",
    "data.files.transforms.eval=[{resize: [16, 16]}, {normalize: imagenet}]",
    "data.files.loader={num_workers: 0}",
]


def write_tree(root: Path, per_class: dict[str, int], classes, *, nested: bool = False) -> Path:
    """root/<domain>[/images]/<class>/<i>.png, tiny 10x12 images."""
    for domain, count in per_class.items():
        folder = root / domain / "images" if nested else root / domain
        write_image_folder(folder, {"": dict.fromkeys(classes, count)}, size=(10, 12))
    return root


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("data") / "PACS", PACS, PACS_CLASSES)


# --------------------------------------------------------------------------- the default
def _pacs_experiment(root: Path, *overrides: str):
    cfg = load_config(
        CONFIGS / "generalize" / "pacs_erm.yaml",
        [f"data.files.root={root}", "data.test_domains=[photo]", *SMALL, *PACS_16, *overrides],
        subcommand="generalize",
    )
    return build_experiment("generalize", cfg, Runtime(CPU))


@pytest.mark.parametrize("method", ["erm", "groupdro", "vrex", "irm"])
def test_the_default_loss_is_the_mean_of_plain_per_domain_means(pacs: Path, method: str) -> None:
    """Training domains of 49, 56 and 98 images: no batch weights, and every method acts on
    R_d = F.cross_entropy(...).mean() of each domain's batch."""
    exp = _pacs_experiment(pacs, f"method.name={method}")
    batch = [stream.batch(0) for stream in exp.streams]
    assert [b.domain for b in batch] == ["art_painting", "cartoon", "sketch"]
    assert all(b.weight is None for b in batch)
    assert [len(b.y) for b in batch] == [4, 4, 4]
    method_ = exp.method
    method_.eval()  # batch norm on running statistics: a joint pass equals separate ones
    out = method_.training_step(batch, 0)
    with torch.no_grad():
        logits = [method_.model(b.x) for b in batch]
    risks = torch.stack([F.cross_entropy(z, b.y) for z, b in zip(logits, batch, strict=True)])
    if method == "erm":
        expected = risks.mean()
    elif method == "vrex":  # penalty weight 1 at step 0
        assert out["nll"].item() == pytest.approx(risks.mean().item(), rel=1e-5)
        expected = risks.mean() + (risks - risks.mean()).pow(2).mean()
    elif method == "groupdro":  # q starts at ones; one exponentiated-gradient step
        q = torch.exp(0.01 * risks)
        expected = (q / q.sum() * risks).sum()
    else:
        penalty = torch.stack(
            [irm_penalty(z.detach(), b.y) for z, b in zip(logits, batch, strict=True)]
        ).mean()
        assert out["nll"].item() == pytest.approx(risks.mean().item(), rel=1e-5)
        assert out["penalty"].item() == pytest.approx(penalty.item(), rel=1e-4, abs=1e-8)
        expected = risks.mean() + penalty
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    record = exp.run_files["weights.json"]
    assert record["sample_weights"] == "none"
    for name, size in (("art_painting", 49), ("cartoon", 56), ("sketch", 98)):
        entry = record["domains"][name]
        assert entry["share_of_loss"] == pytest.approx(1 / 3, abs=1e-6)
        assert entry["batch_weight"] == {"min": 1.0, "max": 1.0, "mean": 1.0}
        assert entry["train_samples"] == round(0.7 * size / 7) * 7


def test_a_disk_run_s_streams_carry_the_weights_in_force(pacs: Path) -> None:
    """pooled on disk: each training domain's batch carries D n_d / N (no longer refused)."""
    exp = _pacs_experiment(pacs, "data.sample_weights=pooled")
    sizes = [s.size for s in exp.streams]
    for stream, n in zip(exp.streams, sizes, strict=True):
        weight = stream.batch(0).weight
        assert weight is not None
        assert weight.tolist() == pytest.approx([3 * n / sum(sizes)] * 4)


# --------------------------------------------------------------------------- the options
def _toy_domains() -> tuple[list[Domain], torch.Tensor]:
    """Domain a: 2 training samples, domain b: 4 (unequal sizes, unequal class counts)."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    ya, yb = torch.tensor([0, 1]), torch.tensor([0, 0, 1, 2])
    domains = [
        Domain("toy", "a", 3, (1, 28, 28), {"train": Split(x[:2], ya)}),
        Domain("toy", "b", 3, (1, 28, 28), {"train": Split(x[2:], yb)}),
    ]
    return domains, x


def _cfg(**data):
    return validate_config(
        {"data": {"dataset": "rotated_mnist5k", "test_domains": ["rot75"], **data}},
        source="t",
        subcommand="generalize",
    )


def _npy(tmp_path: Path) -> str:
    path = tmp_path / "w.npy"
    np.save(path, np.array([0.5, 1.5, 1.0, 2.0, 3.0, 0.0]))
    return str(path)


# s_{d,i} by hand for domains a (y = [0, 1]) and b (y = [0, 0, 1, 2]); N = 6, D = 2
HAND_S = {
    "none": ([1.0, 1.0], [1.0, 1.0, 1.0, 1.0]),
    "pooled": ([2 * 2 / 6] * 2, [2 * 4 / 6] * 4),  # D n_d / N
    # n_d / (C_d n_{d,y}): a has one sample of each of 2 classes; b has 0 twice, 1 and 2 once
    "class_balanced": ([1.0, 1.0], [4 / 6, 4 / 6, 4 / 3, 4 / 3]),
    "npy": ([0.5, 1.5], [1.0, 2.0, 3.0, 0.0]),
}


@pytest.mark.parametrize("kind", list(HAND_S))
def test_sample_and_domain_weights_give_the_hand_computed_objective(
    tmp_path: Path, kind: str
) -> None:
    """(1/D) sum_d lambda_d R_d, R_d = mean of s_{d,i} loss_{d,i} over d's batch."""
    domains, x = _toy_domains()
    cfg = _cfg(sample_weights=_npy(tmp_path) if kind == "npy" else kind)
    cfg.data.domain_weights = {"a": 2.0}  # (validation checks the names against the set)
    weights, record = loss_weights(cfg, domains)
    lam = (2.0, 1.0)
    s = HAND_S[kind]
    for w, s_d, lam_d in zip(weights, s, lam, strict=True):
        expected = [lam_d * v for v in s_d]
        if w is None:  # all 1: the plain mean
            assert expected == [1.0] * len(s_d)
        else:
            assert w.tolist() == pytest.approx(expected)
    weights = [torch.ones(n) if w is None else w for w, n in zip(weights, (2, 4), strict=True)]
    # each domain's share: lambda_d mean(s_d), normalised
    mass = [lam_d * sum(s_d) / len(s_d) for s_d, lam_d in zip(s, lam, strict=True)]
    for name, m in zip("ab", mass, strict=True):
        assert record["domains"][name]["share_of_loss"] == pytest.approx(m / sum(mass), abs=1e-6)

    # Over every batch of one sample per domain, the step loss averages to the objective
    # (1/D) sum_d lambda_d (1/n_d) sum_i s_{d,i} loss_{d,i}, for any per-sample losses.
    losses = [torch.tensor([0.3, 1.7]), torch.tensor([0.2, 0.9, 2.5, 1.1])]
    target = (
        sum(
            lam_d * (torch.tensor(s_d) * loss).mean()
            for s_d, lam_d, loss in zip(s, lam, losses, strict=True)
        )
        / 2
    )
    steps = [
        (weights[0][i] * losses[0][i] + weights[1][j] * losses[1][j]) / 2
        for i in range(2)
        for j in range(4)
    ]
    assert torch.stack(steps).mean().item() == pytest.approx(float(target), rel=1e-6)

    # ERM on one step (2 samples of each domain) against the formula by hand
    model = create_model("lenet", (1, 28, 28), 3)
    method = ERM(model, ERMConfig(), total_steps=1)
    method.eval()
    ya, yb = domains[0].splits["train"].y, domains[1].splits["train"].y
    pick = [1, 3]  # two of b's samples
    batch = [
        DomainBatch(x=x[:2], y=ya, domain="a", weight=weights[0]),
        DomainBatch(x=x[2:][pick], y=yb[pick], domain="b", weight=weights[1][pick]),
    ]
    out = method.training_step(batch, 0)
    with torch.no_grad():
        ce_a = F.cross_entropy(model(x[:2]), ya, reduction="none")
        ce_b = F.cross_entropy(model(x[2:][pick]), yb[pick], reduction="none")
    r_a = (torch.tensor(s[0]) * ce_a).mean()
    r_b = (torch.tensor([s[1][i] for i in pick]) * ce_b).mean()
    assert out["loss"].item() == pytest.approx(((2.0 * r_a + 1.0 * r_b) / 2).item(), rel=1e-5)


def test_no_weights_by_default_and_inverse_domain_size_is_gone() -> None:
    domains, _ = _toy_domains()
    weights, record = loss_weights(_cfg(), domains)
    assert weights == [None, None]  # plain means, though a holds 2 samples and b 4
    assert record["domains"]["a"]["share_of_loss"] == pytest.approx(0.5)
    with pytest.raises(ConfigError) as info:
        _cfg(sample_weights="inverse_domain_size")
    assert len(info.value.lines) == 1
    assert "data.sample_weights: 'inverse_domain_size' was removed" in info.value.lines[0]
    assert "'none'" in info.value.lines[0]


# --------------------------------------------------------------------------- disk streams
@pytest.mark.parametrize("workers", [0, 2])
def test_a_disk_stream_carries_each_image_s_own_weight(pacs: Path, workers: int) -> None:
    """w_i = i + 1: a batch's weights are exactly those of its images, across epochs, after
    a jump (resume), with and without DataLoader workers."""
    section = {"dataset": "pacs", "root": str(pacs), "domain": "cartoon"}
    section["loader"] = {"num_workers": workers}
    cfg = DomainConfig.model_validate(section)
    split = load_configured_domain(cfg, split_seed=0, key="data.source").splits["train"]
    size = len(split)
    every = torch.cat([x for x, _ in split.batches(size, CPU)])  # in file order
    weight = torch.arange(size, dtype=torch.float32) + 1

    def stream():
        return make_stream(split, batch_size=5, seed=3, domain="cartoon", device=CPU, weight=weight)

    def check(b: DomainBatch) -> None:
        assert b.weight is not None and b.weight.shape == (5,)
        for row, w in zip(b.x, b.weight, strict=True):
            index = [i for i in range(size) if torch.equal(every[i], row)]
            assert len(index) == 1 and w.item() == index[0] + 1

    run = stream()
    steps = range(size // 5 + 2)  # into the second epoch
    for step in steps:
        check(run.batch(step))
    check(stream().batch(4))  # a fresh stream asked for a later step
    unweighted = make_stream(split, batch_size=5, seed=3, domain="cartoon", device=CPU)
    assert unweighted.batch(0).weight is None


# --------------------------------------------------------------------------- end to end
def _run(cli, *args) -> dict:
    result = cli(*args, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", DG_METHODS)
def test_every_method_runs_pacs_erm_yaml_on_a_pacs_like_tree(
    cli, pacs: Path, tmp_path: Path, method: str
) -> None:
    """Every generalize method, through configs/generalize/pacs_erm.yaml, once on one held-out
    domain and with --leave-one-out (each of PACS's four domains held out in turn)."""
    args = [
        "generalize",
        CONFIGS / "generalize" / "pacs_erm.yaml",
        f"data.files.root={pacs}",
        f"method.name={method}",
        *SMALL,
        *PACS_16,
        "--runs-dir",
        tmp_path / "runs",
    ]
    summary = _run(cli, *args, "data.test_domains=[sketch]", "--name", "one")
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert {"sketch/test/acc", "train_domains/val/acc"} <= summary["final"].keys()
    record = json.loads((tmp_path / "runs" / "one" / "weights.json").read_text())
    assert all(d["batch_weight"]["max"] == 1.0 for d in record["domains"].values())
    loo = _run(cli, *args, "--leave-one-out", "--name", "loo")
    assert loo["status"] == "completed"
    assert {f"{d}/test/acc" for d in PACS} <= loo["final"].keys()
    for domain in PACS:
        child = json.loads((tmp_path / "runs" / "loo" / domain / "summary.json").read_text())
        assert child["status"] == "completed" and f"{domain}/test/acc" in child["final"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_pacs_erm_yaml_as_shipped_with_weights(cli, pacs: Path, tmp_path: Path) -> None:
    """pacs_erm.yaml's own transforms (224 pixels) and loader (4 workers), with pooled
    weights and a per-domain weight, so that weights cross the DataLoader workers."""
    summary = _run(
        cli, "generalize", CONFIGS / "generalize" / "pacs_erm.yaml",
        f"data.files.root={pacs}", "data.test_domains=[photo]", *SMALL,
        "data.sample_weights=pooled", "data.domain_weights={sketch: 2.0}",
        "--runs-dir", tmp_path / "runs", "--name", "shipped",
    )  # fmt: skip
    assert summary["status"] == "completed" and "photo/test/acc" in summary["final"]
    record = json.loads((tmp_path / "runs" / "shipped" / "weights.json").read_text())
    sizes = {d: v["train_samples"] for d, v in record["domains"].items()}
    total = sum(sizes.values())
    sketch = record["domains"]["sketch"]
    assert sketch["batch_weight"]["max"] == pytest.approx(2 * 3 * sizes["sketch"] / total, 1e-5)
    # pooled: a domain's share is its share of the samples (times lambda_d, normalised)
    mass = {d: n * (2.0 if d == "sketch" else 1.0) for d, n in sizes.items()}
    for d, m in mass.items():
        share = record["domains"][d]["share_of_loss"]
        assert share == pytest.approx(m / sum(mass.values()), abs=1e-5)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize(
    ("name", "per_class", "classes", "nested"),
    [
        ("office31_amazon_to_webcam_dann", OFFICE31, 31, True),
        ("office_home_art_to_clipart_dann", OFFICE_HOME, 65, False),
    ],
)
def test_the_office_configs_run_on_trees_like_theirs(
    cli, tmp_path: Path, name: str, per_class: dict[str, int], classes: int, nested: bool
) -> None:
    """The shipped transfer configs (their 4-worker loaders as shipped, their transforms'
    operations at 16 pixels) on trees with the sets' class counts and relative domain
    sizes."""
    root = write_tree(
        tmp_path / "data", per_class, [f"class_{c:02d}" for c in range(classes)], nested=nested
    )
    small = {  # the shipped transforms' operations at 16 pixels instead of 224
        "train": [{"random_resized_crop": 16}, "horizontal_flip", {"normalize": "imagenet"}],
        "eval": [{"resize": 18}, {"center_crop": 16}, {"normalize": "imagenet"}],
    }
    transforms = [f"data.{s}.transforms={json.dumps(small)}" for s in ("source", "target")]
    summary = _run(
        cli, "transfer", CONFIGS / "transfer" / f"{name}.yaml",
        f"data.source.root={root}", f"data.target.root={root}", *SMALL, *transforms,
        "train.eval_batch_size=256", "--runs-dir", tmp_path / "runs",
    )  # fmt: skip
    assert summary["status"] == "completed" and summary["steps"] == 2
    target = "webcam" if name.startswith("office31") else "Clipart"
    assert f"{target}/test/acc" in summary["final"]
