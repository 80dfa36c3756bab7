"""Fuzzing the readers of user input: whatever comes in, the only exception out is xdt's own
`XdtError` (ConfigError, CheckpointError) with one non-empty line per problem, which the CLI
prints as `error: ...` lines and exit code 2.

(a) random YAML documents (and text that is not YAML at all) as a config file, loaded for
    every subcommand by `resolve.load_config`, the function every command calls;
(b) random `key=value` overrides on a valid config;
(c) random bytes, truncations and bit flips of a real checkpoint, and real checkpoints with
    one entry swapped for a random value, fed to every loader of a checkpoint or weights
    file: `checkpoint.load_checkpoint`, `initialization`'s `init.checkpoint`, `init.weights`
    and `init.from_run` readers, `evaluate_run.load_weights` (xdt evaluate) and
    `Engine.resume_from` (xdt resume); their messages name the file (or, for an `init.*`
    reader, the key that names it).

Every test is derandomized with a bounded number of examples, so CI sees the same inputs.
"""

from __future__ import annotations

import io
import math
import string
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.bad_input_corpus import TINY_CONFIG, make_tiny_run
from xdt_cli.config import SUBCOMMANDS
from xdt_cli.errors import XdtError
from xdt_cli.resolve import load_config

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Keys that the schema knows at some level, so that random documents reach deep validation.
REAL_KEYS = [
    "name",
    "base",
    "seed",
    "device",
    "data",
    "source",
    "target",
    "dataset",
    "domain",
    "domains",
    "test_domains",
    "split_seed",
    "labels_per_class",
    "transforms",
    "train",
    "eval",
    "resize",
    "tasks",
    "label",
    "loss",
    "weight",
    "model",
    "backbone",
    "arch",
    "freeze",
    "trainable",
    "heads",
    "bottleneck",
    "init",
    "from_run",
    "checkpoint",
    "weights",
    "pretrained",
    "method",
    "trade_off",
    "optim",
    "lr",
    "momentum",
    "weight_decay",
    "lr_mult",
    "schedule",
    "warmup_steps",
    "steps",
    "batch_size",
    "eval_every",
    "log_every",
    "precision",
    "grad_clip",
    "ema",
    "selection",
    "rule",
    "metric",
    "mode",
    "tracking",
    "backends",
]
REAL_VALUES = [
    "digits",
    "mnist5k",
    "rotated_mnist5k",
    "colored_mnist5k",
    "multimnist5k",
    "imagefolder",
    "rot0",
    "env10",
    "lenet",
    "cnn",
    "resnet18",
    "timm:none",
    "erm",
    "dann",
    "static",
    "irm",
    "adam",
    "sgd",
    "cosine",
    "source_val",
    "oracle",
    "last",
    "cpu",
    "cuda:3",
    "auto",
    "bf16",
    "digits/val/acc",
    "left",
    "features",
    "imagenet",
]

