"""THE training loop, shared by every subcommand.

The engine decides when to step, log, evaluate, save and stop; the method decides the loss
(`method.training_step`), and the regime decides which data streams feed a step. The engine
never branches on a method's or a subcommand's name.

Per step: one batch from every stream -> `training_step` under autocast -> (scaled) backward
-> optional clipping -> optimizer and schedule step. A method with `manual_optimization`
does the middle itself (`manual_step`, through the same `OptimizerStep`: scaler, autocast,
clipping); the schedule step and the weight average stay the engine's.

`train.ema`: an exponential moving average of every floating-point entry of the method's
state (weights and batch-norm statistics), updated after each optimizer step with the decay
min(ema, (1 + k) / (10 + k)) at step k (the warm-up of TensorFlow's ExponentialMovingAverage,
so early averages are not dominated by the random initialisation). When it is on, the
average is what evaluation scores and what best.pt holds; last.pt holds both the live
weights and the average, so a resumed run continues exactly.

`Experiment.averages` names groups of domains (e.g. a generalize run's training domains);
every eval row also holds their means, `<group>/<split>/<metric>`, which selection can use;
`Experiment.worst` names groups whose worst member is recorded the same way (the lowest acc,
the highest loss: e.g. `worst_domain/test/acc`).

Every `log_every` steps a train row goes to metrics.jsonl; every `eval_every` steps (and at
the end) an eval row, best.pt when the selection metric improves, and last.pt with the full
state (model, optimizer, schedule, grad scaler, RNG, step, best so far, early-stopping count,
the open log window, the weight average). Resuming
from last.pt therefore replays the remaining steps exactly: the data order is a function of
the step (see data/stream.py).

Loss values are summed on the device and read once per log step, not once per step, so the
loop does not synchronise with a GPU on every step; the non-finite guard reads the same sums
at every log step and before any checkpoint is written, so a NaN never reaches last.pt.

Under torchrun (distributed.py) the method trains inside PyTorch's DistributedDataParallel
(its `forward` is `training_step`), or, with manual optimisation, has its gradients averaged
over ranks before its optimizer step; the logged sums are averaged over ranks, evaluation is
sharded and all-reduced, rank 0's batch-norm statistics (and weight average) are broadcast
before each evaluation so that every rank scores, and rank 0 saves, the same weights; a stop
signal on any rank stops every rank after the same step; only rank 0 writes files, and its
last.pt holds every rank's open log window, so a resumed run logs the same numbers. Every rank
draws the same random numbers (the same seed, the same calls): a method's random choices
(RLW's weights, PCGrad's order, Mixup's pairs) agree across ranks, the streams augment the
whole global batch before keeping their share, and rank 0's RNG in last.pt is every rank's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from xdt_cli import distributed
from xdt_cli.checkpoint import (
    previous_path,
    resume_checkpoint,
    save_checkpoint,
    unwrap_state_dict,
)
from xdt_cli.config import (
    AdamConfig,
    AdamWConfig,
    CosineSchedule,
    ExperimentConfig,
    InvSchedule,
    OneCycleSchedule,
    SGDConfig,
    StepSchedule,
    first_line,
)
from xdt_cli.data import InMemoryStream, Split
from xdt_cli.errors import CheckpointError, NonFiniteLoss, RunInterrupted
from xdt_cli.evaluation import evaluate
from xdt_cli.freezing import release
from xdt_cli.methods.base import Method, OptimizerStep
from xdt_cli.progress import Reporter
from xdt_cli.runs import RunDir
from xdt_cli.runtime import Runtime, autocast_for, resolve_precision, stop_signals
from xdt_cli.selection import is_better, mode_of

if TYPE_CHECKING:
    from pathlib import Path

    from xdt_cli.tracking import Tracker


@dataclass(frozen=True)
class Selection:
    """A selection rule resolved for one run (selection.py defines the rules)."""

    rule: str
    metric: str | None  # None for rule "last"
    mode: str  # "max" or "min"
    pick: str = "best"  # "last": every evaluation replaces best.pt (DomainBed's oracle)
    note: str | None = None  # what the rule read, for summary.json (e.g. target labels)

    def better(self, value: float, best: float | None) -> bool:
        return self.metric is None or self.pick == "last" or is_better(value, best, self.mode)

    def as_dict(self) -> dict[str, Any]:
        out = {"rule": self.rule, "metric": self.metric, "mode": self.mode}
        return {**out, "note": self.note} if self.note else out


@dataclass(frozen=True)
class Experiment:
    """What a regime hands the engine: the method, its training streams and eval sets.

    Built complete by `regimes.build_experiment` (frozen: nothing patches it afterwards);
    what a composite run adds to a run, such as a multitask run's single-task baselines,
    is an argument of that function."""

    subcommand: str
    method: Method
    streams: list[InMemoryStream]
    eval_sets: dict[str, dict[str, Split]]
    selection: Selection
    # optimizer groups [{"params": [...], "lr_mult": f}]; None: every parameter that trains
    param_groups: list[dict[str, Any]] | None = None
    # gradual unfreezing: step -> model parameter names that train from that step on
    unfreeze: dict[int, list[str]] = field(default_factory=dict)
    # parameter counts recorded in summary.json ("trainable", "fixed", ...)
    parameters: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # shown to the user before training
    # group name -> domains whose metrics are averaged into `<group>/<split>/<metric>`
    averages: dict[str, list[str]] = field(default_factory=dict)
    # group name -> domains whose worst value is `<group>/<split>/<metric>` (lowest acc,
    # highest loss): a generalize run's worst training domain, `worst_domain`
    worst: dict[str, list[str]] = field(default_factory=dict)
    # extra JSON files of the run folder, e.g. {"weights.json": {...}}, written at its start
    run_files: dict[str, Any] = field(default_factory=dict)
    # scores the method instead of `evaluation.evaluate` over `eval_sets` (multitask: per
    # task metrics); called as evaluator(method, batch_size=, device=, autocast=)
    evaluator: Callable[..., dict[str, float]] | None = None
    # extra entries of summary.json (multitask: the single-task baselines it is compared
    # with), and a function of the summary giving more (their Delta_m, which needs the
    # run's best metrics)
    summary_extra: dict[str, Any] = field(default_factory=dict)
    finish_summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def add_averages(
    metrics: dict[str, float],
    averages: dict[str, list[str]],
    worst: dict[str, list[str]] | None = None,
) -> dict[str, float]:
    """`metrics` plus `<group>/<split>/<metric>`: the mean over the group's domains (groups of
    `averages`) or the worst of them (groups of `worst`: the lowest acc, the highest loss, as
    selection.mode_of says), for every `<split>/<metric>` that all of them have."""
    out = dict(metrics)
    groups = [(g, d, False) for g, d in averages.items()]
    groups += [(g, d, True) for g, d in (worst or {}).items()]
    for group, domains, pick_worst in groups:
        if not domains:
            continue
        suffixes = [k.split("/", 1)[1] for k in metrics if k.split("/", 1)[0] == domains[0]]
        for suffix in suffixes:
            values = [metrics.get(f"{d}/{suffix}") for d in domains]
            if any(v is None for v in values):
                continue
            if pick_worst:
                worse = max if mode_of(suffix) == "min" else min
                out[f"{group}/{suffix}"] = worse(values)  # type: ignore[type-var]
            else:
                out[f"{group}/{suffix}"] = sum(values) / len(values)  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- optimisation
def build_optimizer(cfg: ExperimentConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """One torch param group per lr multiplier (`optim.lr_mult`); the schedule scales all."""
    o = cfg.optim
    params = [{"params": g["params"], "lr": o.lr * g["lr_mult"]} for g in groups]
    if isinstance(o, SGDConfig):
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    if isinstance(o, AdamWConfig):
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    assert isinstance(o, AdamConfig)
    return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def lr_factor(cfg: ExperimentConfig) -> Callable[[int], float]:
    """The multiplier of the base lr for optimizer step k (0-based), for LambdaLR."""
    s, total = cfg.schedule, cfg.train.steps
    if isinstance(s, OneCycleSchedule):
        # torch.optim.lr_scheduler.OneCycleLR with anneal_strategy="cos", as a factor.
        lo, hi, end = 1 / s.div_factor, 1.0, 1 / (s.div_factor * s.final_div_factor)
        peak = max(s.pct_start * total - 1, 1)

        def onecycle(k: int) -> float:
            if k <= peak:
                return _cos_between(lo, hi, k / peak)
            return _cos_between(hi, end, min((k - peak) / max(total - 1 - peak, 1), 1.0))

        return onecycle

    warmup = s.warmup_steps

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        t = min((k - warmup) / max(total - warmup, 1), 1.0)
        if isinstance(s, StepSchedule):
            return s.gamma ** ((k - warmup) // s.step_size)
        if isinstance(s, CosineSchedule):
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if isinstance(s, InvSchedule):
            assert s.gamma is not None  # the schema resolved its default
            count = t if s.unit == "progress" else k - warmup
            return (1 + s.gamma * count) ** -s.power
        return 1.0

    return factor


NO_SKIPS = {"in_a_row": 0, "total": 0}  # Engine.nonfinite before any skipped step


def _nonfinite_terms(values: dict[str, Tensor]) -> list[str]:
    """The names of the entries holding a NaN or an infinity, `loss` (their sum) last."""
    bad = [
        k
        for k, v in values.items()
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    return sorted(bad, key=lambda k: (k == "loss", k))


def _cos_between(start: float, end: float, t: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- the engine
def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A detached copy of a state dict: tensors cloned, a method's extra state (any object
    returned by `get_extra_state`) deep-copied."""
    return {
        k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
        for k, v in state.items()
    }


