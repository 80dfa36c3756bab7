"""torchvision's classic image sets by name, read from their on-disk formats by torchvision's
own dataset classes: `mnist`, `fashion_mnist`, `usps`, `svhn`, `cifar10`, `cifar100`, `stl10`.

Each set's official training split is cut, per class and seeded by `data.split_seed`, into
85% train and 15% val; its official test split is the test split. Images stay uint8 in
memory (CIFAR-10 is 184 MB as bytes, 737 MB as floats) and become floats in [0, 1] per batch.

`root` (default `./data`) is the folder torchvision expects (e.g. `root/cifar-10-batches-py`);
with `download: true` missing files are fetched there. Missing files without `download`, a
failed download or a corrupt file is one ConfigError line that says where xdt looked and
how to get the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdt_cli.config import first_line
from xdt_cli.data.registry import DatasetSpec, DomainRequest, RawDomain, Samples, register
from xdt_cli.errors import ConfigError

DIGITS = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = (
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
)
STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class _Set:
    name: str
    torchvision_class: str
    description: str
    num_classes: int
    shape: tuple[int, int, int]
    files: tuple[str, ...]  # relative to root; all must exist (torchvision checks the same)
    url: str
    classes: tuple[str, ...] | None
    split_arg: str  # "train" (train=True/False) or "split" (split="train"/"test")


_MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_MNIST_RAW += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

SETS = (
    _Set(
        "mnist",
        "MNIST",
        "MNIST handwritten digits (60,000 + 10,000), 1x28x28",
        10,
        (1, 28, 28),
        tuple(f"MNIST/raw/{f}" for f in _MNIST_RAW),
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        DIGITS,
        "train",
    ),
    _Set(
        "fashion_mnist",
        "FashionMNIST",
        "Fashion-MNIST clothing images (60,000 + 10,000), 1x28x28",
        10,
        (1, 28, 28),
        tuple(f"FashionMNIST/raw/{f}" for f in _MNIST_RAW),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        FASHION_CLASSES,
        "train",
    ),
    _Set(
        "usps",
        "USPS",
        "USPS handwritten digits (7,291 + 2,007), 1x16x16",
        10,
        (1, 16, 16),
        ("usps.bz2", "usps.t.bz2"),
        "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/",
        DIGITS,
        "train",
    ),
    _Set(
        "svhn",
        "SVHN",
        "SVHN house-number digits (73,257 + 26,032), 3x32x32",
        10,
        (3, 32, 32),
        ("train_32x32.mat", "test_32x32.mat"),
        "http://ufldl.stanford.edu/housenumbers/",
        DIGITS,
        "split",
    ),
    _Set(
        "cifar10",
        "CIFAR10",
        "CIFAR-10 objects (50,000 + 10,000), 3x32x32",
        10,
        (3, 32, 32),
        tuple(
            f"cifar-10-batches-py/{f}"
            for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
        ),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        CIFAR10_CLASSES,
        "train",
    ),
    _Set(
        "cifar100",
        "CIFAR100",
        "CIFAR-100 objects, 100 fine classes (50,000 + 10,000), 3x32x32",
        100,
        (3, 32, 32),
        tuple(f"cifar-100-python/{f}" for f in ("train", "test", "meta")),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        None,
        "train",
    ),
    _Set(
        "stl10",
        "STL10",
        "STL-10 labelled objects (5,000 + 8,000), 3x96x96",
        10,
        (3, 96, 96),
        tuple(
            f"stl10_binary/{f}"
            for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")
        ),
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        STL10_CLASSES,
        "split",
    ),
)


def _construct(s: _Set, root: str, train: bool, download: bool) -> Any:
    import torchvision

    cls = getattr(torchvision.datasets, s.torchvision_class)
    if s.split_arg == "split":
        return cls(root, split="train" if train else "test", download=download)
    return cls(root, train=train, download=download)


def _arrays(s: _Set, ds: Any) -> tuple[Tensor, Tensor]:
    """torchvision's in-memory arrays -> uint8 [N, C, H, W] and int64 [N]."""
    data = ds.data if isinstance(ds.data, Tensor) else torch.from_numpy(np.asarray(ds.data))
    labels = ds.labels if s.split_arg == "split" else ds.targets
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if data.dim() == 3:  # MNIST, USPS: [N, H, W]
        x = data.unsqueeze(1)
    elif data.shape[-1] == 3:  # CIFAR: [N, H, W, C]
        x = data.permute(0, 3, 1, 2)
    else:  # SVHN, STL-10: [N, C, H, W]
        x = data
    return x.to(torch.uint8).contiguous(), y


def _opener(s: _Set):
    def open_set(request: DomainRequest) -> RawDomain:
        root, key = request.root, request.key
        assert root is not None
        missing = [f for f in s.files if not (root / f).is_file()]
        where = f"unpack {s.url} into {root}"
        if missing and not request.download:
            raise ConfigError(
                f"{key}.root: {s.name} not found: {root / missing[0]} does not exist; "
                f"set {key}.download: true to fetch it, or {where}"
            )
        parts = {}
        for part, train in (("train", True), ("test", False)):
            try:
                ds = _construct(s, str(root), train, request.download)
            except Exception as exc:  # noqa: BLE001  (network, archive or parse errors)
                reason = first_line(exc, 160)
                if missing:
                    raise ConfigError(
                        f"{key}.download: fetching {s.name} into {root} failed ({reason}); "
                        f"{where} by hand"
                    ) from None
                raise ConfigError(
                    f"{key}.root: the {s.name} files in {root} cannot be read ({reason}); "
                    f"delete them and set {key}.download: true, or {where} again"
                ) from None
            x, y = _arrays(s, ds)
            parts[part] = Samples(y, x=x)
            found = getattr(ds, "classes", None)
        classes = tuple(found) if s.name == "cifar100" and found else s.classes
        assert classes is not None
        return RawDomain(classes=classes, parts=parts)

    return open_set


for _s in SETS:
    register(
        DatasetSpec(
            name=_s.name,
            description=_s.description,
            domains=(_s.name,),
            num_classes=_s.num_classes,
            input_shape=_s.shape,
            open=_opener(_s),
            classes=_s.classes,
            kind="torchvision",
        )
    )