keys = st.one_of(
    st.sampled_from(REAL_KEYS),
    st.text(min_size=0, max_size=12),
    st.integers(-3, 3),
    st.booleans(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(REAL_VALUES),
    st.dates(),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)
# A config-shaped document: sections with real names holding random content.
documents = st.one_of(
    st.dictionaries(st.sampled_from(REAL_KEYS), values, max_size=6),
    st.fixed_dictionaries(
        {"data": st.dictionaries(st.sampled_from(REAL_KEYS), values, max_size=4)},
        optional={
            "model": st.dictionaries(st.sampled_from(REAL_KEYS), values, max_size=3),
            "method": st.dictionaries(st.sampled_from(REAL_KEYS), values, max_size=3),
            "train": st.dictionaries(st.sampled_from(REAL_KEYS), values, max_size=3),
            "selection": st.dictionaries(st.sampled_from(REAL_KEYS), values, max_size=3),
        },
    ),
    values,
)


def _dump(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)


def _mutate(text: str, data: st.DataObject) -> str:
    """The valid config with a few characters inserted, deleted or replaced."""
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        where = data.draw(st.integers(0, len(chars)), label="where")
        new = data.draw(st.sampled_from(list(":{}[]-,#&*!|>'\"%@`\t\n ") + ["", "x"]))
        if data.draw(st.booleans(), label="insert"):
            chars.insert(where, new)
        elif where < len(chars):
            chars[where] = new
    return "".join(chars)


config_files = st.one_of(
    documents.map(_dump).map(lambda t: t.encode("utf-8")),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.text(alphabet=string.printable, max_size=200).map(str.encode),
)


def assert_one_line_each(exc: XdtError, *, names: tuple[str, ...] = ()) -> None:
    """The error the CLI prints: one non-empty single line per problem, naming the culprit."""
    assert exc.lines, f"{type(exc).__name__} without a message"
    for line in exc.lines:
        assert line.strip() and "\n" not in line and "\r" not in line, repr(line)
    assert str(exc) == "\n".join(exc.lines)
    if names:
        assert any(n in line for n in names for line in exc.lines), (names, exc.lines)


def load_for_every_subcommand(path: Path, overrides: list[str] = ()) -> None:
    for subcommand in SUBCOMMANDS:
        try:
            load_config(path, list(overrides), subcommand=subcommand)
        except XdtError as exc:
            assert_one_line_each(exc)


# --------------------------------------------------------------------------- (a) configs
@FUZZ
@given(content=config_files)
@example(content=b"seed: 1\n1: 2\n")
@example(content=b"!!python/object/apply:os.system ['true']\n")
@example(content=b"data: {dataset: imagefolder}\n")
@example(content=b"data: &a [*a]\n")
@example(content=b"base: .\n")
def test_random_config_files_raise_only_config_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    load_for_every_subcommand(path)


@FUZZ
@given(data=st.data())
def test_a_damaged_valid_config_raises_only_config_errors(tmp_path: Path, data) -> None:
    path = tmp_path / "damaged.yaml"
    path.write_text(_mutate(TINY_CONFIG, data), encoding="utf-8")
    load_for_every_subcommand(path)


@settings(FUZZ, max_examples=40)
@given(parent=config_files, child=documents)
def test_random_base_configs_raise_only_config_errors(
    tmp_path: Path, parent: bytes, child: Any
) -> None:
    (tmp_path / "parent.yaml").write_bytes(parent)
    document = {"base": "parent.yaml", **child} if isinstance(child, dict) else child
    path = tmp_path / "child.yaml"
    path.write_text(_dump(document), encoding="utf-8")
    load_for_every_subcommand(path)


# --------------------------------------------------------------------------- (b) overrides
dotted_keys = st.lists(
    st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=6)), min_size=1, max_size=4
).map(".".join)
override_values = st.one_of(
    st.sampled_from(REAL_VALUES),
    st.text(max_size=12),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from([".inf", "-.inf", ".nan", "nan", "1e-3", "[", "]", "{a: 1}", "[1, [2]]"]),
    st.sampled_from(["!!python/name:os.system", "&a [*a]", "*x", "? a\n: b", "'''"]),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
)
overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", dotted_keys, override_values),
    st.text(max_size=20),  # no '=', or anything at all
    st.builds(lambda k: f"{k}=", dotted_keys),
)


@FUZZ
@given(given_overrides=st.lists(overrides, min_size=1, max_size=3))
@example(given_overrides=["optim.lr.x=3"])
@example(given_overrides=["=3"])
@example(given_overrides=["data.source=[1]", "data.source.dataset=x"])
@example(given_overrides=["seed=1e400"])
def test_random_overrides_raise_only_config_errors(
    tmp_path: Path, given_overrides: list[str]
) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG, encoding="utf-8")
    load_for_every_subcommand(path, given_overrides)


# --------------------------------------------------------------------------- (c) checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished tiny run, the objects its loaders fill, and its checkpoints' bytes."""
    from xdt_cli.config import read_yaml
    from xdt_cli.engine import Engine
    from xdt_cli.progress import Reporter
    from xdt_cli.regimes import build_experiment
    from xdt_cli.runtime import Runtime

    run = make_tiny_run(tmp_path_factory.mktemp("fuzz") / "tiny")
    cfg = load_config(run / "config.yaml", subcommand="train-source")
    experiment = build_experiment("train-source", cfg, Runtime.from_env("cpu"))
    engine = Engine(
        cfg, experiment, Runtime.from_env("cpu"), run=None, reporter=Reporter(quiet=True)
    )
    assert read_yaml(run / "config.yaml")["model"]["backbone"] == "lenet"
    return _Trained(
        run=run,
        cfg=cfg,
        engine=engine,
        method=experiment.method,
        best=(run / "checkpoints" / "best.pt").read_bytes(),
        last=(run / "checkpoints" / "last.pt").read_bytes(),
    )


class _Trained(dict):
    """The `trained` fixture's objects; a short repr keeps hypothesis' reports readable."""

    def __repr__(self) -> str:
        return f"<tiny run {self['run']}>"


