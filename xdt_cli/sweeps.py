"""Sweeps: one experiment config run over a grid, random draws and seeds, one process per run.

A sweep file (YAML, read with `yaml.safe_load` and validated strictly like a config):
```yaml
name: quickstart_lr          # default: the file's stem; the folder <runs-dir>/<name>
subcommand: train-source     # default train-source
config: ../quickstart.yaml   # the base experiment config, relative to this file
overrides: [train.steps=300] # fixed key=value overrides given to every run
grid:                        # dotted key -> values; the runs are the cartesian product
  optim.lr: [1.0e-3, 3.0e-3]
random:                      # optional: n draws from numpy.random.default_rng(seed)
  n: 4
  seed: 0
  params:                    # key -> one of {choice: [...]}, {uniform: [lo, hi]},
    optim.weight_decay: {loguniform: [1.0e-6, 1.0e-3]}  # {loguniform: [lo, hi]},
                             # {randint: [lo, hi]} (both ends included)
seeds: [0, 1]                # default [0]; each run gets seed=S
launcher:                    # optional: where the runs go (flags of the same name win)
  name: slurm                # local (default: the process pool below) | slurm (launchers.py)
  partition: gpu             # Slurm only: partition, time (minutes per run), gpus_per_run,
  time: 60                   # cpus_per_run, array_parallelism
```
Runs = grid points (crossed with the random draws when both are given) x seeds.

Or, instead of `random:` and `seeds:`, a hyper-parameter search as DomainBed runs one
(Gulrajani & Lopez-Paz, ICLR 2021; search.py):
```yaml
search: {draws: 20, trials: 3}
grid: {data.test_domains: [[rot0], [rot15]]}   # the cells: held-out domains, methods, ...
```
Runs = grid points x draws x trials. Draw d of a grid point is `search.draw` of the space
of its config's method (the method's `search_space` and search.shared_space); draw 0 is the
config's own values. Trial t sets `seed=t` and `data.split_seed=t` (DomainBed's trial seed
sets the data split too), the same for every draw, so `xdt report --choose-by RULE` can pick
within each trial the draw whose RULE validation is best. A key set in `overrides:` is held
there and not searched; a grid key may not be a searched one. A run's
overrides are the fixed ones, its grid and random values and `seed=S`, each `key=value` with
the value written so that YAML reads it back unchanged. A run lives in
`<runs-dir>/<name>/<slug>-<hash>`: the slug shows the values that vary (`lr0.001-seed0`) and
the hash is the first 8 hex digits of the sha256 of the sorted overrides, so the same
settings always land in the same folder; a search run's slug ends in `draw<d>-trial<t>`.

Every run is exactly the command that `xdt sweep --dry-run` prints:
`xdt <subcommand> CONFIG KEY=VALUE... --runs-dir <runs-dir>/<name> --name <slug>-<hash>
--quiet --json`, or `xdt resume RUN_DIR --quiet --json` for a run that was interrupted or
killed. Calling the sweep again skips completed runs, resumes unfinished ones and leaves
failed ones alone (they are reported; delete the folder to run one again).

Two calls of the same sweep at once (two people, two shells) share the work and never run
one run twice. Before it launches a run, a call takes `<sweep>/.claims/<name>.lock` (an
exclusive, non-blocking `flock`) and holds it until the run's process ends, then looks at
the run folder again: another call may have finished it meanwhile. A run whose claim (or
whose own `<run>/.lock`, held by an `xdt resume` started by hand) is taken waits at the back
of the queue and is tried again each second; when it is free the call finds the run
completed (and says so) or, if its holder was killed, resumes it. The kernel drops a lock
when its holder dies, so a killed call never leaves a run stuck. Claims are local `flock`s:
calls on one machine, or on a file system whose locks span machines.

`load_sweep` reads a sweep file, `plan` expands it and validates every run's config
in-process before anything starts, `run_sweep` runs the plan N processes at a time and
writes `<runs-dir>/<name>/sweep.json`; launchers.py submits the same plan to Slurm instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from xdt_cli.config import (
    SUBCOMMANDS,
    dump_config,
    error_lines,
    flatten,
    parse_override,
    read_yaml,
)
from xdt_cli.errors import ConfigError
from xdt_cli.files import atomic_write_text
from xdt_cli.progress import stderr_console
from xdt_cli.resolve import load_config, resolve_from_run
from xdt_cli.runs import default_runs_dir
from xdt_cli.runtime import stop_signals
from xdt_cli.search import draw as draw_search
from xdt_cli.search import is_hyperparameter, is_small, shared_space

HASH_LENGTH = 8
SLUG_MAX = 60
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


# --------------------------------------------------------------------------- the file
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: choice (a list), uniform, loguniform or randint ([lo, hi])."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: (
        tuple[Annotated[int, Field(strict=True)], Annotated[int, Field(strict=True)]] | None
    ) = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise ValueError(
                "expected one of {choice: [a, b, ...]}, {uniform: [lo, hi]}, "
                f"{{loguniform: [lo, hi]}}, {{randint: [lo, hi]}} (got {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is None:
                continue
            lo, hi = bounds
            if not lo < hi:
                raise ValueError(f"{kind}: expected [lo, hi] with lo < hi (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: the bounds must be positive (got [{lo}, {hi}])")
        return self

    def sample(self, rng: Any) -> Any:
        """One draw as a plain Python value (numpy scalars do not survive yaml.safe_dump)."""
        if self.choice is not None:
            return self.choice[int(rng.integers(len(self.choice)))]
        if self.uniform is not None:
            return float(rng.uniform(*self.uniform))
        if self.loguniform is not None:
            lo, hi = self.loguniform
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        assert self.randint is not None
        return int(rng.integers(self.randint[0], self.randint[1], endpoint=True))


class RandomSpec(_Strict):
    n: int = Field(gt=0, strict=True, description="how many draws")
    seed: int = Field(0, strict=True, description="seed of numpy.random.default_rng")
    params: dict[str, Distribution] = Field(min_length=1)


class SearchSpec(_Strict):
    """DomainBed's protocol: `draws` hyper-parameter draws (0 = the defaults) x `trials` seeds."""

    draws: int = Field(
        gt=0, strict=True, description="draws per grid point; draw 0 is the defaults"
    )
    trials: int = Field(
        gt=0, strict=True, description="trial seeds 0..trials-1 (seed and data.split_seed)"
    )


