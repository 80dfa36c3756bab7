"""The data layer: registered data sets, their seeded splits, transforms and batch streams.

A data set is made of one or more domains. The embedded sets (`embedded.py`), torchvision's
sets (`torchvision_sets.py`) and the image-folder sets (`imagefolder.py`) register
themselves when this package is imported; plug-ins add more (see xdt_cli/registry.py).
`load_configured_domain` turns a config section into a `Domain` (registry.py), and
`make_stream` gives a split's training stream (stream.py, disk.py).
"""

from __future__ import annotations

from xdt_cli.data import derived, embedded, imagefolder, multimnist, torchvision_sets  # noqa: F401, I001  (register)
from xdt_cli.data.disk import FileSplit, FileStream
from xdt_cli.data.registry import (
    DATASETS,
    DatasetSpec,
    Domain,
    DomainRequest,
    RawDomain,
    Samples,
    Split,
    check_compatible,
    load_configured_domain,
    load_domain,
    register,
)
from xdt_cli.data.stream import DomainBatch, InMemoryStream, make_stream

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Domain",
    "DomainBatch",
    "DomainRequest",
    "FileSplit",
    "FileStream",
    "InMemoryStream",
    "RawDomain",
    "Samples",
    "Split",
    "check_compatible",
    "load_configured_domain",
    "load_domain",
    "make_stream",
    "register",
]
