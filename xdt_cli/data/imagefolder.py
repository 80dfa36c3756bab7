"""Multi-domain image-folder sets: `root/<domain>/<class>/<image>`, the layout in which
Office-31, Office-Home, PACS, VLCS and DomainNet are distributed, and any user's own tree.

`imagefolder` takes any such tree, its domains being root's sub-folders; the named sets
(`office31`, `office_home`, `pacs`, `vlcs`, `domainnet`) are the same reader with their
domain names fixed. A domain is chosen with the `domain` key of the section, e.g.
`{dataset: office31, root: data/office31, domain: amazon}`. Office-31's archive puts an
`images` folder between the domain and its classes; such a lone `images` folder is looked
through. Named sets match their folders loosely (`Real World` is the domain `Real_World`).

Loading a domain lists its files (Pillow's image extensions, in sorted order, sub-folders
of a class included) and checks them: every domain under root must have the same class
folders; a domain without images is an error; each file is opened and verified by Pillow
(its header and structure, without decoding the pixels), and one that fails is an error
naming it, or, with `skip_bad_images: true`, left out and counted (`Domain.skipped`). There
is no official split: a domain is split 70/15/15 per class with `data.split_seed`. Images
are decoded when batches are read (data/disk.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from xdt_cli.config import first_line
from xdt_cli.data.registry import DatasetSpec, DomainRequest, RawDomain, Samples, register
from xdt_cli.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _normal(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_")


def _subfolders(path: Path) -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(path)
        if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX"
    )


def _class_root(domain_dir: Path) -> Path:
    """Office-31 keeps its classes in <domain>/images/; look through such a lone folder."""
    inner = _subfolders(domain_dir)
    if inner == ["images"] and not any(
        f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) for f in os.scandir(domain_dir)
    ):
        return domain_dir / "images"
    return domain_dir


def _image_files(class_dir: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            os.path.join(folder, f)
            for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
    return found


def _verify(path: str) -> str | None:
    """None if Pillow can open and verify the file, else the reason."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # noqa: BLE001  (Pillow raises many types for a bad file)
        return first_line(exc, 120)
    return None


def _domain_folders(root: Path, expected: tuple[str, ...], key: str) -> dict[str, Path]:
    """Domain name -> folder: every sub-folder (generic set) or the expected ones found."""
    if not root.is_dir():
        raise ConfigError(
            f"{key}.root: {root} is not a folder; an image-folder set is laid out as "
            "root/<domain>/<class>/<image>"
        )
    folders = _subfolders(root)
    if not expected:
        return {name: root / name for name in folders}
    by_normal = {_normal(f): f for f in folders}
    return {d: root / by_normal[_normal(d)] for d in expected if _normal(d) in by_normal}


def _opener(name: str, expected: tuple[str, ...]):
    def open_domain(request: DomainRequest) -> RawDomain:
        root, key = request.root, request.key
        assert root is not None
        domains = _domain_folders(root, expected, key)
        if request.domain not in domains:
            found = ", ".join(domains) or "none"
            raise ConfigError(
                f"{key}.domain: {root} has no folder for domain '{request.domain}' "
                f"(domains found: {found})"
            )
        class_lists = {d: _subfolders(_class_root(p)) for d, p in domains.items()}
        classes = class_lists[request.domain]
        for other, theirs in class_lists.items():
            if theirs != classes:
                lacks = sorted(set(classes) - set(theirs))
                extra = sorted(set(theirs) - set(classes))
                what = "; ".join(
                    part
                    for part in (
                        f"{other} lacks {', '.join(lacks[:3])}" if lacks else "",
                        f"{other} has {', '.join(extra[:3])} that {request.domain} lacks"
                        if extra
                        else "",
                    )
                    if part
                )
                raise ConfigError(
                    f"{key}.root: the domains of {root} have different class folders "
                    f"({what}); every domain needs the same classes"
                )
        if not classes:
            raise ConfigError(
                f"{key}.domain: {domains[request.domain]} has no class folders "
                "(expected <domain>/<class>/<image>)"
            )
        class_root = _class_root(domains[request.domain])
        files: list[str] = []
        labels: list[int] = []
        skipped: list[str] = []
        for label, cls in enumerate(classes):
            for path in _image_files(class_root / cls):
                reason = _verify(path)
                if reason is None:
                    files.append(path)
                    labels.append(label)
                elif request.skip_bad_images:
                    skipped.append(path)
                else:
                    raise ConfigError(
                        f"{key}: cannot decode image {path} ({reason}); remove it or set "
                        f"{key}.skip_bad_images: true"
                    )
        if not files:
            raise ConfigError(
                f"{key}.domain: {class_root} holds no readable images "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        return RawDomain(
            classes=tuple(classes),
            parts={"all": Samples(torch.tensor(labels, dtype=torch.long), files=tuple(files))},
            skipped=tuple(skipped),
        )

    return open_domain


_NAMED = (
    ("office31", ("amazon", "dslr", "webcam"), 31, "Office-31 (Saenko et al. 2010)"),
    (
        "office_home",
        ("Art", "Clipart", "Product", "Real_World"),
        65,
        "Office-Home (Venkateswara et al. 2017)",
    ),
    ("pacs", ("art_painting", "cartoon", "photo", "sketch"), 7, "PACS (Li et al. 2017)"),
    ("vlcs", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5, "VLCS (Fang et al. 2013)"),
    (
        "domainnet",
        ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        345,
        "DomainNet (Peng et al. 2019)",
    ),
)

register(
    DatasetSpec(
        name="imagefolder",
        description="your own images: root/<domain>/<class>/<image>, domains chosen by name",
        domains=(),
        num_classes=None,
        input_shape=None,
        open=_opener("imagefolder", ()),
        kind="imagefolder",
    )
)
for _name, _domains, _classes, _title in _NAMED:
    register(
        DatasetSpec(
            name=_name,
            description=f"{_title}, an image folder: root/<domain>/<class>/<image>",
            domains=_domains,
            num_classes=_classes,
            input_shape=None,
            open=_opener(_name, _domains),
            kind="imagefolder",
        )
    )