class LauncherSpec(_Strict):
    """Where the runs go: the local process pool, or a Slurm job array (launchers.py).

    Every key may be left out; command-line flags of the same name override the file. The
    Slurm keys may sit under `name: local` too, so that `--launcher slurm` alone switches.
    """

    name: Literal["local", "slurm"] = Field("local", description="local | slurm")
    partition: str | None = Field(
        None, min_length=1, description="Slurm partition (default: the cluster's default)"
    )
    time: int | None = Field(None, gt=0, strict=True, description="minutes per run (Slurm)")
    gpus_per_run: int | None = Field(None, ge=0, strict=True, description="GPUs per run (Slurm)")
    cpus_per_run: int | None = Field(None, gt=0, strict=True, description="CPUs per run (Slurm)")
    array_parallelism: int | None = Field(
        None, gt=0, strict=True, description="array tasks at once (Slurm)"
    )


class SweepFile(_Strict):
    """The schema of a sweep file; every level forbids unknown keys."""

    name: str | None = Field(None, description="the sweep's folder; default: the file's stem")
    subcommand: str = "train-source"
    config: str = Field(description="the base experiment config, relative to the sweep file")
    overrides: list[str] = Field(default_factory=list)
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    random: RandomSpec | None = None
    search: SearchSpec | None = Field(
        None, description="a hyper-parameter search: draws x trials per grid point"
    )
    seeds: list[Annotated[int, Field(strict=True)]] = Field(
        default_factory=lambda: [0], min_length=1
    )
    single_task_baselines: bool = Field(
        False,
        description="multitask: run with --single-task-baselines, the baselines kept in "
        "<runs-dir>/single_task and so shared by every sweep of that runs folder",
    )
    launcher: LauncherSpec | None = Field(
        None, description="local or slurm, and the Slurm settings (flags override them)"
    )

    @model_validator(mode="after")
    def _baselines(self) -> SweepFile:
        if self.single_task_baselines and self.subcommand != "multitask":
            raise ValueError("single_task_baselines: only multitask runs have tasks")
        if self.search is not None and self.random is not None:
            raise ValueError("search: draws its own values; drop random: (or search:)")
        if self.search is not None and "seeds" in self.model_fields_set:
            raise ValueError("search: its trials are the seeds; drop seeds:")
        return self


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file. `config` is the path each run is given."""

    path: Path
    name: str
    subcommand: str
    config: Path
    overrides: tuple[str, ...]
    grid: dict[str, list[Any]]
    random: RandomSpec | None
    seeds: tuple[int, ...]
    single_task_baselines: bool = False
    search: SearchSpec | None = None
    launcher: LauncherSpec | None = None


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every problem is one ConfigError line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    data = read_yaml(path)
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(*(f"{path}: {line}" for line in error_lines(exc, SweepFile))) from None

    problems: list[str] = []
    name = spec.name if spec.name is not None else path.stem
    if not re.fullmatch(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*", name) or ".." in name:
        problems.append(
            f"name: '{name}' is the sweep's folder: use letters, digits and ._=+- only "
            "(no '/', '..' or leading '.')"
        )
    if spec.subcommand not in SUBCOMMANDS:
        problems.append(
            f"subcommand: unknown subcommand '{spec.subcommand}' (known: {', '.join(SUBCOMMANDS)})"
        )
    config = Path(spec.config).expanduser()
    if not config.is_absolute():
        config = path.parent / config
    if not config.is_file():
        problems.append(f"config: config file {config} not found")

    fixed: list[str] = []
    keys: list[tuple[str, str]] = []  # (dotted key, where it is set)
    for i, text in enumerate(spec.overrides):
        try:
            parts, value = parse_override(text)
            fixed.append(f"{'.'.join(parts)}={render_value(value)}")
            keys.append((".".join(parts), f"overrides[{i}]"))
        except ConfigError as exc:
            problems.extend(f"overrides[{i}]: {line}" for line in exc.lines)
    for key, values in spec.grid.items():
        keys.append((key, f"grid.{key}"))
        rendered = [_render_or_none(v) for v in values]
        if None in rendered:
            problems.append(f"grid.{key}: cannot pass {values[rendered.index(None)]!r} as a value")
        elif len(set(rendered)) != len(rendered):
            problems.append(f"grid.{key}: a value appears twice in {values!r}")
    if spec.random is not None:
        for key, dist in spec.random.params.items():
            keys.append((key, f"random.params.{key}"))
            if dist.choice is not None and None in map(_render_or_none, dist.choice):
                problems.append(f"random.params.{key}.choice: a value cannot be passed on")
    if len(set(spec.seeds)) != len(spec.seeds):
        problems.append(f"seeds: a seed appears twice in {spec.seeds}")
    problems.extend(_key_problems(keys))
    if spec.search is not None:
        problems.extend(_search_key_problems(keys))
    if problems:
        raise ConfigError(*(f"{path}: {p}" for p in problems))
    return Sweep(
        path=path,
        name=name,
        subcommand=spec.subcommand,
        config=_shown_path(config),
        overrides=tuple(fixed),
        grid=dict(spec.grid),
        random=spec.random,
        seeds=tuple(spec.seeds),
        single_task_baselines=spec.single_task_baselines,
        search=spec.search,
        launcher=spec.launcher,
    )


def _key_problems(keys: list[tuple[str, str]]) -> list[str]:
    """Each key is set in one place only, and `seed` comes from `seeds:`."""
    problems = []
    for i, (key, where) in enumerate(keys):
        parts = key.split(".")
        if not key or not all(parts) or any(c in key for c in "= \t"):
            problems.append(f"{where}: '{key}' is not a dotted key path like optim.lr")
            continue
        if key == "seed":
            problems.append(f"{where}: set the run seeds with seeds: [0, 1, ...], not here")
        for other, other_where in keys[:i]:
            if key == other or key.startswith(other + ".") or other.startswith(key + "."):
                problems.append(f"{where}: '{key}' is also set by {other_where}")
    return problems


def _search_key_problems(keys: list[tuple[str, str]]) -> list[str]:
    """Under search:, the trial sets the seeds and the draws set the hyper-parameters."""
    problems = []
    for key, where in keys:
        if key == "data.split_seed":
            problems.append(f"{where}: search: sets data.split_seed to the trial seed")
        elif is_hyperparameter(key) and where.startswith("grid."):
            problems.append(
                f"{where}: '{key}' is a searched hyper-parameter; fix it in overrides: "
                "(then it is not searched) or let the draws set it"
            )
    return problems


def _shown_path(path: Path) -> Path:
    """The path as runs are given it: relative to the working folder when inside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd())
    except ValueError:
        return resolved


