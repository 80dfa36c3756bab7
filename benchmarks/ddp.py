"""One run on N processes (torchrun, DistributedDataParallel) against one process: accuracy
and time of the same config, seed and global batch, measured side by side.

Run from the repository root:

    python benchmarks/ddp.py                                  # the quickstart, CPU, 1 vs 2
    python benchmarks/ddp.py --device cuda --procs 2          # on a machine with 2 GPUs
    python benchmarks/ddp.py --config configs/transfer/digits_to_mnist5k_dann.yaml \
        --subcommand transfer --metric mnist5k/test/acc

For each seed it runs `xdt SUBCOMMAND CONFIG --seed S --device D` once as one process and
once under `torchrun --standalone --nproc-per-node N` (each rank one thread on the CPU,
`--threads` to change), measures each command's wall time (start-up included) and reads the
final metric and the engine's own training time (`wall_time_s`) from summary.json. It prints
a markdown table and the mean accuracy difference in points. On the CPU the N processes
share the machine's cores, so the time says what the overhead of the collectives costs, not
what N GPUs would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import OtherLoad, describe

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], threads: int) -> tuple[float, float | None]:
    """(wall seconds, cores other processes kept busy meanwhile) of one command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with OtherLoad() as load:
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return wall, load.cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--subcommand", default="train-source")
    parser.add_argument("--metric", default="mnist5k/test/acc")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()

    machine = describe()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            common = [args.subcommand, args.config, *args.overrides, "--seed", str(seed)]
            common += ["--device", args.device, "--quiet", "--runs-dir", tmp]
            launches = {
                1: [sys.executable, "-m", "xdt_cli", *common, "--name", f"one-{seed}"],
                args.procs: [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    str(args.procs),
                    "-m",
                    "xdt_cli",
                    *common,
                    "--name",
                    f"ranks-{seed}",
                ],
            }
            for procs, cmd in launches.items():
                wall, other = run(cmd, args.threads)
                name = f"one-{seed}" if procs == 1 else f"ranks-{seed}"
                summary = json.loads((Path(tmp) / name / "summary.json").read_text())
                rows.append(
                    {
                        "seed": seed,
                        "processes": procs,
                        "metric": summary["final"][args.metric],
                        "train_s": summary["wall_time_s"],
                        "wall_s": wall,
                        "other_load": other,
                    }
                )
    print(
        f"{machine['cores']} cores, {machine['cpu']}, torch {machine['torch']}, "
        f"{machine['date']}; {args.threads} thread(s) per process, device {args.device}\n"
    )
    print(f"| seed | processes | final {args.metric} | training s | wall s | other load |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        load = "n/a" if r["other_load"] is None else f"{r['other_load']:.2f}"
        print(
            f"| {r['seed']} | {r['processes']} | {r['metric']:.4f} | {r['train_s']:.1f} | "
            f"{r['wall_s']:.1f} | {load} |"
        )
    one = {r["seed"]: r for r in rows if r["processes"] == 1}
    many = {r["seed"]: r for r in rows if r["processes"] == args.procs}
    diffs = [100 * (many[s]["metric"] - one[s]["metric"]) for s in args.seeds]
    ratio = statistics.mean(many[s]["train_s"] / one[s]["train_s"] for s in args.seeds)
    print(
        f"\n{args.procs} processes - 1 process: {statistics.mean(diffs):+.2f} points on "
        f"average (largest |difference| {max(abs(d) for d in diffs):.2f}); training time "
        f"x{ratio:.2f}"
    )


if __name__ == "__main__":
    main()
