"""Config loading: schema defaults, strict keys, did-you-mean, overrides, `base:`, file errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdt_cli.config import dump_config
from xdt_cli.errors import ConfigError
from xdt_cli.resolve import load_config

SOURCE = "data:\n  source: {dataset: digits}\n"
ADAM = "optim: {name: adam}\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_file(tmp_path: Path, extra: str = "", name: str = "exp.yaml") -> Path:
    return write(tmp_path / name, SOURCE + extra)


def problems(path: Path, overrides=(), **kwargs) -> list[str]:
    """The error lines that loading `path` raises (the test fails if it loads)."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), **kwargs)
    assert info.value.lines, "a ConfigError must hold at least one line"
    assert str(info.value) == "\n".join(info.value.lines)
    return info.value.lines


# --------------------------------------------------------------------------- defaults
def test_minimal_config_gets_the_schema_defaults(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, name="my-exp.yaml"))
    assert cfg.name == "my-exp"  # the file's stem
    assert cfg.seed == 0
    assert cfg.device == "auto"
    assert cfg.data.split_seed == 0
    assert cfg.data.source.dataset == "digits"
    assert cfg.data.target is None
    assert cfg.model.backbone == "lenet"
    assert cfg.optim.name == "adam"
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.weight_decay == 0.0
    assert tuple(cfg.optim.betas) == (0.9, 0.999)
    assert cfg.schedule.name == "constant"
    assert cfg.schedule.warmup_steps == 0
    assert cfg.method.name == "erm"
    assert cfg.method_config.label_smoothing == 0.0
    assert cfg.method.model_dump() == {"name": "erm", "label_smoothing": 0.0}
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (1000, 64, 200)
    assert cfg.train.precision == "auto"
    assert cfg.train.grad_clip is None
    assert cfg.train.early_stopping is None
    assert cfg.train.deterministic is True
    assert cfg.selection.rule == "source_val"
    assert (cfg.selection.metric, cfg.selection.mode) == ("digits/val/acc", "max")  # resolved


def test_an_explicit_name_wins_over_the_file_stem(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, "name: mine\n")).name == "mine"


def test_an_option_has_its_own_defaults(tmp_path: Path) -> None:
    cfg = load_config(
        config_file(tmp_path, "optim: {name: sgd}\nschedule: {name: step, step_size: 30}\n")
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.01, 0.9)
    assert cfg.optim.nesterov is False
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("step", 30, 0.1)
    adamw = load_config(config_file(tmp_path, "optim: {name: adamw}\n"))
    assert (adamw.optim.name, adamw.optim.weight_decay) == ("adamw", 0.01)


@pytest.mark.parametrize(
    ("extra", "overrides"),
    [
        ("optim: {lr: 0.01}\n", []),
        ("", ["optim.lr=0.01"]),
        ("optim: {weight_decay: 0.01}\n", ["optim.lr=0.01"]),
    ],
    ids=["file", "override", "both"],
)
def test_an_optim_section_without_name_is_the_default_adam(
    tmp_path: Path, extra: str, overrides: list[str]
) -> None:
    cfg = load_config(config_file(tmp_path, extra), overrides)
    assert (cfg.optim.name, cfg.optim.lr) == ("adam", 0.01)


def test_a_schedule_section_without_name_is_the_default_constant(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, "schedule: {warmup_steps: 10}\n"))
    assert (cfg.schedule.name, cfg.schedule.warmup_steps) == ("constant", 10)


# --------------------------------------------------------------------------- unknown keys
def test_unknown_keys_name_their_dotted_path_with_a_did_you_mean(tmp_path: Path) -> None:
    path = config_file(
        tmp_path, "optim: {name: adam, lrr: 0.1}\ntrain: {stepz: 3}\nfoo: 1\nsead: 3\n"
    )
    lines = problems(path)
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    body = sorted(line.removeprefix(f"{path}: ") for line in lines)
    assert body == [
        "foo: unknown key",
        "optim.lrr: unknown key (did you mean 'optim.lr'?)",
        "sead: unknown key (did you mean 'seed'?)",
        "train.stepz: unknown key (did you mean 'train.steps'?)",
    ]


