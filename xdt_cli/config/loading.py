"""Reading configs: the only place that reads YAML (safe loader, bounded, duplicate keys
refused), `base:` chains, `key.path=value` overrides, and the schema-only validation step.

Precedence, lowest first: schema defaults < `base:` config < the config file <
`key.path=value` overrides < CLI flags. What a config means for a subcommand (its method, the
data sets it names, the selection rule) is resolved one floor up, in xdt_cli/resolve.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from xdt_cli.config.errors import ConfigError, error_lines, first_line
from xdt_cli.config.schema import ExperimentConfig

# What a full walk of a document may visit, aliases expanded: a config is a few hundred
# nodes, while nine levels of nine aliases ("billion laughs") make 9^9 of them, which every
# later walk (duplicate keys, validation, merging) would visit.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that counts each node's size with its aliases expanded while it
    composes the document, and refuses a document past MAX_YAML_NODES or an alias that
    refers to the node that holds it (a structure with no end)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        node = super().compose_node(parent, index)
        size = self._sizes.get(id(node))
        if size is None:
            if alias:  # the anchored node is still being composed: it contains itself
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to the node that holds it", node.start_mark
                )
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            size = 1 + sum(self._sizes[id(n)] for n in children)
            self._sizes[id(node)] = size
        if size > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"aliases expand the document past {MAX_YAML_NODES:,} nodes",
                node.start_mark,
            )
        return node


def _load_yaml(text: str) -> tuple[Any, str | None]:
    """(`yaml.safe_load(text)`, the first duplicated key or None), in one bounded pass."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        return loader.construct_document(node), _duplicate_key(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping (config, base, sweep or benchmark suite file) with the safe
    loader; any problem is one line that names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data, duplicate = _load_yaml(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {' '.join(problem.split())}") from None
    if duplicate:
        raise ConfigError(f"{path}: {duplicate}")
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a YAML mapping of sections, not a {type(data).__name__}"
        )
    return data


def _duplicate_key(root: yaml.Node) -> str | None:
    """PyYAML keeps the last of two equal keys; a config that repeats one is a mistake.

    Walks the composed node tree, each node once (an alias shares its anchor's node)."""
    stack, seen_nodes = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        line = key.start_mark.line + 1
                        return f"key '{key.value}' appears twice in one mapping (line {line})"
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise ConfigError(
            f"{path}: cannot read config file ({first_line(exc, kind=False)})"
        ) from None
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: base: configs form a cycle: {cycle}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of a config file")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: config file {base_path} not found")
    return deep_merge(read_with_bases(base_path, (*chain, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. train.steps=500")
    try:
        value = _load_yaml(raw)[0] if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML") from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{text}': {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The merged mapping of a config file: its `base:` chain, then the overrides, then the
    CLI flags' top-level values (`seed`, `device`; None is "not given")."""
    data = apply_overrides(read_with_bases(Path(path)), list(overrides))
    for key, value in (flags or {}).items():
        if value is not None:
            data[key] = value
    return data


def parse_experiment(
    data: dict[str, Any], *, source: str, stem: str | None = None
) -> ExperimentConfig:
    """The schema's check of a merged mapping (`source` names it in error messages); the
    name defaults to the file's stem."""
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        lines = error_lines(exc, ExperimentConfig)
        raise ConfigError(*(f"{source}: {line}" for line in lines)) from None
    if cfg.name is None and stem:
        cfg.name = stem
    return cfg
