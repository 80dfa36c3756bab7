"""One run on several processes through torchrun (DistributedDataParallel, gloo on the CPU):
the same numbers as one process with the same global batch, one run folder, metrics of the
whole batch and split, exact resume, and one failing rank ending the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SHORT = ["train.steps=200", "train.eval_every=50", "train.log_every=25"]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    out.pop("WORLD_SIZE", None)
    out.pop("RANK", None)
    return out


def torchrun(*args: str, procs: int = 2, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(procs), "-m", "xdt_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def xdt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "xdt_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def rows(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def quickstart_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The quickstart for 200 steps on 2 processes and on 1, same global batch and seed."""
    root = tmp_path_factory.mktemp("ddp")
    two = torchrun(
        "train-source", QUICKSTART, *SHORT, "--runs-dir", str(root), "--name", "two", env=env()
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = xdt(
        "train-source", QUICKSTART, *SHORT, "--runs-dir", str(root), "--name", "one", env=env()
    )
    assert one.returncode == 0, one.stderr[-3000:]
    return root, root / "two", root / "one"


def test_two_processes_end_where_one_process_does(quickstart_pair) -> None:
    root, two, one = quickstart_pair
    assert sorted(p.name for p in root.iterdir()) == ["one", "two"]  # one folder per run
    assert json.loads((two / "meta.json").read_text())["processes"] == 2
    a, b = summary(two), summary(one)
    assert a["status"] == b["status"] == "completed"
    assert abs(a["final"]["mnist5k/test/acc"] - b["final"]["mnist5k/test/acc"]) <= 0.005
    assert abs(a["best"]["mnist5k/test/acc"] - b["best"]["mnist5k/test/acc"]) <= 0.005
    # the logged training loss is the whole global batch's: each rank sees half the images,
    # and a half-batch loss would differ from the one-process loss by far more than this
    for x, y in zip(rows(two, "train"), rows(one, "train"), strict=True):
        assert x["step"] == y["step"]
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=2e-4)
        assert x["train/acc"] == pytest.approx(y["train/acc"], abs=1e-6)


def test_the_sharded_evaluation_scores_the_whole_split(quickstart_pair) -> None:
    """Every eval number of the 2-process run (each rank scored half the batches) equals a
    one-process evaluation of the same checkpoint: the sums were all-reduced."""
    _, two, _ = quickstart_pair
    out = xdt("evaluate", str(two), "--checkpoint", "last", "--json", env=env())
    assert out.returncode == 0, out.stderr
    scored = json.loads(out.stdout)["metrics"]
    last = rows(two, "eval")[-1]
    for name in ("mnist5k/test/acc", "digits/test/acc", "mnist5k/test/loss", "digits/test/loss"):
        assert last[name] == pytest.approx(scored[name], abs=1e-6), name


