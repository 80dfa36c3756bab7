"""`xdt report --choose-by RULE` (choose.py): DomainBed's results of a hyper-parameter search.

Every search here is written by hand as run folders (the keys a real run writes), with
numbers picked so that each wrong way of choosing gives another answer than the right one:
choosing on the test metric (draw C of the generalize search has the best test values and
the worst validation), taking each run's last step where the rule picks an earlier one,
taking the best step where the rule takes the last one (oracle, last), pooling the trials
(the winners differ between trials), and maximising a metric that is minimised (task_val on
mse). No torch: nothing here trains.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from xdt_cli.choose import choose, describe_choice, render_choice
from xdt_cli.errors import XdtError
from xdt_cli.report import collect_runs

COLORED = ("env90", "env80", "env10")  # colored_mnist5k's domains, in its own order
ROTATED = ("rot0", "rot15", "rot30", "rot45", "rot60", "rot75")
# draws of the generalize search: (optim.lr, train.batch_size)
DRAWS = {"A": (1e-3, 32), "B": (1e-4, 64), "C": (1e-2, 8)}


# --------------------------------------------------------------------------- run folders
def write_run(
    path: Path, config: dict, evals: list[dict], subcommand: str, status: str = "completed"
) -> Path:
    """A finished run folder as `xdt <subcommand>` leaves it (tests/test_report.py's
    write_run, for any subcommand): config.yaml, meta.json, metrics.jsonl, summary.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    meta = {"xdt": "0.1.0", "subcommand": subcommand, "device": "cpu", "precision": "fp32"}
    (path / "meta.json").write_text(json.dumps(meta))
    train = [{"step": r["step"], "split": "train", "train/loss": 1.0} for r in evals]
    rows = sorted([*train, *evals], key=lambda r: (r["step"], r["split"] == "eval"))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = {k: v for k, v in evals[-1].items() if k not in ("step", "split")}
    rule = config["selection"]["rule"]
    summary = {
        "status": status,
        "subcommand": subcommand,
        "final": last,
        "best": last,
        "best_step": evals[-1]["step"],
        "selection": {"rule": rule, "metric": None, "mode": "max"},
        "steps": evals[-1]["step"],
        "wall_time_s": 1.0,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def common(config: dict, *, seed: int, lr: float, batch_size: int, rule: str) -> dict:
    """The sections every resolved config.yaml has, around a run's own `data` and `method`."""
    return {
        "name": config.pop("name"),
        "seed": seed,
        "device": "auto",
        "data": config.pop("data"),
        "model": {"backbone": "cnn", "preset": None, "freeze": [], "trainable": []},
        "init": {"from_run": None, "checkpoint": None, "weights": None, "pretrained": None},
        "method": config.pop("method"),
        "optim": {"name": "adam", "lr": lr, "weight_decay": 0.0, "betas": [0.9, 0.999]},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"steps": 20, "batch_size": batch_size, "eval_every": 10, "log_every": 25},
        "selection": {"rule": rule, "metric": None, "mode": None},
    }


def dg_config(held, draw, seed, *, dataset="colored_mnist5k", rule="training_domain_val") -> dict:
    """What `xdt generalize` writes for one draw and trial (DomainBed's trial_seed sets the
    seed and the data split together)."""
    data = {
        "split_seed": seed,
        "source": None,
        "target": None,
        "dataset": dataset,
        "domains": None,
        "test_domains": list(held),
        "domain_weights": {},
        "files": None,
        "tasks": {},
        "sample_weights": "none",
    }
    lr, batch_size = DRAWS[draw]
    config = {
        "name": f"{dataset}_erm",
        "data": data,
        "method": {"name": "erm", "label_smoothing": 0.0},
    }
    return common(config, seed=seed, lr=lr, batch_size=batch_size, rule=rule)


