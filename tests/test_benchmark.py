"""`xdt benchmark`: a suite of sweeps runs, and its tables land between its markers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.conftest import TINY, write_config
from xdt_cli.benchmark import write_section
from xdt_cli.cli import app


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
