"""Regimes: what each subcommand feeds the engine (the core, below api.py).

`build_experiment(subcommand, cfg, runtime)` decides the data streams of a training step,
the domains evaluated, how the model starts and how the best checkpoint is chosen, and
returns the engine's `Experiment`, complete. The method (the loss) comes from
`method.name`; the loop is the engine's. `build_run` gives the same Experiment and the data
it evaluates with every split (`EvalData`): `xdt evaluate` (evaluate_run.py) rebuilds a
trained run through it, so the model, method and data are those the run trained with.
What a composite run adds to one of its runs is an argument here, never a patch afterwards:
a multitask run compared with single-task baselines (baselines.py) gets their record as
`single_task`, and summary.json then holds it and Delta_m.

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
  means `train_domains/...` (training domains) and `test_domains/...` (held-out domains) and
  the worst training domain, `worst_domain/...`. With no held-out domain (`test_domains: []`)
  every domain trains and is evaluated: the aim is then to do well on all of them (the mean
  and the worst). The rules are selection.py's.

Loss of generalize. Every step draws an equal batch of b samples from each of the D
training domains, and the objective is L(theta) = (1/D) sum_d lambda_d R_d with
R_d = mean over domain d's batch of s_{d,i} * loss_{d,i}. By default (lambda_d = 1, s = 1)
that is DomainBed's ERM (Gulrajani & Lopez-Paz 2021): the mean over training domains of each
domain's mean loss, whatever the domains' sizes, and the risks R_d that IRM, V-REx, GroupDRO,
... act on are plain per-domain means. `data.domain_weights[d]` sets lambda_d (default 1);
`data.sample_weights` sets s: `none` (1), `pooled` (D n_d / N, n_d the domain's training
samples and N their total: every training sample weighs the same whatever its domain's size,
as in one pooled data set), `class_balanced` (n_d / (C_d n_{d,y}), n_{d,y} the domain's count
of the sample's class and C_d its classes present: every class weighs the same in each
domain's risk, which keeps its mean 1), or the values of a .npy file (one per training
sample, the training domains' train splits concatenated in order). A sample of domain d is
drawn with probability b / n_d, so R_d estimates (1/n_d) sum_i s_{d,i} loss_{d,i} without
bias. The batch carries `weight = lambda_d * s_{d,i}`, indexed like the split so it travels
with its sample through in-memory and file streams alike, and None where that is 1 (then
methods/_shared_dg.py takes plain means); GroupDRO, V-REx and IRM therefore see lambda_d R_d.
The weights in force and each domain's share of the objective (lambda_d mean_i s_{d,i},
normalised) are written to `<run>/weights.json`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xdt_cli.config import DomainConfig, ExperimentConfig
from xdt_cli.data import Domain, check_compatible, load_configured_domain, make_stream
from xdt_cli.data.registry import get_spec
from xdt_cli.data.tasks import TaskGroup, TaskStream, load_task_groups
from xdt_cli.engine import Experiment, Selection
from xdt_cli.errors import ConfigError, XdtError
from xdt_cli.evaluation import delta_m, evaluate_tasks
from xdt_cli.freezing import param_groups, plan_freezing
from xdt_cli.initialization import initialize
from xdt_cli.methods import METHODS
from xdt_cli.models import Classifier, MultiTaskModel, create_model
from xdt_cli.runtime import Runtime, seed_everything
from xdt_cli.selection import RULES, Layout

# the file of a multitask run's folder that records its single-task baselines (`resume`
# reads it back)
SINGLE_TASK_FILE = "single_task.json"


@dataclass(frozen=True)
class EvalData:
    """The data a run evaluates, every split included (train, val, test).

    `domains`: the domains evaluated, by name in evaluation order (every regime with one
    model; the Experiment's eval_sets hold their val and test splits). `task_groups` and
    `task_losses` (multitask): the groups of tasks by inputs and each task's loss kind."""

    domains: dict[str, Domain] = field(default_factory=dict)
    task_groups: list[TaskGroup] = field(default_factory=list)
    task_losses: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltRun:
    """What `build_run` gives: the engine's Experiment and the data it evaluates."""

    experiment: Experiment
    data: EvalData


def build_experiment(
    subcommand: str,
    cfg: ExperimentConfig,
    runtime: Runtime,
    *,
    resuming: bool = False,
    single_task: dict[str, Any] | None = None,
) -> Experiment:
    """The engine's Experiment of a validated config.

    `resuming`: the weights come from last.pt, so `init` is not read again (the source run
    it names may be gone by then; everything it gave is in the checkpoint). `single_task`
    (multitask): the single-task baselines the run is compared with, as
    `baselines.run_baselines` records them; the run writes them to single_task.json, and
    summary.json holds them and their Delta_m (evaluation.delta_m)."""
    return build_run(
        subcommand, cfg, runtime, resuming=resuming, single_task=single_task
    ).experiment


def build_run(
    subcommand: str,
    cfg: ExperimentConfig,
    runtime: Runtime,
    *,
    resuming: bool = False,
    single_task: dict[str, Any] | None = None,
) -> BuiltRun:
    """`build_experiment`, plus the data the run evaluates with every split."""
    if single_task is not None and subcommand != "multitask":
        raise XdtError("single-task baselines: only multitask runs have tasks")
    seed_everything(cfg.seed, cfg.train.deterministic)
    if subcommand == "generalize":
        return _build_generalize(cfg, runtime, resuming=resuming)
    if subcommand == "multitask":
        return _build_multitask(cfg, runtime, resuming=resuming, single_task=single_task)
    domains = _domains(subcommand, cfg)
    trained = domains.target if subcommand == "finetune" else domains.source
    assert trained is not None  # config validation requires it

    model = create_model(
        cfg.model.backbone, trained.input_shape, trained.num_classes, cfg.model.bottleneck
    )
    notes = [
        f"{key}: skipped {len(d.skipped)} unreadable images (skip_bad_images)"
        for key, d in (("data.source", domains.source), ("data.target", domains.target))
        if d is not None and d.skipped
    ]
    method, plan = _make_method(model, cfg, notes, init=None if resuming else initialize)
    method.to(runtime.device)

    def stream(domain: Domain, labelled: bool, ratio: int = 1):
        return _train_stream(domain, cfg, runtime, labelled=labelled, batch_ratio=ratio)

    if subcommand == "train-source":
        streams = [stream(domains.source, True)]
    elif subcommand == "finetune":
        streams = [stream(domains.target, True)]
    else:  # transfer: the target's labels are dropped here, before any method sees a batch
        # the method may ask for more unlabelled images per step (FixMatch's mu)
        ratio = method.unlabelled_batch_ratio
        streams = [stream(domains.source, True), stream(domains.target, False, ratio)]

    eval_domains = [d for d in (domains.source, domains.target) if d is not None]
    eval_sets = {d.name: {"val": d.splits["val"], "test": d.splits["test"]} for d in eval_domains}
    layout = Layout(
        subcommand=subcommand,
        source=domains.source.name if domains.source is not None else None,
        target=domains.target.name if domains.target is not None else None,
    )
    experiment = _experiment(
        cfg,
        method,
        plan,
        notes,
        subcommand=subcommand,
        streams=streams,
        eval_sets=eval_sets,
        selection=make_selection(cfg, layout),
    )
    return BuiltRun(experiment, EvalData(domains={d.name: d for d in eval_domains}))


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
    batch_ratio: int = 1,
):
    """The training stream of a domain's train split, batched and seeded by the config
    (`batch_ratio` times train.batch_size images a step)."""
    return make_stream(
        domain.splits["train"],
        batch_size=global_batch(cfg, runtime) * batch_ratio,
        seed=cfg.seed,
        domain=domain.name,
        device=runtime.device,
        labelled=labelled,
        weight=weight,
        shard=runtime.shard,
    )


