"""External reference: the Transfer-Learning-Library's (TLlib) own ERM and DANN scripts on
xdt's embedded digit domains, with xdt's exact splits.

What it does
------------
1. `git clone`s TLlib (`--tllib`, a git URL or a local path) into a temporary directory; none
   of TLlib's code is kept in this repository, and no TLlib file is edited.
2. Exports xdt's two embedded domains with xdt's own loader (`load_configured_domain`,
   `data.split_seed` 0; the 70/15/15 stratified split of xdt_cli/data/splits.py) as 8-bit
   grey PNGs (round(x * 255)) plus TLlib image lists ("relative/path label" per line), laid
   out as TLlib's `MNIST` and `USPS` dataset classes (tllib/vision/datasets/digits.py) expect
   them, so that TLlib reads them with its `-d Digits` data path unchanged (the folders it
   would download exist, so it downloads nothing). An assert checks that every exported list
   has exactly as many lines as xdt's split has samples, and that the exported images are
   the samples at xdt's split indices.
   With `--digits-layout` the digits are written as xdt's transfer configs draw them
   (data.target.transforms.eval of configs/transfer/_mnist5k_to_digits.yaml: MNIST's 20-pixel
   layout and stroke contrast), so TLlib and xdt read the same images; mnist5k as it comes.
3. Runs TLlib's unmodified `examples/domain_adaptation/image_classification/erm.py` (source
   only) and `dann.py` in both directions, seeds 0, 1, 2, one process at a time, on the CPU.
4. Writes one JSON per (direction, method, seed), then `results.json` and `table.md`.

Mapping (the same files serve both directions; xdt's split of a domain does not depend on
whether the domain is the source or the target)
-----------------------------------------------------------------------------------------
    xdt mnist5k train split (3,500) -> <root>/MNIST/image_list/mnist_train.txt
    xdt mnist5k test split    (750) -> <root>/MNIST/image_list/mnist_test.txt
    xdt digits train split  (1,258) -> <root>/USPS/image_list/usps_train.txt
    xdt digits test split     (270) -> <root>/USPS/image_list/usps_test.txt
    xdt's val splits are not exported (TLlib's Digits data path has no val split).

    digits -> mnist5k:  -s USPS -t MNIST      mnist5k -> digits:  -s MNIST -t USPS

TLlib's `utils.get_dataset` ("Digits") reads: source "train" list = xdt's source train
split (labelled); target "train" list = xdt's target train split (DANN reads its images, no
labels; ERM ignores it); target "test" list = xdt's target TEST split, which TLlib uses as
BOTH its `val_loader` and its `test_loader`.

Selection rule: TLlib evaluates on `val_loader` after each of the 6 epochs and keeps the
best checkpoint (first one at the maximum); `test_acc1` is that checkpoint on the test
loader. For Digits val IS the target test split, so the reference picks its checkpoint on
target test labels: "best of 6 evaluations on the target test split (TLlib's own rule)".
The last epoch's accuracy (the 6th " * Acc@1" line of its log) is reported too.

Recipe (dann.sh, "# Digits"), with xdt's budget of 1,500 steps of 32 source + 32 target
images and 6 evaluations:

    -d Digits --train-resizing res. --val-resizing res. --resize-size 28 --no-hflip
    --norm-mean 0.5 --norm-std 0.5 -a lenet --no-pool --lr 0.01 --scratch
    -b 32 --epochs 6 -i 250 --seed S
    --wd 0.001 --momentum 0.9 --lr-gamma 0.001 --lr-decay 0.75 -j 0

`--wd`, `--momentum`, `--lr-gamma` and `--lr-decay` are dann.py's defaults; they are passed
explicitly to both scripts because erm.py's own defaults differ (wd 5e-4, lr-gamma 3e-4), so
both methods get the same optimizer and schedule. `-j 0` loads images in the main process
(one process per run; no random augmentation is on, so it changes no result). TLlib's ERM
model is LeNet -> Linear(500, 10) (erm.py's `Classifier`, no bottleneck); its DANN model is
LeNet -> Linear(500, 256) + BatchNorm1d + ReLU -> Linear(256, 10) with a 256-1024-1024-1
discriminator (BatchNorm, sigmoid) behind a warm-start gradient reversal layer,
coefficient 2 / (1 + exp(-i / 1000)) - 1 at its i-th forward call (0 ... 0.635 at i=1,499).

Learning rate: `SGD(params, lr, momentum=0.9, weight_decay=wd, nesterov=True)` over param
groups whose "lr" is 1.0 (with --scratch: backbone, bottleneck, head and discriminator all
1.0), and `LambdaLR(optimizer, lambda x: lr * (1 + lr_gamma * x) ** -lr_decay)`, stepped
after every optimizer step. LambdaLR multiplies each group's initial "lr" (1.0) by the
lambda, so step x = 0, 1, ..., 1,499 uses lr_x = 1.0 * 0.01 * (1 + 0.001 * x) ** -0.75
(0.01 at x=0, 0.00503 at x=1,499), weight decay coupled (added to the gradient).

Workarounds for TLlib on torch 2.14 / torchvision 0.29 / numpy 2 (no TLlib file edited):
a `sitecustomize.py` written to the temporary directory and put first on PYTHONPATH (so
the TLlib interpreter imports it at start-up) restores three names that TLlib imports and
that newer releases removed:
- `torch.utils.data.dataset.T_co` (imported by tllib/vision/datasets/imagelist.py):
  `TypeVar("T_co", covariant=True)`, as torch defined it;
- `torchvision.models.resnet.model_urls` (tllib/vision/models/resnet.py): an empty dict; it
  is read only to download pretrained ResNets, which this recipe (lenet, --scratch) never does;
- `numpy.float` (tllib/modules/grl.py, the DANN gradient reversal coefficient): `float`.
It also sets torch's intra- and inter-op threads to 1. TLlib itself is put on PYTHONPATH
(its utils.py only appends '../../..' to sys.path, relative to the working directory; the
runs' working directory is the example folder anyway). Runs are CPU only
(CUDA_VISIBLE_DEVICES="", so TLlib's `device` is the CPU), OMP_NUM_THREADS=1, `nice -n 5`.
A finished TLlib run exits with status 120 (its CompleteLogger.close() closes the real
stdout, and the interpreter's last flush fails); a run is accepted when its log holds all
the evaluations and `test_acc1`.

How to rerun
------------
TLlib needs packages that xdt's venv does not have (timm, numba, matplotlib, ...); give it
its own interpreter (torch and torchvision install from this machine's disk):

    python3 -m venv /tmp/tllib-venv
    /tmp/tllib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm numba \
        matplotlib scikit-learn prettytable webcolors
    .venv/bin/python benchmarks/tllib_reference.py --python /tmp/tllib-venv/bin/python

(offline, add `--tllib /work/.mirror/thuml+Transfer-Learning-Library/repo`). It is
resumable: a (direction, method, seed) whose JSON exists in `--out` is skipped, and the
summary is rebuilt from all the JSONs.

Side by side with xdt (docs/BENCHMARKS.md, "xdt beside the Transfer-Learning-Library"): run
`xdt benchmark transfer --runs-dir R`, then this script with `--digits-layout --xdt-runs R`.
It writes `side_by_side.md`: TLlib's erm and dann beside xdt's source_only and dann sweeps of
that suite, each tool under its own rule (TLlib: best of its 6 evaluations on the target's
TEST labels; xdt: source_val) and both under TLlib's rule and at the last evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from xdt_cli.config import DomainConfig
from xdt_cli.data import DATASETS, load_configured_domain
from xdt_cli.data.splits import stratified_split
from xdt_cli.data.transforms import Pipeline, build_pipeline, to_float
from xdt_cli.resolve import load_config
from xdt_cli.runs import read_metrics

TLLIB_URL = "https://github.com/thuml/Transfer-Learning-Library"
EXAMPLES = "examples/domain_adaptation/image_classification"
SPLIT_SEED = 0
LAYOUT_CONFIG = Path(__file__).resolve().parents[1] / "configs/transfer/_mnist5k_to_digits.yaml"
SELECTION = "best of 6 evaluations on the target test split (TLlib's own rule)"

# xdt domain -> (TLlib Digits class whose folder it fills, that class's file prefix)
TLLIB_DOMAIN = {"mnist5k": ("MNIST", "mnist"), "digits": ("USPS", "usps")}
DIRECTIONS = (("digits", "mnist5k"), ("mnist5k", "digits"))
METHODS = {"erm": "erm.py", "dann": "dann.py"}
# xdt split -> TLlib list; xdt's val split has no place in TLlib's Digits data path
EXPORTED_SPLITS = ("train", "test")

RECIPE = [
    "-d", "Digits",
    "--train-resizing", "res.", "--val-resizing", "res.", "--resize-size", "28",
    "--no-hflip", "--norm-mean", "0.5", "--norm-std", "0.5",
    "-a", "lenet", "--no-pool", "--lr", "0.01", "--scratch",
    "--wd", "0.001", "--momentum", "0.9", "--lr-gamma", "0.001", "--lr-decay", "0.75",
    "-j", "0", "-p", "50",
]  # fmt: skip

SHIM = '''\
"""Written by xdt's benchmarks/tllib_reference.py: names that TLlib imports and that
torch 2.14 / torchvision 0.29 / numpy 2 removed. Put first on PYTHONPATH for TLlib only."""
import typing

import numpy
import torch
import torch.utils.data.dataset
import torchvision.models.resnet

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
if not hasattr(torch.utils.data.dataset, "T_co"):
    torch.utils.data.dataset.T_co = typing.TypeVar("T_co", covariant=True)
if not hasattr(torchvision.models.resnet, "model_urls"):
    torchvision.models.resnet.model_urls = {}  # only read for pretrained ResNets
if not hasattr(numpy, "float"):
    numpy.float = float
'''

TLLIB_PACKAGES = "timm numba matplotlib sklearn prettytable torch torchvision"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run TLlib's own erm.py and dann.py on xdt's embedded digit domains "
        "(xdt's exact splits) and tabulate target test accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tllib", default=TLLIB_URL, help="TLlib git URL or local path")
    parser.add_argument(
        "--python",
        required=True,
        help="interpreter that runs TLlib (with torch, torchvision, timm, numba, matplotlib, "
        "scikit-learn, prettytable)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tllib_reference"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["erm", "dann"])
    parser.add_argument("--epochs", type=int, default=6, help="evaluations (TLlib --epochs)")
    parser.add_argument("--iters", type=int, default=250, help="steps per epoch (TLlib -i)")
    parser.add_argument("--batch-size", type=int, default=32, help="per domain (TLlib -b)")
    parser.add_argument(
        "--digits-layout",
        action="store_true",
        help="export the digits as xdt's transfer configs draw them (MNIST's layout and stroke "
        f"contrast: the eval transforms of data.target in {LAYOUT_CONFIG}), so both tools "
        "read the same images; use another --out",
    )
    parser.add_argument(
        "--xdt-runs",
        type=Path,
        help="the runs folder of `xdt benchmark transfer` (its <pair>_source_only and "
        "<pair>_dann sweeps): also write side_by_side.md, each tool under each selection rule",
    )
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_name(source: str, target: str, method: str, seed: int) -> str:
    return f"{source}_to_{target}_{method}_seed{seed}"


# ---------------------------------------------------------------------------- TLlib itself


def clone_tllib(source: str, dest: Path) -> str:
    """Clone TLlib into `dest`; returns the commit it checked out."""
    subprocess.run(["git", "clone", "--quiet", source, str(dest)], check=True)
    head = ["git", "-C", str(dest), "rev-parse", "HEAD"]
    return subprocess.run(head, check=True, capture_output=True, text=True).stdout.strip()


def check_interpreter(python: str) -> None:
    probe = "import " + ", ".join(TLLIB_PACKAGES.split())
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"--python {python} cannot import TLlib's requirements ({TLLIB_PACKAGES}):\n"
            f"{done.stderr.strip()}\nSee this script's docstring for the setup commands."
        )


# -------------------------------------------------------------------------- xdt's data out


def digits_layout() -> Pipeline:
    """xdt's deterministic drawing of the digits in the transfer configs (resize, centre
    crop, levels), read from the config itself so that the two cannot drift apart."""
    cfg = load_config(LAYOUT_CONFIG, ["method.name=source_only"], subcommand="transfer")
    assert cfg.data.target.dataset == "digits"
    pipeline = build_pipeline(cfg.data.target.transforms.eval)
    assert not pipeline.random, pipeline
    return pipeline


def export_domain(name: str, root: Path, layout: Pipeline | None = None) -> dict[str, int]:
    """Write xdt's train and test splits of `name` (split seed 0) as TLlib's MNIST or USPS
    folder under `root`; returns the number of samples of each of xdt's splits. `layout`:
    the images are written as that pipeline draws them (--digits-layout)."""
    folder, prefix = TLLIB_DOMAIN[name]
    base = root / folder
    domain = load_configured_domain(
        DomainConfig(dataset=name), split_seed=SPLIT_SEED, key="data.source"
    )
    # The raw tensors and the split indices, to name each image by its index in the set and
    # to check that xdt's split holds exactly those samples.
    load = DATASETS[name].load
    assert load is not None
    raw_x, raw_y = load(name)
    indices = dict(zip(("train", "val", "test"), stratified_split(raw_y, SPLIT_SEED), strict=True))

    sizes = {split: len(domain.splits[split]) for split in ("train", "val", "test")}
    (base / "image_list").mkdir(parents=True, exist_ok=True)
    for split in EXPORTED_SPLITS:
        part, idx = domain.splits[split], indices[split]
        assert torch.equal(raw_x[idx], part.x) and torch.equal(raw_y[idx], part.y), (name, split)
        # TLlib downloads a folder <prefix>_train_image unless it exists; the test images
        # get their own folder next to it.
        images = base / f"{prefix}_{split}_image"
        images.mkdir(exist_ok=True)
        x = part.x if layout is None else layout(part.x)
        pixels = torch.round(to_float(x).clamp(0, 1) * 255).to(torch.uint8)
        lines = []
        for i, index in enumerate(idx.tolist()):
            path = f"{images.name}/{index:05d}.png"
            Image.fromarray(pixels[i, 0].numpy(), mode="L").save(base / path)
            lines.append(f"{path} {int(part.y[i])}\n")
        list_file = base / "image_list" / f"{prefix}_{split}.txt"
        list_file.write_text("".join(lines))
        exported = len(list_file.read_text().splitlines())
        assert exported == sizes[split], f"{list_file}: {exported} lines, xdt has {sizes[split]}"
        log(f"exported xdt {name} {split} split: {exported} images -> {folder}/{list_file.name}")
    return sizes


# --------------------------------------------------------------------------------- one run


def tllib_command(
    args: argparse.Namespace, method: str, source: str, target: str, seed: int, data: Path
) -> list[str]:
    log_dir = data.parent / "logs" / run_name(source, target, method, seed)
    return [
        "nice", "-n", "5", args.python, METHODS[method], str(data),
        "-s", TLLIB_DOMAIN[source][0], "-t", TLLIB_DOMAIN[target][0],
        *RECIPE,
        "-b", str(args.batch_size), "--epochs", str(args.epochs), "-i", str(args.iters),
        "--seed", str(seed), "--log", str(log_dir),
    ]  # fmt: skip


def tllib_env(clone: Path, shim: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": f"{shim}{os.pathsep}{clone}",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def parse_tllib_log(text: str, epochs: int) -> dict:
    """TLlib's validate() prints " * Acc@1 x.xxx" after every epoch (on val_loader) and once
    more for the final test of the best checkpoint; main() prints best_acc1 and test_acc1."""
    accs = [float(a) for a in re.findall(r"^\s*\* Acc@1 ([0-9.]+)", text, flags=re.M)]
    best = re.search(r"^best_acc1 = ([0-9.]+)", text, flags=re.M)
    test = re.search(r"^test_acc1 = ([0-9.]+)", text, flags=re.M)
    if len(accs) != epochs + 1 or best is None or test is None:
        raise RuntimeError(f"unexpected TLlib output: {len(accs)} ' * Acc@1' lines")
    per_epoch, final = accs[:epochs], accs[epochs]
    return {
        "test_acc1": final,  # validate() of the best checkpoint on test_loader, 3 decimals
        "test_acc1_printed": float(test.group(1)),
        "best_acc1_printed": float(best.group(1)),
        "last_epoch_acc": per_epoch[-1],
        "epoch_accs": per_epoch,
        "best_epoch": per_epoch.index(max(per_epoch)) + 1,
    }


def run_one(
    args: argparse.Namespace,
    method: str,
    source: str,
    target: str,
    seed: int,
    work: dict,
) -> dict:
    name = run_name(source, target, method, seed)
    command = tllib_command(args, method, source, target, seed, work["data"])
    env = tllib_env(work["clone"], work["shim"])
    cwd = work["clone"] / EXAMPLES
    log_file = args.out / "logs" / f"{name}.log"
    log(f"start {name}")
    start = time.monotonic()
    with log_file.open("w") as fh:
        done = subprocess.run(
            command, cwd=cwd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT
        )
    seconds = time.monotonic() - start
    # TLlib's CompleteLogger.close() closes the real stdout, so the interpreter's final
    # flush fails and a finished run exits with 120: a run counts as done when its log holds
    # every evaluation and test_acc1 (parse_tllib_log raises otherwise).
    if done.returncode not in (0, 120):
        raise RuntimeError(f"{name}: TLlib exited with {done.returncode}; see {log_file}")
    result = parse_tllib_log(log_file.read_text(), args.epochs)
    env_words = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    record = {
        "pair": f"{source} -> {target}",
        "source": source,
        "target": target,
        "method": method,
        "seed": seed,
        **result,
        "seconds": round(seconds, 1),
        "returncode": done.returncode,
        "selection": SELECTION,
        "steps": args.epochs * args.iters,
        "batch_size_per_domain": args.batch_size,
        "tllib": {"source": args.tllib, "commit": work["commit"], "script": METHODS[method]},
        "command": f"cd {shlex.quote(str(cwd))} && env {' '.join(env_words)} "
        + shlex.join(command),
        "split_sizes": {d: work["sizes"][d] for d in (source, target)},
        "split_seed": SPLIT_SEED,
        "log": str(log_file),
    }
    log(
        f"done  {name}: test_acc1 {record['test_acc1']:.3f} (epoch {record['best_epoch']}), "
        f"last epoch {record['last_epoch_acc']:.3f}, {seconds:.0f} s"
    )
    return record


# ------------------------------------------------------------------------------- summaries


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for source, target in DIRECTIONS:
        for method in METHODS:
            key = (source, target, method)
            runs = [r for r in records if (r["source"], r["target"], r["method"]) == key]
            runs.sort(key=lambda r: r["seed"])
            if not runs:
                continue
            rows.append(
                {
                    "pair": f"{source} -> {target}",
                    "method": method,
                    "seeds": [r["seed"] for r in runs],
                    "test_acc1": [r["test_acc1"] for r in runs],
                    "last_epoch_acc": [r["last_epoch_acc"] for r in runs],
                    "best_epoch": [r["best_epoch"] for r in runs],
                    "seconds": [r["seconds"] for r in runs],
                }
            )
    return rows


def write_table(rows: list[dict], path: Path, commit: str) -> None:
    lines = [
        "# TLlib reference: its own erm.py / dann.py on xdt's digit domains",
        "",
        f"TLlib commit {commit}; xdt splits with data.split_seed {SPLIT_SEED}; target test "
        "accuracy (%), mean ± sample std over seeds.",
        f'Selection rule: {SELECTION}. "last epoch": the 6th evaluation, no selection.',
        "",
        "| pair | method | test_acc1 (selected) | per seed | last epoch | per seed | best epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = ", ".join(f"{a:.2f}" for a in row["test_acc1"])
        last = ", ".join(f"{a:.2f}" for a in row["last_epoch_acc"])
        lines.append(
            f"| {row['pair']} | {row['method']} | {mean_std(row['test_acc1'])} | {seeds} | "
            f"{mean_std(row['last_epoch_acc'])} | {last} | "
            f"{', '.join(map(str, row['best_epoch']))} |"
        )
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------ xdt beside it

# TLlib's script -> the xdt transfer suite's sweep of the same method
XDT_SWEEP = {"erm": "source_only", "dann": "dann"}


def xdt_accuracies(run_dir: Path, target: str) -> dict[str, float] | None:
    """One completed xdt run's target test accuracy (%) under three rules: its own
    (`source_val`, the checkpoint in summary.json), TLlib's (the best of its evaluations on
    the target TEST split, the rule TLlib applies; here only to compare like with like) and
    the last one. None for a run that has not completed."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("status") != "completed":
        return None
    key = f"{target}/test/acc"
    evals = [
        row
        for row in read_metrics(run_dir / "metrics.jsonl")
        if row.get("split") == "eval" and key in row and row["step"] > 0
    ]
    return {
        "source_val": 100 * summary["best"][key],
        "target_test": 100 * max(row[key] for row in evals),
        "last": 100 * summary["final"][key],
        "evaluations": len(evals),
    }