def test_an_unknown_key_deep_in_a_section_names_the_full_path(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "data:\n  source: {datset: digits}\n")
    lines = problems(path)
    assert f"{path}: data.source.datset: unknown key (did you mean 'data.source.dataset'?)" in (
        lines
    )


@pytest.mark.parametrize(
    ("extra", "dotted", "detail"),
    [
        ("train: {steps: -1}\n", "train.steps", "-1"),
        ("train: {steps: 2.5}\n", "train.steps", "2.5"),
        ("optim: {name: adam, lr: abc}\n", "optim.lr", "'abc'"),
        ("optim: {name: adam, lr: 0}\n", "optim.lr", "0"),
        ("optim: {name: sgd, momentum: 1.0}\n", "optim.momentum", "1.0"),
        ("train: {precision: fp8}\n", "train.precision", "'fp8'"),
        ("train: {grad_clip: -1.0}\n", "train.grad_clip", "-1.0"),
        ("schedule: {name: cosine, min_lr_ratio: 2}\n", "schedule.min_lr_ratio", "2"),
        ("seed: abc\n", "seed", "'abc'"),
        ("data: {source: {dataset: digits}, split_seed: [1]}\n", "data.split_seed", "[1]"),
    ],
)
def test_a_bad_value_names_its_dotted_path(
    tmp_path: Path, extra: str, dotted: str, detail: str
) -> None:
    path = write(tmp_path / "exp.yaml", extra if extra.startswith("data:") else SOURCE + extra)
    lines = problems(path)
    hits = [line for line in lines if line.startswith(f"{path}: {dotted}: ")]
    assert len(hits) == 1, lines
    assert f"(got {detail})" in hits[0]


def test_several_bad_values_give_one_line_each(tmp_path: Path) -> None:
    path = config_file(
        tmp_path, "train: {steps: -1, batch_size: 0}\noptim: {name: adam, lr: abc}\n"
    )
    lines = problems(path)
    assert len(lines) == 3, lines
    assert {line.split(": ")[1] for line in lines} == {
        "train.steps",
        "train.batch_size",
        "optim.lr",
    }


@pytest.mark.parametrize("extra", ["train: {steps: true}\n", "seed: yes\n"])
def test_a_boolean_is_not_an_integer(tmp_path: Path, extra: str) -> None:
    problems(config_file(tmp_path, extra))


# --------------------------------------------------------------------------- tagged options
def test_keys_of_another_option_are_refused(tmp_path: Path) -> None:
    path = config_file(
        tmp_path, "optim: {name: adam, momentum: 0.5}\nschedule: {name: cosine, gamma: 0.1}\n"
    )
    lines = problems(path)
    assert sorted(lines) == [
        f"{path}: optim.momentum: unknown key",
        f"{path}: schedule.gamma: unknown key",
    ]
    # the same keys are fine where they belong
    cfg = load_config(
        config_file(
            tmp_path,
            "optim: {name: sgd, momentum: 0.5}\nschedule: {name: step, step_size: 5, gamma: 0.5}\n",
        )
    )
    assert (cfg.optim.momentum, cfg.schedule.gamma) == (0.5, 0.5)


def test_a_misspelt_option_name_suggests_the_right_one(tmp_path: Path) -> None:
    path = config_file(tmp_path, "optim: {name: sgdd}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: optim.name: unknown name 'sgdd' (did you mean 'sgd'?)")
    assert "adam" in line and "adamw" in line  # lists the choices

    path = config_file(tmp_path, "schedule: {name: cosin}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: schedule.name: unknown name 'cosin' (did you mean 'cosine'?)")


def test_a_step_schedule_needs_step_size(tmp_path: Path) -> None:
    path = config_file(tmp_path, "schedule: {name: step}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: schedule.step_size: ")
    assert "required" in line.lower()


# --------------------------------------------------------------------------- overrides
def test_override_values_parse_as_yaml_scalars(tmp_path: Path) -> None:
    # PyYAML alone reads 1e-3 as a string; the schema must still make it a float.
    assert yaml.safe_load("1e-3") == "1e-3"
    path = config_file(tmp_path, ADAM + "train: {steps: 100, grad_clip: 1.0}\n")
    cfg = load_config(
        path,
        [
            "train.steps=500",
            "optim.lr=1e-3",
            "optim.weight_decay=5e-4",
            "train.grad_clip=null",
            "train.deterministic=false",
            "model.backbone=cnn",
            "optim.betas=[0.8, 0.99]",
        ],
    )
    assert cfg.train.steps == 500 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.0005 and type(cfg.optim.weight_decay) is float
    assert cfg.train.grad_clip is None
    assert cfg.train.deterministic is False
    assert cfg.model.backbone == "cnn"
    assert tuple(cfg.optim.betas) == (0.8, 0.99)


