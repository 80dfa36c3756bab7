"""`xdt benchmark`: a suite of sweeps runs, and its tables land between its markers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import TINY, write_config
from xdt_cli.benchmark import write_section
from xdt_cli.cli import app

REPO = Path(__file__).resolve().parents[1]


def make_suite(tmp_path: Path) -> Path:
    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = {"config": "tiny.yaml", "overrides": ["train.steps=10"], "seeds": [0, 1]}
    (tmp_path / "tiny_seeds.yaml").write_text(yaml.safe_dump(sweep))
    suite = {
        "description": "Two seeds of a tiny run.",
        "sweeps": ["tiny_seeds.yaml"],
        "metrics": ["digits/test/acc"],
    }
    path = tmp_path / "tiny_suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_benchmark_writes_its_tables_between_its_markers(tmp_path: Path) -> None:
    suite = make_suite(tmp_path)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(
        "# Benchmarks\n\nkept above\n\n<!-- suite:tiny_suite:start -->\nold table\n"
        "<!-- suite:tiny_suite:end -->\n\nkept below\n"
    )
    runs = tmp_path / "runs"
    args = ["benchmark", str(suite), "--jobs", "2", "--runs-dir", str(runs), "--doc", str(doc)]
    result = CliRunner().invoke(app, [*args, "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["suite"] == "tiny_suite"

    text = doc.read_text()
    assert "kept above" in text and "kept below" in text and "old table" not in text
    assert text.count("<!-- suite:tiny_suite:start -->") == 1
    assert "xdt benchmark tiny_suite --jobs 2" in text
    accs = [
        json.loads(p.read_text())["best"]["digits/test/acc"]
        for p in sorted((runs / "tiny_seeds").glob("*/summary.json"))
    ]
    assert len(accs) == 2
    row = f"| 2 | {statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f} |"
    assert row in text

    again = CliRunner().invoke(app, [*args, "-q"])  # reuses the finished runs
    assert again.exit_code == 0
    assert doc.read_text().count("<!-- suite:tiny_suite:start -->") == 1

    # a smaller grid: the seed-1 folder stays on disk but is no run of the sweep any more
    sweep = yaml.safe_load((tmp_path / "tiny_seeds.yaml").read_text())
    (tmp_path / "tiny_seeds.yaml").write_text(yaml.safe_dump({**sweep, "seeds": [0]}))
    smaller = CliRunner().invoke(app, [*args, "-q"])
    assert smaller.exit_code == 0, smaller.stderr
    seed0 = json.loads(next((runs / "tiny_seeds").glob("seed0*/summary.json")).read_text())
    assert f"| 1 | {seed0['best']['digits/test/acc']:.4f}" in doc.read_text()


def test_write_section_appends_when_the_markers_are_missing(tmp_path: Path) -> None:
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    write_section(doc, "s", "## Suite `s`\n")
    write_section(doc, "s", "## Suite `s` again\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "again" in text and text.count("<!-- suite:s:start -->") == 1


def test_unknown_suite_and_bad_suite_file_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["benchmark", "no_such_suite"])
    assert missing.exit_code == 2 and "no_such_suite" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweeps: [x.yaml]\nmetricz: [a]\n")
    result = runner.invoke(app, ["benchmark", str(bad)])
    assert result.exit_code == 2 and "metricz" in result.stderr


def test_comparison_and_held_out_domain_tables(tmp_path: Path) -> None:
    """The two cross-sweep tables compute their cells from the runs' own chosen rows."""
    write_config(tmp_path / "tiny.yaml", TINY)
    generalize = {
        "data": {"dataset": "colored_mnist5k"},
        "model": {"backbone": "lenet"},
        "train": {"steps": 4, "batch_size": 16, "eval_every": 4},
    }
    write_config(tmp_path / "dg.yaml", generalize)
    sweeps = {
        "base.yaml": {"config": "tiny.yaml", "overrides": ["train.steps=6"], "seeds": [0]},
        "more.yaml": {"config": "tiny.yaml", "overrides": ["train.steps=20"], "seeds": [0, 1]},
        "top.yaml": {"config": "tiny.yaml", "overrides": ["train.steps=40"], "seeds": [0]},
    }
    for name, spec in sweeps.items():
        (tmp_path / name).write_text(yaml.safe_dump(spec))
    dg_sweep = {
        "subcommand": "generalize",
        "config": "dg.yaml",
        "grid": {"data.test_domains": [["env90"], ["env10"]]},
        "seeds": [0, 1],
    }
    (tmp_path / "dgs.yaml").write_text(yaml.safe_dump(dg_sweep))
    suite = {
        "sweeps": ["base.yaml", "more.yaml", "top.yaml", "dgs.yaml"],
        "selection": "last",
        "tables": [
            {
                "title": "cmp",
                "metric": "digits/test/acc",
                "rows": ["base", "more", "top"],
                "baseline": "base",
                "ceiling": "top",
            },
            {"title": "dg", "kind": "held_out_domains", "metric": "test/acc", "rows": ["dgs"]},
        ],
    }
    path = tmp_path / "tables.yaml"
    path.write_text(yaml.safe_dump(suite))
    runs, doc = tmp_path / "runs", tmp_path / "B.md"
    args = ["benchmark", str(path), "--runs-dir", str(runs), "--doc", str(doc), "-q"]
    result = CliRunner().invoke(app, [*args, "--jobs", "2"])  # 12 tiny runs, two at a time
    assert result.exit_code == 0, result.stderr

    def finals(sweep: str, metric: str) -> dict[str, float]:
        out = {}
        for p in sorted((runs / sweep).glob("*/summary.json")):
            out[p.parent.name] = json.loads(p.read_text())["final"][metric]
        return out

    text = doc.read_text()
    base = statistics.mean(finals("base", "digits/test/acc").values())
    more = statistics.mean(finals("more", "digits/test/acc").values())
    top = statistics.mean(finals("top", "digits/test/acc").values())
    gap = f"{100 * (more - base) / (top - base):.0f}%"
    assert f"| `more` | 2 | {more:.4f} ± " in text
    assert f"| {100 * (more - base):+.1f} | {gap} |" in text
    # held-out columns: a run reports every domain, but counts only for the one it held out
    env10 = [v for k, v in finals("dgs", "env10/test/acc").items() if "env10" in k]
    env90 = [v for k, v in finals("dgs", "env90/test/acc").items() if "env90" in k]
    avg = [(a + b) / 2 for a, b in zip(env90, env10, strict=True)]  # per seed, then over seeds
    cells = [
        f"{100 * statistics.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}"
        for v in (env90, env10, avg)
    ]
    assert "| run | env90 | env10 | avg |" in text
    assert f"| `dgs` | {cells[0]} | {cells[1]} | {cells[2]} |" in text


