"""Regimes: what each subcommand feeds the engine.

`build_experiment(subcommand, cfg, runtime)` decides the data streams of a training step,
the domains evaluated, how the model starts and how the best checkpoint is chosen. The
method (the loss) comes from `method.name`; the loop is the engine's.
"""

from __future__ import annotations

from xdt_cli.config import ExperimentConfig
from xdt_cli.data import Domain, InMemoryStream, load_domain
from xdt_cli.engine import Experiment, Selection
from xdt_cli.errors import ConfigError
from xdt_cli.methods import METHODS
from xdt_cli.models import create_model
from xdt_cli.runtime import Runtime, seed_everything


def build_experiment(subcommand: str, cfg: ExperimentConfig, runtime: Runtime) -> Experiment:
    builders = {"train-source": build_train_source}
    return builders[subcommand](cfg, runtime)


def build_train_source(cfg: ExperimentConfig, runtime: Runtime) -> Experiment:
    """Supervised training on `data.source`; `data.target`, if given, is only evaluated."""
    seed_everything(cfg.seed, cfg.train.deterministic)
    source = load_domain(cfg.data.source.dataset, split_seed=cfg.data.split_seed)
    eval_domains = [source]
    if cfg.data.target is not None:
        target = load_domain(
            cfg.data.target.dataset, split_seed=cfg.data.split_seed, key="data.target"
        )
        _check_compatible(source, target)
        if target.name == source.name:
            raise ConfigError("data.target: is the same domain as data.source")
        eval_domains.append(target)

    model = create_model(cfg.model.backbone, source.input_shape, source.num_classes)
    method = METHODS[cfg.method.name](model, cfg.method_config).to(runtime.device)
    train = source.splits["train"]
    stream = InMemoryStream(
        train.x,
        train.y,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        domain=source.name,
        device=runtime.device,
    )
    eval_sets = {d.name: {"val": d.splits["val"], "test": d.splits["test"]} for d in eval_domains}
    return Experiment(
        subcommand="train-source",
        method=method,
        streams=[stream],
        eval_sets=eval_sets,
        selection=make_selection(cfg, default_metric=f"{source.name}/val/acc", eval_sets=eval_sets),
    )


def _check_compatible(a: Domain, b: Domain) -> None:
    if a.input_shape != b.input_shape or a.num_classes != b.num_classes:
        raise ConfigError(
            f"data.target: {b.name} has inputs {b.input_shape} and {b.num_classes} classes, "
            f"but data.source {a.name} has {a.input_shape} and {a.num_classes}"
        )


def make_selection(cfg: ExperimentConfig, *, default_metric: str, eval_sets) -> Selection:
    """Resolve `selection` against the metrics this run's evaluations produce."""
    if cfg.selection.rule == "last":
        return Selection(rule="last", metric=None, mode="max")
    metric = cfg.selection.metric or default_metric
    known = [
        f"{domain}/{split}/{metric}"
        for domain, splits in eval_sets.items()
        for split in splits
        for metric in ("acc", "loss")
    ]
    if metric not in known:
        raise ConfigError(
            f"selection.metric: '{metric}' is not measured by this run; "
            f"choose one of {', '.join(k for k in known if '/test/' not in k)}"
        )
    if "/test/" in metric:
        raise ConfigError(
            f"selection.metric: '{metric}' is a test split; choosing a checkpoint on test data "
            "inflates the result; use a val split"
        )
    mode = cfg.selection.mode or ("min" if metric.endswith("loss") else "max")
    return Selection(rule=cfg.selection.rule, metric=metric, mode=mode)
