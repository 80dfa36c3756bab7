"""The `xdt` command line: one short function per subcommand over the core in `api.py`.

Exit codes: 0 done; 1 runtime failure (message and hint; traceback with --debug); 2 bad
config, argument or input file (one line per problem, never a traceback); 130/143 stopped
by SIGINT/SIGTERM after saving last.pt. stdout carries only results; the rest is on stderr.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from xdt_cli import __version__
from xdt_cli.config import SUBCOMMANDS, did_you_mean, first_line
from xdt_cli.errors import RunInterrupted, WriteFailed, XdtError

# click's ClickException (usage errors, bad options) is the base of typer.BadParameter;
# found this way so the code works with the click that typer vendors or depends on.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _err(line: str) -> None:
    """One plain line on stderr (no rich wrapping: scripts read these lines); under torchrun
    a rank other than 0 names itself (`rank 1: error: ...`)."""
    print(f"rank {_rank()}: {line}" if _rank() else line, file=sys.stderr, flush=True)


def _rank() -> int:
    """This process's torchrun rank (0 outside torchrun): only rank 0 prints progress and
    results; every rank prints its errors."""
    from xdt_cli.runtime import env_rank

    return env_rank()


class _Group(TyperGroup):
    """Usage errors become one line and exit 2, the same under Typer's test runner."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(
                args=args,
                prog_name=prog_name or "xdt",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except _ClickException as exc:
            _err(f"error: {exc.format_message()}")
            code = 2 if exc.exit_code == 2 else exc.exit_code
            if standalone_mode:
                sys.exit(code)
            raise
        except typer.Abort:
            if standalone_mode:
                sys.exit(130)
            raise
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_Group,
    name="xdt",
    help=(
        "Cross-domain knowledge transfer experiments from YAML configs.\n\n"
        "Every run writes config.yaml, meta.json, metrics.jsonl, checkpoints and summary.json "
        "into its own folder under runs/ (or $XDT_RUNS_DIR).\n\n"
        "Example: xdt train-source configs/quickstart.yaml train.steps=300 --name first"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"xdt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Cross-domain knowledge transfer experiments from YAML configs."""


def _guard(debug: bool, body: Callable[[], int]) -> None:
    """Run a command body and map its outcome to the contract's exit codes."""
    try:
        code = body()
    except XdtError as exc:
        if debug:
            traceback.print_exc()
        for line in exc.lines:
            _err(f"error: {line}")
        raise typer.Exit(2) from None
    except RunInterrupted as exc:
        _err(f"interrupted at step {exc.step}; last.pt saved. Continue with: xdt resume RUN_DIR")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130) from None
    except WriteFailed as exc:  # a runtime failure whose message says what to do
        if debug:
            traceback.print_exc()
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    except Exception as exc:  # a runtime failure: a message and a hint, no traceback
        if debug:
            traceback.print_exc()
        _err(f"error: {first_line(exc)}")
        if not debug:
            _err("hint: run again with --debug to see the traceback")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _finish(summary: dict[str, Any], as_json: bool) -> int:
    if _rank() == 0:  # torchrun: rank 0 prints the result
        if as_json:
            print(json.dumps(summary, indent=2))
        elif summary.get("run_dir"):
            print(summary["run_dir"])
    if summary["status"] == "failed":
        _err(f"error: run failed: {summary.get('error', 'see summary.json')}")
        return 1
    return 0