def dg_row(step, held, *, tv, hv, ht, domains=COLORED) -> dict:
    """A generalize eval row: every training domain's val acc is `tv`, every held-out
    domain's val and test acc are `hv` and `ht` (training domains' test: 0.5); training
    domains first, as the engine writes them, then the held-out ones and the means."""
    training = [d for d in domains if d not in held]
    accs = {d: (tv, 0.5) for d in training} | {d: (hv, ht) for d in held}
    row: dict = {"step": step, "split": "eval"}
    for d, (val, test) in accs.items():
        row |= {
            f"{d}/val/acc": val,
            f"{d}/val/loss": 1 - val,
            f"{d}/test/acc": test,
            f"{d}/test/loss": 1 - test,
        }
    groups = {"train_domains": training, "test_domains": list(held), "worst_domain": training}
    for group, names in groups.items():
        for split in ("val", "test"):
            for metric in ("acc", "loss"):
                values = [row[f"{d}/{split}/{metric}"] for d in names]
                if values:
                    row[f"{group}/{split}/{metric}"] = statistics.mean(values)
    return row


# --------------------------------------------------------------------------- generalize
# (held-out domain, seed, draw) -> [(train_domains val, held-out val, held-out test)] at steps
# 10 and 20. Draw C has the best test values everywhere and the worst validation.
GENERALIZE = {
    ("env90", 0, "A"): [(0.90, 0.2, 0.40), (0.50, 0.6, 0.55)],
    ("env90", 0, "B"): [(0.80, 0.9, 0.85), (0.70, 0.4, 0.60)],
    ("env90", 1, "A"): [(0.60, 0.5, 0.30), (0.80, 0.3, 0.35)],
    ("env90", 1, "B"): [(0.95, 0.2, 0.50), (0.60, 0.7, 0.45)],
    ("env80", 0, "A"): [(0.70, 0.8, 0.20), (0.75, 0.5, 0.25)],
    ("env80", 0, "B"): [(0.85, 0.4, 0.70), (0.60, 0.6, 0.30)],
    ("env80", 1, "A"): [(0.60, 0.9, 0.60), (0.40, 0.2, 0.10)],
    ("env80", 1, "B"): [(0.45, 0.3, 0.80), (0.55, 0.35, 0.90)],
}
for _held, _seed in [("env90", 0), ("env90", 1), ("env80", 0), ("env80", 1)]:
    GENERALIZE[(_held, _seed, "C")] = [(0.10, 0.1, 0.99), (0.20, 0.1, 0.98)]

# rule -> column -> per trial (seed 0, seed 1): (test, winning draw, step, validation value)
EXPECTED_DG = {
    # the best train_domains/val/acc of each run, then the best draw
    "training_domain_val": {
        "env90": [(0.40, "A", 10, 0.90), (0.50, "B", 10, 0.95)],
        "env80": [(0.70, "B", 10, 0.85), (0.60, "A", 10, 0.60)],
    },
    # the last step of each run; the draw with the best test_domains/val/acc there
    "oracle": {
        "env90": [(0.55, "A", 20, 0.6), (0.45, "B", 20, 0.7)],
        "env80": [(0.30, "B", 20, 0.6), (0.90, "B", 20, 0.35)],
    },
    # the last step of each run; the draw with the best train_domains/val/acc there
    "last": {
        "env90": [(0.60, "B", 20, 0.70), (0.35, "A", 20, 0.80)],
        "env80": [(0.25, "A", 20, 0.75), (0.90, "B", 20, 0.55)],
    },
}
VAL_METRIC = {
    "training_domain_val": "train_domains/val/acc",
    "oracle": "test_domains/val/acc",
    "last": "train_domains/val/acc",
}


@pytest.fixture
def dg_search(tmp_path: Path) -> Path:
    """3 draws x 2 trials x 2 held-out domains of colored_mnist5k, and a failed run whose
    numbers would win every rule (it must not count)."""
    root = tmp_path / "search"
    for (held, seed, draw), steps in GENERALIZE.items():
        rows = [
            dg_row(10 * (i + 1), [held], tv=tv, hv=hv, ht=ht)
            for i, (tv, hv, ht) in enumerate(steps)
        ]
        config = dg_config([held], draw, seed)
        write_run(root / f"{held}-s{seed}-{draw}", config, rows, "generalize")
    failed = [dg_row(10, ["env90"], tv=1.0, hv=1.0, ht=0.0)]
    write_run(
        root / "env90-s0-Z",
        dg_config(["env90"], "A", 0) | {"name": "z"},
        failed,
        "generalize",
        status="failed",
    )
    return root