def _loaders(trained: dict[str, Any], path: Path) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """name -> (call, what its message must name) for every reader of a checkpoint file."""
    from xdt_cli.checkpoint import load_checkpoint
    from xdt_cli.evaluate_run import load_weights
    from xdt_cli.initialization import initialize

    model = trained["method"].model

    def init(key: str, value: str):
        cfg = trained["cfg"].model_copy(deep=True)
        setattr(cfg.init, key, value)
        return lambda: initialize(model, cfg)

    return {
        "load_checkpoint": (lambda: load_checkpoint(path), (str(path),)),
        "init.checkpoint": (init("checkpoint", str(path)), (str(path), "init.checkpoint")),
        "init.weights": (init("weights", str(path)), (str(path), "init.weights")),
        "evaluate": (lambda: load_weights(trained["method"], path), (str(path),)),
        "resume": (lambda: trained["engine"].resume_from(path), (str(path),)),
    }


LOADERS = ("load_checkpoint", "init.checkpoint", "init.weights", "evaluate", "resume")
# A warning is printed on stderr, under the CLI's one error line. Known: init.weights
# (initialization.py) lets torch's "Detected pickle protocol N" UserWarning through.
WARNS_KNOWN = {"init.weights"}


def feed_loaders(
    trained: dict[str, Any], path: Path, data: bytes, loaders: tuple[str, ...] = LOADERS
) -> None:
    """Write `data` to `path` and read it with each loader: it loads, or raises an XdtError
    with one line per problem naming the file; nothing else escapes."""
    path.write_bytes(data)
    every = _loaders(trained, path)
    for name in loaders:
        call, names = every[name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except XdtError as exc:
                assert_one_line_each(exc, names=names)
            except Exception as exc:  # noqa: BLE001  (the point: nothing else may escape)
                raise AssertionError(f"{name}: {type(exc).__name__}: {exc}") from exc
        if name not in WARNS_KNOWN:
            assert not caught, f"{name}: {caught[0].category.__name__}: {caught[0].message}"


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for where, bit in flips:
        out[where % len(out)] ^= 1 << bit
    return bytes(out)


@FUZZ
@given(data=st.binary(max_size=4096))
@example(data=b"")
@example(data=b"PK\x03\x04")
@example(data=b"\x80\x02}q\x00.")  # a pickled empty dict: a torch file with no format
@example(data=b".")  # found: the unpickler's STOP on an empty stack raised IndexError
def test_random_bytes_as_a_checkpoint(tmp_path: Path, trained, data: bytes) -> None:
    feed_loaders(trained, tmp_path / "noise.pt", data)


@FUZZ
@given(which=st.sampled_from(["best", "last"]), fraction=st.floats(0, 1, exclude_max=True))
def test_a_truncated_checkpoint(tmp_path: Path, trained, which: str, fraction: float) -> None:
    full = trained[which]
    feed_loaders(trained, tmp_path / f"{which}.pt", full[: math.floor(fraction * len(full))])


@settings(FUZZ, max_examples=100)
@given(
    which=st.sampled_from(["best", "last"]),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)), min_size=1, max_size=8),
    near_the_end=st.booleans(),
)
def test_bit_flips_in_a_checkpoint(
    tmp_path: Path, trained, which: str, flips: list[tuple[int, int]], near_the_end: bool
) -> None:
    full = trained[which]
    if near_the_end:  # the zip's central directory and the pickle's records live there
        flips = [(len(full) - 1 - (w % 2048), b) for w, b in flips]
    feed_loaders(trained, tmp_path / f"{which}.pt", _flip(full, flips))