def test_overrides_apply_in_order_over_the_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, ADAM + "train: {steps: 100, batch_size: 8}\n")
    cfg = load_config(path, ["train.steps=1", "train.steps=2"])
    assert (cfg.train.steps, cfg.train.batch_size) == (2, 8)


def test_floats_in_the_file_accept_exponent_notation(tmp_path: Path) -> None:
    cfg = load_config(
        config_file(tmp_path, "optim: {name: adam, lr: 3e-4}\nmethod: {label_smoothing: 1e-1}\n")
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.method_config.label_smoothing == 0.1


def test_an_override_of_an_unknown_key_is_an_error_like_in_the_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, ADAM)
    assert problems(path, ["optim.lrr=0.1"]) == [
        f"{path}: optim.lrr: unknown key (did you mean 'optim.lr'?)"
    ]
    assert problems(path, ["trian.steps=5"]) == [
        f"{path}: trian: unknown key (did you mean 'train'?)"
    ]


def test_base_cannot_be_set_by_an_override(tmp_path: Path) -> None:
    # overrides apply after `base:` is resolved, so accepting it would silently ignore it
    path = config_file(tmp_path, ADAM)
    (line,) = problems(path, ["base=other.yaml"])
    assert line.startswith(f"{path}: base: unknown key")


@pytest.mark.parametrize("text", ["trainsteps", "=3", "a..b=1", ".a=1", "a.=1", "train. =1"])
def test_a_malformed_override_is_an_error_naming_it(tmp_path: Path, text: str) -> None:
    (line,) = problems(config_file(tmp_path, ADAM), [text])
    assert f"'{text}'" in line
    assert "key.path=value" in line


def test_an_override_value_with_a_python_tag_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "hacked"
    text = f'seed=!!python/object/apply:os.system ["touch {marker}"]'
    (line,) = problems(config_file(tmp_path, ADAM), [text])
    assert "seed=" in line
    assert not marker.exists()


@pytest.mark.parametrize("extra", ["", "seed: 3\n"], ids=["absent", "in-file"])
def test_an_override_through_a_scalar_is_an_error(tmp_path: Path, extra: str) -> None:
    path = config_file(tmp_path, ADAM + extra)
    (line,) = problems(path, ["seed.x=1"])
    assert "seed" in line
    (line,) = problems(path, ["train.steps=5", "train.steps.x=1"])
    assert "train.steps" in line


def test_flags_win_over_overrides(tmp_path: Path) -> None:
    path = config_file(tmp_path, ADAM + "seed: 1\ndevice: cuda\n")
    cfg = load_config(path, ["seed=3", "device=cuda:1"], flags={"seed": 7, "device": "cpu"})
    assert (cfg.seed, cfg.device) == (7, "cpu")
    # a flag left unset (None) does not hide the override
    cfg = load_config(path, ["seed=3"], flags={"seed": None, "device": None})
    assert (cfg.seed, cfg.device) == (3, "cuda")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.integers(min_value=1, max_value=10**9),
    batch_size=st.integers(min_value=1, max_value=1 << 16),
    seed=st.integers(min_value=-(2**31), max_value=2**31),
    lr=st.floats(min_value=1e-12, max_value=10.0, allow_nan=False, allow_infinity=False),
)
def test_overrides_round_trip_into_the_validated_config(
    tmp_path: Path, steps: int, batch_size: int, seed: int, lr: float
) -> None:
    path = config_file(tmp_path, ADAM)
    cfg = load_config(
        path,
        [
            f"train.steps={steps}",
            f"train.batch_size={batch_size}",
            f"seed={seed}",
            f"optim.lr={lr!r}",
        ],
    )
    assert cfg.train.steps == steps and type(cfg.train.steps) is int
    assert cfg.train.batch_size == batch_size
    assert cfg.seed == seed
    assert cfg.optim.lr == lr and type(cfg.optim.lr) is float


