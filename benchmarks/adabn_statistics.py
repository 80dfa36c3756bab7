"""AdaBN's statistics, two ways, on the transfer suite's runs: does the target's batch-norm
statistic help the source model?

xdt's AdaBN (xdt_cli/methods/adabn.py) keeps a moving average of the target's statistics
while it trains. The paper (Li et al. 2018, Algorithm 1) instead computes them once, over the
whole target set, for the trained weights. This script takes the checkpoints that the
transfer suite chose (best.pt, source_val) of one direction's `source_only` and `adabn`
sweeps and scores each twice on the target's val and test splits: as saved, then with every
batch-norm layer's statistics recomputed over the whole target TRAIN split (its images, not
its labels; the eval transforms; a cumulative average over batches of 256, in train mode
without gradients). On source_only's checkpoints the second score is the paper's AdaBN
exactly (source-trained weights, target statistics).

Run from the repository root after `xdt benchmark transfer --runs-dir R`:

    python benchmarks/adabn_statistics.py R --pair mnist5k_to_digits

It prints one line per run and the means; it writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from xdt_cli.data.transforms import to_float
from xdt_cli.evaluate_run import _isolated, load_weights, read_run
from xdt_cli.evaluation import evaluate
from xdt_cli.regimes import build_run
from xdt_cli.runs import RunDir
from xdt_cli.runtime import Runtime

CPU = torch.device("cpu")


def target_scores(method, target) -> dict[str, float]:
    sets = {target.name: {s: target.splits[s] for s in ("val", "test")}}
    metrics = evaluate(method, sets, batch_size=512, device=CPU, autocast=contextlib.nullcontext())
    return {s: metrics[f"{target.name}/{s}/acc"] for s in ("val", "test")}


@torch.no_grad()
def whole_set_statistics(model: torch.nn.Module, split, batch_size: int = 256) -> None:
    """Every batch-norm layer's running mean and variance over all of `split` (cumulative
    average: momentum None), for the current weights; the model is left in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    x = split.eval_transform(to_float(split.x))
    for i in range(0, len(x), batch_size):
        model.embed(x[i : i + batch_size])
    model.eval()
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum


def score_run(run_dir: Path) -> dict[str, float]:
    run = RunDir(run_dir)
    subcommand, cfg = read_run(run)
    with _isolated():
        built = build_run(subcommand, cfg, Runtime(CPU), resuming=True)
        method = built.experiment.method
        target = list(built.data.domains.values())[1]
        load_weights(method, run.best_ckpt)
        saved = target_scores(method, target)
        whole_set_statistics(method.model, target.splits["train"])
        whole = target_scores(method, target)
    return {
        "saved_val": saved["val"],
        "saved_test": saved["test"],
        "whole_val": whole["val"],
        "whole_test": whole["test"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the runs folder of xdt benchmark transfer")
    parser.add_argument("--pair", default="mnist5k_to_digits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| sweep | run | target val, as saved | target test, as saved "
        "| target val, whole-set statistics | target test, whole-set statistics |"
    )
    print("|---|---|---|---|---|---|")
    for method in ("source_only", "adabn"):
        folder = args.runs / f"{args.pair}_{method}"
        rows = [(d.name, score_run(d)) for d in sorted(folder.glob("seed*"))]
        for name, s in rows:
            cells = " | ".join(f"{100 * s[k]:.1f}" for k in s)
            print(f"| {folder.name} | {name} | {cells} |")
        means = " | ".join(
            f"{100 * statistics.mean(s[k] for _, s in rows):.1f}" for k in rows[0][1]
        )
        print(f"| {folder.name} | mean of {len(rows)} | {means} |")


if __name__ == "__main__":
    main()