def _entries(state: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys or indices) to every entry of a nested checkpoint dict."""
    out = []
    if isinstance(state, dict):
        for key, value in state.items():
            out.append((*prefix, key))
            out.extend(_entries(value, (*prefix, key)))
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            out.append((*prefix, i))
            out.extend(_entries(value, (*prefix, i)))
    return out


def _replace(state: Any, where: tuple, value: Any, delete: bool) -> Any:
    if not where:
        return value
    head, rest = where[0], where[1:]
    if isinstance(state, dict):
        out = dict(state)
        if delete and not rest:
            out.pop(head, None)
        else:
            out[head] = _replace(state[head], rest, value, delete)
        return out
    out = list(state)
    out[head] = _replace(state[head], rest, value, delete)
    return type(state)(out) if isinstance(state, tuple) else out


plain_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.builds(torch.zeros, st.lists(st.integers(0, 3), max_size=3).map(tuple)),
    st.builds(lambda n: torch.arange(n, dtype=torch.int8), st.integers(0, 5)),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _swapped(trained, which: str, where: tuple, value: Any, delete: bool = False) -> bytes:
    """The checkpoint with one entry replaced (or deleted), saved without its checksum (as
    an older xdt wrote it), so that the loaders read the entry rather than refuse the sum."""
    state = torch.load(io.BytesIO(trained[which]), map_location="cpu", weights_only=True)
    state.pop("checksum", None)
    buffer = io.BytesIO()
    torch.save(_replace(state, where, value, delete), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "loader",
    [n for n in LOADERS],
)
# no shrinking: the draws (entry, value) are the reproducer, and the known failures would
# spend half a minute shrinking
@settings(FUZZ, max_examples=60, phases=(Phase.explicit, Phase.generate))
@given(data=st.data())
def test_a_checkpoint_with_one_entry_swapped(tmp_path: Path, trained, loader: str, data) -> None:
    # resume reads last.pt (best.pt has no optimizer state: refused at once); others either
    which = "last" if loader == "resume" else data.draw(st.sampled_from(["best", "last"]))
    state = torch.load(io.BytesIO(trained[which]), map_location="cpu", weights_only=True)
    state.pop("checksum", None)
    entries = _entries(state)
    # a third of the draws each: a whole section, one entry of a section (a weight of the
    # model, the optimizer's state), anything
    top, second = ([e for e in entries if len(e) == n] for n in (1, 2))
    where = data.draw(
        st.sampled_from(top) | st.sampled_from(second) | st.sampled_from(entries), label="entry"
    )
    delete = data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(plain_values, label="value")
    content = _swapped(trained, which, where, value, delete)
    feed_loaders(trained, tmp_path / f"{which}.pt", content, (loader,))


@pytest.mark.parametrize(
    ("loader", "which", "where", "value"),
    [
        # found by the fuzzing above and fixed in checkpoint.py (kept as regressions)
        pytest.param("load_checkpoint", "best", ("format",), torch.zeros(2), id="format-tensor"),
        pytest.param("load_checkpoint", "best", ("format",), True, id="format-true"),
        pytest.param("resume", "last", ("method",), None, id="resume-method-none"),
        pytest.param("resume", "last", ("method",), {1: torch.ones(2)}, id="resume-int-keys"),
        pytest.param("evaluate", "best", ("method",), {1: torch.ones(2)}, id="evaluate-int-keys"),
        # found by the fuzzing above in engine.py (load_state_dict let AttributeError and
        # IndexError through) and initialization.py (_load read .shape of non-tensors)
        *(
            pytest.param(
                "resume",
                "last",
                where,
                value,
                id=f"resume-{'.'.join(map(str, where))}",
            )
            for where, value in [
                (("optimizer",), None),
                (("scheduler",), None),
                (("rng",), torch.zeros(2)),
                (("log_sums",), None),
                (("data", 0, "seed"), torch.zeros(2)),
            ]
        ),
        *(
            pytest.param(
                "init.checkpoint",
                "best",
                ("method", key),
                value,
                id=f"init-{key}",
            )
            for key, value in [
                ("model.features.0.weight", None),
                ("model.head.weight", torch.zeros(())),
            ]
        ),
    ],
)
def test_a_checkpoint_with_a_known_bad_entry(
    tmp_path: Path, trained, loader: str, which: str, where: tuple, value: Any
) -> None:
    content = _swapped(trained, which, where, value)
    feed_loaders(trained, tmp_path / f"{which}.pt", content, (loader,))


@settings(FUZZ, max_examples=30)
@given(data=st.one_of(st.binary(max_size=512), st.just(b"")))
def test_a_damaged_best_pt_behind_init_from_run(tmp_path: Path, trained, data: bytes) -> None:
    """init.from_run reads <run>/config.yaml and <run>/checkpoints/best.pt."""
    import shutil

    from xdt_cli.initialization import initialize

    run = tmp_path / "run"
    if not run.exists():
        shutil.copytree(trained["run"], run)
    (run / "checkpoints" / "best.pt").write_bytes(data)
    cfg = trained["cfg"].model_copy(deep=True)
    cfg.init.from_run = str(run)
    try:
        initialize(trained["method"].model, cfg)
    except XdtError as exc:
        assert_one_line_each(exc, names=(str(run), "init.from_run"))