class Engine:
    def __init__(
        self,
        cfg: ExperimentConfig,
        experiment: Experiment,
        runtime: Runtime,
        *,
        run: RunDir | None,
        reporter: Reporter,
        evaluate: bool = True,
    ) -> None:
        self.cfg = cfg
        self.exp = experiment
        self.method = experiment.method
        self.streams = experiment.streams
        self.runtime = runtime
        self.device = runtime.device
        self.run = run if runtime.is_main else None
        self.reporter = reporter
        self.trackers: list[Tracker] = []  # fit's: rank 0 mirrors its rows to them
        self.do_evaluate = evaluate

        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.autocast = autocast_for(self.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        groups = experiment.param_groups
        if groups is None:
            groups = [{"params": [p for p in self.method.parameters() if p.requires_grad]}]
            groups[0]["lr_mult"] = 1.0
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = build_optimizer(cfg, groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        # torchrun: DDP averages the gradients of a method trained through `forward`; a
        # manual method (several backward passes) gets them averaged by OptimizerStep
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        manual = self.method.manual_optimization
        if runtime.world_size > 1 and not manual:
            self.ddp = self._wrap()  # its constructor gives every rank rank 0's weights
        elif runtime.world_size > 1:
            distributed.broadcast_state(self.method)  # every rank starts from rank 0's weights
        self.opt_step = OptimizerStep(
            self.optimizer,
            self.scaler,
            self.autocast,
            self.params,
            cfg.train.grad_clip,
            average_gradients=runtime.world_size > 1 and manual,
            skip_nonfinite=cfg.train.on_nonfinite == "skip",
        )
        # train.on_nonfinite skip: skipped steps in a row (the run stops at max_nonfinite)
        # and in all
        self.nonfinite = dict(NO_SKIPS)
        # train.ema: the running average of the method's floating-point state
        self.ema: dict[str, Any] | None = None
        if cfg.train.ema is not None:
            self.ema = _snapshot(self.method.state_dict())

        self._model_params = dict(self.method.model.named_parameters())
        self.step = 0
        self.best: dict[str, Any] | None = None  # {"step", "value", "metrics"}
        self.last_eval: dict[str, float] = {}
        self.bad_evals = 0
        self.log_sums: dict[str, Tensor] = {}
        self.log_count = 0
        self.elapsed_before = 0.0
        self._signal: int | None = None

    def _wrap(self) -> torch.nn.parallel.DistributedDataParallel:
        """The method in DistributedDataParallel, which reduces the gradients of the
        parameters that train when it is built (so it is built again when more are
        released: gradual unfreezing)."""
        return torch.nn.parallel.DistributedDataParallel(
            self.method,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.method.unused_parameters,
        )

    # -- state ---------------------------------------------------------------------------
    def state_dict(self, elapsed: float, ranks_sums: list | None = None) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        extra = {"log_sums_ranks": ranks_sums} if ranks_sums is not None else {}
        return {
            **extra,
            "step": self.step,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "data": [s.state_dict() for s in self.streams],
            "ema": self.ema,
            "best": self.best,
            "last_eval": self.last_eval,
            "bad_evals": self.bad_evals,
            "log_sums": {k: v.detach().cpu() for k, v in self.log_sums.items()},
            "log_count": self.log_count,
            "nonfinite": dict(self.nonfinite),
            "elapsed": elapsed,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        with warnings.catch_warnings():  # a damaged entry may make torch warn: one line only
            warnings.simplefilter("ignore", UserWarning)
            self._load_state_dict(state, source)

    def _load_state_dict(self, state: dict[str, Any], source: str) -> None:
        try:
            for key in ("method", "optimizer", "scheduler", "scaler", "rng", "log_sums"):
                if not isinstance(state[key], dict):
                    raise TypeError(f"its {key} is a {type(state[key]).__name__}, not a dict")
            if state.get("data") != [s.state_dict() for s in self.streams]:
                raise CheckpointError(f"{source}: its data streams differ from this run's config")
            self.method.load_state_dict(unwrap_state_dict(state["method"]))
            if self.ema is not None:
                if state.get("ema") is None:
                    raise CheckpointError(f"{source}: was written without train.ema")
                saved = unwrap_state_dict(state["ema"])
                if saved.keys() != self.ema.keys():
                    raise CheckpointError(f"{source}: its weight average has other entries")
                for key, value in saved.items():
                    if isinstance(self.ema[key], Tensor):
                        self.ema[key].copy_(value)
                    else:  # a method's extra state (e.g. L2-SP's head origin)
                        self.ema[key] = copy.deepcopy(value)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"]["cpu"])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.step = int(state["step"])
            self.best = state["best"]
            self.last_eval = dict(state["last_eval"])
            self.bad_evals = int(state["bad_evals"])
            self.log_sums = {k: v.to(self.device) for k, v in self._saved_sums(state).items()}
            self.log_count = int(state["log_count"])
            self.nonfinite = dict(state.get("nonfinite", NO_SKIPS))  # older: no such entry
            self.elapsed_before = float(state["elapsed"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as exc:
            # a damaged entry (an older checkpoint without a checksum): one line, exit 2
            first = first_line(exc, 200, kind=False)
            raise CheckpointError(f"{source}: does not match this run ({first})") from None

    def _saved_sums(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """The open log window's sums to continue from: a torchrun run saved every rank's;
        resumed on as many ranks, each takes its own (so the logged mean is bit-exact),
        else each takes their mean (the same logged mean, to rounding)."""
        ranks = state.get("log_sums_ranks")
        if not ranks:
            return state["log_sums"]
        if len(ranks) == self.runtime.world_size:
            return ranks[self.runtime.rank]
        return {k: sum(r[k] for r in ranks) / len(ranks) for k in ranks[0]}

    def resume_from(self, path: Path) -> str | None:
        """Continue from last.pt, or from last.prev.pt when last.pt is damaged or missing
        (see checkpoint.resume_checkpoint); returns the note that says so."""
        state, note = resume_checkpoint(path)
        self.load_state_dict(state, str(path if note is None else previous_path(path)))
        return note

    # -- the loop ------------------------------------------------------------------------
    def fit(self, trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
        """Train from `self.step` to `train.steps`; return the summary (also written).
        Every metrics row and the summary also go to `trackers` (tracking/; rank 0)."""
        self.trackers = list(trackers) if self.run is not None else []
        total = self.cfg.train.steps
        started = time.perf_counter()
        elapsed = lambda: self.elapsed_before + time.perf_counter() - started  # noqa: E731
        self.method.train()
        status, error, early = "completed", None, False
        self.reporter.start(total=total, done=self.step)
        try:
            with self._signals():
                while self.step < total:
                    self._release_due_parameters()
                    out = self._train_step()
                    self.step += 1
                    if out is not None:  # None: a skipped non-finite step (on_nonfinite)
                        self._accumulate(out)
                    self.reporter.advance(self.step)
                    if self.step % self.cfg.train.log_every == 0:
                        self._log_train()
                    if self.do_evaluate and (
                        self.step % self.cfg.train.eval_every == 0 or self.step == total
                    ):
                        early = self._evaluate_and_save(elapsed())
                        if early:
                            break
                    if self._stop_requested():
                        self._check_finite()
                        self._check_weights_finite()
                        self._save_last(elapsed())
                        raise RunInterrupted(self._signal or signal.SIGTERM, self.step)
        except NonFiniteLoss as exc:
            status, error = "failed", str(exc)
        except RunInterrupted:
            self._write_summary("interrupted", elapsed(), None, False)
            raise
        finally:
            self.reporter.stop()
        return self._write_summary(status, elapsed(), error, early)

    def _release_due_parameters(self) -> None:
        """Gradual unfreezing: parameters whose step has come start to train (idempotent, so
        a resumed run releases everything due up to its step)."""
        due = [n for s, names in self.exp.unfreeze.items() if s <= self.step for n in names]
        if due and not all(self._model_params[n].requires_grad for n in due):
            release(self.method.model, due)
            if self.ddp is not None:  # DDP reduces only what trained when it was built
                self.ddp = self._wrap()

    def _train_step(self) -> dict[str, Tensor] | None:
        """One optimisation step; None when train.on_nonfinite skip skipped it."""
        batch = []  # a multitask stream gives one batch per task of its inputs
        for stream in self.streams:
            part = stream.batch(self.step)
            batch.extend(part if isinstance(part, list) else [part])
        skip = self.opt_step.skip_nonfinite
        # skip mode: the buffers (batch-norm statistics) the forward pass moves are put back
        # when the step is skipped, so a NaN batch leaves no trace in the model
        buffers = [b.clone() for b in self.method.buffers()] if skip else []
        if self.method.manual_optimization:
            out = self.method.manual_step(batch, self.step, self.opt_step)
            skipped = self.opt_step.skipped or (skip and self._any_nonfinite(out["loss"]))
        else:
            with self.autocast:
                if self.ddp is not None:  # Method.forward is training_step
                    out = self.ddp(batch, self.step)
                else:
                    out = self.method.training_step(batch, self.step)
            # a collective decision under torchrun: DDP's backward needs every rank
            skipped = skip and self._any_nonfinite(out["loss"])
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.opt_step.backward(out["loss"])
                self.opt_step.step()
                skipped = self.opt_step.skipped
        self.scheduler.step()  # the lr follows the step count, skipped steps included
        if skipped:
            with torch.no_grad():
                for buffer, before in zip(self.method.buffers(), buffers, strict=True):
                    buffer.copy_(before)
            self._count_skipped(out)
            return None
        self.nonfinite["in_a_row"] = 0
        self._update_ema()
        return out

    def _any_nonfinite(self, loss: Tensor) -> bool:
        """The loss is NaN or infinite here, or (torchrun) on any rank; reads it (a sync)."""
        return distributed.any_(not bool(torch.isfinite(loss.detach()).all()), self.device)

    def _count_skipped(self, out: dict[str, Tensor]) -> None:
        """train.on_nonfinite skip: count the step (1-based number self.step + 1), say
        which loss terms were non-finite, and stop after max_nonfinite in a row."""
        self.nonfinite["in_a_row"] += 1
        self.nonfinite["total"] += 1
        terms = _nonfinite_terms(out) or ["the gradients"]
        in_a_row, limit = self.nonfinite["in_a_row"], self.cfg.train.max_nonfinite
        where = f"step {self.step + 1}: non-finite {', '.join(terms)}"
        if in_a_row >= limit:
            raise NonFiniteLoss(
                f"{where}; {in_a_row} steps in a row skipped (train.max_nonfinite {limit}), "
                "so the run stops; last.pt keeps the last good state (try a lower optim.lr "
                "or train.grad_clip)"
            )
        self.reporter.message(f"{where}; step skipped ({in_a_row} in a row)")

    @torch.no_grad()
    def _update_ema(self) -> None:
        """avg <- d avg + (1 - d) theta after the optimizer step of step k (0-based), with
        d = min(train.ema, (1 + k) / (10 + k)); a function of the step alone, so resuming
        needs only the average itself. Integer entries (batch counts) and a method's
        non-tensor extra state (L2-SP's head origin, DELTA's attention) are copied."""
        if self.ema is None:
            return
        assert self.cfg.train.ema is not None
        decay = min(self.cfg.train.ema, (1 + self.step) / (10 + self.step))
        current = self.method.state_dict()
        for key, avg in self.ema.items():
            value = current[key]
            if not isinstance(avg, Tensor):
                self.ema[key] = copy.deepcopy(value)
            elif avg.is_floating_point():
                avg.lerp_(value.detach().to(avg.dtype), 1.0 - decay)
            else:
                avg.copy_(value.detach())

    @contextlib.contextmanager
    def _evaluated_weights(self) -> Iterator[None]:
        """With train.ema, the method holds the average inside this block and its live
        weights again after it (copied back in place, so the optimizer is unaffected)."""
        if self.ema is None:
            yield
            return
        live = _snapshot(self.method.state_dict())
        self.method.load_state_dict(self.ema)
        try:
            yield
        finally:
            self.method.load_state_dict(live)

    def _accumulate(self, out: dict[str, Tensor]) -> None:
        for key, value in out.items():
            total = self.log_sums.get(key)
            if total is None:  # a fresh float32 sum: later steps add into it in place
                self.log_sums[key] = value.detach().to(torch.float32, copy=True)
            else:
                total.add_(value.detach())
        self.log_count += 1

    def _stop_requested(self) -> bool:
        """A stop signal here, or (torchrun) on any rank: every rank stops after this step."""
        if self.runtime.world_size == 1:
            return self._signal is not None
        return distributed.any_(self._signal is not None, self.device)

    def _check_finite(self, averaged: bool = False) -> None:
        loss = self.log_sums.get("loss")
        if loss is not None and self.runtime.world_size > 1 and not averaged:
            # torchrun: every rank checks the mean over ranks (a NaN on one stops them all)
            # on a copy: each rank's own sums stay as they are until the window is logged
            loss = distributed.average_(loss.clone())
        if loss is not None and not torch.isfinite(loss).item():
            terms = ", ".join(_nonfinite_terms(self.log_sums) or ["loss"])
            raise NonFiniteLoss(
                f"the training loss became non-finite between steps "
                f"{self.step - self.log_count + 1} and {self.step} ({terms}); last.pt keeps "
                "the last good state (try a lower optim.lr, train.grad_clip, "
                "train.on_nonfinite=skip or train.precision=fp32)"
            )

    def _check_weights_finite(self) -> None:
        """No checkpoint holds a NaN: weights that became non-finite while the loss stayed
        finite (it can happen) stop the run before anything is written. A collective
        decision under torchrun: each rank's batch-norm statistics are its own until
        `_align_ranks`, and every rank must stop together."""
        bad = _nonfinite_terms(self.method.state_dict())
        if distributed.any_(bool(bad), self.device):
            where = bad[0] if bad else "on another rank"
            raise NonFiniteLoss(
                f"the weights became non-finite by step {self.step} ({where}); last.pt "
                "keeps the last good state (try a lower optim.lr or train.grad_clip)"
            )

    def _log_train(self) -> None:
        for key in sorted(self.log_sums):  # torchrun: the whole global batch's values
            distributed.average_(self.log_sums[key])
        self._check_finite(averaged=True)
        row: dict[str, Any] = {"step": self.step, "split": "train"}
        for key, total in self.log_sums.items():  # none when every step was skipped
            row[f"train/{key}"] = (total / self.log_count).item()
        row["train/lr"] = self.scheduler.get_last_lr()[0]
        if self.opt_step.skip_nonfinite:
            row["train/nonfinite_skipped"] = self.nonfinite["total"]
        self.log_sums, self.log_count = {}, 0
        self._record(row)
        self.reporter.train_row(row)

    def _evaluate_and_save(self, elapsed: float) -> bool:
        """Evaluate, update best.pt and last.pt; return True when early stopping triggers."""
        self._check_finite()
        self._check_weights_finite()
        self._align_ranks()
        with self._evaluated_weights():
            score = self.exp.evaluator
            if score is None:
                score = functools.partial(evaluate, eval_sets=self.exp.eval_sets)
            metrics = score(
                self.method,
                batch_size=self.cfg.train.eval_batch_size,
                device=self.device,
                autocast=self.autocast,
            )
            metrics = add_averages(metrics, self.exp.averages, self.exp.worst)
            self.last_eval = metrics
            sel = self.exp.selection
            value = metrics[sel.metric] if sel.metric else None
            improved = sel.better(value, self.best["value"] if self.best else None)
            if improved:
                self.best = {"step": self.step, "value": value, "metrics": metrics}
                self.bad_evals = 0
                if self.run is not None:  # the weights evaluated: the average under ema
                    state = {"step": self.step, "method": self.method.state_dict()}
                    with self.run.writing():
                        save_checkpoint(self.run.best_ckpt, {**state, "metrics": metrics})
            else:
                self.bad_evals += 1
        self._record({"step": self.step, "split": "eval", **metrics})
        self._save_last(elapsed)
        self.reporter.eval_row(self.step, metrics, sel.metric, improved)
        patience = self.cfg.train.early_stopping
        return patience is not None and self.bad_evals >= patience

    def _align_ranks(self) -> None:
        """torchrun: rank 0's batch-norm statistics (each rank updates its own from its
        share) and weight average on every rank, so all score and rank 0 saves one model."""
        if self.runtime.world_size == 1:
            return
        distributed.broadcast_state(self.method)
        if self.ema is not None:
            for value in self.ema.values():
                if isinstance(value, Tensor):
                    torch.distributed.broadcast(value, src=0)

    def _save_last(self, elapsed: float) -> None:
        sums = None
        if self.runtime.world_size > 1:  # a collective: every rank hands rank 0 its sums
            local = {k: v.detach().cpu() for k, v in self.log_sums.items()}
            sums = distributed.gather_objects(local)
        if self.run is not None:
            with self.run.writing():
                state = self.state_dict(elapsed, sums)
                save_checkpoint(self.run.last_ckpt, state, keep_previous=True)

    def _record(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row (rank 0), mirrored to the trackers (tracking/)."""
        if self.run is not None:
            self.run.append_metrics(row)
            for tracker in self.trackers:
                tracker.log(row)

    def _write_summary(
        self, status: str, elapsed: float, error: str | None, early: bool
    ) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "status": status,
            "subcommand": self.exp.subcommand,
            "final": self.last_eval,
            "best": self.best["metrics"] if self.best else {},
            "best_step": self.best["step"] if self.best else None,
            "selection": self.exp.selection.as_dict(),
            "steps": self.step,
            "wall_time_s": round(elapsed, 3),
            "early_stopped": early,
            "parameters": self.exp.parameters,
            **self.exp.summary_extra,
        }
        if self.exp.finish_summary is not None:
            summary.update(self.exp.finish_summary(summary))
        if self.cfg.train.ema is not None:
            summary["ema"] = self.cfg.train.ema  # "best" and "final" score the average
        if self.opt_step.skip_nonfinite:
            summary["nonfinite_skipped"] = self.nonfinite["total"]
        if error is not None:
            summary["error"] = error
        if self.run is not None:
            summary["run_dir"] = str(self.run.path)
            self.run.write_json(self.run.summary_path, summary)
            for tracker in self.trackers:
                tracker.finish(summary)
        return summary

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the loop to stop after the current step and save."""

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self._signal = signum
            self.reporter.message("stopping after this step; saving last.pt ...")

        with stop_signals(handler):
            yield
