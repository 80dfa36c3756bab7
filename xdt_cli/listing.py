"""`xdt datasets` and `xdt methods`: what is registered, as rows for a table or JSON
(`xdt methods` also shows the selection rules, selection.py's one definition of each).

Both load the plug-ins first (registry.py), and every row says its origin: the distribution that
registered it, `xdt` for built-ins. Split sizes are shown for the embedded sets only; the
others would need their files (see `root`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def dataset_rows() -> list[dict[str, Any]]:
    from xdt_cli.data import DATASETS, load_domain
    from xdt_cli.data.registry import describe

    rows = []
    for _, spec, _ in DATASETS.listing():
        row = describe(spec)
        sizes: dict[str, dict[str, int]] = {}
        if spec.load is not None:  # in memory: cheap to load and split
            for domain in spec.domains:
                splits = load_domain(spec.name, domain).splits
                sizes[domain] = {name: len(split) for name, split in splits.items()}
        row["size"] = sum(sum(s.values()) for s in sizes.values()) if sizes else None
        row["splits"] = sizes
        rows.append(row)
    return rows


def method_rows() -> list[dict[str, Any]]:
    from xdt_cli.methods import METHODS

    return [
        {
            "name": cls.name,
            "subcommands": sorted(cls.regimes),
            "defaults": cls.Config().model_dump(mode="json"),
            "paper": cls.paper,
            "description": (cls.__doc__ or "").strip().splitlines()[0],
            "torchrun": cls.synchronised,
            "origin": origin,
        }
        for _, cls, origin in METHODS.listing()
    ]


def method_detail(name: str) -> dict[str, Any]:
    """One method for `xdt methods NAME`: its row, its whole description and its search
    space (search.py): its own keys, then the shared keys for each optimizer and image size."""
    from xdt_cli.methods import METHODS
    from xdt_cli.search import shared_space

    cls = METHODS.lookup(name, "NAME")
    rows = {row["name"]: row for row in method_rows()}
    defaults = rows[name]["defaults"]

    def entry(key: str, param: Any, default: Any) -> dict[str, Any]:
        return {
            "key": key,
            "default": default,
            "distribution": param.describe(),
            "source": param.source,
        }

    own = [entry(f"method.{k}", p, defaults.get(k)) for k, p in cls.search_space.items()]
    shared = []
    for optimizer, small in (("adam", True), ("adam", False), ("sgd", True), ("sgd", False)):
        where = f"{optimizer}, {'small' if small else 'large'} images"
        for key, param in shared_space(optimizer, small).items():
            row = entry(key, param, None)
            del row["default"]  # draw 0 takes the config's own value
            shared.append({"when": where, **row})
    return {
        **rows[name],
        "description": " ".join((cls.__doc__ or "").split()),
        "search_space": own,
        "shared_search_space": shared,
    }


def print_method(detail: dict[str, Any]) -> None:
    """`xdt methods NAME` for a person: the facts, then the two parts of its search space."""
    console = Console()
    console.print(f"[bold]{detail['name']}[/bold] ({', '.join(detail['subcommands'])})")
    console.print(detail["description"], markup=False)
    console.print(f"paper: {detail['paper']}", markup=False)
    console.print(f"defaults: {_cell(detail['defaults'])}", markup=False)
    console.print(f"under torchrun, synchronised: {detail['torchrun']}", markup=False)
    own = detail["search_space"] or [{"key": "-", "default": "-", "distribution": "-"}]
    print_table(f"search space of {detail['name']} (draw 0: the defaults)", own)
    print_table(
        "shared search space (every method; draw 0: the config's values)",
        detail["shared_search_space"],
    )


def rule_rows() -> list[dict[str, Any]]:
    """The selection rules (`selection.rule`, `xdt report --selection`), from selection.py."""
    from xdt_cli.selection import DEFAULT_RULES, RULES

    return [
        {
            "rule": rule.name,
            "subcommands": list(rule.subcommands),
            "default of": [s for s, r in DEFAULT_RULES.items() if r == rule.name],
            "chooses": "the last checkpoint" if rule.pick == "last" else "the best checkpoint",
            "reads": rule.doc,
        }
        for rule in RULES.values()
    ]


def _cell(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):  # an image shape
            return "x".join(map(str, value))
        return ", ".join(_cell(v) for v in value)
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title, title_justify="left", show_lines=True)
    # descriptions and per-domain split sizes are too wide for a table: --json has them
    columns = [k for k in rows[0] if k not in ("description", "splits", "torchrun")] if rows else []
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    Console().print(table)
