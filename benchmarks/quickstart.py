"""Quickstart accuracy and time: the README's first command, as a user runs it, over seeds.

Run from the repository root:

    python benchmarks/quickstart.py                  # python -m xdt_cli, seeds 0 1 2
    python benchmarks/quickstart.py --xdt-script     # the installed `xdt` console script
    python benchmarks/quickstart.py --seeds 0 1 2 3 4 --json quickstart.json

For each seed, one after another, it runs

    xdt train-source configs/quickstart.yaml --seed S --quiet --json --runs-dir <tmp dir>

as a separate process, measures that process's wall time (Python start-up, imports, data
loading, training and evaluation included) and reads `final` `mnist5k/test/acc` from the
JSON summary on stdout. It prints a table and a summary line (mean ± sample std of the
accuracy, the largest wall time), and exits 1 if any seed fails, scores below `--min-acc`
(0.95) or takes longer than `--max-wall` (30 s). Run folders go to a temporary directory
that is deleted afterwards. The "other load" column is the number of CPU cores other
processes kept busy meanwhile; wall times are only meaningful where it is near zero.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import OtherLoad, describe

ROOT = Path(__file__).resolve().parent.parent
METRIC = "mnist5k/test/acc"


def xdt_command(use_script: bool) -> list[str]:
    if not use_script:
        return [sys.executable, "-m", "xdt_cli"]
    beside = Path(sys.executable).parent / "xdt"  # the venv this script runs in
    script = str(beside) if beside.is_file() else shutil.which("xdt")
    if script is None:
        raise SystemExit("error: no `xdt` console script found (pip install -e . first)")
    return [script]


def run_seed(base: list[str], config: str, seed: int, runs_dir: str) -> dict:
    cmd = [
        *base,
        "train-source",
        config,
        "--seed",
        str(seed),
        "--quiet",
        "--json",
        "--runs-dir",
        runs_dir,
    ]
    with OtherLoad() as load:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    row: dict = {"seed": seed, "wall_s": wall, "other": load.cores, "rc": proc.returncode}
    try:
        summary = json.loads(proc.stdout)
        row["acc"] = float(summary["final"][METRIC])
        row["train_s"] = float(summary["wall_time_s"])
        row["status"] = summary["status"]
    except (ValueError, KeyError, TypeError):
        row.update(acc=None, train_s=None, status="no summary")
    if proc.returncode != 0 or row["acc"] is None:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"seed {seed}: exit {proc.returncode}\n{tail}", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--xdt-script", action="store_true", help="run the `xdt` script")
    parser.add_argument("--min-acc", type=float, default=0.95, help=f"lowest {METRIC}")
    parser.add_argument("--max-wall", type=float, default=30.0, help="longest wall time, s")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    base = xdt_command(args.xdt_script)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xdt-bench-") as runs_dir:
        for seed in args.seeds:
            row = run_seed(base, args.config, seed, runs_dir)
            rows.append(row)
            acc = "failed" if row["acc"] is None else f"{row['acc']:.4f}"
            print(f"seed {seed}: {METRIC} {acc}, {row['wall_s']:.1f} s", file=sys.stderr)

    machine = describe()
    shown = "xdt" if args.xdt_script else "python -m xdt_cli"
    print(
        f"\n{shown} train-source {args.config}; {machine['cores']} cores ({machine['cpu']}), "
        f"torch {machine['torch']}, {machine['date']}"
    )
    print(f"{'seed':>4}  {METRIC:>16}  {'wall s':>6}  {'train s':>7}  other load")
    for row in rows:
        acc = "failed" if row["acc"] is None else f"{row['acc']:.4f}"
        train = "-" if row["train_s"] is None else f"{row['train_s']:.1f}"
        other = "n/a" if row["other"] is None else f"{row['other']:.2f}"
        print(f"{row['seed']:>4}  {acc:>16}  {row['wall_s']:>6.1f}  {train:>7}  {other:>10}")

    problems = []
    for row in rows:
        if row["rc"] != 0 or row["acc"] is None or row["status"] != "completed":
            problems.append(f"seed {row['seed']}: exit {row['rc']}, status {row['status']}")
        elif row["acc"] < args.min_acc:
            problems.append(f"seed {row['seed']}: {METRIC} {row['acc']:.4f} < {args.min_acc}")
        if row["wall_s"] > args.max_wall:
            problems.append(f"seed {row['seed']}: {row['wall_s']:.1f} s > {args.max_wall} s")

    accs = [row["acc"] for row in rows if row["acc"] is not None]
    mean = statistics.mean(accs) if accs else float("nan")
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    max_wall = max(row["wall_s"] for row in rows)
    if args.json is not None:
        result = {
            "command": [*base, "train-source", args.config],
            "rows": rows,
            "mean_acc": mean,
            "std_acc": std,
            "max_wall_s": max_wall,
            "machine": machine,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(
        f"{METRIC}: {mean:.4f} ± {std:.4f} (mean ± sample std, {len(accs)} of {len(rows)} "
        f"seeds); max wall time {max_wall:.1f} s"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