def test_a_stopped_two_process_run_resumes_to_the_same_metrics(quickstart_pair) -> None:
    root, two, _ = quickstart_pair
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "xdt_cli",
        "train-source",
        QUICKSTART,
        *SHORT,
        "--runs-dir",
        str(root),
        "--name",
        "stopped",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,
    )
    metrics = root / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # stop it once it has saved its first evaluation
        if metrics.exists() and '"split": "eval"' in metrics.read_text():
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: torchrun and both ranks
    _, err = proc.communicate(timeout=120)
    stopped = summary(root / "stopped")
    assert stopped["status"] == "interrupted", err[-2000:]
    assert 50 <= stopped["steps"] < 200
    assert err.count("interrupted at step") == 2  # each rank stopped after the same step
    import shutil

    shutil.copytree(root / "stopped", root / "stopped-alone")
    resumed = torchrun("resume", str(root / "stopped"), env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(root / "stopped")["final"] == summary(two)["final"]
    assert (root / "stopped" / "metrics.jsonl").read_text() == (two / "metrics.jsonl").read_text()
    # the same stopped run continued by one process (the global batch is the same)
    alone = xdt("resume", str(root / "stopped-alone"), env=env())
    assert alone.returncode == 0, alone.stderr[-3000:]
    final, expected = summary(root / "stopped-alone")["final"], summary(two)["final"]
    assert abs(final["mnist5k/test/acc"] - expected["mnist5k/test/acc"]) <= 0.005
    meta = json.loads((root / "stopped-alone" / "meta.json").read_text())
    assert meta["processes"] == 2 and meta["resumed"][-1]["processes"] == 1


def test_a_failing_rank_ends_the_run_with_its_message(tmp_path: Path) -> None:
    """A method that raises on rank 1 only (a plug-in): torchrun ends both ranks, exit 1, and
    rank 1's one-line error is shown."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "xdt_boom.py").write_text(
        textwrap.dedent(
            """
            import os
            from xdt_cli.methods.erm import ERM

            class Boom(ERM):
                name = "boom"

                def training_step(self, batch, step):
                    if os.environ.get("RANK") == "1" and step == 5:
                        raise RuntimeError("boom on rank 1 at step 5")
                    return super().training_step(batch, step)
            """
        )
    )
    info = site / "xdt_boom-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xdt-boom\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xdt.methods]\nboom = xdt_boom:Boom\n")
    out = torchrun(
        "train-source",
        QUICKSTART,
        "method.name=boom",
        *SHORT,
        "--runs-dir",
        str(tmp_path / "runs"),
        "--name",
        "boom",
        env=env(PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"),
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "rank 1: error: RuntimeError: boom on rank 1 at step 5" in out.stderr
    assert not (tmp_path / "runs" / "boom" / "summary.json").exists() or (
        summary(tmp_path / "runs" / "boom")["status"] != "completed"
    )


def test_a_global_batch_that_does_not_split_is_refused() -> None:
    from xdt_cli.data.stream import check_batch_size
    from xdt_cli.distributed import Shard
    from xdt_cli.errors import ConfigError

    check_batch_size(100, 64, "mnist5k", Shard(1, 2))  # 32 a rank
    with pytest.raises(ConfigError) as err:
        check_batch_size(100, 63, "mnist5k", Shard(0, 2))
    assert "the global batch of 63 images of 'mnist5k' does not split evenly over 2" in str(
        err.value
    )
    assert "train.batch_size_per_rank: true" in str(err.value)


# --------------------------------------------------------------------------- shares, in process
def test_each_rank_streams_its_own_half_of_the_global_batch(tmp_path: Path) -> None:
    """In memory and from image files: the two ranks' shares of a step are disjoint and
    together exactly the one-process batch (image files: the same augmented pixels too)."""
    import numpy as np
    import torch
    from PIL import Image

    from xdt_cli.data.disk import FileSplit
    from xdt_cli.data.stream import InMemoryStream
    from xdt_cli.data.transforms import Pipeline
    from xdt_cli.distributed import Shard

    x = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 2, 2).clone()
    y = torch.arange(40)
    cpu = torch.device("cpu")

    def noisy(batch: torch.Tensor) -> torch.Tensor:  # a random train transform
        return batch + torch.rand_like(batch)

    def mem(shard: Shard) -> InMemoryStream:
        return InMemoryStream(
            x, y, batch_size=8, seed=3, domain="d", device=cpu, transform=noisy, shard=shard
        )

    files = []
    for i in range(40):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((2, 2), i, dtype=np.uint8)).save(path)
        files.append(str(path))
    split = FileSplit(tuple(files), y, Pipeline(), Pipeline())

    def disk(shard: Shard):
        return split.stream(
            batch_size=8, seed=3, domain="d", device=cpu, labelled=True, task=None, shard=shard
        )

    def at(stream, step: int):
        torch.manual_seed(step)  # every rank holds the same RNG state (same seed and calls)
        return stream.batch(step)

    for make in (mem, disk):
        whole, first, second = make(Shard()), make(Shard(0, 2)), make(Shard(1, 2))
        for step in (0, 4, 7):  # 7: the second epoch
            a, b, c = (at(s, step) for s in (whole, first, second))
            assert len(b.y) == len(c.y) == 4
            assert torch.equal(torch.cat([b.y, c.y]), a.y)
            assert torch.equal(torch.cat([b.x, c.x]), a.x)
            assert not set(b.y.tolist()) & set(c.y.tolist())
        assert whole.state_dict() == first.state_dict()  # the global batch: resumable at any N
    for shards in ((Shard(0, 2), Shard(1, 2)), (Shard(0, 3), Shard(1, 3), Shard(2, 3))):
        seen = torch.cat([yy for s in shards for _, yy in split.batches(7, cpu, s)])
        assert torch.equal(seen, y)  # evaluation: every sample once, in order


# --------------------------------------------------------------------------- every method
# whose N-rank run is close to one process, not equal: batch-norm layers of the method's own
# (the discriminators) normalise each rank's share, AdaBN keeps rank 0's target statistics,
# and self-training augments each rank's share (methods' `synchronised` says so)
CLOSE = {"dann", "cdan", "adabn", "self_training"}


@pytest.fixture(scope="module")
def every_method(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tests/ddp_methods_driver.py: every method for 3 steps, on 2 processes and on 1."""
    root = tmp_path_factory.mktemp("methods")
    driver = str(REPO / "tests" / "ddp_methods_driver.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launches = {
        "two": [*torchrun, "--nproc-per-node", "2", driver, str(root / "two")],
        "one": [sys.executable, driver, str(root / "one")],
    }
    for cmd in launches.values():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(), cwd=REPO)
        assert done.returncode == 0, done.stderr[-4000:]
    return root / "two", root / "one"


