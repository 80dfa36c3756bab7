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
- generalize: one labelled stream per training domain of `data.dataset` (`data.domains`
  minus `data.test_domains`), so every step holds a batch of each; the held-out domains are
  loaded with `held_out=True` (20% val, 80% test, no train split) and only evaluated: no
  stream is ever built from them, so they cannot reach the optimizer. Eval rows also hold the
  means `train_domains/...` (training domains), `test_domains/...` (held-out domains) and,
  with two or more held-out domains, `val_domains/...` (all but the first), which the rules
  training_domain_val, oracle and leave_one_domain_out choose on.

Loss weights of generalize (the brief's L(theta) = sum_d sum_i lambda_{d,i} L_{d,i}, with
L_{d,i} the loss of sample i of training domain d divided by N, the number of training
samples): lambda_{d,i} = `data.domain_weights[d]` (default 1) times the per-sample weight of
`data.sample_weights`: `none` (1), `class_balanced` (N / (C n_y), n_y the pooled count of
the sample's class: every class weighs the same in total), `inverse_domain_size`
(N / (D n_d): every domain weighs the same, DomainBed's ERM), or the values of a .npy file
(one per training sample, the training domains' train splits concatenated in order). Every
step draws b samples of each of the D domains, so a sample of domain d is drawn with
probability b / n_d; the batch carries `weight = lambda_{d,i} * D n_d / N`, and the mean of
`weight * loss` over the step's D*b samples is an unbiased estimate of L(theta). Methods
compute weighted per-domain risks (methods/_shared_dg.py). The weights in force are written
to `<run>/weights.json`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdt_cli.config import DomainConfig, ExperimentConfig
from xdt_cli.data import Domain, check_compatible, load_configured_domain, make_stream
from xdt_cli.data.registry import get_spec
from xdt_cli.data.tasks import TaskStream, load_task_groups
from xdt_cli.engine import Experiment, Selection
from xdt_cli.errors import ConfigError
from xdt_cli.evaluation import evaluate_tasks
from xdt_cli.freezing import param_groups, plan_freezing
from xdt_cli.initialization import initialize
from xdt_cli.methods import METHODS
from xdt_cli.models import Classifier, MultiTaskModel, create_model
from xdt_cli.runtime import Runtime, seed_everything
from xdt_cli.selection import GENERALIZE_METRICS  # the metric each generalize rule reads


def build_experiment(
    subcommand: str, cfg: ExperimentConfig, runtime: Runtime, *, resuming: bool = False
) -> Experiment:
    """`resuming`: the weights come from last.pt, so `init` is not read again (the source
    run it names may be gone by then; everything it gave is in the checkpoint)."""
    seed_everything(cfg.seed, cfg.train.deterministic)
    if subcommand == "generalize":
        return _build_generalize(cfg, runtime, resuming=resuming)
    if subcommand == "multitask":
        return _build_multitask(cfg, runtime, resuming=resuming)
    domains = _domains(subcommand, cfg)
    trained = domains.target if subcommand == "finetune" else domains.source
    assert trained is not None  # config validation requires it

    model = create_model(cfg.model.backbone, trained.input_shape, trained.num_classes)
    notes = [
        f"{key}: skipped {len(d.skipped)} unreadable images (skip_bad_images)"
        for key, d in (("data.source", domains.source), ("data.target", domains.target))
        if d is not None and d.skipped
    ]
    method, plan = _make_method(model, cfg, notes, init=None if resuming else initialize)
    method.to(runtime.device)

    def stream(domain: Domain, labelled: bool):
        return _train_stream(domain, cfg, runtime, labelled=labelled)

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
    return _experiment(
        cfg,
        method,
        plan,
        notes,
        subcommand=subcommand,
        streams=streams,
        eval_sets=eval_sets,
        selection=make_selection(cfg, default_metric=default_metric, eval_sets=eval_sets),
    )


def _experiment(cfg: ExperimentConfig, method, plan, notes: list[str], **fields) -> Experiment:
    """The Experiment of every regime: `fields` plus what the freezing plan decides (the
    optimizer groups, gradual unfreezing, the parameter counts and their note)."""
    counts = _parameter_counts(plan, method)
    notes.append(_parameter_note(counts, method))
    return Experiment(
        method=method,
        param_groups=param_groups(method, plan, cfg.optim.lr_mult),
        unfreeze=plan.scheduled,
        parameters=counts,
        notes=notes,
        **fields,
    )


def _make_method(model, cfg: ExperimentConfig, notes: list[str], *, init) -> tuple[Any, Any]:
    """Load `init` into the model (`init` None: resuming, last.pt has the weights), decide
    theta_fix / theta_upd, and wrap the model in the method. A note says what init did."""
    if init is not None:
        message = init(model, cfg)
        if message:
            notes.append(message)
    plan = plan_freezing(model, cfg.model)
    method = METHODS[cfg.method.name](model, cfg.method_config, total_steps=cfg.train.steps)
    return method, plan


def _train_stream(
    domain: Domain,
    cfg: ExperimentConfig,
    runtime: Runtime,
    *,
    labelled: bool = True,
    weight: Tensor | None = None,
):
    """The training stream of a domain's train split, batched and seeded by the config."""
    return make_stream(
        domain.splits["train"],
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        domain=domain.name,
        device=runtime.device,
        labelled=labelled,
        weight=weight,
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
    released = {n for names in plan.scheduled.values() for n in names}
    return {
        "trainable": plan.trainable,
        "fixed": plan.fixed,
        "unfrozen_later": sum(
            p.numel() for n, p in method.model.named_parameters() if n in released
        ),
        "method": own,
    }


def _parameter_note(counts: dict[str, int], method) -> str:
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


def make_selection(
    cfg: ExperimentConfig,
    *,
    default_metric: str,
    eval_sets,
    averages: dict[str, list[str]] | None = None,
) -> Selection:
    """Resolve `selection` against the metrics this run's evaluations produce (the domains'
    own and the means of the `averages` groups)."""
    rule = cfg.selection.rule
    assert rule is not None  # validate_config resolves the subcommand's default
    if rule == "last":
        return Selection(rule="last", metric=None, mode="max")
    metric = cfg.selection.metric or default_metric
    splits_of = dict(eval_sets)
    for group, domains in (averages or {}).items():
        if domains:
            splits_of[group] = eval_sets[domains[0]]
    known = [
        f"{domain}/{split}/{metric}"
        for domain, splits in splits_of.items()
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


# --------------------------------------------------------------------------- generalize
def _build_generalize(cfg: ExperimentConfig, runtime: Runtime, *, resuming: bool) -> Experiment:
    data = cfg.data
    assert data.dataset is not None  # validate_config requires it
    spec = get_spec(data.dataset, "data.dataset")
    used = data.domains if data.domains is not None else list(spec.domains)
    names = [d for d in used if d not in data.test_domains]
    held_names = list(data.test_domains)

    def load(name: str, key: str, held_out: bool) -> Domain:
        # only the keys given: a key that does not apply to the set is an error there
        files = data.files.model_dump(exclude_unset=True) if data.files is not None else {}
        section = DomainConfig(dataset=data.dataset, domain=name, **files)
        return load_configured_domain(
            section, split_seed=data.split_seed, key=key, held_out=held_out
        )

    files = data.files is not None  # then a missing folder or bad image names data.files
    training = [load(d, "data.files" if files else "data.domains", False) for d in names]
    held = [load(d, "data.files" if files else "data.test_domains", True) for d in held_names]
    first = training[0]
    for other in training[1:] + held:
        check_compatible(first, other, key=f"data.dataset ({other.name})")

    model = create_model(cfg.model.backbone, first.input_shape, first.num_classes)
    notes = []
    method, plan = _make_method(model, cfg, notes, init=None if resuming else initialize)
    method.setup_domains(names)
    method.to(runtime.device)

    weights, record = loss_weights(cfg, training)
    record["held_out"] = held_names
    streams = [
        _train_stream(d, cfg, runtime, weight=w) for d, w in zip(training, weights, strict=True)
    ]
    # Held-out domains only here: evaluation reads their val and test splits.
    eval_sets = {d.name: {"val": d.splits["val"], "test": d.splits["test"]} for d in training}
    eval_sets.update({d.name: {"val": d.splits["val"], "test": d.splits["test"]} for d in held})
    averages = {"train_domains": names, "test_domains": held_names}
    if len(held_names) > 1:
        averages["val_domains"] = held_names[1:]
    rule = cfg.selection.rule
    default_metric = GENERALIZE_METRICS.get(str(rule), "train_domains/val/acc")
    selection = make_selection(
        cfg, default_metric=default_metric, eval_sets=eval_sets, averages=averages
    )
    _check_generalize_selection(selection, held_names)
    notes.append(
        f"training domains: {', '.join(names)}; held out: {', '.join(held_names)}; "
        f"selection: {selection.rule}" + (f" on {selection.metric}" if selection.metric else "")
    )
    return _experiment(
        cfg,
        method,
        plan,
        notes,
        subcommand="generalize",
        streams=streams,
        eval_sets=eval_sets,
        selection=selection,
        averages=averages,
        run_files={"weights.json": record},
    )


def _check_generalize_selection(selection: Selection, held: list[str]) -> None:
    """training_domain_val never reads a held-out domain; leave_one_domain_out never reads
    the test domain (the first held-out one). The oracle reads held-out val splits."""
    if selection.metric is None or selection.rule == "oracle":
        return
    source = selection.metric.split("/", 1)[0]
    forbidden = {"test_domains", *held} if selection.rule == "training_domain_val" else set()
    if selection.rule == "leave_one_domain_out":
        forbidden = {"test_domains", "train_domains", held[0]}
    if source in forbidden:
        raise ConfigError(
            f"selection.metric: '{selection.metric}' is not something {selection.rule} may "
            "choose on (a held-out domain is chosen on only by the oracle rule)"
        )


def loss_weights(
    cfg: ExperimentConfig, training: list[Domain]
) -> tuple[list[Tensor | None], dict[str, Any]]:
    """The per-sample batch weights of each training domain (None where all are 1) and the
    record of weights.json. See the module docstring for the formula."""
    data = cfg.data
    ys = [d.splits["train"].y for d in training]
    sizes = [len(y) for y in ys]
    total, count = sum(sizes), len(training)
    kind = data.sample_weights
    if kind == "none":
        per_sample = [torch.ones(n, dtype=torch.float64) for n in sizes]
    elif kind == "inverse_domain_size":
        per_sample = [torch.full((n,), total / (count * n), dtype=torch.float64) for n in sizes]
    elif kind == "class_balanced":
        pooled = torch.cat(ys)
        counts = torch.bincount(pooled).double()
        present = int((counts > 0).sum())
        per_sample = [total / (present * counts[y]) for y in ys]
    else:
        per_sample = _weights_file(kind, sizes, [d.name for d in training])

    weights: list[Tensor | None] = []
    domains: dict[str, Any] = {}
    grand = sum(
        float(w.sum()) * data.domain_weights.get(d.name, 1.0)
        for d, w in zip(training, per_sample, strict=True)
    )
    if grand <= 0:
        raise ConfigError("data.sample_weights: every training sample has weight 0")
    for d, w, n in zip(training, per_sample, sizes, strict=True):
        lam = data.domain_weights.get(d.name, 1.0)
        batch = (lam * w * (count * n / total)).float()
        weights.append(None if bool((batch == 1).all()) else batch)
        domains[d.name] = {
            "train_samples": n,
            "lambda_d": lam,
            "sample_weight": _stats(w),
            "batch_weight": _stats(batch),
            "share_of_loss": round(lam * float(w.sum()) / grand, 6),
        }
    record = {
        "formula": "L = sum_d sum_i lambda_{d,i} L_{d,i}; L_{d,i} = loss_{d,i} / N; "
        "lambda_{d,i} = domain_weights[d] * sample_weight_{d,i}; a step's batch carries "
        "lambda_{d,i} * D * n_d / N and averages weight * loss over its D*b samples",
        "sample_weights": kind,
        "domain_weights": {d.name: data.domain_weights.get(d.name, 1.0) for d in training},
        "N": total,
        "domains": domains,
    }
    return weights, record


def _stats(w: Tensor) -> dict[str, float]:
    return {
        "min": round(float(w.min()), 6),
        "max": round(float(w.max()), 6),
        "mean": round(float(w.double().mean()), 6),
    }


def _weights_file(path_text: str, sizes: list[int], names: list[str]) -> list[Tensor]:
    """One weight per training sample from a .npy file (no pickles), split by domain."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.sample_weights: {path} not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.sample_weights: {path}: not a readable .npy ({exc})") from None
    total = sum(sizes)
    if array.ndim != 1 or array.shape[0] != total or not np.issubdtype(array.dtype, np.number):
        order = ", ".join(f"{n} ({k})" for n, k in zip(names, sizes, strict=True))
        raise ConfigError(
            f"data.sample_weights: {path} holds shape {list(array.shape)}; expected {total} "
            f"numbers, the train splits of {order} in that order"
        )
    values = torch.from_numpy(array.astype(np.float64))
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ConfigError(f"data.sample_weights: {path} holds negative or non-finite weights")
    return list(torch.split(values, sizes))


# --------------------------------------------------------------------------- multitask
def _build_multitask(cfg: ExperimentConfig, runtime: Runtime, *, resuming: bool) -> Experiment:
    """One stream per group of tasks that share inputs (data/tasks.py); every step holds a
    batch of every group, labelled for each of its tasks. The model is one encoder (hps) or
    a mixture of experts (mmoe) with a head per task (models.MultiTaskModel)."""
    groups, specs = load_task_groups(cfg.data.tasks, cfg.data.split_seed)
    first = groups[0]
    for group in groups[1:]:
        if group.domain.input_shape != first.domain.input_shape:
            raise ConfigError(
                f"data.tasks.{group.tasks[0]}: its images have shape "
                f"{group.domain.input_shape} but task {first.tasks[0]}'s have "
                f"{first.domain.input_shape}; one encoder reads both (add a resize to "
                f"data.tasks.{group.tasks[0]}.transforms)"
            )
    model = MultiTaskModel(
        cfg.model.backbone,
        first.domain.input_shape,
        {t.name: t.outputs for t in specs},
        arch=cfg.model.arch or "hps",
        experts=cfg.model.experts or 3,
        hidden=cfg.model.heads,
    )
    notes = [
        f"data.tasks.{g.tasks[0]}: skipped {len(g.domain.skipped)} unreadable images"
        for g in groups
        if g.domain.skipped
    ]
    init = None if resuming else _initialize_encoders
    method, plan = _make_method(model, cfg, notes, init=init)
    method.setup_tasks(specs)
    method.to(runtime.device)
    streams = [
        TaskStream(g, batch_size=cfg.train.batch_size, seed=cfg.seed, device=runtime.device)
        for g in groups
    ]
    kinds = {t.name: t.loss for t in specs}
    classifying = [t.name for t in specs if t.loss != "mse"]
    averages = {"avg": classifying or [t.name for t in specs]}
    selection = _multitask_selection(cfg, kinds, averages["avg"])
    layout = "; ".join(f"{g.name}: {', '.join(g.tasks)}" for g in groups)
    notes.append(
        f"tasks by inputs: {layout}; model {model.arch} ({cfg.model.backbone}); "
        f"weighting {cfg.method.name}; selection: {selection.rule}"
        + (f" on {selection.metric}" if selection.metric else "")
    )
    return _experiment(
        cfg,
        method,
        plan,
        notes,
        subcommand="multitask",
        streams=streams,
        eval_sets={},
        selection=selection,
        averages=averages,
        evaluator=functools.partial(evaluate_tasks, groups=groups, specs=kinds),
        run_files={"tasks.json": _tasks_record(groups, specs)},
    )


def _initialize_encoders(model: MultiTaskModel, cfg: ExperimentConfig) -> str | None:
    """`init` loads a single-task model's features into the encoder (hps) or into every
    expert (mmoe); each task's head starts new."""
    encoders = [model.features] if model.arch == "hps" else list(model.experts)
    message = None
    for encoder in encoders:  # a view sharing the encoder's modules, so loading fills it
        message = initialize(Classifier(encoder, model.feature_dim, 1), cfg)
    if message is None:
        return None
    into = "the encoder" if model.arch == "hps" else f"each of the {len(encoders)} experts"
    return f"{message.split('; ')[0]} into {into}; every task gets a new head"


def _multitask_selection(cfg: ExperimentConfig, kinds: dict[str, str], avg: list[str]) -> Selection:
    if cfg.selection.rule == "last":
        return Selection(rule="last", metric=None, mode="max")
    names = {"ce": ("acc", "loss"), "bce": ("acc", "loss"), "mse": ("mse", "mae")}
    known = [f"{t}/val/{m}" for t, kind in kinds.items() for m in names[kind]]
    known += [f"avg/val/{m}" for m in names[kinds[avg[0]]]]
    default = "avg/val/" + names[kinds[avg[0]]][0]
    metric = cfg.selection.metric or default
    if metric not in known:
        test = "/test/" in metric
        reason = "is a test split; choose on a val split" if test else "is not measured"
        raise ConfigError(
            f"selection.metric: '{metric}' {reason}; choose one of {', '.join(known)}"
        )
    lower = metric.endswith(("/loss", "/mse", "/mae"))
    mode = cfg.selection.mode or ("min" if lower else "max")
    return Selection(rule=str(cfg.selection.rule), metric=metric, mode=mode)


def _tasks_record(groups, specs) -> dict[str, Any]:
    """tasks.json: each task's loss, head, weight and labelled sample counts per split."""
    tasks = {}
    for group in groups:
        for name in group.tasks:
            spec = next(t for t in specs if t.name == name)
            labelled = {}
            for split, labels in group.labels.items():
                y = labels[name]
                missing = (y < 0) if y.dtype == torch.long else torch.isnan(y)
                labelled[split] = {"samples": len(y), "labelled": int((~missing).sum())}
            tasks[name] = {
                "inputs": group.name,
                "loss": spec.loss,
                "outputs": spec.outputs,
                "weight": spec.weight,
                "splits": labelled,
            }
    return {"tasks": tasks}