# --------------------------------------------------------------------------- values
def render_value(value: Any) -> str:
    """A value as override text that `yaml.safe_load` reads back as the same value."""
    text = _render_or_none(value)
    if text is None:
        raise ConfigError(f"the value {value!r} cannot be written as a one-line YAML value")
    return text


def _render_or_none(value: Any) -> str | None:
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=2**30, allow_unicode=True)
    except yaml.YAMLError:
        return None
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if "\n" in text or yaml.safe_load(text) != value:
        return None
    return text


def run_hash(overrides: list[str] | tuple[str, ...]) -> str:
    """First 8 hex digits of the sha256 of the sorted overrides: independent of their order."""
    canonical = "\n".join(sorted(overrides))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_LENGTH]


def draw(spec: RandomSpec) -> list[dict[str, Any]]:
    """`spec.n` draws, each param in file order, from numpy.random.default_rng(spec.seed)."""
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    return [{key: dist.sample(rng) for key, dist in spec.params.items()} for _ in range(spec.n)]


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in file order ([{}] for no grid)."""
    return [
        dict(zip(sweep.grid, combo, strict=True))
        for combo in itertools.product(*sweep.grid.values())
    ]


def points(sweep: Sweep) -> list[dict[str, Any]]:
    """Every run's values: grid product (x random draws) x seeds, `seed` last."""
    draws = draw(sweep.random) if sweep.random is not None else [{}]
    return [
        {**g, **d, "seed": seed} for g in grid_points(sweep) for d in draws for seed in sweep.seeds
    ]


