"""One floor above `config`: what a config means for a subcommand.

`config` (the ground floor) reads YAML and checks the schema without knowing any method,
data set or selection rule. Here a parsed config is resolved against the registries: the
method's own `Config` validates the `method` section, the subcommand's default method and
selection rule are written into the config (so config.yaml records them), and the settings
the schema accepts but this subcommand cannot run become one line each. `load_config` is
the one entry point that every command uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from xdt_cli.config import (
    SUBCOMMANDS,
    ConfigError,
    DataConfig,
    DomainConfig,
    ExperimentConfig,
    MethodSection,
    did_you_mean,
    error_lines,
    parse_experiment,
    read_config,
)
from xdt_cli.selection import DEFAULT_RULES, RULES, Layout


def load_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    subcommand: str = "train-source",
    flags: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Read, merge, override and validate a config for `subcommand`.

    `flags` holds top-level values from CLI flags (`seed`, `device`), which win over all.
    Raises ConfigError with one line per problem.
    """
    path = Path(path)
    data = read_config(path, overrides, flags)
    return validate_config(data, source=str(path), subcommand=subcommand, stem=path.stem)


def resolve_from_run(cfg: ExperimentConfig, runs_root: Path) -> None:
    """`init.from_run` may name a run inside the runs folder (`digits-src`, or
    `../other_sweep/seed0-1a2b3c4d` from a sweep's folder) when no such path exists here.
    The resolved absolute path is what config.yaml records; `xdt sweep` resolves it the
    same way (against the sweep's folder) before it compares a finished run's config.yaml
    with the config it would start now."""
    given = cfg.init.from_run
    if given and not Path(given).expanduser().is_absolute() and not Path(given).exists():
        candidate = runs_root / given
        if candidate.exists():
            cfg.init.from_run = str(candidate.resolve())


def validate_config(
    data: dict[str, Any], *, source: str, subcommand: str, stem: str | None = None
) -> ExperimentConfig:
    """Validate a merged config mapping; `source` names it in error messages."""
    cfg = parse_experiment(data, source=source, stem=stem)
    from xdt_cli.methods import METHODS  # methods import torch: a config alone does not

    if "name" not in cfg.method.model_fields_set and subcommand in DEFAULT_METHODS:
        cfg.method.name = DEFAULT_METHODS[subcommand]  # resolved: config.yaml names it
    method_name = cfg.method.name
    try:
        method_cls = METHODS.lookup(method_name, "method.name")  # plug-ins load first
    except ConfigError as exc:
        raise ConfigError(*(f"{source}: {line}" for line in exc.lines)) from None
    if subcommand not in method_cls.regimes:
        raise ConfigError(
            f"{source}: method.name: '{method_name}' does not serve {subcommand} "
            f"(it serves: {', '.join(sorted(method_cls.regimes))})"
        )
    params = dict(cfg.method.model_extra or {})
    try:
        method_cfg = method_cls.Config.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(
            *(f"{source}: method.{line}" for line in error_lines(exc, method_cls.Config))
        ) from None
    cfg.method = MethodSection(name=method_name, **method_cfg.model_dump())
    if subcommand == "multitask" and cfg.model.arch is None:
        cfg.model.arch = "hps"  # resolved: config.yaml names it
    cfg._method_config = method_cfg

    if cfg.selection.rule is None and subcommand in DEFAULT_RULES:
        cfg.selection.rule = DEFAULT_RULES[subcommand]  # resolved: config.yaml names it
    rule = str(cfg.selection.rule)
    if rule not in RULES:
        raise ConfigError(
            f"{source}: selection.rule: unknown selection rule '{rule}'"
            + did_you_mean(rule, RULES)
            + f"; known: {', '.join(RULES)}"
        )
    problems = _regime_problems(cfg, subcommand)
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    _fill_defaults(cfg, subcommand)
    return cfg


DEFAULT_METHODS = {"multitask": "static"}  # method.name when not given (else erm)
GENERALIZE_KEYS = (
    "dataset",
    "domains",
    "test_domains",
    "domain_weights",
    "files",
    "sample_weights",
)