def test_a_table_names_a_sweep_by_its_name_not_its_file(tmp_path: Path) -> None:
    """A sweep file with `name:` is found in the tables by that name (its folder, the key of
    its records); its file's stem is not a row."""
    from xdt_cli.benchmark import load_suite
    from xdt_cli.errors import ConfigError

    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = {"name": "renamed", "config": "tiny.yaml", "seeds": [0]}
    (tmp_path / "file_stem.yaml").write_text(yaml.safe_dump(sweep))
    suite = {"description": "d", "sweeps": ["file_stem.yaml"], "selection": "source_val"}
    table = {"title": "t", "metric": "digits/test/acc", "rows": ["renamed"]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**suite, "tables": [table]}))
    assert load_suite(path).name == "s"
    path.write_text(yaml.safe_dump({**suite, "tables": [{**table, "rows": ["file_stem"]}]}))
    with pytest.raises(ConfigError, match="'file_stem' is not one of the suite's sweeps"):
        load_suite(path)


def test_the_held_out_transfer_suite_runs_the_shipped_configs_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transfer_heldout runs every shipped UDA config of the transfer suite (and source_only),
    unchanged but for the split: split_seed 2 with seed 3, which neither the transfer suite
    (split_seed 0, seeds 0-2) nor the choice of its settings (split_seed 1) used."""
    from xdt_cli.benchmark import find_suite, load_suite
    from xdt_cli.resolve import load_config
    from xdt_cli.sweeps import load_sweep, plan

    monkeypatch.chdir(REPO)
    transfer = load_suite(find_suite("transfer"))
    heldout = load_suite(find_suite("transfer_heldout"))
    configs = {load_sweep(p).config.resolve() for p in transfer.sweeps}
    runs = [r for p in heldout.sweeps for r in plan(load_sweep(p), tmp_path).runs]
    assert len(runs) == 16
    for sweep_path in heldout.sweeps:
        sweep = load_sweep(sweep_path)
        assert sweep.config.resolve() in configs and sweep.seeds == (3,)
        assert sweep.name == "heldout_" + sweep.config.stem
        shipped = load_config(sweep.config, [], subcommand="transfer")
        moved = load_config(sweep.config, list(sweep.overrides), subcommand="transfer")
        assert shipped.data.split_seed == 0 and moved.data.split_seed == 2
        assert moved.model == shipped.model and moved.method == shipped.method