def test_every_method_on_two_ranks_matches_one_process(every_method) -> None:
    """With LeNet (no batch norm of the model), every method's weights after 3 steps on 2
    ranks equal one process's on the same global batch (what each synchronises: its
    `synchronised`), and the ranks agree with each other; CLOSE ones are near."""
    import torch

    from xdt_cli.methods import METHODS

    two, one = every_method
    done = json.loads((two / "done.json").read_text())
    assert set(done) == set(METHODS) and all(d["status"] == "completed" for d in done.values())
    for name in sorted(done):
        rank0 = torch.load(two / f"{name}.rank0.pt", weights_only=True)
        rank1 = torch.load(two / f"{name}.rank1.pt", weights_only=True)
        alone = torch.load(one / f"{name}.rank0.pt", weights_only=True)
        assert rank0.keys() == alone.keys()
        for key, value in rank0.items():
            if not value.is_floating_point():
                continue
            assert torch.equal(value, rank1[key]), f"{name}: ranks differ on {key}"
            tol = {"atol": 1e-2, "rtol": 1e-2} if name in CLOSE else {"atol": 2e-5, "rtol": 1e-4}
            assert torch.allclose(value, alone[key], **tol), (
                f"{name}: {key} differs from one process by "
                f"{(value - alone[key]).abs().max().item():.2e}"
            )


# --------------------------------------------------------------------------- CUDA (NCCL)
@pytest.mark.cuda
def test_two_ranks_on_cuda_end_where_one_gpu_does(tmp_path: Path) -> None:
    """scripts/gpu_check.sh: NCCL, one rank per GPU (NCCL refuses two ranks on one GPU)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL runs one rank per GPU; this machine has fewer than 2 GPUs")
    common = [*SHORT, "--device", "cuda", "--runs-dir", str(tmp_path)]
    two = torchrun("train-source", QUICKSTART, *common, "--name", "two", env=env())
    assert two.returncode == 0, two.stderr[-3000:]
    one = xdt("train-source", QUICKSTART, *common, "--name", "one", env=env())
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert abs(a["final"]["mnist5k/test/acc"] - b["final"]["mnist5k/test/acc"]) <= 0.005
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["device"] == "cuda:0"


def test_image_files_through_dataloader_workers_on_two_ranks(tmp_path: Path) -> None:
    """The DataLoader path: a generalize run on an image-folder tree with random crops and
    flips, one worker per rank: 2 ranks load their shares (each sample with its own
    augmentation seed) and end with one process's metrics."""
    import yaml

    from tests.data_fixtures import write_image_folder

    classes = dict.fromkeys(["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"], 4)
    domains = ("art_painting", "cartoon", "photo", "sketch")
    tree = write_image_folder(tmp_path / "PACS", dict.fromkeys(domains, classes), size=(36, 36))
    config = tmp_path / "tree.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "dataset": "pacs",
                    "domains": ["art_painting", "cartoon", "photo"],
                    "test_domains": ["photo"],
                    "files": {
                        "root": str(tree),
                        "transforms": {
                            "train": [{"random_crop": {"size": 32}}, "horizontal_flip"],
                            "eval": [{"center_crop": {"size": 32}}],
                        },
                        "loader": {"num_workers": 1},
                    },
                },
                "model": {"backbone": "lenet"},
                "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                "train": {"steps": 12, "batch_size": 8, "eval_every": 6, "log_every": 3},
            }
        )
    )
    runs = str(tmp_path / "runs")
    two = torchrun("generalize", str(config), "--runs-dir", runs, "--name", "two", env=env())
    assert two.returncode == 0, two.stderr[-3000:]
    one = xdt("generalize", str(config), "--runs-dir", runs, "--name", "one", env=env())
    assert one.returncode == 0, one.stderr[-3000:]
    for x, y in zip(
        rows(tmp_path / "runs" / "two", "train"),
        rows(tmp_path / "runs" / "one", "train"),
        strict=True,
    ):
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-4)
    a, b = summary(tmp_path / "runs" / "two"), summary(tmp_path / "runs" / "one")
    for name, value in b["final"].items():
        assert a["final"][name] == pytest.approx(value, abs=1e-4), name
