"""The package's layers (README, "Development"): `config` is the ground floor, the import
graph has no cycle, no module imports a layer above its own, and config.yaml records what
ran (every default resolved)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xdt_cli.config import dump_config, flatten
from xdt_cli.resolve import load_config

PACKAGE = Path(__file__).resolve().parents[1] / "xdt_cli"
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The xdt modules that `name` imports anywhere in its file (inside functions too, but
    not under `if TYPE_CHECKING:`, which never runs)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert cycle_in(GRAPH) is None, " -> ".join(cycle_in(GRAPH) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {**GRAPH, "xdt_cli.config.schema": GRAPH["xdt_cli.config.schema"] | {"xdt_cli.api"}}
    found = cycle_in(graph)
    assert found is not None and found[0] == found[-1] and "xdt_cli.config.schema" in found


def test_config_is_the_ground_floor() -> None:
    """Importing xdt_cli.config in a fresh interpreter loads no other xdt module (and no
    torch); its files import nothing of xdt outside the package."""
    code = (
        "import sys, xdt_cli.config\n"
        "print(sorted(m for m in sys.modules if m.startswith('xdt_cli') "
        "and not m.startswith('xdt_cli.config') and m != 'xdt_cli'))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "False", out
    for name in MODULES:
        if name.startswith("xdt_cli.config"):
            outside = {m for m in GRAPH[name] if not m.startswith("xdt_cli.config")}
            assert not outside, f"{name} imports {outside}"


# Each module's floor, lowest first; a module may import its own floor and those below.
LAYERS: list[tuple[str, ...]] = [
    ("xdt_cli.config",),
    (
        "xdt_cli.errors",
        "xdt_cli.registry",
        "xdt_cli.files",
        "xdt_cli.distributed",
        "xdt_cli.faults",
    ),
    (
        "xdt_cli.data",
        "xdt_cli.models",
        "xdt_cli.methods",
        "xdt_cli.selection",
        "xdt_cli.search",
        "xdt_cli.augment",
        "xdt_cli.freezing",
        "xdt_cli.initialization",
        "xdt_cli.checkpoint",
        "xdt_cli.runtime",
        "xdt_cli.progress",
        "xdt_cli.runs",
        "xdt_cli.evaluation",
        "xdt_cli.tracking",
    ),
    ("xdt_cli.resolve", "xdt_cli.engine", "xdt_cli.regimes"),
    ("xdt_cli.api",),
    ("xdt_cli.leave_one_out", "xdt_cli.baselines", "xdt_cli.evaluate_run"),
    (
        "xdt_cli.sweeps",
        "xdt_cli.launchers",
        "xdt_cli.report",
        "xdt_cli.choose",
        "xdt_cli.plotting",
        "xdt_cli.benchmark",
        "xdt_cli.listing",
    ),
    ("xdt_cli.cli", "xdt_cli.__main__", "xdt_cli"),
]


def floor_of(name: str) -> int:
    best = None
    for floor, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (floor, len(prefix))
    assert best is not None, f"{name} is on no floor of LAYERS: add it"
    return best[0]


def test_no_module_imports_a_floor_above_its_own() -> None:
    upward = [
        f"{name} (floor {floor_of(name)}) imports {dep} (floor {floor_of(dep)})"
        for name in sorted(GRAPH)
        for dep in sorted(GRAPH[name])
        if dep != "xdt_cli" and floor_of(dep) > floor_of(name)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize(
    ("subcommand", "config", "overrides"),
    [
        ("train-source", "configs/quickstart.yaml", []),
        ("transfer", "configs/transfer/digits_to_mnist5k_cdan.yaml", []),
        (
            "finetune",
            "configs/transfer/digits_to_mnist5k_finetune_10shot.yaml",
            ["model.preset=last_k_blocks"],
        ),
        ("multitask", "configs/multitask/multimnist5k_static.yaml", []),
        ("multitask", "configs/multitask/multimnist5k_equal_mmoe.yaml", []),
        ("generalize", "configs/generalize/colored_mnist5k_irm.yaml", []),
    ],
)
def test_config_yaml_records_every_resolved_default(
    tmp_path: Path, subcommand: str, config: str, overrides: list[str]
) -> None:
    """What a run writes as config.yaml names every key of the schema and of its method,
    with the defaults that the subcommand resolved (method, selection rule, metric and mode,
    model.arch, model.experts, model.k_blocks, a static task's weight, generalize's domains):
    read back, nothing is filled in, and it is a fixed point."""
    cfg = load_config(REPO / config, overrides, subcommand=subcommand)
    text = dump_config(cfg)
    written = yaml.safe_load(text)
    again = load_config(_write(tmp_path / "config.yaml", text), subcommand=subcommand)
    assert flatten(again.model_dump(mode="json")).keys() == flatten(written).keys()
    assert dump_config(again) == text
    assert written["selection"]["rule"] is not None and written["method"]["name"]
    model = written["model"]
    if subcommand == "multitask":
        assert model["arch"] in ("hps", "mmoe")
        assert (model["experts"] == 3) == (model["arch"] == "mmoe")
    if model["preset"] == "last_k_blocks":
        assert model["k_blocks"] == 1
    if written["selection"]["rule"] != "last":
        assert written["selection"]["metric"].split("/")[1] == "val"
        assert written["selection"]["mode"] in ("max", "min")
    if subcommand == "generalize":
        assert written["data"]["domains"] == ["env90", "env80", "env10"]
    if written["method"]["name"] == "static":
        assert all(task["weight"] is not None for task in written["data"]["tasks"].values())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