def check_column(got: dict, expected: list[tuple], metric: str, val_metric: str, draws=3):
    """One column of choose()'s output against (test, draw, step, val) per trial."""
    tests = [e[0] for e in expected]
    assert got["metric"] == metric
    assert [t["test"] for t in got["trials"]] == pytest.approx(tests)
    assert [t["step"] for t in got["trials"]] == [e[2] for e in expected]
    assert [t["val"] for t in got["trials"]] == pytest.approx([e[3] for e in expected])
    assert {t["val_metric"] for t in got["trials"]} == {val_metric}
    assert [t["draws"] for t in got["trials"]] == [draws] * len(expected)
    assert got["n"] == len(expected)
    assert got["mean"] == pytest.approx(statistics.mean(tests))
    std = statistics.stdev(tests) if len(tests) > 1 else 0.0
    assert got["std"] == pytest.approx(std)
    assert got["se"] == pytest.approx(statistics.pstdev(tests) / len(tests) ** 0.5)


@pytest.mark.parametrize("rule", ["training_domain_val", "oracle", "last"])
def test_generalize_search_chooses_the_draw_per_trial(dg_search: Path, rule: str) -> None:
    (entry,) = choose(collect_runs([dg_search]), rule)
    assert set(entry) == {"row", "columns", "avg"}
    assert entry["row"] == {"method.name": "erm", "data.dataset": "colored_mnist5k"}
    # no run trains on both env90 and env80, so the first seen (by path) comes first
    assert list(entry["columns"]) == ["env90", "env80"]
    for column, expected in EXPECTED_DG[rule].items():
        got = entry["columns"][column]
        check_column(got, expected, f"{column}/test/acc", VAL_METRIC[rule])
        for trial, (seed, (_, draw, _, _)) in zip(got["trials"], enumerate(expected), strict=True):
            assert trial["trial"] == {"seed": seed, "data.split_seed": seed}
            assert trial["run"] == str(dg_search / f"{column}-s{seed}-{draw}")
            lr, batch_size = DRAWS[draw]
            assert trial["hparams"] == {
                "method.label_smoothing": 0.0,
                "optim.lr": lr,
                "optim.weight_decay": 0.0,
                "train.batch_size": batch_size,
            }
    # avg: per trial over the two columns, then over the trials
    per_trial = [
        statistics.mean(EXPECTED_DG[rule][c][i][0] for c in ("env90", "env80")) for i in (0, 1)
    ]
    assert entry["avg"]["n"] == 2
    assert entry["avg"]["mean"] == pytest.approx(statistics.mean(per_trial))
    assert entry["avg"]["std"] == pytest.approx(statistics.stdev(per_trial))
    assert entry["avg"]["se"] == pytest.approx(statistics.pstdev(per_trial) / 2**0.5)


def test_the_avg_counts_only_trials_with_a_result_in_every_column(dg_search: Path) -> None:
    # a third trial in env90 alone: it has a column mean, but no place in the avg
    for draw in ("A", "B"):
        rows = [dg_row(10, ["env90"], tv=0.5 if draw == "A" else 0.6, hv=0.5, ht=0.8)]
        write_run(dg_search / f"env90-s2-{draw}", dg_config(["env90"], draw, 2), rows, "generalize")
    (entry,) = choose(collect_runs([dg_search]), "training_domain_val")
    env90 = entry["columns"]["env90"]
    assert env90["n"] == 3 and env90["trials"][2]["draws"] == 2
    assert env90["trials"][2]["run"].endswith("env90-s2-B")
    assert env90["mean"] == pytest.approx(statistics.mean([0.40, 0.50, 0.8]))
    assert entry["columns"]["env80"]["n"] == 2
    assert entry["avg"]["n"] == 2
    assert entry["avg"]["mean"] == pytest.approx(0.55)  # (0.40+0.70)/2 and (0.50+0.60)/2


