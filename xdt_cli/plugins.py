"""Plug-ins: methods, data sets and backbones that other installed packages register through
entry points, so that nobody has to fork xdt to add one.

Groups and what an entry point may name:
- `xdt.methods`: a `Method` subclass, or a module whose import registers methods with
  `xdt_cli.methods.register`;
- `xdt.datasets`: a `DatasetSpec`, a list of them, or a module that calls
  `xdt_cli.data.register`;
- `xdt.backbones`: a factory `(in_channels) -> nn.Module` mapping images to flat feature
  vectors, registered under the entry point's name, or a module that calls
  `xdt_cli.models.register_backbone`.
For example, in a plug-in's pyproject.toml:

    [project.entry-points."xdt.datasets"]
    my_scans = "my_pkg.data:SCANS"

`load_plugins(kind)` loads one group, once per process, when a registry is looked up
(`get_spec`, `create_model`, the method lookup) and by `xdt datasets` / `xdt methods`;
nothing is discovered at import time. Everything a plug-in registers records its origin,
the distribution's name (`xdt` for built-ins). A plug-in that fails to import, names the
wrong kind of object or reuses a registered name is one ConfigError line naming it.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

from xdt_cli.errors import ConfigError

GROUPS = {"methods": "xdt.methods", "datasets": "xdt.datasets", "backbones": "xdt.backbones"}

# kind -> {registered name: distribution}; names not listed are built-ins ("xdt")
ORIGINS: dict[str, dict[str, str]] = {kind: {} for kind in GROUPS}
_loaded_kinds: set[str] = set()
_loaded_points: set[tuple[str, str, str]] = set()


def origin(kind: str, name: str) -> str:
    """The distribution that registered `name` in `kind`, or "xdt"."""
    return ORIGINS[kind].get(name, "xdt")


def load_plugins(kind: str) -> None:
    """Load every entry point of `kind`'s group (once); raise ConfigError for a broken one."""
    if kind in _loaded_kinds:
        return
    points = sorted(entry_points(group=GROUPS[kind]), key=lambda p: (_dist(p), p.name))
    for point in points:
        ident = (point.group, point.name, point.value)
        if ident in _loaded_points:
            continue
        _load_one(kind, point)
        _loaded_points.add(ident)
    _loaded_kinds.add(kind)


def _dist(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return dist.name if dist is not None and dist.name else "unknown"


def _describe(point: EntryPoint) -> str:
    return f"plug-in '{point.name}' ({_dist(point)}; {point.group} = {point.value})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    text = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _registry(kind: str) -> dict[str, Any]:
    if kind == "methods":
        from xdt_cli.methods import METHODS

        return METHODS
    if kind == "datasets":
        from xdt_cli.data import DATASETS

        return DATASETS
    from xdt_cli.models import BACKBONES

    return BACKBONES


def _load_one(kind: str, point: EntryPoint) -> None:
    registry = _registry(kind)
    before = set(registry)
    try:
        obj = point.load()
    except Exception as exc:  # noqa: BLE001  (whatever a third-party import raises)
        raise ConfigError(f"{_describe(point)} failed to load ({_first_line(exc)})") from None
    try:
        if not isinstance(obj, ModuleType):  # a module registered its items on import
            _register(kind, point, obj)
    except ValueError as exc:  # a registry refusing a name twice
        raise ConfigError(f"{_describe(point)}: {exc}") from None
    added = set(registry) - before
    if not added:
        raise ConfigError(f"{_describe(point)} registered nothing in {point.group}")
    dist = _dist(point)
    for name in added:
        ORIGINS[kind][name] = dist
        if kind == "datasets":
            _set_dataset_origin(name, dist)
        elif kind == "backbones":
            _set_backbone_origin(name, dist)


def _register(kind: str, point: EntryPoint, obj: Any) -> None:
    if kind == "methods":
        from xdt_cli.methods import register
        from xdt_cli.methods.base import Method

        if not (isinstance(obj, type) and issubclass(obj, Method)):
            raise ConfigError(
                f"{_describe(point)} gave {type(obj).__name__}; expected a Method subclass"
            )
        register(obj)
    elif kind == "datasets":
        from xdt_cli.data import DatasetSpec, register

        specs = list(obj) if isinstance(obj, list | tuple) else [obj]
        if not specs or not all(isinstance(s, DatasetSpec) for s in specs):
            raise ConfigError(
                f"{_describe(point)} gave {type(obj).__name__}; expected a DatasetSpec "
                "or a list of them"
            )
        for spec in specs:
            register(spec)
    else:
        from xdt_cli.models import register_backbone

        if not callable(obj):
            raise ConfigError(
                f"{_describe(point)} gave {type(obj).__name__}; expected a factory "
                "(in_channels) -> nn.Module"
            )
        register_backbone(point.name, obj, description=(obj.__doc__ or "").strip())


def _set_dataset_origin(name: str, dist: str) -> None:
    import dataclasses

    from xdt_cli.data import DATASETS

    DATASETS[name] = dataclasses.replace(DATASETS[name], origin=dist)


def _set_backbone_origin(name: str, dist: str) -> None:
    import dataclasses

    from xdt_cli.models import BACKBONES

    BACKBONES[name] = dataclasses.replace(BACKBONES[name], origin=dist)