def _regime_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    """Settings that the schema accepts but this subcommand cannot run (the selection rule's
    only once the data is right: a missing data.source is one problem, not two)."""
    if subcommand not in SUBCOMMANDS:
        return [f"unknown subcommand '{subcommand}'"]
    problems = _data_problems(cfg, subcommand) or _selection_problems(cfg, subcommand)
    return problems + _tracking_problems(cfg)


def _tracking_problems(cfg: ExperimentConfig) -> list[str]:
    """A tracker whose optional package is missing fails before a run folder is claimed."""
    import importlib.util

    return [
        f"tracking.backends: {backend} needs the package {backend} (pip install 'xdt[{backend}]')"
        for backend in cfg.tracking.backends
        if importlib.util.find_spec(backend) is None
    ]


def _data_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    problems = _model_problems(cfg, subcommand)
    if subcommand == "generalize":
        return problems + _generalize_problems(cfg)
    if subcommand == "multitask":
        return problems + _multitask_problems(cfg)
    data = cfg.data
    if data.tasks:
        problems.append(f"data.tasks: only used by multitask (not {subcommand})")
    default = DataConfig()
    for key in GENERALIZE_KEYS:
        if getattr(data, key) != getattr(default, key):
            problems.append(f"data.{key}: only used by generalize (not {subcommand})")
    if subcommand in ("train-source", "transfer") and data.source is None:
        problems.append(f"data.source: required by {subcommand} (e.g. {{dataset: mnist5k}})")
    if subcommand in ("finetune", "transfer") and data.target is None:
        problems.append(f"data.target: required by {subcommand} (e.g. {{dataset: digits}})")
    if subcommand == "finetune" and not cfg.init.given:
        problems.append(
            "init: finetune starts from trained weights; set init.from_run, init.checkpoint, "
            "init.weights or init.pretrained (or use train-source to train from scratch)"
        )
    if subcommand == "transfer" and data.target is not None and data.target.labels_per_class:
        problems.append(
            "data.target.labels_per_class: transfer uses no target labels; "
            "use finetune to train on a few labelled target samples"
        )
    if subcommand == "train-source" and data.target is not None and data.target.labels_per_class:
        problems.append("data.target.labels_per_class: train-source only evaluates data.target")
    return problems


def _selection_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    """What selection.py's rule says it cannot do for this subcommand and data (the rule's
    metric is checked against the run's own names when the experiment is built)."""
    rule = RULES[str(cfg.selection.rule)]
    problems = rule.problems(_layout(cfg, subcommand))
    if not problems and rule.pick == "last" and cfg.train.early_stopping is not None:
        problems.append(
            f"train.early_stopping: selection.rule {rule.name} takes the last checkpoint; "
            "nothing can stop early"
        )
    return problems


def _layout(cfg: ExperimentConfig, subcommand: str) -> Layout:
    """The names a run of this config evaluates, as far as the config alone tells."""
    data = cfg.data

    def name(section: DomainConfig | None) -> str | None:
        return None if section is None else section.domain or section.dataset

    return Layout(
        subcommand,
        source=name(data.source),
        target=name(data.target),
        held_out=tuple(data.test_domains),
        tasks=tuple((t, task.loss) for t, task in data.tasks.items()),
    )


def _fill_defaults(cfg: ExperimentConfig, subcommand: str) -> None:
    """Write into the config the defaults that depend on the subcommand, the method or the
    data, so that config.yaml records what runs: a static task's weight (1), the domains of
    generalize's data set, and the selection rule's metric and mode."""
    if subcommand == "multitask" and cfg.method.name == "static":
        for task in cfg.data.tasks.values():
            if task.weight is None:
                task.weight = 1.0
    if subcommand == "generalize" and cfg.data.domains is None:
        from xdt_cli.data.registry import get_spec

        known = list(get_spec(str(cfg.data.dataset), "data.dataset").domains)
        if known:  # an image-folder set's domains are its folders, read with its files
            cfg.data.domains = known
    if cfg.selection.metric is None:
        rule = RULES[str(cfg.selection.rule)]
        metric, mode = rule.criterion(_layout(cfg, subcommand), None, cfg.selection.mode)
        if metric is not None:  # `last` reads no metric
            cfg.selection.metric, cfg.selection.mode = metric, mode