@dataclass(frozen=True)
class Point:
    """One run's values and the label its folder name starts with."""

    values: dict[str, Any]
    label: str
    draw: int | None = None  # a search's draw and trial
    trial: int | None = None


def space_of(cfg: Any) -> dict[str, Any]:
    """The search space of a resolved config: search.shared_space for its optimizer and
    image size (small when every data set it reads is), then its method's own keys."""
    from xdt_cli.data.registry import get_spec
    from xdt_cli.methods import METHODS

    data = cfg.data
    names = [data.dataset] if data.dataset else []
    names += [d.dataset for d in (data.source, data.target) if d is not None]
    names += [task.dataset for task in (data.tasks or {}).values()]
    small = bool(names) and all(is_small(get_spec(name).input_shape) for name in names)
    own = METHODS[cfg.method.name].search_space
    return {**shared_space(cfg.optim.name, small), **{f"method.{k}": p for k, p in own.items()}}


def search_points(sweep: Sweep) -> list[Point]:
    """A search's runs: for each grid point, draws x trials of its config's space (keys
    fixed in `overrides:` left out), draw 0 being that config's values."""
    assert sweep.search is not None
    varying = [k for k, v in sweep.grid.items() if len(v) > 1]
    fixed = {text.split("=", 1)[0] for text in sweep.overrides}
    out = []
    for g in grid_points(sweep):
        given = [*sweep.overrides, *(f"{k}={render_value(v)}" for k, v in g.items())]
        try:
            cfg = load_config(sweep.config, given, subcommand=sweep.subcommand)
        except ConfigError as exc:
            raise ConfigError(*(f"{sweep.path}: {line}" for line in exc.lines)) from None
        space = {k: p for k, p in space_of(cfg).items() if k not in fixed}
        resolved = flatten(yaml.safe_load(dump_config(cfg)))
        prefix = f"{_slug(g, varying)}-" if varying else ""
        for d in range(sweep.search.draws):
            values = draw_search(space, d, {k: resolved[k] for k in space})
            for t in range(sweep.search.trials):
                out.append(
                    Point(
                        {**g, **values, "seed": t, "data.split_seed": t},
                        f"{prefix}draw{d}-trial{t}",
                        d,
                        t,
                    )
                )
    return out


def _slug(values: dict[str, Any], varying: list[str]) -> str:
    """`lr0.001-seed0`: the varying values, only [A-Za-z0-9._=-], at most SLUG_MAX chars."""
    last = [k.rsplit(".", 1)[-1] for k in varying]
    parts = []
    for key, short in zip(varying, last, strict=True):
        label = short if last.count(short) == 1 else key
        value = values[key]
        text = f"{value:.4g}" if isinstance(value, float) else render_value(value)
        text = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")
        sep = "" if not text or text[0].isdigit() or text[0] in "-." else "="
        parts.append(f"{label}{sep}{text}")
    slug = re.sub(r"\.{2,}", ".", "-".join(parts)).lstrip(".-")
    return slug[:SLUG_MAX].rstrip("-_.=") or "run"


# --------------------------------------------------------------------------- the plan
@dataclass
class PlannedRun:
    """One run of a sweep and what this call will do with it."""

    name: str
    values: dict[str, Any]
    overrides: list[str]
    run_dir: Path
    log_path: Path
    action: str  # start | resume | restart (a folder left without config or meta) | skip
    found: str | None  # what is on disk: None, completed, failed, interrupted, killed, ...
    argv: list[str] = field(default_factory=list)  # the xdt command without the program
    draw: int | None = None  # a search's draw and trial (None outside a search)
    trial: int | None = None