# --------------------------------------------------------------------------- base
PARENT = (
    "data:\n  source: {dataset: digits}\n  split_seed: 4\n"
    "optim: {name: sgd, lr: 0.5, momentum: 0.5}\n"
    "train: {steps: 100, batch_size: 8}\n"
    "seed: 1\n"
)


def test_a_child_overrides_its_base_key_by_key(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", PARENT)
    child = write(
        tmp_path / "child.yaml",
        "base: parent.yaml\noptim: {lr: 0.1}\ntrain: {steps: 200}\n"
        "data: {target: {dataset: mnist5k}}\n",
    )
    cfg = load_config(child)
    assert cfg.name == "child"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.1, 0.5)
    assert (cfg.train.steps, cfg.train.batch_size) == (200, 8)
    assert cfg.seed == 1
    assert cfg.data.source.dataset == "digits"
    assert cfg.data.target.dataset == "mnist5k"
    assert cfg.data.split_seed == 4
    # precedence: base < file < overrides < flags
    cfg = load_config(child, ["train.steps=300", "seed=5"], flags={"seed": 6})
    assert (cfg.train.steps, cfg.seed, cfg.optim.lr) == (300, 6, 0.1)


def test_relative_base_paths_resolve_against_the_childs_folder_through_a_chain_of_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "configs" / "common" / "root.yaml", PARENT)
    write(
        tmp_path / "configs" / "mid" / "mid.yaml",
        "base: ../common/root.yaml\ntrain: {steps: 200}\nseed: 2\n",
    )
    leaf = write(
        tmp_path / "configs" / "leaf" / "deep" / "leaf.yaml",
        "base: ../../mid/mid.yaml\ntrain: {batch_size: 16}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not relative to the working directory
    cfg = load_config(leaf)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.seed) == (200, 16, 2)
    assert (cfg.optim.name, cfg.optim.lr) == ("sgd", 0.5)
    assert cfg.name == "leaf"


def test_an_absolute_base_path_works(tmp_path: Path) -> None:
    parent = write(tmp_path / "a" / "parent.yaml", PARENT)
    child = write(tmp_path / "b" / "child.yaml", f"base: {parent}\nseed: 9\n")
    cfg = load_config(child)
    assert (cfg.seed, cfg.optim.name) == (9, "sgd")


def test_a_missing_base_is_an_error_naming_the_file(tmp_path: Path) -> None:
    child = config_file(tmp_path, "base: missing.yaml\n", name="child.yaml")
    (line,) = problems(child)
    assert line.startswith(f"{child}: base:")
    assert str(tmp_path / "missing.yaml") in line
    assert "not found" in line


def test_a_base_that_is_not_a_path_is_an_error(tmp_path: Path) -> None:
    child = config_file(tmp_path, "base: 3\n", name="child.yaml")
    (line,) = problems(child)
    assert line.startswith(f"{child}: base:")


def test_base_cycles_are_errors(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", SOURCE + "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    (line,) = problems(a)
    assert "cycle" in line
    assert "a.yaml" in line and "b.yaml" in line

    me = write(tmp_path / "self.yaml", SOURCE + "base: self.yaml\n")
    (line,) = problems(me)
    assert "cycle" in line and "self.yaml" in line


def test_base_does_not_appear_in_the_resolved_config(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    cfg = load_config(child)
    assert "base" not in cfg.model_dump()
    dumped = yaml.safe_load(dump_config(cfg))
    assert "base" not in dumped
    assert dumped["optim"]["name"] == "sgd"


# --------------------------------------------------------------------------- file errors
def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: config file not found"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "empty.yaml", text)
    (line,) = problems(path)
    assert line.startswith(f"{path}: ") and "empty" in line


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("hello\n", "str")])
def test_a_document_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path / "x.yaml", text)
    (line,) = problems(path)
    assert line.startswith(f"{path}: ")
    assert "mapping" in line and kind in line


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "seed: 1\ndata:\n  source: {dataset: digits\nname: x\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: invalid YAML at line 4")


