"""Engine overhead: the xdt training engine against a minimal hand-written PyTorch loop.

Run from the repository root:

    python benchmarks/overhead.py                 # 600 steps, 5 repeats, default threads
    python benchmarks/overhead.py --steps 1000 --threads 1 --json overhead.json
    python benchmarks/overhead.py --device cuda   # on a GPU machine (fp32 in both loops)

Both loops train the quickstart model (configs/quickstart.yaml: LeNet on the embedded
mnist5k, Adam, cosine schedule with warm-up, batch 64) on the CPU (or `--device`) for the
same number of steps, on the same train-split tensors, with the same initial weights and the
same data order (one `torch.randperm` per epoch, seeded like xdt_cli/data/stream.py).
Evaluation, logging to files and checkpoints are off in both. After a warm-up of each,
the script alternates engine and raw repeats (engine, raw, engine, raw, ...), times only
the training steps of each (models and optimizers are built outside the timed region) and
prints steps/s per repeat. The last line is the median over repeats of the per-pair
throughput ratio engine/raw, exactly `ratio: X.XX` (1.00 = no overhead).

As a check that the two loops do the same work, the first timed pair's final weights are
compared; with deterministic kernels (the quickstart's default) they should be identical.

The machine must be otherwise idle: with torch using every core, one competing process can
slow a repeat tenfold. Each pair records how many cores other processes kept busy (from
/proc/stat); a pair above `--max-other-load` is discarded and measured again (at most
`--retries` times in all), and any busy pair that remains is marked in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import OtherLoad, describe

from xdt_cli.config import AdamConfig, CosineSchedule, ExperimentConfig
from xdt_cli.engine import Engine
from xdt_cli.models import create_model
from xdt_cli.progress import Reporter
from xdt_cli.regimes import build_experiment
from xdt_cli.resolve import load_config
from xdt_cli.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"


def load(steps: int, device: str) -> ExperimentConfig:
    # fp32 in both loops: the raw loop has no autocast
    cfg = load_config(CONFIG, [f"train.steps={steps}", f"device={device}", "train.precision=fp32"])
    # The raw loop below hard-codes what the quickstart uses; fail loudly if it changes.
    assert isinstance(cfg.optim, AdamConfig), cfg.optim
    assert isinstance(cfg.schedule, CosineSchedule), cfg.schedule
    assert cfg.method.name == "erm" and cfg.train.grad_clip is None
    return cfg


# --------------------------------------------------------------------------- the engine
def engine_run(cfg: ExperimentConfig) -> tuple[float, float | None, torch.nn.Module]:
    """Build outside the clock, then time `Engine.fit` (training steps only).

    Returns (seconds, cores used by other processes meanwhile, the trained model).
    """
    runtime = Runtime.from_env(cfg.device)
    experiment = build_experiment("train-source", cfg, runtime)
    engine = Engine(
        cfg, experiment, runtime, run=None, reporter=Reporter(quiet=True), evaluate=False
    )
    with OtherLoad() as load:
        start = time.perf_counter()
        summary = engine.fit()
        _sync(runtime.device)
        seconds = time.perf_counter() - start
    assert summary["status"] == "completed" and summary["steps"] == cfg.train.steps, summary
    return seconds, load.cores, experiment.method.model


# --------------------------------------------------------------------------- the raw loop
def raw_run(cfg: ExperimentConfig) -> tuple[float, float | None, torch.nn.Module]:
    """The same training as a plain PyTorch loop; only the loop itself is timed."""
    runtime = Runtime.from_env(cfg.device)
    # The same train split tensors (and the same global seeding and deterministic-kernel
    # setting) as the engine: build the experiment, keep its data, and build our own model.
    experiment = build_experiment("train-source", cfg, runtime)
    stream = experiment.streams[0]
    x_all, y_all = stream.x, stream.y
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.backbone, tuple(x_all.shape[1:]), int(y_all.max()) + 1)
    model.to(runtime.device).train()
    o = cfg.optim
    optimizer = torch.optim.Adam(
        model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
    )
    steps, warmup, floor = cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_ratio

    def factor(k: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
        if k < warmup:
            return (k + 1) / warmup
        t = min((k - warmup) / max(steps - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    n, bs = len(x_all), cfg.train.batch_size
    per_epoch = n // bs
    perm = torch.empty(0, dtype=torch.long)

    with OtherLoad() as load:
        start = time.perf_counter()
        for step in range(steps):
            epoch, i = divmod(step, per_epoch)
            if i == 0:
                gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) % 2**64)
                perm = torch.randperm(n, generator=gen).to(runtime.device)
            idx = perm[i * bs : (i + 1) * bs]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        _sync(runtime.device)
        seconds = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        raise RuntimeError("the raw loop's loss is not finite")
    return seconds, load.cores, model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# --------------------------------------------------------------------------- main
def _fmt_load(cores: float | None) -> str:
    return "n/a" if cores is None else f"{cores:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed engine/raw pairs")
    parser.add_argument("--warmup-steps", type=int, default=100, help="untimed warm-up steps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="a pair during which other processes kept more CPU cores busy than this is "
        "measured again (default 0.25)",
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="extra attempts allowed for busy pairs, in all"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cfg = load(args.steps, args.device)
    warm = load(args.warmup_steps, args.device)
    engine_run(warm)
    raw_run(warm)

    rows: list[dict[str, float | bool | None]] = []
    weight_diff = None
    retries_left = args.retries
    while len(rows) < args.repeats:
        e_s, e_load, e_model = engine_run(cfg)
        r_s, r_load, r_model = raw_run(cfg)
        if weight_diff is None:
            weight_diff = max_abs_diff(e_model, r_model)
        loads = [v for v in (e_load, r_load) if v is not None]
        other = max(loads) if loads else None
        busy = other is not None and other > args.max_other_load
        engine, raw = args.steps / e_s, args.steps / r_s
        line = (
            f"engine {engine:7.1f} steps/s   raw {raw:7.1f} steps/s   ratio "
            f"{engine / raw:.3f}   other processes {_fmt_load(other)} cores"
        )
        if busy and retries_left > 0:
            retries_left -= 1
            print(f"discarded (machine busy): {line}", file=sys.stderr, flush=True)
            continue
        row = {"engine": engine, "raw": raw, "ratio": engine / raw, "other": other, "busy": busy}
        rows.append(row)
        print(f"repeat {len(rows)}: {line}", file=sys.stderr, flush=True)

    ratio = statistics.median(row["ratio"] for row in rows)
    machine = describe()
    print(
        f"\nengine vs raw loop, quickstart model, {args.steps} steps per repeat; "
        f"{machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, {machine['date']}"
    )
    print(
        f"{'repeat':>6}  {'engine steps/s':>14}  {'raw steps/s':>11}  {'engine/raw':>10}  "
        "other load"
    )
    for r, row in enumerate(rows, 1):
        mark = "  (busy)" if row["busy"] else ""
        print(
            f"{r:>6}  {row['engine']:>14.1f}  {row['raw']:>11.1f}  {row['ratio']:>10.3f}  "
            f"{_fmt_load(row['other']):>10}{mark}"
        )
    print(
        f"{'median':>6}  {statistics.median(x['engine'] for x in rows):>14.1f}  "
        f"{statistics.median(x['raw'] for x in rows):>11.1f}  {ratio:>10.3f}"
    )
    print(f"final weights, engine vs raw: max |diff| = {weight_diff:.3g}")
    if any(row["busy"] for row in rows):
        print(
            f"warning: other processes used more than {args.max_other_load} cores during some "
            "repeats; rerun on a quiet machine",
            file=sys.stderr,
        )
    if args.json is not None:
        result = {
            "steps": args.steps,
            "repeats": rows,
            "median_ratio": ratio,
            "max_weight_diff": weight_diff,
            "machine": machine,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