def test_ties_go_to_the_first_draw_and_a_nan_never_wins(tmp_path: Path) -> None:
    root = tmp_path / "ties"
    # a, b and c tie on train_domains/val/acc: a, the first by path, wins; n (first of all)
    # has no validation value (metrics.jsonl writes NaN as null) and the best test
    for name, draw, tv, ht in [("a", "B", 0.7, 0.3), ("b", "A", 0.7, 0.9), ("c", "C", 0.7, 0.8),
                               ("0-nan", "A", None, 1.0)]:  # fmt: skip
        rows = [dg_row(10, ["env90"], tv=0.5 if tv is None else tv, hv=0.5, ht=ht)]
        if tv is None:
            rows[0] |= {f"{d}/val/acc": None for d in ("env80", "env10", "train_domains")}
        write_run(root / name, dg_config(["env90"], draw, 0), rows, "generalize")
    (entry,) = choose(collect_runs([root]), "training_domain_val")
    (trial,) = entry["columns"]["env90"]["trials"]
    assert trial["run"] == str(root / "a") and trial["test"] == pytest.approx(0.3)
    assert trial["draws"] == 4 and trial["hparams"]["optim.lr"] == DRAWS["B"][0]


# --------------------------------------------------------------------------- leave-one-out
# draw -> (t, v) -> the v/test/acc of run [t, v] at steps 10 and 20 (its validation for t)
LODO_PAIRS = {
    "A": {("env90", "env80"): (0.9, 0.5), ("env90", "env10"): (0.7, 0.7),
          ("env80", "env90"): (0.4, 0.5), ("env80", "env10"): (0.4, 0.5),
          ("env10", "env90"): (0.6, 0.6), ("env10", "env80"): (0.6, 0.6)},
    "B": {("env90", "env80"): (0.5, 0.6), ("env90", "env10"): (0.5, 0.6),
          ("env80", "env90"): (0.7, 0.65), ("env80", "env10"): (0.7, 0.65),
          ("env10", "env90"): (0.55, 0.59), ("env10", "env80"): (0.55, 0.59)},
}  # fmt: skip
# draw -> t -> t/test/acc of run [t] at steps 10 and 20
LODO_TESTS = {
    "A": {"env90": (0.55, 0.95), "env80": (0.30, 0.60), "env10": (0.70, 0.20)},
    "B": {"env90": (0.99, 0.97), "env80": (0.45, 0.90), "env10": (0.80, 0.80)},
}
# column -> (test, draw, step, validation: the mean over v at that step)
EXPECTED_LODO = {
    "env90": (0.55, "A", 10, 0.8),  # A: (0.8, 0.6) at 10 and 20; B: (0.5, 0.6)
    "env80": (0.45, "B", 10, 0.7),  # A: (0.4, 0.5); B: (0.7, 0.65)
    "env10": (0.70, "A", 10, 0.6),  # A: a tie (0.6, 0.6), the first step; B: (0.55, 0.59)
}


@pytest.fixture
def lodo_search(tmp_path: Path) -> Path:
    """`xdt generalize --leave-one-out` for 2 draws, one trial: per draw, 3 runs holding out
    [t] and 6 holding out [t, v]. Each [t] run's own training-domain val and held-out val
    point at step 20, where leave-one-domain-out mostly does not."""
    root = tmp_path / "lodo"
    for draw in ("A", "B"):
        for t, tests in LODO_TESTS[draw].items():
            own = zip((0.1, 0.9), (0.1, 0.9), tests, strict=True)  # (tv, hv, ht) per step
            rows = [
                dg_row(10 * (i + 1), [t], tv=tv, hv=hv, ht=ht) for i, (tv, hv, ht) in enumerate(own)
            ]
            config = dg_config([t], draw, 0, rule="leave_one_domain_out")
            write_run(root / f"{draw}-{t}", config, rows, "generalize")
        for (t, v), values in LODO_PAIRS[draw].items():
            rows = [
                dg_row(10 * (i + 1), [t, v], tv=0.5, hv=0.5, ht=x) for i, x in enumerate(values)
            ]
            config = dg_config([t, v], draw, 0, rule="leave_one_domain_out")
            write_run(root / f"{draw}-{t}-{v}", config, rows, "generalize")
    return root