def test_a_python_object_tag_is_refused_and_never_run(tmp_path: Path) -> None:
    control = tmp_path / "control"
    payload = '!!python/object/apply:os.system ["touch {}"]\n'
    # the payload is live: an unsafe loader runs it
    yaml.unsafe_load(payload.format(control))
    assert control.exists()

    marker = tmp_path / "hacked"
    path = write(tmp_path / "evil.yaml", payload.format(marker))
    (line,) = problems(path)
    assert line.startswith(f"{path}: ")
    assert not marker.exists()

    nested = write(tmp_path / "nested.yaml", f"{SOURCE}seed: {payload.format(marker)}")
    (line,) = problems(nested)
    assert line.startswith(f"{nested}: ")
    assert not marker.exists()


# --------------------------------------------------------------------------- method
def test_an_unknown_method_suggests_a_known_one(tmp_path: Path) -> None:
    path = config_file(tmp_path, "method: {name: ermm}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: method.name: unknown method 'ermm' (did you mean 'erm'?)")


def test_method_hyper_parameters_are_checked_by_the_methods_config(tmp_path: Path) -> None:
    path = config_file(tmp_path, "method: {name: erm, foo: 1}\n")
    assert problems(path) == [f"{path}: method.foo: unknown key"]

    path = config_file(tmp_path, "method: {label_smoothing: 2}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: method.label_smoothing: ")
    assert "(got 2)" in line

    cfg = load_config(config_file(tmp_path, "method: {label_smoothing: 0.2}\n"))
    assert cfg.method_config.label_smoothing == 0.2
    assert cfg.method.model_dump() == {"name": "erm", "label_smoothing": 0.2}
    cfg = load_config(config_file(tmp_path, ADAM), ["method.label_smoothing=1e-1"])
    assert cfg.method_config.label_smoothing == 0.1


def test_a_method_that_does_not_serve_the_subcommand_is_refused(tmp_path: Path) -> None:
    path = config_file(tmp_path)
    (line,) = problems(path, subcommand="transfer")
    assert line.startswith(f"{path}: method.name: 'erm' does not serve transfer")


# --------------------------------------------------------------------------- consistency
def test_early_stopping_needs_a_selection_metric(tmp_path: Path) -> None:
    path = config_file(tmp_path, "train: {early_stopping: 3}\nselection: {rule: last}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: ")
    assert "train.early_stopping" in line and "last" in line
    cfg = load_config(config_file(tmp_path, "train: {early_stopping: 3}\n"))
    assert (cfg.train.early_stopping, cfg.selection.rule) == (3, "source_val")


def test_warmup_must_be_shorter_than_training(tmp_path: Path) -> None:
    path = config_file(tmp_path, "train: {steps: 10}\nschedule: {name: cosine, warmup_steps: 10}\n")
    (line,) = problems(path)
    assert "schedule.warmup_steps" in line