# --------------------------------------------------------------------------- options
ConfigArg = Annotated[
    Path, typer.Argument(help="YAML experiment config.", show_default=False, metavar="CONFIG")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="key.path=value overrides, values parsed as YAML (e.g. optim.lr=1e-3).",
        show_default=False,
        metavar="[KEY=VALUE]...",
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option("--name", help="Run folder name: `<runs-dir>/NAME`.", show_default=False),
]
RunsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--runs-dir",
        help="Folder of runs (default: $XDT_RUNS_DIR, else ./runs).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", show_default=False)
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Overrides `seed`.", show_default=False)
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print summary.json on stdout at the end.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing run folder given by --name.")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
LogToOpt = Annotated[
    str | None,
    typer.Option(
        "--log-to",
        help="Also send metrics to these trackers, comma-separated: tensorboard, mlflow "
        "(sets tracking.backends).",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class RunOptions:
    """The options of every training subcommand, handed down as one object."""

    name: str | None = None
    runs_dir: Path | None = None
    device: str | None = None
    seed: int | None = None
    quiet: bool = False
    as_json: bool = False
    overwrite: bool = False
    debug: bool = False
    log_to: str | None = None  # "tensorboard,mlflow": tracking.backends


@dataclass(frozen=True)
class Composite:
    """What makes a training command start more than one run (each only on its subcommand)."""

    leave_one_out: bool = False  # generalize --leave-one-out
    single_task_baselines: bool = False  # multitask --single-task-baselines
    baselines_dir: Path | None = None  # multitask --baselines-dir


def _train(
    subcommand: str,
    config: Path,
    overrides: list[str] | None,
    options: RunOptions,
    composite: Composite = Composite(),
) -> None:
    """The one path of the five training subcommands: one run (api.py), or a composite of
    runs above it (leave_one_out.py, baselines.py)."""

    def body() -> int:
        from xdt_cli.api import start_run
        from xdt_cli.baselines import start_with_baselines
        from xdt_cli.leave_one_out import start_leave_one_out
        from xdt_cli.progress import Reporter

        if composite.baselines_dir is not None and not composite.single_task_baselines:
            raise XdtError("--baselines-dir: only used with --single-task-baselines")
        given = [*(overrides or []), *_log_to(options.log_to)]  # the flag wins
        common = {
            "name": options.name,
            "runs_dir": options.runs_dir,
            "device": options.device,
            "seed": options.seed,
            "overwrite": options.overwrite,
            "reporter": Reporter(quiet=options.quiet or _rank() > 0),
            "argv": sys.argv,
        }
        if composite.leave_one_out:
            summary = start_leave_one_out(config, given, **common)
        elif composite.single_task_baselines:
            summary = start_with_baselines(
                config, given, baselines_dir=composite.baselines_dir, **common
            )
        else:
            summary = start_run(subcommand, config, given, **common)
        return _finish(summary, options.as_json)

    _guard(options.debug, body)


def _log_to(text: str | None) -> list[str]:
    """`--log-to tensorboard,mlflow` as the override `tracking.backends=[...]`."""
    if text is None:
        return []
    from xdt_cli.tracking import BACKENDS

    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in BACKENDS:
            raise XdtError(
                f"--log-to: unknown tracker '{name}'{did_you_mean(name, BACKENDS)}; "
                f"known: {', '.join(BACKENDS)}"
            )
    return [f"tracking.backends=[{', '.join(dict.fromkeys(names))}]"]


@app.command("train-source")
def train_source(
    config: ConfigArg,
    overrides: OverridesArg = None,
    name: NameOpt = None,
    runs_dir: RunsDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
    log_to: LogToOpt = None,
) -> None:
    """Train a model on one labelled source domain.

    Example: xdt train-source configs/quickstart.yaml train.steps=500 --name mnist-500 --json
    """
    options = RunOptions(
        name=name,
        runs_dir=runs_dir,
        device=device,
        seed=seed,
        quiet=quiet,
        as_json=as_json,
        overwrite=overwrite,
        debug=debug,
        log_to=log_to,
    )
    _train("train-source", config, overrides, options)


@app.command("finetune")
def finetune(
    config: ConfigArg,
    overrides: OverridesArg = None,
    name: NameOpt = None,
    runs_dir: RunsDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
    log_to: LogToOpt = None,
) -> None:
    """Fine-tune trained weights on the labelled target domain.

    The model starts from `init` (a source run, a checkpoint, a weights file or ImageNet
    weights); `model.preset`, `model.freeze` and `model.trainable` choose the parameters that
    stay fixed and those that train; `method.name` is a fine-tuning rule (`xdt methods`).

    Example: xdt finetune configs/transfer/digits_to_mnist5k_finetune_10shot.yaml --seed 1
    """
    options = RunOptions(
        name=name,
        runs_dir=runs_dir,
        device=device,
        seed=seed,
        quiet=quiet,
        as_json=as_json,
        overwrite=overwrite,
        debug=debug,
        log_to=log_to,
    )
    _train("finetune", config, overrides, options)


@app.command("transfer")
def transfer(
    config: ConfigArg,
    overrides: OverridesArg = None,
    name: NameOpt = None,
    runs_dir: RunsDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
    log_to: LogToOpt = None,
) -> None:
    """Adapt from a labelled source domain to an unlabelled target domain.

    Every step takes a labelled source batch and an unlabelled target batch (its labels never
    reach the method); `method.name` picks the domain-adaptation method (`xdt methods`).
    Checkpoints are chosen on the source's val split unless `selection.rule` says otherwise.

    Example: xdt transfer configs/transfer/digits_to_mnist5k_dann.yaml --seed 1 --json
    """
    options = RunOptions(
        name=name,
        runs_dir=runs_dir,
        device=device,
        seed=seed,
        quiet=quiet,
        as_json=as_json,
        overwrite=overwrite,
        debug=debug,
        log_to=log_to,
    )
    _train("transfer", config, overrides, options)


@app.command("multitask")
def multitask(
    config: ConfigArg,
    overrides: OverridesArg = None,
    name: NameOpt = None,
    runs_dir: RunsDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
    log_to: LogToOpt = None,
    single_task_baselines: Annotated[
        bool,
        typer.Option(
            "--single-task-baselines",
            help="First train each task alone with the same budget (reused when already "
            "trained), then report the multitask change Delta_m% against them.",
        ),
    ] = False,
    baselines_dir: Annotated[
        Path | None,
        typer.Option(
            "--baselines-dir",
            help="Where single-task baselines are kept and reused [default: "
            "<runs-dir>/single_task].",
        ),
    ] = None,
) -> None:
    """Learn several tasks at once through shared parameters.

    Tasks are `data.tasks.<task>` (data set, label, loss, weight); tasks on the same inputs
    share each batch, a task with its own data set brings its own. `model.arch` is hps (one
    shared encoder) or mmoe; `method.name` is the task weighting (`xdt methods` lists them),
    logged as train/weight_<task>.

    Example: xdt multitask configs/multitask/multimnist5k_static.yaml --single-task-baselines
    """
    options = RunOptions(
        name=name,
        runs_dir=runs_dir,
        device=device,
        seed=seed,
        quiet=quiet,
        as_json=as_json,
        overwrite=overwrite,
        debug=debug,
        log_to=log_to,
    )
    _train(
        "multitask",
        config,
        overrides,
        options,
        Composite(single_task_baselines=single_task_baselines, baselines_dir=baselines_dir),
    )


@app.command("generalize")
def generalize(
    config: ConfigArg,
    overrides: OverridesArg = None,
    name: NameOpt = None,
    runs_dir: RunsDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
    log_to: LogToOpt = None,
    leave_one_out: Annotated[
        bool,
        typer.Option(
            "--leave-one-out",
            help="Run once per domain with that domain held out, as child runs <run>/<domain>/, "
            "and write the DomainBed-style table; again with the same --name it resumes.",
        ),
    ] = False,
) -> None:
    """Learn from several domains to do well on all of them, or on held-out ones.

    Every step takes a batch from each training domain of `data.dataset` (`data.domains`
    minus `data.test_domains`); held-out domains are only evaluated. With
    data.test_domains=[] every domain trains, and the summary gives the mean and the worst
    domain's test accuracy. `method.name` picks the algorithm (`xdt methods` lists
    them); `selection.rule` is training_domain_val (default), oracle
    (DomainBed's: the last checkpoint) or leave_one_domain_out (DomainBed's; with
    --leave-one-out only).

    Example: xdt generalize configs/generalize/rotated_mnist5k_erm.yaml data.test_domains=[rot75]
    """
    options = RunOptions(
        name=name,
        runs_dir=runs_dir,
        device=device,
        seed=seed,
        quiet=quiet,
        as_json=as_json,
        overwrite=overwrite,
        debug=debug,
        log_to=log_to,
    )
    _train("generalize", config, overrides, options, Composite(leave_one_out=leave_one_out))


@app.command("resume")
def resume(
    run_dir: Annotated[
        Path, typer.Argument(help="The run folder.", show_default=False, metavar="RUN_DIR")
    ],
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Continue an interrupted or killed run from its checkpoints/last.pt.

    The resumed run ends with the same metrics as an uninterrupted one. A finished run is
    left alone.

    Example: xdt resume runs/train-source/quickstart-20260101-120000
    """

    def body() -> int:
        from xdt_cli.api import resume_run
        from xdt_cli.progress import Reporter

        reporter = Reporter(quiet=quiet or _rank() > 0)
        summary, trained = resume_run(run_dir, reporter=reporter, argv=sys.argv)
        if not trained:
            if summary.get("status") == "failed":
                _err(f"error: {run_dir} failed ({summary.get('error', '')}); nothing to resume")
                return 1
            if not quiet:
                _err(f"{run_dir} already finished ({summary.get('steps')} steps); nothing to do")
        return _finish(summary, as_json)

    _guard(debug, body)


@app.command("log-sync")
def log_sync(
    run_dir: Annotated[
        Path, typer.Argument(help="The run folder.", show_default=False, metavar="RUN_DIR")
    ],
    to: Annotated[
        str, typer.Option("--to", help="The tracker to catch up: mlflow.", show_default=False)
    ],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="Where a run that never reached its MLflow server goes (default: "
            "tracking.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlruns).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was sent as JSON.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Send a tracker what it missed of a run (its server was down, or the run was killed).

    metrics.jsonl, config.yaml and summary.json are the source of truth: the MLflow run gets
    its params and tags, every row after the last one it has, the files and the final
    status. Nothing is sent twice; a second call sends nothing.

    Example: xdt log-sync runs/first --to mlflow
    """

    def body() -> int:
        from xdt_cli.tracking import sync_run

        result = sync_run(run_dir, to, tracking_uri=tracking_uri)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            files = ", ".join(result["files"]) or "no files"
            status = result["status"] or "status unchanged"
            print(
                f"{result['run_dir']}: {result['rows']} rows, {files}, {status} -> "
                f"MLflow run {result['run_id']} on {result['tracking_uri']}"
            )
        return 0

    _guard(debug, body)


@app.command("validate")
def validate(
    config: ConfigArg,
    overrides: OverridesArg = None,
    subcommand: Annotated[
        str, typer.Option("--subcommand", help="The subcommand the config is for.")
    ] = "train-source",
    debug: DebugOpt = False,
) -> None:
    """Check a config and print it fully resolved (defaults, base and overrides applied).

    It builds the experiment (data, model, selection) without training, so a config that
    validates will start. Errors go to stderr, one line per problem, exit code 2.

    Example: xdt validate configs/quickstart.yaml optim.lr=3e-3
    """

    def body() -> int:
        from xdt_cli.config import dump_config
        from xdt_cli.regimes import build_experiment
        from xdt_cli.resolve import load_config
        from xdt_cli.runtime import Runtime

        if subcommand not in SUBCOMMANDS:  # else the method check would name it first
            raise XdtError(
                f"--subcommand: unknown subcommand '{subcommand}'"
                f"{did_you_mean(subcommand, SUBCOMMANDS)}; known: {', '.join(SUBCOMMANDS)}"
            )
        cfg = load_config(config, overrides or [], subcommand=subcommand)
        build_experiment(subcommand, cfg, Runtime.from_env("cpu"))
        print(dump_config(cfg), end="")
        return 0

    _guard(debug, body)


@app.command("datasets")
def datasets(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the registered data sets with their domains, classes and split sizes.

    Example: xdt datasets --json
    """

    def body() -> int:
        from xdt_cli.listing import dataset_rows, print_table

        rows = dataset_rows()
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            print_table("data sets", rows)
        return 0

    _guard(debug, body)


@app.command("methods")
def methods(
    name: Annotated[
        str | None,
        typer.Argument(
            help="A method: print its description, defaults and search space.",
            show_default=False,
            metavar="NAME",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the learning rules (`method.name`), the subcommands each serves and its defaults,
    then the selection rules (`selection.rule`) and what each reads (the table only). With
    NAME, one method and its hyper-parameter search space (what `search:` in a sweep draws).

    Example: xdt methods irm
    """

    def body() -> int:
        from xdt_cli.listing import method_detail, method_rows, print_method, print_table, rule_rows

        if name is not None:
            detail = method_detail(name)
            if as_json:
                print(json.dumps(detail, indent=2))
            else:
                print_method(detail)
            return 0
        rows = method_rows()
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            print_table("methods", rows)
            print_table("selection rules", rule_rows())
        return 0

    _guard(debug, body)


@app.command("evaluate")
def evaluate(
    run_dir: Annotated[
        Path, typer.Argument(help="The run folder.", show_default=False, metavar="RUN_DIR")
    ],
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="best or last: which checkpoints/*.pt to score.")
    ] = "best",
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="DATASET or DATASET:DOMAIN to score (repeatable); default: the run's own data.",
            show_default=False,
            metavar="DATASET[:DOMAIN]",
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, val, test or all.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    features: Annotated[
        Path | None,
        typer.Option(
            "--features",
            help="Also save penultimate features, labels and logits to this .npz file.",
            show_default=False,
            metavar="OUT.npz",
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option("--device", help="auto, cpu, cuda or cuda:N; the run's own reproduces it."),
    ] = "cpu",
    debug: DebugOpt = False,
) -> None:
    """Score a trained run's checkpoint on its own data or any compatible data set.

    Every subcommand's run is rebuilt as it trained. Metrics are named as in training
    (`<domain>/<split>/<acc|loss>`, `<task>/<split>/...` for multitask, and the run's averages);
    best and last reproduce summary's best and final.

    Example: xdt evaluate runs/first --data digits --split all --json
    """

    def body() -> int:
        from xdt_cli.evaluate_run import evaluate_run, print_result

        result = evaluate_run(run_dir, checkpoint, data, split, device, features)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            print_result(result)
        return 0

    _guard(debug, body)


@app.command("report")
def report(
    runs_dirs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Folders searched for runs, recursively (default: $XDT_RUNS_DIR, else ./runs).",
            show_default=False,
            metavar="RUNS_DIR",
        ),
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            "--group-by",
            help="Comma-separated config keys to group by (default: all but seed, name, device).",
            show_default=False,
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            help="Metric name or glob to report (repeatable; default: every */test/acc).",
            show_default=False,
        ),
    ] = None,
    selection: Annotated[
        str,
        typer.Option(
            "--selection",
            help="summary (each run's own choice), source_val, target_val, last, "
            "training_domain_val, oracle (DomainBed's: the last checkpoint), task_val or "
            "leave_one_domain_out (DomainBed's, over runs holding out [t] and [t, v]).",
        ),
    ] = "summary",
    fmt: Annotated[
        str, typer.Option("--format", help="table, markdown, csv, latex or json.")
    ] = "table",
    choose_by: Annotated[
        str | None,
        typer.Option(
            "--choose-by",
            metavar="RULE",
            help="DomainBed's protocol: within each trial seed, the draw whose RULE validation "
            "is best; one column per held-out domain or source->target pair, plus avg.",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Mean ± std over seeds of finished runs, one row per configuration.

    Failed, interrupted and unfinished runs are listed on stderr, never averaged in.

    Example: xdt report runs/lr-sweep --group-by optim.lr --selection source_val --format markdown

    Example: xdt report runs/dg-search --choose-by training_domain_val --format markdown
    """

    def body() -> int:
        import shutil

        from xdt_cli.choose import report_choice
        from xdt_cli.report import report as make_report

        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        if choose_by is not None:
            given = {
                "--group-by": group_by is not None,
                "--selection": selection != "summary",
                "--metric": bool(metric),
            }
            text, left_out = report_choice(
                runs_dirs,
                choose_by,
                fmt=fmt,
                width=width,
                given=[option for option, used in given.items() if used],
            )
        else:
            text, left_out = make_report(
                runs_dirs,
                group_by=group_by,
                metrics=metric,
                selection=selection,
                fmt=fmt,
                width=width,
            )
        print(text, end="")
        for line in left_out:
            _err(f"not reported: {line}")
        return 0

    _guard(debug, body)


@app.command("plot")
def plot(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders, or folders of runs.", show_default=False, metavar="RUN_DIR"
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Image to write (.png, .pdf, .svg).", show_default=False),
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            help="Metric name or glob (repeatable; default: train/loss and the source val acc).",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Plot learning curves of one or several runs, one subplot per metric.

    Example: xdt plot runs/lr-0.001 runs/lr-0.01 --metric train/loss --out curves.png
    """

    def body() -> int:
        from xdt_cli.plotting import plot_runs

        print(plot_runs(run_dirs, out, metrics=metric))
        return 0

    _guard(debug, body)


@app.command("sweep")
def sweep(
    sweep_file: Annotated[
        Path, typer.Argument(help="YAML sweep file.", show_default=False, metavar="SWEEP")
    ],
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Local launcher: runs at once, sharing the cores [default: 1].",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print each run's xdt command (and Slurm's #SBATCH lines); run nothing.",
        ),
    ] = False,
    launcher: Annotated[
        str | None,
        typer.Option(
            "--launcher",
            help="local: a process pool here [default]; slurm: one Slurm job array (submitit).",
            show_default=False,
        ),
    ] = None,
    partition: Annotated[
        str | None, typer.Option("--partition", help="Slurm partition.", show_default=False)
    ] = None,
    time_min: Annotated[
        int | None,
        typer.Option(
            "--time", min=1, help="Slurm: minutes per run [default: 60].", show_default=False
        ),
    ] = None,
    gpus_per_run: Annotated[
        int | None,
        typer.Option(
            "--gpus-per-run", min=0, help="Slurm: GPUs per run [default: 0].", show_default=False
        ),
    ] = None,
    cpus_per_run: Annotated[
        int | None,
        typer.Option(
            "--cpus-per-run",
            min=1,
            help="Slurm: CPUs (and torch threads) per run [default: 1].",
            show_default=False,
        ),
    ] = None,
    array_parallelism: Annotated[
        int | None,
        typer.Option(
            "--array-parallelism", min=1, help="Slurm: array tasks at once.", show_default=False
        ),
    ] = None,
    show_status: Annotated[
        bool,
        typer.Option(
            "--status",
            help="Each run's state (run folder, Slurm queue) and the counts; run nothing.",
        ),
    ] = False,
    runs_dir: RunsDirOpt = None,
    quiet: QuietOpt = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print sweep.json (or the status, the submission) on stdout."),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a config over a grid, random draws and seeds: one xdt process per run.

    Runs go to `<runs-dir>/<sweep name>/<values>-<hash>`, logs to its logs/ folder, and a
    summary of all runs to its sweep.json. Calling it again skips completed runs, resumes
    interrupted ones and reports failed ones. Exit 1 if a run failed.

    With `--launcher slurm` (or `launcher: {name: slurm}` in the sweep file) the runs that are
    not completed go to Slurm as one job array through submitit: it prints the job id and
    returns; `--status` shows pending, running, done and failed runs; a run preempted or
    timed out is requeued and resumes from its last.pt.

    Example: xdt sweep configs/sweeps/quickstart_seeds.yaml --jobs 2

    Example: xdt sweep configs/sweeps/quickstart_lr.yaml --launcher slurm --time 30

    Example: xdt sweep configs/sweeps/quickstart_lr.yaml --status --json
    """

    def body() -> int:
        from xdt_cli import launchers, sweeps

        loaded = sweeps.load_sweep(sweep_file)
        flags = {
            "partition": partition,
            "time": time_min,
            "gpus_per_run": gpus_per_run,
            "cpus_per_run": cpus_per_run,
            "array_parallelism": array_parallelism,
        }
        _, options = launchers.choose_launcher(loaded.launcher, launcher, flags)
        if show_status:
            if dry_run:
                raise XdtError("--status: shows the sweep's state; it does not go with --dry-run")
            result = launchers.status(sweeps.plan(loaded, runs_dir, validate=False))
            if not quiet:
                from xdt_cli.progress import stderr_console

                launchers.print_status(result, stderr_console)
            if as_json:
                print(json.dumps(result, indent=2))
            return 0
        if options is not None and jobs is not None:
            raise XdtError("--jobs: the local launcher's option; on Slurm use --array-parallelism")
        planned = sweeps.plan(loaded, runs_dir)
        if options is not None:
            if dry_run:
                print("\n".join(launchers.dry_run_lines(planned, options)))
                return 0
            reporter = sweeps.SweepReporter(quiet=quiet)
            submitted = launchers.submit(planned, options, reporter=reporter)
            if as_json:
                print(json.dumps(submitted, indent=2))
            elif submitted["job_id"] is not None:
                print(submitted["job_id"])
            return 0
        if dry_run:
            print("\n".join(sweeps.dry_run_lines(planned)))
            return 0
        reporter = sweeps.SweepReporter(quiet=quiet)
        result = sweeps.run_sweep(planned, jobs=jobs or 1, reporter=reporter)
        print(json.dumps(result, indent=2) if as_json else result["runs_dir"])
        code, lines = sweeps.outcome(result)
        for line in lines:
            _err(line)
        return code

    _guard(debug, body)


@app.command("benchmark")
def benchmark(
    suite: Annotated[
        str,
        typer.Argument(
            help="A suite name (benchmarks/suites/NAME.yaml) or a suite file.",
            show_default=False,
            metavar="SUITE",
        ),
    ],
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Runs at once (they share the cores).")
    ] = 1,
    runs_dir: RunsDirOpt = None,
    doc: Annotated[
        Path, typer.Option("--doc", help="The markdown file that receives the tables.")
    ] = Path("docs/BENCHMARKS.md"),
    quiet: QuietOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a summary on stdout.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a shipped benchmark suite (a list of sweeps) and write its tables into the docs.

    The tables (mean ± std over seeds), the command, the core count and the wall time go
    between the suite's markers in docs/BENCHMARKS.md. Run again, it reuses finished runs.

    Example: xdt benchmark quickstart --jobs 2
    """

    def body() -> int:
        from xdt_cli.benchmark import find_suite, load_suite, run_benchmark

        loaded = load_suite(find_suite(suite))
        result = run_benchmark(loaded, jobs=jobs, runs_dir=runs_dir, doc=doc, quiet=quiet)
        print(json.dumps(result, indent=2) if as_json else result["doc"])
        return 0

    _guard(debug, body)


def main() -> None:
    app()