@dataclass
class Plan:
    sweep: Sweep
    sweep_dir: Path
    runs: list[PlannedRun]


def plan(sweep: Sweep, runs_dir: str | Path | None = None, *, validate: bool = True) -> Plan:
    """Expand the sweep into runs and decide, from what is on disk, what each one needs.

    With `validate`, every run's config is loaded in-process first (ConfigError lists each
    distinct problem once), and an existing run folder must hold the config the sweep asks
    for now: a sweep file or base config edited since would otherwise mix old and new runs.
    """
    sweep_dir = Path(runs_dir if runs_dir is not None else default_runs_dir()) / sweep.name
    if sweep.search is not None:
        all_points = search_points(sweep)
    else:
        varying = [k for k, v in sweep.grid.items() if len(v) > 1]
        varying += list(sweep.random.params) if sweep.random is not None else []
        varying.append("seed")
        all_points = [Point(values, _slug(values, varying)) for values in points(sweep)]
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for point in all_points:
        values = point.values
        overrides = [*sweep.overrides, *(f"{k}={render_value(v)}" for k, v in values.items())]
        digest = run_hash(overrides)
        if digest in seen:  # a random draw that repeats another: the same run
            continue
        seen.add(digest)
        name = f"{point.label}-{digest}"
        run_dir = sweep_dir / name
        action, found = on_disk(run_dir)
        run = PlannedRun(
            name=name,
            values=values,
            overrides=overrides,
            run_dir=run_dir,
            log_path=sweep_dir / "logs" / f"{name}.log",
            action=action,
            found=found,
            draw=point.draw,
            trial=point.trial,
        )
        run.argv = _argv(sweep, sweep_dir, run)
        runs.append(run)
    result = Plan(sweep=sweep, sweep_dir=sweep_dir, runs=runs)
    if validate:
        validate_plan(result)
    return result


def on_disk(run_dir: Path) -> tuple[str, str | None]:
    """(what to do with a run folder, what is in it): ("start", None) for none yet,
    ("restart", "incomplete"), ("resume", "killed" | "interrupted" | ...), ("skip", "completed"
    | "failed"). The plan asks it once; a Slurm task asks it again when it (re)starts."""
    if not run_dir.exists():
        return "start", None
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "meta.json").is_file():
        return "restart", "incomplete"  # killed before it wrote its config: start it over
    summary = _read_json(run_dir / "summary.json")
    if summary is None:
        return "resume", "killed"
    status = str(summary.get("status"))
    if status in ("completed", "failed"):
        return "skip", status
    return "resume", status


def _argv(sweep: Sweep, sweep_dir: Path, run: PlannedRun) -> list[str]:
    if run.action == "skip":
        return []
    if run.action == "resume":
        return ["resume", str(run.run_dir), "--quiet", "--json"]
    argv = [sweep.subcommand, str(sweep.config), *run.overrides, "--runs-dir", str(sweep_dir)]
    argv += ["--name", run.name, "--quiet", "--json"]
    if sweep.single_task_baselines:
        baselines = sweep_dir.parent / "single_task"
        argv += ["--single-task-baselines", "--baselines-dir", str(baselines)]
    return argv + (["--overwrite"] if run.action == "restart" else [])


def validate_plan(p: Plan) -> None:
    """Load every run's config once, in-process; raise ConfigError before anything starts."""
    problems: dict[str, list[str]] = {}  # problem line -> the runs that have it
    for run in p.runs:
        try:
            cfg = load_config(p.sweep.config, run.overrides, subcommand=p.sweep.subcommand)
        except ConfigError as exc:
            for line in exc.lines:
                problems.setdefault(line, []).append(run.name)
            continue
        if run.action in ("skip", "resume"):
            resolve_from_run(cfg, p.sweep_dir)  # as the run's own `--runs-dir` resolves it
            line = _mismatch(p.sweep, run, cfg)
            if line:
                problems.setdefault(line, []).append(run.name)
    lines = []
    for line, names in problems.items():
        where = ""
        if len(names) < len(p.runs) and not line.startswith(str(p.sweep_dir)):
            shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
            where = f" (in {len(names)} of {len(p.runs)} runs: {shown})"
        lines.append(f"{p.sweep.path}: {line}{where}")
    if lines:
        raise ConfigError(*lines)