def xdt_rows(runs: Path) -> list[dict]:
    rows = []
    for source, target in DIRECTIONS:
        for method, sweep in XDT_SWEEP.items():
            folder = runs / f"{source}_to_{target}_{sweep}"
            scored = [(d, xdt_accuracies(d, target)) for d in sorted(folder.glob("seed*"))]
            done = [(d, a) for d, a in scored if a is not None]
            if not done:
                continue
            accs = [a for _, a in done]
            rows.append(
                {
                    "pair": f"{source} -> {target}",
                    "method": method,
                    "xdt_sweep": folder.name,
                    "runs": [d.name for d, _ in done],
                    **{rule: [a[rule] for a in accs] for rule in ("source_val", "target_test")},
                    "last": [a["last"] for a in accs],
                    "evaluations": sorted({a["evaluations"] for a in accs}),
                }
            )
    return rows


def write_side_by_side(tllib: list[dict], xdt: list[dict], path: Path, commit: str) -> None:
    """One table: for each pair and method, TLlib under its own rule and at its last
    evaluation, xdt under its rule (source_val), TLlib's rule and at its last evaluation."""
    lines = [
        "| pair | method | TLlib, its rule: best on target test | TLlib, last evaluation "
        "| xdt, its rule: source_val | xdt, TLlib's rule: best on target test "
        "| xdt, last evaluation |",
        "|---|---|---|---|---|---|---|",
    ]
    ours = {(r["pair"], r["method"]): r for r in xdt}
    for row in tllib:
        x = ours.get((row["pair"], row["method"]))
        cells = [mean_std(x[k]) for k in ("source_val", "target_test", "last")] if x else [""] * 3
        name = f"{row['method']} / {XDT_SWEEP[row['method']]}"
        lines.append(
            f"| {row['pair']} | {name} | {mean_std(row['test_acc1'])} | "
            f"{mean_std(row['last_epoch_acc'])} | {' | '.join(cells)} |"
        )
    seeds = ", ".join(map(str, sorted({s for r in tllib for s in r["seeds"]})))
    lines += [
        "",
        f"Target test accuracy (%), mean ± sample std over seeds {seeds}; "
        f"xdt's split_seed {SPLIT_SEED} in both tools; TLlib commit {commit}. TLlib evaluates "
        "6 times (every 250 steps) and keeps the checkpoint best on the target's test labels; "
        "xdt evaluates at the same steps and keeps the one best on the source's val split.",
    ]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    plan = [
        (source, target, method, seed)
        for source, target in DIRECTIONS
        for method in args.methods
        for seed in args.seeds
    ]
    todo = [p for p in plan if not (args.out / "runs" / f"{run_name(*p)}.json").exists()]
    log(f"{len(plan)} runs, {len(plan) - len(todo)} already done, {len(todo)} to run")

    if todo:
        check_interpreter(args.python)
        with tempfile.TemporaryDirectory(prefix="tllib_reference_") as tmp:
            work = {"clone": Path(tmp) / "tllib", "data": Path(tmp) / "data"}
            work["commit"] = clone_tllib(args.tllib, work["clone"])
            log(f"cloned {args.tllib} at {work['commit']}")
            work["shim"] = Path(tmp) / "shim"
            work["shim"].mkdir()
            (work["shim"] / "sitecustomize.py").write_text(SHIM)
            layout = digits_layout() if args.digits_layout else None
            work["sizes"] = {
                name: export_domain(name, work["data"], layout if name == "digits" else None)
                for name in TLLIB_DOMAIN
            }
            for source, target, method, seed in todo:
                record = run_one(args, method, source, target, seed, work)
                path = args.out / "runs" / f"{run_name(source, target, method, seed)}.json"
                path.with_suffix(".tmp").write_text(json.dumps(record, indent=2) + "\n")
                path.with_suffix(".tmp").replace(path)

    records = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    rows = summarize(records)
    commits = sorted({r["tllib"]["commit"] for r in records})
    results = {"selection": SELECTION, "tllib_commits": commits, "summary": rows, "runs": records}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(rows, args.out / "table.md", ", ".join(commits))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    print((args.out / "table.md").read_text())
    if args.xdt_runs is not None:
        side = args.out / "side_by_side.md"
        write_side_by_side(rows, xdt_rows(args.xdt_runs), side, ", ".join(commits))
        log(f"wrote {side}")
        print(side.read_text())


if __name__ == "__main__":
    main()