def global_batch(cfg: ExperimentConfig, runtime: Runtime) -> int:
    """Images of a domain a step over all ranks: train.batch_size, or N times it with
    train.batch_size_per_rank under torchrun (one process: the same)."""
    per_rank = cfg.train.batch_size_per_rank
    return cfg.train.batch_size * (runtime.world_size if per_rank else 1)


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


def make_selection(cfg: ExperimentConfig, layout: Layout) -> Selection:
    """The engine's Selection: `selection.rule` as selection.py defines it, resolved against
    the names this run evaluates (a metric the rule may not read is a ConfigError)."""
    rule = RULES[str(cfg.selection.rule)]  # validate_config resolves the subcommand's default
    metric, mode = rule.criterion(layout, cfg.selection.metric, cfg.selection.mode)
    return Selection(rule.name, metric, mode, pick=rule.pick, note=rule.note(layout))


# --------------------------------------------------------------------------- generalize
def _build_generalize(cfg: ExperimentConfig, runtime: Runtime, *, resuming: bool) -> BuiltRun:
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

    model = create_model(
        cfg.model.backbone, first.input_shape, first.num_classes, cfg.model.bottleneck
    )
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
    layout = Layout("generalize", training=tuple(names), held_out=tuple(held_names))
    selection = make_selection(cfg, layout)
    notes.append(
        f"training domains: {', '.join(names)}; held out: {', '.join(held_names) or 'none'}; "
        f"selection: {selection.rule}" + (f" on {selection.metric}" if selection.metric else "")
    )
    experiment = _experiment(
        cfg,
        method,
        plan,
        notes,
        subcommand="generalize",
        streams=streams,
        eval_sets=eval_sets,
        selection=selection,
        averages=averages,
        worst={"worst_domain": names},
        run_files={"weights.json": record},
    )
    return BuiltRun(experiment, EvalData(domains={d.name: d for d in [*training, *held]}))