def _mismatch(sweep: Sweep, run: PlannedRun, cfg: Any) -> str | None:
    """A line when the run folder holds another config than the sweep asks for now."""
    meta = _read_json(run.run_dir / "meta.json") or {}
    if meta.get("subcommand") != sweep.subcommand:
        return f"{run.run_dir}: is a {meta.get('subcommand')} run, not {sweep.subcommand}"
    try:
        old = load_config(run.run_dir / "config.yaml", subcommand=sweep.subcommand)
    except ConfigError as exc:
        return f"{run.run_dir}: its config.yaml no longer loads ({exc.lines[0]})"
    before = flatten(yaml.safe_load(dump_config(old)))
    now = flatten(yaml.safe_load(dump_config(cfg)))
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if not differ:
        return None
    keys = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
    return (
        f"{run.run_dir}: was made from another config than the sweep now gives it ({keys} "
        "differ); set another name: in the sweep file, or delete that folder"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dry_run_lines(p: Plan) -> list[str]:
    """One shell line per run: its command, or `# skip NAME: ...` for a run left alone."""
    lines = []
    for run in p.runs:
        if run.action != "skip":
            lines.append(shlex.join(["xdt", *run.argv]))
        elif run.found == "failed":
            lines.append(f"# skip {run.name}: failed (delete {run.run_dir} to run it again)")
        else:
            lines.append(f"# skip {run.name}: {run.found}")
    return lines


# --------------------------------------------------------------------------- running
def cpu_count() -> int:
    """The cores this process may use (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def child_env(jobs: int) -> dict[str, str]:
    """The environment of a run: N runs at once share the cores, cores // N threads each."""
    threads = str(max(1, cpu_count() // max(1, jobs)))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


class SweepReporter:
    """What a person sees during a sweep, on stderr: a bar on a terminal, one line per run."""

    def __init__(self, *, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or stderr_console
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: Any = None

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)

    def start(self, total: int) -> None:
        if self.quiet or not self.console.is_terminal or total == 0:
            return
        self._progress = Progress(
            TextColumn("[bold]sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[running]} running"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task("sweep", total=total, running=0)
        self._progress.start()

    def running(self, count: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, running=count)

    def finished(self, done: int, total: int, entry: dict[str, Any], elapsed: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
        status = entry["status"]
        if status == "completed":
            text = f"[{done}/{total}] done {entry['name']} ({elapsed:.1f} s)"
        else:
            text = (
                f"[{done}/{total}] {status} {entry['name']} ({elapsed:.1f} s): see {entry['log']}"
            )
        self.message(text)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@dataclass
class _Stop:
    signum: int | None = None
    force: bool = False


@contextlib.contextmanager
def _catch_signals(stop: _Stop) -> Iterator[None]:
    """SIGINT/SIGTERM: stop the runs (they save last.pt); a second one kills them at once."""

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is None:
            stop.signum = signum
        else:
            stop.force = True

    with stop_signals(handler):
        yield


def _entry(run: PlannedRun) -> dict[str, Any]:
    """A run's line in sweep.json before this call does anything to it."""
    status = {"completed": "skipped", "failed": "failed"}.get(run.found or "", "pending")
    entry: dict[str, Any] = {
        "name": run.name,
        "values": json.loads(json.dumps(run.values, default=str)),
        "overrides": run.overrides,
        "action": run.action,
        "status": status,
        "run_dir": str(run.run_dir),
        "log": str(run.log_path),
        **({"draw": run.draw, "trial": run.trial} if run.draw is not None else {}),
        "exit_code": None,
        "wall_time_s": None,
    }
    if run.action == "skip":
        _add_summary(entry, _read_json(run.run_dir / "summary.json"))
        if status == "failed":
            entry["note"] = "failed in an earlier call; not rerun (delete its folder to rerun it)"
    return entry


def _add_summary(entry: dict[str, Any], summary: dict[str, Any] | None) -> None:
    if summary is None:
        return
    entry["wall_time_s"] = summary.get("wall_time_s")
    entry["best"] = summary.get("best", {})
    if "error" in summary:
        entry["error"] = summary["error"]


def _log_tail(path: Path) -> str:
    """The run's last `error:` line, else its last line: why a run without a summary failed."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1].removeprefix("error: ")


def run_sweep(p: Plan, *, jobs: int = 1, reporter: SweepReporter | None = None) -> dict[str, Any]:
    """Run the plan, `jobs` processes at a time; write and return sweep.json's object.

    A run's stdout and stderr go to `<sweep>/logs/<name>.log`. On SIGINT or SIGTERM the
    running children get SIGTERM (they save last.pt and stop), sweep.json is written and the
    result's "interrupted" holds the signal number; the next call resumes those runs.
    Runs that track to MLflow are the children of one parent run of the sweep.
    """
    reporter = reporter or SweepReporter()
    entries = {run.name: _entry(run) for run in p.runs}
    todo = deque(run for run in p.runs if run.action != "skip")
    total = len(todo)
    width = max(1, min(jobs, total))
    env = child_env(width)
    counts = {a: sum(r.action == a for r in p.runs) for a in ("start", "resume", "restart")}
    failed_before = sum(r.found == "failed" for r in p.runs)
    reporter.message(
        f"sweep {p.sweep.name}: {len(p.runs)} runs in {p.sweep_dir}: {counts['start']} to start, "
        f"{counts['resume'] + counts['restart']} to continue, "
        f"{len(p.runs) - total - failed_before} already completed, {failed_before} failed before"
        + (f"; {width} at a time, {env['OMP_NUM_THREADS']} thread(s) each" if total else "")
    )
    tracking = _tracking_env(p, list(todo))
    env.update(tracking)
    stop = _Stop()
    running: dict[subprocess.Popen, tuple[PlannedRun, float, IO[str]]] = {}
    waiting: deque[PlannedRun] = deque()  # runs that another process holds (module docstring)
    announced: set[str] = set()
    next_retry = 0.0
    done = 0
    if total:
        (p.sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    reporter.start(total)
    try:
        with _catch_signals(stop):
            terminated = killed = False
            while ((todo or waiting) and stop.signum is None) or running:
                if stop.signum is not None and not terminated:
                    terminated = True
                    reporter.message("stopping: each running run saves last.pt ...")
                    for proc in running:
                        proc.terminate()
                if stop.force and not killed:
                    killed = True
                    for proc in running:
                        proc.kill()
                if waiting and not todo and time.monotonic() >= next_retry:
                    todo.extend(waiting)  # free now? (a claim is dropped when its holder ends)
                    waiting.clear()
                    next_retry = time.monotonic() + CLAIM_RETRY_S
                while todo and len(running) < width and stop.signum is None:
                    run = todo.popleft()
                    entry = entries[run.name]
                    held = claim(p.sweep_dir, run)
                    if held is None:
                        if run.name not in announced:
                            announced.add(run.name)
                            reporter.message(f"waiting: {run.name} is being run by another process")
                        waiting.append(run)
                        continue
                    if not _recheck(p, run, entry):  # another call finished it meanwhile
                        held.close()
                        done += 1
                        reporter.finished(done, total, entry, 0.0)
                        continue
                    running[_launch(run, env)] = (run, time.monotonic(), held)
                for proc in [proc for proc in running if proc.poll() is not None]:
                    run, started, held = running.pop(proc)
                    held.close()
                    done += 1
                    entry = entries[run.name]
                    _finish(entry, run, proc.returncode, stop.signum is not None)
                    reporter.finished(done, total, entry, time.monotonic() - started)
                reporter.running(len(running))
                if running or waiting:
                    time.sleep(0.05)
    finally:
        reporter.stop()
        for proc, (_, _, held) in running.items():  # only after an unexpected error here
            proc.kill()  # leave no orphans
            held.close()
    result = _result(p, jobs, width, env, list(entries.values()), stop.signum)
    p.sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p.sweep_dir / "sweep.json", json.dumps(result, indent=2) + "\n")
    if tracking:
        from xdt_cli.tracking.mlflow import finish_sweep_parent

        finish_sweep_parent(p.sweep_dir, result["status"])
    return result


CLAIMS = ".claims"  # <sweep>/.claims/<run name>.lock: who is running which run
CLAIM_RETRY_S = 1.0  # how often a call tries again the runs that another process holds


def claim(sweep_dir: Path, run: PlannedRun) -> IO[str] | None:
    """Take the run's claim for this process (see the module docstring): the open, locked
    file, to close when the run's process has ended; None when another process holds the
    claim or the run folder's own lock."""
    path = sweep_dir / CLAIMS / f"{run.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    held = open(path, "w")  # noqa: SIM115  (held until the run ends; not inherited by it)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        return None
    if _run_locked(run.run_dir):
        held.close()
        return None
    return held


def _run_locked(run_dir: Path) -> bool:
    """Whether a process holds `<run>/.lock` (runs.RunDir.lock) now."""
    try:
        fh = open(run_dir / ".lock")  # noqa: SIM115
    except OSError:  # no lock file: nobody has trained this run yet
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _recheck(p: Plan, run: PlannedRun, entry: dict[str, Any]) -> bool:
    """With the claim held, look at the run folder again: the plan may be stale when another
    call of the sweep ran the run meanwhile. Whether the run still needs a process; if not,
    its entry records what the other call left."""
    action, found = on_disk(run.run_dir)
    if action == "skip":
        entry["status"] = "completed" if found == "completed" else "failed"
        entry["note"] = f"{found} by another process while this call waited"
        _add_summary(entry, _read_json(run.run_dir / "summary.json"))
        return False
    if action != run.action:
        run.action, run.found = action, found
        run.argv = _argv(p.sweep, p.sweep_dir, run)
        entry["action"] = action
    return True


def _tracking_env(p: Plan, todo: list[PlannedRun]) -> dict[str, str]:
    """When the runs track to MLflow: the environment that makes them children of the
    sweep's parent run, in the sweep's experiment (tracking/mlflow.py); else nothing."""
    if not todo:
        return {}
    cfg = load_config(p.sweep.config, todo[0].overrides, subcommand=p.sweep.subcommand)
    if "mlflow" not in cfg.tracking.backends:
        return {}
    from xdt_cli.tracking.mlflow import sweep_parent

    return sweep_parent(p.sweep_dir, p.sweep.name, cfg)


def _launch(run: PlannedRun, env: dict[str, str]) -> subprocess.Popen:
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    with run.log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(['xdt', *run.argv])}\n")
        log.flush()
        # A session of its own: a Ctrl-C at the terminal reaches only the sweep, which then
        # sends each run one SIGTERM (a second signal would make a run stop without saving).
        return subprocess.Popen(
            [sys.executable, "-m", "xdt_cli", *run.argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _finish(entry: dict[str, Any], run: PlannedRun, code: int, stopping: bool) -> None:
    summary = _read_json(run.run_dir / "summary.json")
    entry["exit_code"] = code
    _add_summary(entry, summary)
    status = (summary or {}).get("status")
    if status == "completed":  # also a run that finished just as it was told to stop
        entry["status"] = "completed"
    elif status == "interrupted" or (stopping and code in (130, 143, -2, -9, -15)):
        entry["status"] = "interrupted"
    else:
        entry["status"] = "failed"
        entry.setdefault("error", _log_tail(run.log_path) or f"exit code {code}")


def _result(
    p: Plan,
    jobs: int,
    width: int,
    env: dict[str, str],
    entries: list[dict[str, Any]],
    signum: int | None,
) -> dict[str, Any]:
    statuses = ("completed", "skipped", "failed", "interrupted", "pending")
    counts = {s: sum(e["status"] == s for e in entries) for s in statuses}
    if signum is not None or counts["interrupted"] or counts["pending"]:
        status = "interrupted"
    elif counts["failed"]:
        status = "failed"
    else:
        status = "completed"
    return {
        "sweep": str(p.sweep.path),
        "name": p.sweep.name,
        "subcommand": p.sweep.subcommand,
        "config": str(p.sweep.config),
        "runs_dir": str(p.sweep_dir),
        "status": status,
        "interrupted": signum,
        "jobs": jobs,
        "threads_per_run": int(env["OMP_NUM_THREADS"]) if width else None,
        "counts": counts,
        "runs": entries,
    }


def outcome(result: dict[str, Any]) -> tuple[int, list[str]]:
    """The exit code of a sweep and its error lines (failed runs with their logs).

    0 when every run completed (now or before), 128 + N when the sweep was stopped by signal
    N, else 1.
    """
    lines = []
    for entry in result["runs"]:
        if entry["status"] == "failed" and entry["action"] == "skip":
            lines.append(
                f"error: run {entry['name']} failed in an earlier call "
                f"({entry.get('error', 'see its summary.json')}); not rerun: delete "
                f"{entry['run_dir']} to run it again"
            )
        elif entry["status"] == "failed":
            why = entry.get("error") or "see its log"
            lines.append(f"error: run {entry['name']} failed: {why}; log: {entry['log']}")
        elif entry["status"] == "interrupted" and result["interrupted"] is None:
            lines.append(
                f"error: run {entry['name']} was stopped (exit code {entry['exit_code']}); "
                "run the sweep again to resume it"
            )
    if result["interrupted"] is not None:
        lines.append(
            "interrupted; the stopped runs saved last.pt. "
            "Run the same xdt sweep command again to resume them"
        )
        return 128 + result["interrupted"], lines
    if lines:
        counts = result["counts"]
        bad = counts["failed"] + counts["interrupted"]
        lines.append(f"error: {bad} of {len(result['runs'])} runs did not complete")
        return 1, lines
    return 0, lines
