"""The data layer: registered data sets, their seeded splits, and the in-memory batch stream.

A data set is made of one or more domains; each domain is split, per class, into 70% train,
15% val and 15% test with `data.split_seed` (see `splits.py`). The embedded sets live in
`embedded.py` and register themselves when this package is imported.
"""

from __future__ import annotations

from xdt_cli.data import embedded  # noqa: E402, F401, I001  (registers the embedded sets)
from xdt_cli.data.registry import (
    DATASETS,
    DatasetSpec,
    Domain,
    Split,
    load_configured_domain,
    load_domain,
    register,
)
from xdt_cli.data.stream import InMemoryStream, make_stream

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Domain",
    "InMemoryStream",
    "Split",
    "load_configured_domain",
    "load_domain",
    "make_stream",
    "register",
]