def loss_weights(
    cfg: ExperimentConfig, training: list[Domain]
) -> tuple[list[Tensor | None], dict[str, Any]]:
    """The per-sample batch weights lambda_d * s_{d,i} of each training domain, indexed like
    its train split (None where all are 1, so that methods take plain means), and the record
    of weights.json. See the module docstring for the objective."""
    data = cfg.data
    ys = [d.splits["train"].y for d in training]
    sizes = [len(y) for y in ys]
    total, count = sum(sizes), len(training)
    kind = data.sample_weights
    if kind == "none":
        per_sample = [torch.ones(n, dtype=torch.float64) for n in sizes]
    elif kind == "pooled":
        per_sample = [torch.full((n,), count * n / total, dtype=torch.float64) for n in sizes]
    elif kind == "class_balanced":
        per_sample = [_class_balanced(y) for y in ys]
    else:
        per_sample = _weights_file(kind, sizes, [d.name for d in training])

    lambdas = [data.domain_weights.get(d.name, 1.0) for d in training]
    # a domain's share of the objective: lambda_d times the mean of its s (R_d's expectation
    # weighs each of its n_d samples by s_{d,i} / n_d)
    mass = [lam * float(w.mean()) for lam, w in zip(lambdas, per_sample, strict=True)]
    grand = sum(mass)
    if grand <= 0:
        raise ConfigError("data.sample_weights: every training sample has weight 0")
    weights: list[Tensor | None] = []
    domains: dict[str, Any] = {}
    for d, w, n, lam, m in zip(training, per_sample, sizes, lambdas, mass, strict=True):
        batch = (lam * w).float()
        weights.append(None if bool((batch == 1).all()) else batch)
        domains[d.name] = {
            "train_samples": n,
            "lambda_d": lam,
            "sample_weight": _stats(w),
            "batch_weight": _stats(batch),
            "share_of_loss": round(m / grand, 6),
        }
    record = {
        "formula": "L = (1/D) sum_d lambda_d R_d; R_d = mean over domain d's batch of "
        "s_{d,i} * loss_{d,i} (equal batches per domain); a batch carries weight = "
        "lambda_d * s_{d,i}, or none where that is 1 (plain means: DomainBed's ERM)",
        "sample_weights": kind,
        "domain_weights": dict(zip([d.name for d in training], lambdas, strict=True)),
        "N": total,
        "domains": domains,
    }
    return weights, record


