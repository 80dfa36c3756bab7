"""`xdt datasets` and `xdt methods`: what is registered, as rows for a table or JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def dataset_rows() -> list[dict[str, Any]]:
    from xdt_cli.data import DATASETS, load_domain

    rows = []
    for spec in DATASETS.values():
        sizes = {}
        for domain in spec.domains:
            splits = load_domain(spec.name, domain).splits
            sizes[domain] = {name: len(split) for name, split in splits.items()}
        rows.append(
            {
                "name": spec.name,
                "domains": list(spec.domains),
                "classes": spec.num_classes,
                "input_shape": list(spec.input_shape),
                "size": sum(sum(s.values()) for s in sizes.values()),
                "splits": sizes,
                "description": spec.description,
                "origin": spec.origin,
            }
        )
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
        }
        for cls in METHODS.values()
    ]


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title, title_justify="left", show_lines=True)
    columns = [k for k in rows[0] if k != "description"] if rows else []
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    Console().print(table)
