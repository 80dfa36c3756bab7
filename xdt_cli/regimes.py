"""Regimes: what each subcommand feeds the engine.

`build_experiment(subcommand, cfg, runtime)` decides the data streams of a training step,
the domains evaluated, how the model starts and how the best checkpoint is chosen. The
method (the loss) comes from `method.name`; the loop is the engine's.

- train-source: one stream, `data.source` with labels; `data.target` is only evaluated.
- finetune: one stream, `data.target` with labels (a few per class with
  `labels_per_class`); the model starts from `init` and `model.freeze`/`preset` decide
  theta_fix and theta_upd; `data.source`, if given, is only evaluated (forgetting).
- transfer: two streams, `data.source` with labels and `data.target` WITHOUT labels: the
  target's stream is built with `labelled=False`, so no target label can reach a method.
  Target labels exist only in its val/test splits, which only evaluation reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdt_cli.config import ExperimentConfig
from xdt_cli.data import Domain, check_compatible, load_configured_domain, make_stream
from xdt_cli.engine import Experiment, Selection
from xdt_cli.errors import ConfigError
from xdt_cli.freezing import param_groups, plan_freezing
from xdt_cli.initialization import initialize
from xdt_cli.methods import METHODS
from xdt_cli.models import create_model
from xdt_cli.runtime import Runtime, seed_everything


def build_experiment(
    subcommand: str, cfg: ExperimentConfig, runtime: Runtime, *, resuming: bool = False
) -> Experiment:
    """`resuming`: the weights come from last.pt, so `init` is not read again (the source
    run it names may be gone by then; everything it gave is in the checkpoint)."""
    seed_everything(cfg.seed, cfg.train.deterministic)
    domains = _domains(subcommand, cfg)
    trained = domains.target if subcommand == "finetune" else domains.source
    assert trained is not None  # config validation requires it

    model = create_model(cfg.model.backbone, trained.input_shape, trained.num_classes)
    notes = [
        f"{key}: skipped {len(d.skipped)} unreadable images (skip_bad_images)"
        for key, d in (("data.source", domains.source), ("data.target", domains.target))
        if d is not None and d.skipped
    ]
    if not resuming:
        message = initialize(model, cfg)
        if message:
            notes.append(message)
    plan = plan_freezing(model, cfg.model)
    method = METHODS[cfg.method.name](model, cfg.method_config, total_steps=cfg.train.steps)
    method.to(runtime.device)

    def stream(domain: Domain, labelled: bool):
        return make_stream(
            domain.splits["train"],
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            domain=domain.name,
            device=runtime.device,
            labelled=labelled,
        )

    if subcommand == "train-source":
        streams = [stream(domains.source, True)]
    elif subcommand == "finetune":
        streams = [stream(domains.target, True)]
    else:  # transfer: the target's labels are dropped here, before any method sees a batch
        streams = [stream(domains.source, True), stream(domains.target, False)]

    eval_domains = [d for d in (domains.source, domains.target) if d is not None]
    eval_sets = {d.name: {"val": d.splits["val"], "test": d.splits["test"]} for d in eval_domains}
    rule_domain = {"source_val": domains.source, "target_val": domains.target}
    chosen = rule_domain.get(cfg.selection.rule)
    default_metric = f"{(chosen or trained).name}/val/acc"
    groups = param_groups(method, plan, cfg.optim.lr_mult)
    notes.append(_parameter_note(plan, method))
    return Experiment(
        subcommand=subcommand,
        method=method,
        streams=streams,
        eval_sets=eval_sets,
        selection=make_selection(cfg, default_metric=default_metric, eval_sets=eval_sets),
        param_groups=groups,
        unfreeze=plan.scheduled,
        parameters=_parameter_counts(plan, method),
        notes=notes,
    )


@dataclass
class _Domains:
    source: Domain | None
    target: Domain | None


def _domains(subcommand: str, cfg: ExperimentConfig) -> _Domains:
    data = cfg.data
    source = target = None
    if data.source is not None:
        source = load_configured_domain(data.source, split_seed=data.split_seed, key="data.source")
    if data.target is not None:
        target = load_configured_domain(data.target, split_seed=data.split_seed, key="data.target")
    if source is not None and target is not None:
        _check_compatible(source, target, subcommand)
        if target.name == source.name:
            raise ConfigError("data.target: is the same domain as data.source")
    return _Domains(source, target)


def _parameter_counts(plan, method) -> dict[str, int]:
    """Parameter elements: the model's trainable (theta_upd), fixed (theta_fix), released later
    by gradual unfreezing, and those the method adds (e.g. a domain discriminator)."""
    own = sum(
        p.numel()
        for n, p in method.named_parameters()
        if not n.startswith("model.") and p.requires_grad  # not e.g. DELTA's frozen copy
    )
    return {
        "trainable": plan.trainable,
        "fixed": plan.fixed,
        "unfrozen_later": sum(
            p.numel()
            for n, p in method.model.named_parameters()
            if n in {x for names in plan.scheduled.values() for x in names}
        ),
        "method": own,
    }


def _parameter_note(plan, method) -> str:
    counts = _parameter_counts(plan, method)
    text = f"parameters: {counts['trainable']:,} trainable, {counts['fixed']:,} fixed"
    if counts["unfrozen_later"]:
        text += f", {counts['unfrozen_later']:,} unfrozen later"
    if counts["method"]:
        text += f", {counts['method']:,} of the method ({method.name})"
    return text


def _check_compatible(a: Domain, b: Domain, subcommand: str) -> None:
    """Source and target must fit one model: the same image shape and classes."""
    if subcommand == "finetune" and a.num_classes != b.num_classes:
        raise ConfigError(
            f"data.source: finetune only evaluates it, with the target's head, so it needs "
            f"the target's {b.num_classes} classes (it has {a.num_classes}); leave it out"
        )
    check_compatible(a, b)


def make_selection(cfg: ExperimentConfig, *, default_metric: str, eval_sets) -> Selection:
    """Resolve `selection` against the metrics this run's evaluations produce."""
    rule = cfg.selection.rule
    assert rule is not None  # validate_config resolves the subcommand's default
    if rule == "last":
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
    return Selection(rule=rule, metric=metric, mode=mode)
