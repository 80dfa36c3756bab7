"""The registry of learning rules: `method.name` -> Method class.

Each method lives in its own module and registers itself with `@register`; the modules are
imported explicitly at the bottom of this file, so the registry is complete after
`import xdt_cli.methods` and nothing is discovered by magic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xdt_cli.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is registered twice")
    METHODS[cls.name] = cls
    return cls


from xdt_cli.methods import erm  # noqa: E402, F401  (registers itself)

# One import line per method, so that adding a method never edits a shared line; isort
# would merge them into one statement.
# isort: off
from xdt_cli.methods import cdan  # noqa: E402, F401
from xdt_cli.methods import dan  # noqa: E402, F401
from xdt_cli.methods import dann  # noqa: E402, F401
from xdt_cli.methods import deep_coral  # noqa: E402, F401
from xdt_cli.methods import mcc  # noqa: E402, F401
from xdt_cli.methods import source_only  # noqa: E402, F401
from xdt_cli.methods import adabn  # noqa: E402, F401
from xdt_cli.methods import self_training  # noqa: E402, F401
from xdt_cli.methods import l2sp  # noqa: E402, F401
from xdt_cli.methods import bss  # noqa: E402, F401
from xdt_cli.methods import delta  # noqa: E402, F401
from xdt_cli.methods import irm  # noqa: E402, F401
from xdt_cli.methods import vrex  # noqa: E402, F401
from xdt_cli.methods import groupdro  # noqa: E402, F401
from xdt_cli.methods import coral  # noqa: E402, F401
from xdt_cli.methods import mmd  # noqa: E402, F401
from xdt_cli.methods import mixup  # noqa: E402, F401
from xdt_cli.methods import mldg  # noqa: E402, F401
from xdt_cli.methods import static  # noqa: E402, F401
from xdt_cli.methods import equal  # noqa: E402, F401
from xdt_cli.methods import uncertainty  # noqa: E402, F401
from xdt_cli.methods import dwa  # noqa: E402, F401
from xdt_cli.methods import gradnorm  # noqa: E402, F401
from xdt_cli.methods import pcgrad  # noqa: E402, F401
from xdt_cli.methods import mgda  # noqa: E402, F401
from xdt_cli.methods import rlw  # noqa: E402, F401