def test_leave_one_domain_out_search(lodo_search: Path) -> None:
    (entry,) = choose(collect_runs([lodo_search]), "leave_one_domain_out")
    # the [t, v] runs are in no column; the columns follow the data set, not the paths
    assert list(entry["columns"]) == ["env90", "env80", "env10"]
    for column, (test, draw, step, val) in EXPECTED_LODO.items():
        got = entry["columns"][column]
        check_column(
            got,
            [(test, draw, step, val)],
            f"{column}/test/acc",
            "leave_one_domain_out/val/acc",
            draws=2,
        )
        assert got["trials"][0]["run"] == str(lodo_search / f"{draw}-{column}")
    assert entry["avg"]["n"] == 1
    assert entry["avg"]["mean"] == pytest.approx((0.55 + 0.45 + 0.70) / 3)
    assert entry["avg"]["std"] == 0.0 and entry["avg"]["se"] == 0.0


def test_leave_one_domain_out_drops_a_draw_missing_a_t_v_run(lodo_search: Path) -> None:
    # draw A, the winner for env90, lacks [env90, env10]: it drops out of env90 only
    for path in (lodo_search / "A-env90-env10").iterdir():
        path.unlink()
    (lodo_search / "A-env90-env10").rmdir()
    (entry,) = choose(collect_runs([lodo_search]), "leave_one_domain_out")
    env90 = entry["columns"]["env90"]
    check_column(
        env90, [(0.97, "B", 20, 0.6)], "env90/test/acc", "leave_one_domain_out/val/acc", draws=1
    )
    assert env90["trials"][0]["run"] == str(lodo_search / "B-env90")
    assert [t["draws"] for t in entry["columns"]["env10"]["trials"]] == [2]
    assert entry["avg"]["mean"] == pytest.approx((0.97 + 0.45 + 0.70) / 3)
    # and without any [env90, v] run of B either, env90 has no value: nor has the avg
    for path in (lodo_search / "B-env90-env80").iterdir():
        path.unlink()
    (lodo_search / "B-env90-env80").rmdir()
    (entry,) = choose(collect_runs([lodo_search]), "leave_one_domain_out")
    assert entry["columns"]["env90"] | {"metric": None} == {
        "metric": None,
        "n": 0,
        "mean": None,
        "std": None,
        "se": None,
        "trials": [],
    }
    assert entry["columns"]["env80"]["mean"] == pytest.approx(0.45)
    assert entry["avg"] == {"n": 0, "mean": None, "std": None, "se": None}


# --------------------------------------------------------------------------- transfer
# (seed, draw) -> [(source val, target val, target test)] at steps 10 and 20, digits ->
# mnist5k; the runs mnist5k -> digits have the same numbers, the test 0.1 lower
TRANSFER = {
    (0, "A"): [(0.90, 0.3, 0.35), (0.80, 0.6, 0.80)],
    (0, "B"): [(0.85, 0.7, 0.72), (0.70, 0.5, 0.90)],
    (1, "A"): [(0.60, 0.8, 0.50), (0.70, 0.4, 0.95)],
    (1, "B"): [(0.75, 0.3, 0.60), (0.65, 0.35, 0.70)],
}
TRANSFER_DRAWS = {"A": (1e-2, 1.0), "B": (1e-3, 0.1)}  # (optim.lr, method.trade_off)
# rule -> per trial: (test of digits->mnist5k, draw, step, validation value)
EXPECTED_TRANSFER = {
    "source_val": [(0.35, "A", 10, 0.90), (0.60, "B", 10, 0.75)],
    "target_val": [(0.72, "B", 10, 0.70), (0.50, "A", 10, 0.80)],
}


