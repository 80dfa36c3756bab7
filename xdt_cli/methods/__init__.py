"""The registry of learning rules: `method.name` -> Method class.

Each method lives in its own module of this package and registers itself with `@register`.
The registry discovers the package's modules on its first use (every public module but
`base`; `_shared_*` hold shared code), so adding a method is adding one file; plug-ins add
more through the entry-point group `xdt.methods` (see xdt_cli/registry.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xdt_cli.registry import Registry

if TYPE_CHECKING:
    from xdt_cli.methods.base import Method


def _plugged(name: str, obj: Any) -> list[tuple[str, type[Method]]]:
    """An `xdt.methods` entry point that names a class: a Method subclass."""
    from xdt_cli.methods.base import Method

    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise TypeError(f"{type(obj).__name__}; expected a Method subclass")
    return [(obj.name, obj)]


METHODS: Registry[type[Method]] = Registry(
    "method", group="xdt.methods", coerce=_plugged, discover="xdt_cli.methods"
)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass under its `name`."""
    return METHODS.register(cls.name, cls)