def _class_balanced(y: Tensor) -> Tensor:
    """s_i = n / (C n_{y_i}) within one domain (C its classes present): each class weighs the
    same in the domain's risk, and the weights' mean is 1, so the domain's share is kept."""
    counts = torch.bincount(y).double()
    present = int((counts > 0).sum())
    return len(y) / (present * counts[y])


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
def _build_multitask(
    cfg: ExperimentConfig,
    runtime: Runtime,
    *,
    resuming: bool,
    single_task: dict[str, Any] | None,
) -> BuiltRun:
    """One stream per group of tasks that share inputs (data/tasks.py); every step holds a
    batch of every group, labelled for each of its tasks. The model is one encoder (hps) or
    a mixture of experts (mmoe) with a head per task (models.MultiTaskModel). With
    `single_task` (the baselines' record), single_task.json and summary.json hold it, and
    summary.json the Delta_m of the run's best metrics against it."""
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
        arch=cfg.model.arch,  # resolved: hps unless the config says mmoe (resolve.py)
        experts=cfg.model.experts,  # resolved: 3 under mmoe (config/schema.py)
        hidden=cfg.model.heads,
        bottleneck=cfg.model.bottleneck,
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
        TaskStream(
            g,
            batch_size=global_batch(cfg, runtime),
            seed=cfg.seed,
            device=runtime.device,
            shard=runtime.shard,
        )
        for g in groups
    ]
    kinds = {t.name: t.loss for t in specs}
    classifying = [t.name for t in specs if t.loss != "mse"]
    averages = {"avg": classifying or [t.name for t in specs]}
    selection = make_selection(cfg, Layout("multitask", tasks=tuple(kinds.items())))
    layout = "; ".join(f"{g.name}: {', '.join(g.tasks)}" for g in groups)
    notes.append(
        f"tasks by inputs: {layout}; model {model.arch} ({cfg.model.backbone}); "
        f"weighting {cfg.method.name}; selection: {selection.rule}"
        + (f" on {selection.metric}" if selection.metric else "")
    )
    run_files: dict[str, Any] = {"tasks.json": _tasks_record(groups, specs)}
    summary_extra: dict[str, Any] = {}
    finish_summary = None
    if single_task is not None:  # compared with single-task baselines
        run_files[SINGLE_TASK_FILE] = single_task
        summary_extra["single_task"] = single_task
        finish_summary = functools.partial(_delta_m_entry, baselines=single_task)
    experiment = _experiment(
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
        run_files=run_files,
        summary_extra=summary_extra,
        finish_summary=finish_summary,
    )
    return BuiltRun(experiment, EvalData(task_groups=groups, task_losses=kinds))


def _delta_m_entry(summary: dict[str, Any], *, baselines: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `delta_m`: the run's best metrics against the single-task baselines."""
    return {"delta_m": delta_m(summary, baselines)}


def _initialize_encoders(model: MultiTaskModel, cfg: ExperimentConfig) -> str | None:
    """`init` loads a single-task model's features into the encoder (hps) or into every
    expert (mmoe); each task's head starts new."""
    encoders = model.encoders()
    message = None
    for features, neck in encoders:  # a view sharing the encoder's modules: loading fills it
        view = Classifier(features, model.feature_dim, 1)
        view.bottleneck = neck
        message = initialize(view, cfg)
    if message is None:
        return None
    into = "the encoder" if model.arch == "hps" else f"each of the {len(encoders)} experts"
    return f"{message.split('; ')[0]} into {into}; every task gets a new head"


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
