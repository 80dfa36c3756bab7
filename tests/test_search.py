"""Hyper-parameter search (search.py, a sweep's `search:`): every method's space, draws as
DomainBed's hparams_registry makes them, draw 0 = the defaults, and a search planned as
grid x draws x trials."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from xdt_cli.cli import app
from xdt_cli.errors import ConfigError
from xdt_cli.methods import METHODS
from xdt_cli.search import Param, draw, is_hyperparameter, is_small, seed_hash, shared_space
from xdt_cli.sweeps import load_sweep, plan

REPO = Path(__file__).resolve().parents[1]
SPACES = [(opt, small) for opt in ("adam", "sgd") for small in (True, False)]


def full_space(method: str, optimizer: str = "adam", small: bool = True) -> dict[str, Param]:
    own = {f"method.{k}": p for k, p in METHODS[method].search_space.items()}
    return {**shared_space(optimizer, small), **own}


# --------------------------------------------------------------------------- the spaces
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_space_names_its_own_config_keys_and_its_source(name: str) -> None:
    cls = METHODS[name]
    for key, param in cls.search_space.items():
        assert key in cls.Config.model_fields, f"{name}: {key} is not a key of its Config"
        assert param.source, f"{name}.{key}: no source"
        assert param.describe()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_draw_is_a_valid_config_within_its_range(name: str) -> None:
    """Draws 1..30 of each method's own keys pass its Config's checks (a range that leaves
    the Config's bounds fails here), lie within their distribution and repeat exactly."""
    cls = METHODS[name]
    own = cls.search_space
    for d in range(1, 31):
        values = draw(own, d, {})
        assert values == draw(own, d, {})
        for key, value in values.items():
            assert own[key].contains(value), (name, key, value, own[key].describe())
        cls.Config(**values)  # raises when a drawn value is outside the method's bounds


@pytest.mark.parametrize(("optimizer", "small"), SPACES)
def test_shared_draws_are_deterministic_and_within_range(optimizer: str, small: bool) -> None:
    space = shared_space(optimizer, small)
    draws = [draw(space, d, {}) for d in range(1, 41)]
    assert draws == [draw(space, d, {}) for d in range(1, 41)]
    for values in draws:
        for key, value in values.items():
            assert space[key].contains(value), (key, value)
    lrs = [v["optim.lr"] for v in draws]
    assert len(set(lrs)) == len(lrs)  # each draw its own stream: no two alike
    assert all(isinstance(v["train.batch_size"], int) for v in draws)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_draw_zero_is_the_method_defaults(name: str) -> None:
    cls = METHODS[name]
    defaults = cls.Config().model_dump()
    assert draw(cls.search_space, 0, defaults) == {k: defaults[k] for k in cls.search_space}


def test_draws_equal_domainbeds_random_hparams() -> None:
    """Reference values: DomainBed's hparams_registry.random_hparams(algorithm, dataset, d)
    (facebookresearch/DomainBed at its 2026-11 head), for the keys xdt shares with it."""
    expected = {
        ("irm", 1): {"lr": 8.511453013879485e-05, "batch_size": 228},
        ("irm", 3): {"lr": 0.00015587459590446422, "batch_size": 192},
    }
    for (name, d), want in expected.items():
        got = draw(full_space(name), d, {})
        assert got["optim.lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["train.batch_size"] == want["batch_size"]
    own = {  # algorithm, draw: {xdt key: DomainBed's value}
        ("irm", 1): {"penalty_weight": 0.8390320270599932, "anneal_steps": 5941},
        ("irm", 3): {"penalty_weight": 4713.922551229862, "anneal_steps": 2567},
        ("dann", 1): {"trade_off": 53.1611277452152, "hidden_dim": 80},
        ("dann", 2): {"trade_off": 1.8934045876952095, "hidden_dim": 115},
        ("mldg", 2): {"beta": 1.9090534135329338},
        ("mixup", 3): {"alpha": 0.15238141575284625},
    }
    for (name, d), want in own.items():
        got = draw(METHODS[name].search_space, d, {})
        assert got == pytest.approx(want, rel=1e-12), (name, d)
    pacs = draw(shared_space("adam", small_images=False), 2, {})  # ERM on PACS, draw 2
    assert pacs == pytest.approx(
        {
            "optim.lr": 1.3397675113647168e-05,
            "train.batch_size": 9,
            "optim.weight_decay": 0.0011232899620239713,
        },
        rel=1e-12,
    )


def test_a_draw_uses_domainbeds_per_name_stream() -> None:
    """Each key from RandomState(seed_hash(draw, name)): adding a key moves no other key."""
    assert seed_hash(1, "lr") == seed_hash(1, "lr") != seed_hash(2, "lr")
    p = shared_space("adam", True)["optim.lr"]
    rng = np.random.RandomState(seed_hash(5, "lr"))
    assert draw({"optim.lr": p}, 5, {})["optim.lr"] == 10 ** rng.uniform(-4.5, -2.5)
    alone = draw({"optim.lr": p}, 5, {})
    together = draw(full_space("irm"), 5, {})
    assert together["optim.lr"] == alone["optim.lr"]


def test_image_size_and_hyperparameter_keys() -> None:
    assert is_small((1, 28, 28)) and is_small((3, 32, 32)) and is_small((1, 36, 36))
    assert not is_small((3, 224, 224)) and not is_small(None)
    assert "optim.weight_decay" not in shared_space("adam", small_images=True)
    assert shared_space("sgd", True)["optim.lr"].describe() == "10^uniform(-3, -1)"
    assert is_hyperparameter("method.penalty_weight") and is_hyperparameter("optim.lr")
    assert not is_hyperparameter("method.name") and not is_hyperparameter("seed")


# --------------------------------------------------------------------------- a sweep's search
def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def irm_search(tmp_path: Path, **extra) -> Path:
    spec = {
        "subcommand": "generalize",
        "config": str(REPO / "configs/generalize/rotated_mnist5k_irm.yaml"),
        "overrides": ["train.steps=20"],
        "grid": {"data.test_domains": [["rot0"], ["rot15"]]},
        "search": {"draws": 3, "trials": 2},
        **extra,
    }
    return write(tmp_path / "irm_search.yaml", spec)


def test_a_search_plans_grid_x_draws_x_trials(tmp_path: Path) -> None:
    p = plan(load_sweep(irm_search(tmp_path)), tmp_path / "runs")
    assert len(p.runs) == 2 * 3 * 2
    shipped = yaml.safe_load((REPO / "configs/generalize/rotated_mnist5k_irm.yaml").read_text())
    base = yaml.safe_load((REPO / "configs/generalize/_rotated_mnist5k.yaml").read_text())
    for run in p.runs:
        assert run.values["seed"] == run.values["data.split_seed"] == run.trial
        assert run.name.startswith(
            f"test_domains=rot{0 if run.values['data.test_domains'] == ['rot0'] else 15}-"
            f"draw{run.draw}-trial{run.trial}-"
        )
        if run.draw == 0:  # the config's own values (the IRM config sets anneal_steps 50)
            assert run.values["method.anneal_steps"] == shipped["method"]["anneal_steps"]
            assert run.values["method.penalty_weight"] == shipped["method"]["penalty_weight"]
            assert run.values["optim.lr"] == base["optim"]["lr"]
            assert run.values["train.batch_size"] == base["train"]["batch_size"]
        else:  # the same draw in every cell and trial
            assert (
                run.values["method.penalty_weight"]
                == draw(full_space("irm"), run.draw, {})["method.penalty_weight"]
            )
    # draws differ between them, trials share them
    by_draw = {}
    for run in p.runs:
        keys = ("optim.lr", "train.batch_size", "method.penalty_weight", "method.anneal_steps")
        by_draw.setdefault(run.draw, set()).add(tuple(run.values[k] for k in keys))
    assert all(len(v) == 1 for v in by_draw.values()) and len(by_draw) == 3
    assert len({next(iter(v)) for v in by_draw.values()}) == 3
    again = plan(load_sweep(irm_search(tmp_path)), tmp_path / "runs")
    assert [r.name for r in again.runs] == [r.name for r in p.runs]


def test_a_key_fixed_in_overrides_is_not_searched(tmp_path: Path) -> None:
    sweep = irm_search(tmp_path, overrides=["train.steps=20", "train.batch_size=8"])
    p = plan(load_sweep(sweep), tmp_path / "runs")
    assert {r.values.get("train.batch_size") for r in p.runs} == {None}
    assert all("train.batch_size=8" in r.overrides for r in p.runs)
    assert len({r.values["optim.lr"] for r in p.runs}) == 3


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"seeds": [0, 1]}, "its trials are the seeds"),
        ({"random": {"n": 2, "params": {"optim.lr": {"uniform": [0.1, 0.2]}}}}, "drop random"),
        ({"grid": {"optim.lr": [0.1, 0.2]}}, "'optim.lr' is a searched hyper-parameter"),
        ({"overrides": ["data.split_seed=3"]}, "sets data.split_seed to the trial seed"),
        ({"search": {"draws": 0, "trials": 2}}, "search.draws"),
    ],
)
def test_search_file_errors_name_the_key(tmp_path: Path, extra: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep(irm_search(tmp_path, **extra))
    assert any(needle in line for line in err.value.lines), err.value.lines


def test_the_dry_run_prints_every_search_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["sweep", str(irm_search(tmp_path)), "--dry-run", "--runs-dir", str(tmp_path / "r")],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 12
    assert all("seed=" in ln and "data.split_seed=" in ln for ln in lines)
    assert sum("method.anneal_steps=50 " in ln for ln in lines) == 4  # draw 0, 2 cells x 2


def test_xdt_methods_name_prints_the_space() -> None:
    result = CliRunner().invoke(app, ["methods", "irm", "--json"])
    assert result.exit_code == 0, result.output
    detail = json.loads(result.stdout)
    own = {e["key"]: e for e in detail["search_space"]}
    assert own["method.penalty_weight"]["distribution"] == "10^uniform(-1, 5)"
    assert own["method.penalty_weight"]["default"] == 100.0
    assert own["method.anneal_steps"]["distribution"] == "int(10^uniform(0, 4))"
    shared = {(e["when"], e["key"]): e["distribution"] for e in detail["shared_search_space"]}
    assert shared[("adam, small images", "optim.lr")] == "10^uniform(-4.5, -2.5)"
    assert shared[("adam, small images", "train.batch_size")] == "int(2^uniform(3, 9))"
    mgda = json.loads(CliRunner().invoke(app, ["methods", "mgda", "--json"]).stdout)
    assert mgda["search_space"][0]["distribution"] == "choice(none, l2, loss, loss+)"
    text = CliRunner().invoke(app, ["methods", "mgda"])
    assert text.exit_code == 0 and "search space of mgda" in text.stdout
    bad = CliRunner().invoke(app, ["methods", "irn"])
    assert bad.exit_code == 2 and "did you mean 'irm'" in bad.output


# --------------------------------------------------------------------------- end to end
def test_a_tiny_search_runs_and_report_chooses_within_each_trial(tmp_path: Path) -> None:
    """2 draws x 2 trials x 2 held-out domains through `xdt sweep`, then `xdt report
    --choose-by training_domain_val`: each trial's chosen draw is the one with the best
    training-domain val accuracy (recomputed here from metrics.jsonl), its test accuracy the
    held-out domain's at that step, and the column their mean over trials."""
    sweep = write(
        tmp_path / "tiny_search.yaml",
        {
            "subcommand": "generalize",
            "config": str(REPO / "configs/generalize/rotated_mnist5k_irm.yaml"),
            "overrides": [
                "data.domains=[rot0, rot15, rot30]",
                "train.steps=6",
                "train.eval_every=2",
                "train.log_every=2",
                "train.batch_size=8",
            ],
            "grid": {"data.test_domains": [["rot0"], ["rot30"]]},
            "search": {"draws": 2, "trials": 2},
        },
    )
    runs = tmp_path / "runs"
    ran = CliRunner().invoke(app, ["sweep", str(sweep), "--jobs", "2", "--runs-dir", str(runs)])
    assert ran.exit_code == 0, ran.output
    sweep_json = json.loads((runs / "tiny_search" / "sweep.json").read_text())
    assert sorted((e["draw"], e["trial"]) for e in sweep_json["runs"]) == sorted(
        [(d, t) for d in (0, 1) for t in (0, 1)] * 2
    )
    out = CliRunner().invoke(
        app,
        ["report", str(runs / "tiny_search"), "--choose-by", "training_domain_val"]
        + ["--format", "json"],
    )
    assert out.exit_code == 0, out.output
    [row] = json.loads(out.stdout)
    assert list(row["columns"]) == ["rot0", "rot30"]

    def best_val(run_dir: Path, held: str) -> tuple[float, float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best = None
        for r in (r for r in rows if r["split"] == "eval"):
            if best is None or r["train_domains/val/acc"] > best["train_domains/val/acc"]:
                best = r
        return best["train_domains/val/acc"], best[f"{held}/test/acc"]

    for held, column in row["columns"].items():
        assert column["n"] == 2
        tests = []
        for trial in column["trials"]:
            seed = trial["trial"]["seed"]
            cands = [
                (*best_val(Path(e["run_dir"]), held), e["run_dir"])
                for e in sweep_json["runs"]
                if e["trial"] == seed and e["values"]["data.test_domains"] == [held]
            ]
            assert len(cands) == trial["draws"] == 2
            val, test, run_dir = max(cands, key=lambda c: c[0])  # ties: the first
            assert trial["val"] == pytest.approx(val) and trial["test"] == pytest.approx(test)
            if cands[0][0] != cands[1][0]:
                assert trial["run"] == run_dir
            tests.append(test)
        assert column["mean"] == pytest.approx(sum(tests) / 2)
    # the benchmark's search table (benchmark.py) is the same choice, in %
    from xdt_cli.benchmark import TableSpec, search_table
    from xdt_cli.report import collect_runs

    spec = TableSpec(
        title="t", kind="search", rows=["tiny_search"], selection="training_domain_val"
    )
    table = search_table(spec, {"tiny_search": collect_runs([runs / "tiny_search"])}, "last")
    header, _, line = table.splitlines()[:3]
    assert header == "| method | rot0 | rot30 | avg |"
    rot0 = row["columns"]["rot0"]
    assert line.startswith(f"| `irm` | {100 * rot0['mean']:.1f} ± {100 * rot0['std']:.1f} |")
    assert "among 2 completed draws per trial, 2 trials" in table
    md = CliRunner().invoke(
        app,
        ["report", str(runs / "tiny_search"), "--choose-by", "oracle", "--format", "markdown"],
    )
    assert md.exit_code == 0 and "| rot0 | rot30 | avg |" in md.stdout.replace("  ", " "), md.stdout


def test_the_shipped_searches_plan_and_validate(tmp_path: Path, monkeypatch) -> None:
    """The search suites' sweeps (and the README's example) expand and validate: every run's
    config loads; the suites hold the runs their comments promise."""
    from xdt_cli.benchmark import find_suite, load_suite

    monkeypatch.chdir(REPO)
    sizes = {}
    for suite in ("search_generalize", "search_transfer"):
        loaded = load_suite(find_suite(suite))
        plans = [plan(load_sweep(p), tmp_path / "runs") for p in loaded.sweeps]
        assert all(p.sweep.search is not None for p in plans)
        sizes[suite] = sum(len(p.runs) for p in plans)
    assert sizes == {"search_generalize": 432, "search_transfer": 96}
    example = plan(load_sweep("configs/sweeps/colored_mnist5k_irm_search.yaml"), tmp_path / "r")
    assert [(r.draw, r.trial) for r in example.runs] == [(d, t) for d in range(3) for t in (0, 1)]