def transfer_side(dataset: str) -> dict:
    return {
        "dataset": dataset,
        "domain": None,
        "root": None,
        "download": False,
        "labels_per_class": None,
        "transforms": {"train": [], "eval": []},
    }


@pytest.fixture
def transfer_search(tmp_path: Path) -> Path:
    root = tmp_path / "transfer"
    for (seed, draw), steps in TRANSFER.items():
        lr, trade_off = TRANSFER_DRAWS[draw]
        for source, target, shift in [("digits", "mnist5k", 0.0), ("mnist5k", "digits", 0.1)]:
            data = {
                "split_seed": seed,
                "source": transfer_side(source),
                "target": transfer_side(target),
                "dataset": None,
                "domains": None,
                "test_domains": [],
                "tasks": {},
            }
            method = {"name": "dann", "trade_off": trade_off, "gamma": 10.0, "hidden_dim": 1024}
            config = common(
                {"name": f"{source}_to_{target}_dann", "data": data, "method": method},
                seed=seed,
                lr=lr,
                batch_size=32,
                rule="source_val",
            )
            rows = []
            for i, (sv, tv, tt) in enumerate(steps):
                row = {"step": 10 * (i + 1), "split": "eval"}
                for name, val, test in [(source, sv, 0.5), (target, tv, tt - shift)]:
                    row |= {
                        f"{name}/val/acc": val,
                        f"{name}/val/loss": 1 - val,
                        f"{name}/test/acc": test,
                        f"{name}/test/loss": 1 - test,
                    }
                rows.append(row)
            write_run(root / f"{source}2{target}-s{seed}-{draw}", config, rows, "transfer")
    return root


@pytest.mark.parametrize("rule", ["source_val", "target_val"])
def test_transfer_search_one_column_per_pair(transfer_search: Path, rule: str) -> None:
    (entry,) = choose(collect_runs([transfer_search]), rule)
    assert entry["row"] == {"method.name": "dann"}  # data.dataset is null under transfer
    assert list(entry["columns"]) == ["digits->mnist5k", "mnist5k->digits"]
    expected = EXPECTED_TRANSFER[rule]
    shifted = [(test - 0.1, *rest) for test, *rest in expected]
    val_metrics = {"source_val": ("digits", "mnist5k"), "target_val": ("mnist5k", "digits")}
    first, second = (f"{name}/val/acc" for name in val_metrics[rule])
    check_column(entry["columns"]["digits->mnist5k"], expected, "mnist5k/test/acc", first, 2)
    check_column(entry["columns"]["mnist5k->digits"], shifted, "digits/test/acc", second, 2)
    for seed, (_, draw, _, _) in enumerate(expected):
        trial = entry["columns"]["digits->mnist5k"]["trials"][seed]
        assert trial["run"] == str(transfer_search / f"digits2mnist5k-s{seed}-{draw}")
        lr, trade_off = TRANSFER_DRAWS[draw]
        assert trial["hparams"] == {
            "method.trade_off": trade_off,
            "method.gamma": 10.0,
            "method.hidden_dim": 1024,
            "optim.lr": lr,
            "optim.weight_decay": 0.0,
            "train.batch_size": 32,
        }
    per_trial = [e[0] - 0.05 for e in expected]  # the mean of x and x - 0.1
    assert entry["avg"]["mean"] == pytest.approx(statistics.mean(per_trial))
    assert entry["avg"]["std"] == pytest.approx(statistics.stdev(per_trial))


# --------------------------------------------------------------------------- multitask
# (seed, draw) -> [(avg/val/mse, left/test/mse, sum/test/mse)] at steps 10 and 20: a
# regression search, where the lowest validation error wins
MULTITASK = {
    (0, "A"): [(0.5, 2.0, 3.0), (0.9, 1.0, 1.5)],
    (0, "B"): [(0.7, 0.5, 0.6), (0.8, 0.4, 0.3)],
    (1, "A"): [(0.6, 1.2, 2.2), (0.65, 1.1, 2.1)],
    (1, "B"): [(0.8, 0.9, 1.9), (0.3, 1.4, 2.4)],
}
MULTITASK_DRAWS = {"A": 2.0, "B": 5.0}  # method.temperature