def _model_problems(cfg: ExperimentConfig, subcommand: str) -> list[str]:
    if subcommand == "multitask":
        if cfg.model.preset is not None:
            return [
                "model.preset: presets choose a single head; under multitask freeze the "
                "encoder with model.freeze (e.g. [features]) instead"
            ]
        return []
    return [
        f"model.{key}: only used by multitask (not {subcommand})"
        for key in ("arch", "experts", "heads")
        if getattr(cfg.model, key)
    ]


def _multitask_problems(cfg: ExperimentConfig) -> list[str]:
    """multitask reads data.tasks (and data.split_seed) only; `weight` belongs to static."""
    data, problems = cfg.data, []
    for key in ("source", "target", *GENERALIZE_KEYS):
        if getattr(data, key) != getattr(DataConfig(), key):
            problems.append(f"data.{key}: multitask reads data.tasks (not data.{key})")
    for name in cfg.model.heads:
        if name not in data.tasks:
            problems.append(
                f"model.heads.{name}: not a task{did_you_mean(name, data.tasks)} "
                f"(tasks: {', '.join(data.tasks)})"
            )
    if not data.tasks:
        problems.append(
            "data.tasks: required by multitask, e.g. {left: {dataset: multimnist5k, "
            "label: left}, right: {dataset: multimnist5k, label: right}}"
        )
    if cfg.method.name != "static":
        for name, task in data.tasks.items():
            if task.weight is not None:
                problems.append(
                    f"data.tasks.{name}.weight: only the static weighting reads task weights "
                    f"(method.name is {cfg.method.name})"
                )
    return problems


def _generalize_problems(cfg: ExperimentConfig) -> list[str]:
    """generalize reads `data.dataset`, its domains and the held-out ones; domain names are
    checked against the data set (unknown names, overlaps, nothing left to train on)."""
    data, problems = cfg.data, []
    for key in ("source", "target"):
        if getattr(data, key) is not None:
            problems.append(
                f"data.{key}: generalize reads data.dataset, data.domains and "
                "data.test_domains (not data.source / data.target)"
            )
    if data.tasks:
        problems.append("data.tasks: only used by multitask (not generalize)")
    if data.dataset is None:
        problems.append("data.dataset: required by generalize (e.g. rotated_mnist5k)")
        return problems
    from xdt_cli.data.registry import get_spec  # torch: only once a data set is named

    try:
        spec = get_spec(data.dataset, "data.dataset")
    except ConfigError as exc:
        return [*problems, *exc.lines]
    known = list(spec.domains)
    if len(known) < 2:
        return [*problems, f"data.dataset: {spec.name} has one domain; generalize needs several"]
    for key in ("domains", "test_domains", "domain_weights"):
        for name in getattr(data, key) or []:
            if name not in known:
                problems.append(
                    f"data.{key}: {spec.name} has no domain '{name}'{did_you_mean(name, known)}"
                    f"; its domains: {', '.join(known)}"
                )
    if problems:
        return problems
    used = data.domains if data.domains is not None else known
    outside = [d for d in data.test_domains if d not in used]
    if data.domains is not None and outside:
        problems.append(f"data.test_domains: {', '.join(outside)} not in data.domains")
    training = [d for d in used if d not in data.test_domains]
    if data.test_domains and not training:
        problems.append("data.test_domains: holds out every domain; keep one to train on")
    held = [d for d in data.domain_weights if d not in training]
    if held:
        problems.append(
            f"data.domain_weights: {', '.join(held)} is not a training domain "
            "(held-out domains never reach the loss)"
        )
    elif training and not any(data.domain_weights.get(d, 1.0) > 0 for d in training):
        problems.append("data.domain_weights: every training domain has weight 0")
    return problems
