"""Tiny real-format data sets written at test time: torchvision's on-disk formats (MNIST idx,
USPS libsvm bz2, SVHN .mat, CIFAR pickles, STL-10 binaries) and image-folder trees of PNGs.

Images are random with a class-dependent brightness, so a model can learn a little. Nothing
here touches the network.
"""

from __future__ import annotations

import bz2
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def images(n: int, shape: tuple[int, ...], labels: np.ndarray, seed: int) -> np.ndarray:
    """uint8 images of `shape` (per image), brighter for higher labels."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 128, size=(n, *shape))
    level = (labels.reshape(-1, *([1] * len(shape))) * 12).astype(np.int64)
    return np.clip(base + level, 0, 255).astype(np.uint8)


def labels(n: int, classes: int = 10) -> np.ndarray:
    """Every class at least once (n >= classes), then cycling."""
    return (np.arange(n) % classes).astype(np.int64)


# --------------------------------------------------------------------------- MNIST formats
def _idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


Written = dict[str, tuple[np.ndarray, np.ndarray]]
"""What a writer wrote: {"train" | "test": (uint8 images [N, C, H, W], int labels [N])}."""


def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, folder: str = "MNIST") -> Written:
    raw, out = root / folder / "raw", {}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        y = labels(n)
        x = images(n, (28, 28), y, seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        out["train" if prefix == "train" else "test"] = (x[:, None], y)
    return out


def write_usps(root: Path, n_train: int = 40, n_test: int = 20) -> Written:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n, seed in (("usps.bz2", n_train, 3), ("usps.t.bz2", n_test, 4)):
        y = labels(n)
        pixels = images(n, (256,), y, seed)
        x = pixels.astype(np.float64) / 255 * 2 - 1  # the file holds values in [-1, 1]
        lines = [
            f"{label + 1} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(row))
            for label, row in zip(y, x, strict=True)
        ]
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
        out["train" if name == "usps.bz2" else "test"] = (pixels.reshape(n, 1, 16, 16), y)
    return out


def write_svhn(root: Path, n_train: int = 40, n_test: int = 20) -> Written:
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n, seed in (("train_32x32.mat", n_train, 5), ("test_32x32.mat", n_test, 6)):
        y = labels(n)
        x = images(n, (3, 32, 32), y, seed)
        mat_y = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)  # SVHN's 10 is a 0
        scipy.io.savemat(root / name, {"X": x.transpose(2, 3, 1, 0), "y": mat_y})  # H W C N
        out[name.split("_")[0]] = (x, y)
    return out


# --------------------------------------------------------------------------- CIFAR, STL-10
def _pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> Written:
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        y = labels(per_batch)
        x = images(per_batch, (3, 32, 32), y, 10 + i)
        _pickle(
            folder / f"data_batch_{i}", {"data": x.reshape(per_batch, -1), "labels": y.tolist()}
        )
        xs.append(x)
        ys.append(y)
    y = labels(n_test)
    x = images(n_test, (3, 32, 32), y, 16)
    _pickle(folder / "test_batch", {"data": x.reshape(n_test, -1), "labels": y.tolist()})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES})
    return {"train": (np.concatenate(xs), np.concatenate(ys)), "test": (x, y)}


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Written:
    folder, out = root / "cifar-100-python", {}
    for name, n, seed in (("train", n_train, 17), ("test", n_test, 18)):
        y = labels(n, 100)
        x = images(n, (3, 32, 32), y % 10, seed)
        _pickle(folder / name, {"data": x.reshape(n, -1), "fine_labels": y.tolist()})
        out[name] = (x, y)
    _pickle(folder / "meta", {"fine_label_names": [f"class{i:02d}" for i in range(100)]})
    return out


def write_stl10(root: Path, n_train: int = 40, n_test: int = 20) -> Written:
    folder, out = root / "stl10_binary", {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 19), ("test", n_test, 20)):
        y = labels(n)
        x = images(n, (3, 96, 96), y, seed)
        # STL-10 stores each channel column-major; torchvision transposes it back
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
        out[split] = (x, y)
    (folder / "unlabeled_X.bin").write_bytes(b"")
    (folder / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    return out


@pytest.fixture
def no_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks CIFAR, STL-10 and SVHN files against the real files' MD5 sums; the
    tiny fixtures only have to exist."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.svhn as svhn

    def exists(fpath: str, md5: str | None = None) -> bool:
        return Path(fpath).is_file()

    for module in (cifar, stl10, svhn):
        monkeypatch.setattr(module, "check_integrity", exists)


# --------------------------------------------------------------------------- image folders
def write_image_folder(
    root: Path,
    domains: dict[str, dict[str, int]],
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """root/<domain>/<class>/<i>.png with the given number of images per class."""
    rng = np.random.default_rng(seed)
    for d, (domain, classes) in enumerate(domains.items()):
        for c, (cls, count) in enumerate(sorted(classes.items())):
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 100, size=(*size, 3)) + 30 * c + 10 * d
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{i:03d}.png"
                )
    return root


def three_domains(root: Path, per_class: int = 8) -> Path:
    """A tiny multi-domain set: domains a, b, c with classes cat, dog, fox."""
    classes = {"cat": per_class, "dog": per_class, "fox": per_class}
    return write_image_folder(root, {"a": classes, "b": classes, "c": classes})