@pytest.fixture
def multitask_search(tmp_path: Path) -> Path:
    root = tmp_path / "multitask"
    tasks = {
        "left": {"dataset": "multimnist5k", "label": "left", "loss": "mse", "weight": None},
        "sum": {"dataset": "multimnist5k", "label": "sum", "loss": "mse", "weight": None},
    }
    for (seed, draw), steps in MULTITASK.items():
        data = {
            "split_seed": seed,
            "source": None,
            "target": None,
            "dataset": None,
            "domains": None,
            "test_domains": [],
            "tasks": tasks,
        }
        method = {"name": "dwa", "temperature": MULTITASK_DRAWS[draw], "window": 1}
        config = common(
            {"name": "multimnist5k_dwa", "data": data, "method": method},
            seed=seed,
            lr=1e-3,
            batch_size=64,
            rule="task_val",
        )
        rows = []
        for i, (val, left, total) in enumerate(steps):
            row = {"step": 10 * (i + 1), "split": "eval"}
            for task, test in [("left", left), ("sum", total), ("avg", (left + total) / 2)]:
                row |= {
                    f"{task}/val/mse": val,
                    f"{task}/val/mae": val,
                    f"{task}/test/mse": test,
                    f"{task}/test/mae": test,
                }
            rows.append(row)
        write_run(root / f"s{seed}-{draw}", config, rows, "multitask")
    return root


def test_multitask_regression_search_minimises_the_validation_error(
    multitask_search: Path,
) -> None:
    (entry,) = choose(collect_runs([multitask_search]), "task_val")
    assert entry["row"] == {"method.name": "dwa"}
    assert list(entry["columns"]) == ["left", "sum"]
    # seed 0: A's 0.5 at step 10 (B's best is 0.7); seed 1: B's 0.3 at step 20 (A's 0.6)
    check_column(
        entry["columns"]["left"],
        [(2.0, "A", 10, 0.5), (1.4, "B", 20, 0.3)],
        "left/test/mse",
        "avg/val/mse",
        2,
    )
    check_column(
        entry["columns"]["sum"],
        [(3.0, "A", 10, 0.5), (2.4, "B", 20, 0.3)],
        "sum/test/mse",
        "avg/val/mse",
        2,
    )
    trials = entry["columns"]["left"]["trials"]
    assert [t["hparams"]["method.temperature"] for t in trials] == [2.0, 5.0]
    assert trials[0]["hparams"]["method.window"] == 1 and "method.name" not in trials[0]["hparams"]
    assert entry["avg"]["mean"] == pytest.approx(statistics.mean([2.5, 1.9]))
    assert entry["avg"]["std"] == pytest.approx(statistics.stdev([2.5, 1.9]))


# --------------------------------------------------------------------------- rendering
def test_every_format(dg_search: Path) -> None:
    records = collect_runs([dg_search])
    choices = choose(records, "training_domain_val")
    note = describe_choice(records, "training_domain_val", choices)
    assert note.startswith(
        "chosen by training_domain_val (train_domains/val/acc, max) among 3 draws per trial; "
        "mean ± sample std over trials"
    )
    assert json.loads(render_choice(choices, "json")) == choices

    markdown = render_choice(choices, "markdown", note=note).splitlines()
    assert markdown[0] == "| method.name | data.dataset | env90 | env80 | avg |"
    assert markdown[1] == "| --- | --- | ---: | ---: | ---: |"
    assert markdown[2] == (
        "| erm | colored_mnist5k | 0.4500 ± 0.0707 | 0.6500 ± 0.0707 | 0.5500 ± 0.0000 |"
    )
    assert markdown[-1] == note + "."

    rows = list(csv.DictReader(io.StringIO(render_choice(choices, "csv"))))
    assert list(rows[0]) == [
        "method.name",
        "data.dataset",
        "env90 mean",
        "env90 std",
        "env80 mean",
        "env80 std",
        "avg mean",
        "avg std",
    ]
    assert float(rows[0]["env80 mean"]) == pytest.approx(0.65) and len(rows) == 1

    latex = render_choice(choices, "latex", note=note)
    assert latex.startswith("% chosen by training_domain_val")
    assert r"\begin{tabular}{llrrr}" in latex
    assert r"erm & colored\_mnist5k & 0.4500 $\pm$ 0.0707 & 0.6500 $\pm$ 0.0707" in latex

    table = render_choice(choices, "table", note=note)
    assert "chosen by training_domain_val" in table and "0.4500 ± 0.0707" in table
    assert "env80" in table and "avg" in table
    with pytest.raises(XdtError, match="did you mean 'markdown'"):
        render_choice(choices, "markdwn")