def test_train_source_needs_a_source(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.yaml", "seed: 1\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: data.source: ")
    path = write(tmp_path / "exp.yaml", "data: {source: {}}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: data.source.dataset: ")


# --------------------------------------------------------------------------- dump
@pytest.mark.parametrize(
    "extra",
    [
        "",
        "data: {source: {dataset: digits}, target: {dataset: mnist5k}, split_seed: 3}\n"
        "model: {backbone: cnn}\n"
        "method: {name: erm, label_smoothing: 0.1}\n"
        "optim: {name: sgd, lr: 0.05, momentum: 0.8, nesterov: true, weight_decay: 5e-4}\n"
        "schedule: {name: step, step_size: 30, gamma: 0.5, warmup_steps: 5}\n"
        "train: {steps: 90, batch_size: 32, grad_clip: 1.0, early_stopping: 2, precision: fp32}\n"
        "selection: {metric: digits/val/loss, mode: min}\n"
        "seed: 11\ndevice: cpu\n",
    ],
    ids=["minimal", "full"],
)
def test_dump_config_reloads_to_an_equal_config(tmp_path: Path, extra: str) -> None:
    text = extra if extra.startswith("data:") else SOURCE + extra
    original = load_config(write(tmp_path / "exp.yaml", text))
    text = dump_config(original)
    assert text.startswith("name: exp\n")
    copy_path = write(tmp_path / "copy" / "resolved.yaml", text)
    reloaded = load_config(copy_path)
    assert reloaded.model_dump() == original.model_dump()
    assert reloaded.method_config == original.method_config
    assert dump_config(reloaded) == text


def test_an_error_in_a_base_file_names_the_base_file(tmp_path: Path) -> None:
    parent = write(tmp_path / "common" / "parent.yaml", "train: {steps: 5\n")
    child = config_file(tmp_path, "base: common/parent.yaml\n", name="child.yaml")
    (line,) = problems(child)
    assert line.startswith(f"{parent}: invalid YAML at line 2")


def test_a_duplicated_key_is_an_error(tmp_path: Path) -> None:
    path = config_file(tmp_path, "train: {steps: 10}\nseed: 1\ntrain: {batch_size: 8}\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: ") and "train" in line


# --------------------------------------------------------------------------- hostile files
def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': each level lists `width` aliases of the one below, width^levels
    leaves in all (9^9 = 387,420,489) from a file of a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def _one_error_line(result, path: Path) -> str:
    """The CLI refused `path` as bad input: exit 2, one stderr line naming it, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert "Traceback" not in result.output and "hint:" not in result.stderr
    return lines[0]


def _cli(*args):
    from typer.testing import CliRunner

    from xdt_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_config_that_is_not_utf8_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SOURCE.encode() + "name: caf\xe9\n".encode("latin-1"))
    line = _one_error_line(_cli("validate", path), path)
    assert "UTF-8" in line and "0xe9" in line
    assert problems(path) == [line.removeprefix("error: ")]


def test_a_base_file_that_is_not_utf8_names_the_base_file(tmp_path: Path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_bytes(b"seed: 1\nname: \xff\xfe\n")
    child = config_file(tmp_path, "base: parent.yaml\n", name="child.yaml")
    line = _one_error_line(_cli("validate", child), parent)
    assert "UTF-8" in line


def test_an_alias_bomb_is_refused_quickly_naming_the_file(tmp_path: Path) -> None:
    import time

    path = write(tmp_path / "bomb.yaml", SOURCE + _alias_bomb())
    _cli("validate", tmp_path / "missing.yaml")  # the imports, outside the timing
    start = time.perf_counter()
    line = _one_error_line(_cli("validate", path), path)
    assert time.perf_counter() - start < 2.0
    assert "alias" in line
    # the same reader guards base files, sweep files and benchmark suites
    child = config_file(tmp_path, "base: bomb.yaml\n", name="child.yaml")
    assert "alias" in _one_error_line(_cli("validate", child), path)
    sweep = write(tmp_path / "sweep.yaml", _alias_bomb())
    assert "alias" in _one_error_line(_cli("sweep", sweep, "--dry-run"), sweep)
    suite = write(tmp_path / "suite.yaml", _alias_bomb())
    assert "alias" in _one_error_line(_cli("benchmark", suite), suite)
    assert time.perf_counter() - start < 8.0


def test_a_wide_but_shallow_use_of_aliases_still_loads(tmp_path: Path) -> None:
    # anchors and aliases are ordinary YAML: sharing a section is fine, and so is a bomb
    # of a few levels whose expansion stays small
    path = config_file(
        tmp_path,
        "train: &t {steps: 7}\nschedule: {name: constant}\n",
    )
    assert load_config(path).train.steps == 7
    shared = write(
        tmp_path / "shared.yaml",
        "data:\n  source: &s {dataset: digits}\n  target: *s\nmethod: {name: dann}\n",
    )
    cfg = load_config(shared, subcommand="transfer")
    assert cfg.data.target.dataset == cfg.data.source.dataset == "digits"
    small = write(tmp_path / "small.yaml", SOURCE + _alias_bomb(levels=3, width=9))
    lines = problems(small)  # 9^3 nodes load; then the keys are unknown, as they should be
    assert len(lines) == 3 and all("unknown key" in line for line in lines), lines


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "loop.yaml", SOURCE + "seed: &a [1, *a]\n")
    line = _one_error_line(_cli("validate", path), path)
    assert "alias" in line


def test_the_reader_is_still_a_safe_loader() -> None:
    from xdt_cli.config import loading as config

    assert issubclass(config._BoundedLoader, yaml.SafeLoader)
    assert config._load_yaml("a: 1\nb: [x, 1e-3]\n")[0] == yaml.safe_load("a: 1\nb: [x, 1e-3]\n")
