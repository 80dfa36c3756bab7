"""`Registry`: the one name -> entry table behind methods, data sets, backbones and selection
rules, and the plug-in loader that fills them from other installed packages.

A registry knows
- its entries and where each came from (`origin`: `xdt` for built-ins, else the
  distribution of the plug-in that registered it);
- its entry-point group (`xdt.methods`, `xdt.datasets`, `xdt.backbones`), loaded once per
  process on the first lookup or listing, never at import time;
- its package of built-ins to discover (methods: every module of xdt_cli/methods, so that
  adding a method is adding one file);
- how to say a miss: `lookup` raises one ConfigError line that names the key, the unknown
  name, the closest known name and the known ones.

A plug-in's entry point names either an object that the registry's `coerce` turns into
entries (a Method subclass; a DatasetSpec or a list of them; a backbone factory) or a module
whose import registers its entries itself. A plug-in that fails to import, names the wrong
kind of object or reuses a registered name is one ConfigError line naming it. For example,
in a plug-in's pyproject.toml:

    [project.entry-points."xdt.datasets"]
    my_scans = "my_pkg.data:SCANS"

This module sits right above the ground floor (it imports `xdt_cli.config` only).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any, Generic, TypeVar

from xdt_cli.config import ConfigError, did_you_mean, first_line

T = TypeVar("T")

BUILTIN = "xdt"  # the origin of everything xdt itself registers


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping name -> entry, filled by `register` (see the module docstring)."""

    def __init__(
        self,
        noun: str,
        *,
        group: str | None = None,
        coerce: Callable[[str, Any], list[tuple[str, T]]] | None = None,
        discover: str | None = None,
    ) -> None:
        self.noun = noun  # "method": the word of "unknown method 'x'"
        self.group = group  # the entry-point group of plug-ins, if any
        self._coerce = coerce  # (entry-point name, loaded object) -> [(name, entry)]
        self._discover = discover  # a package whose public modules register built-ins
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._discovered = discover is None
        self._plugins_loaded = group is None
        self._points_loaded: set[tuple[str, str, str]] = set()

    # ------------------------------------------------------------------ the mapping
    def __getitem__(self, name: str) -> T:
        self.discover()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(self._entries)

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.noun}: {', '.join(self._entries)})"

    # ------------------------------------------------------------------ filling it
    def register(self, name: str, entry: T, *, origin: str = BUILTIN) -> T:
        """Add `entry` under `name`; a name registered twice is a ValueError."""
        if name in self._entries:
            raise ValueError(f"{self.noun} '{name}' is registered twice")
        self._entries[name] = entry
        self._origins[name] = origin
        return entry

    def unregister(self, name: str) -> None:
        """Remove `name` (tests restore a registry with it)."""
        self._entries.pop(name, None)
        self._origins.pop(name, None)

    def discover(self) -> None:
        """Import every public module of the built-ins' package once (they register
        themselves); modules whose name starts with `_`, and `base`, hold shared code."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self._discover)
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not module.name.startswith("_") and module.name != "base":
                importlib.import_module(f"{self._discover}.{module.name}")

    def load_plugins(self) -> None:
        """Load every entry point of the group (once per process)."""
        self.discover()
        if self._plugins_loaded:
            return
        points = sorted(entry_points(group=self.group), key=lambda p: (_dist(p), p.name))
        for point in points:
            ident = (point.group, point.name, point.value)
            if ident not in self._points_loaded:
                self._load_one(point)
                self._points_loaded.add(ident)
        self._plugins_loaded = True

    def _load_one(self, point: EntryPoint) -> None:
        before = set(self._entries)
        try:
            obj = point.load()
        except Exception as exc:  # noqa: BLE001  (whatever a third-party import raises)
            raise ConfigError(f"{_describe(point)} failed to load ({first_line(exc)})") from None
        try:
            if not isinstance(obj, ModuleType):  # a module registered its entries on import
                assert self._coerce is not None
                for name, entry in self._coerce(point.name, obj):
                    self.register(name, entry)
        except TypeError as exc:  # coerce: the wrong kind of object
            raise ConfigError(f"{_describe(point)} gave {exc}") from None
        except ValueError as exc:  # a name registered twice
            raise ConfigError(f"{_describe(point)}: {exc}") from None
        added = set(self._entries) - before
        if not added:
            raise ConfigError(f"{_describe(point)} registered nothing in {point.group}")
        for name in added:
            self._origins[name] = _dist(point)

    # ------------------------------------------------------------------ reading it
    def origin(self, name: str) -> str:
        """The distribution that registered `name` ("xdt" for built-ins)."""
        self.discover()
        return self._origins.get(name, BUILTIN)

    def lookup(self, name: str, key: str) -> T:
        """The entry called `name`, plug-ins loaded first; a miss is one ConfigError line:
        `KEY: unknown NOUN 'name' (did you mean 'x'?); known: a, b`."""
        self.load_plugins()
        entry = self._entries.get(name)
        if entry is None:
            raise ConfigError(self.unknown(name, key))
        return entry

    def unknown(self, name: str, key: str, extra: tuple[str, ...] = ()) -> str:
        """The one line that says `name` is not registered (`extra`: more valid words)."""
        known = [*self._entries, *extra]
        return (
            f"{key}: unknown {self.noun} '{name}'{did_you_mean(name, known)}; "
            f"known: {', '.join(sorted(known))}"
        )

    def listing(self) -> list[tuple[str, T, str]]:
        """(name, entry, origin) of every entry, plug-ins loaded, sorted by name: what
        `xdt methods` and `xdt datasets` print."""
        self.load_plugins()
        return [(n, self._entries[n], self.origin(n)) for n in sorted(self._entries)]


def _dist(point: EntryPoint) -> str:
    dist = getattr(point, "dist", None)
    return dist.name if dist is not None and dist.name else "unknown"


def _describe(point: EntryPoint) -> str:
    return f"plug-in '{point.name}' ({_dist(point)}; {point.group} = {point.value})"