def test_one_table_per_set_of_columns(dg_search: Path) -> None:
    """Two data sets in one folder: two rows, shown by data.dataset, in two tables."""
    for held in ("rot0", "rot15", "rot30"):
        rows = [dg_row(10, [held], tv=0.9, hv=0.5, ht=0.7, domains=ROTATED)]
        config = dg_config([held], "A", 0, dataset="rotated_mnist5k")
        write_run(dg_search / f"rot-{held}", config, rows, "generalize")
    choices = choose(collect_runs([dg_search]), "training_domain_val")
    assert [c["row"] for c in choices] == [
        {"data.dataset": "colored_mnist5k"},
        {"data.dataset": "rotated_mnist5k"},
    ]
    # the data set's order (run [rot30] trains on rot0 then rot15), not the paths' order
    assert list(choices[1]["columns"]) == ["rot0", "rot15", "rot30"]
    assert choices[1]["columns"]["rot15"]["trials"][0]["draws"] == 1
    markdown = render_choice(choices, "markdown")
    assert "| data.dataset | env90 | env80 | avg |" in markdown
    assert "| data.dataset | rot0 | rot15 | rot30 | avg |" in markdown
    assert "| rotated_mnist5k |" + " 0.7000 ± 0.0000 |" * 4 in markdown
    assert render_choice(choices, "latex").count(r"\begin{tabular}") == 2
    assert len(render_choice(choices, "csv").split("\n\n")) == 2


# --------------------------------------------------------------------------- the command
def test_cli_choose_by(cli, dg_search: Path) -> None:
    result = cli("report", dg_search, "--choose-by", "training_domain_val", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == choose(collect_runs([dg_search]), "training_domain_val")
    # the failed run is named on stderr, never chosen
    assert result.stderr.strip() == f"not reported: {dg_search / 'env90-s0-Z'} (failed)"

    markdown = cli("report", dg_search, "--choose-by", "oracle", "--format", "markdown")
    assert markdown.exit_code == 0, markdown.stderr
    assert markdown.stdout.splitlines()[0] == "| method.name | data.dataset | env90 | env80 | avg |"
    assert "chosen by oracle (the last checkpoint; draws compared on test_domains/val/acc" in (
        markdown.stdout
    )

    for args, words in [
        (["--choose-by", "summary"], "summary is each run's own choice"),
        (["--choose-by", "nope"], "unknown selection rule 'nope'"),
        (["--choose-by", "oracel"], "did you mean 'oracle'"),
        (["--choose-by", "last", "--group-by", "optim.lr"], "--choose-by and --group-by"),
        (["--choose-by", "last", "--selection", "oracle"], "--choose-by and --selection"),
        (["--choose-by", "last", "--metric", "*/test/acc"], "--choose-by and --metric"),
        (["--choose-by", "source_val"], "source_val is not a rule of generalize"),
    ]:
        bad = cli("report", dg_search, *args)
        assert bad.exit_code == 2, args
        assert bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
        assert words in bad.stderr, bad.stderr
    assert "--choose-by" in cli("report", "--help").stdout
