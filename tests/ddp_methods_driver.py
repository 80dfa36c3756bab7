"""Trains every registered method for a few steps in this process (or, under torchrun, in
each rank) and saves each rank's final method state: tests/test_distributed.py compares a
2-process launch with one process. Not a test module itself.

    python tests/ddp_methods_driver.py OUT_DIR                         # one process
    torchrun --standalone --nproc-per-node 2 tests/ddp_methods_driver.py OUT_DIR

The model is LeNet (no batch norm), so that every method whose terms are means over samples,
or statistics that it gathers from every rank, gives one process's weights exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHORT = ["model.backbone=lenet", "train.steps=3", "train.eval_every=3", "train.log_every=1"]


def runs() -> list[tuple[str, str, str, list[str]]]:
    """(name, subcommand, config, overrides) for every registered method."""
    from xdt_cli.methods import METHODS

    out = []
    for name, cls in sorted(METHODS.items()):
        regime = sorted(cls.regimes)[0]
        if regime == "transfer":
            config = f"configs/transfer/digits_to_mnist5k_{name}.yaml"
            # no bottleneck: its batch norm would normalise each rank's share (LeNet has none)
            out.append((name, regime, config, ["train.batch_size=16", "model.bottleneck=null"]))
        elif regime == "generalize" or name == "erm":
            config = f"configs/generalize/rotated_mnist5k_{name}.yaml"
            extra = ["data.domains=[rot0, rot15, rot30]", "data.test_domains=[rot30]"]
            out.append((name, "generalize", config, [*extra, "train.batch_size=8"]))
        elif regime == "multitask":
            config = f"configs/multitask/digits+mnist5k_{name}.yaml"
            out.append((name, regime, config, ["train.batch_size=16"]))
        elif regime == "finetune":
            out.append((name, regime, "finetune", [f"method.name={name}"]))
    return out


def main(out_dir: Path) -> None:
    from xdt_cli import distributed
    from xdt_cli.api import start_run
    from xdt_cli.progress import Reporter

    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    quiet = Reporter(quiet=True)
    # the source run of the finetune methods: LeNet on mnist5k
    start_run(
        "train-source",
        REPO / "configs" / "quickstart.yaml",
        [*SHORT, "train.batch_size=16", "schedule.warmup_steps=0"],
        name="source",
        runs_dir=runs_dir,
        reporter=quiet,
    )
    finetune = out_dir / "finetune.yaml"
    finetune.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": {"dataset": "mnist5k"},
                    "target": {"dataset": "digits", "labels_per_class": 10},
                },
                "init": {"from_run": str(runs_dir / "source")},
                "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
                "train": {"batch_size": 16},
                "selection": {"rule": "last"},
            }
        )
    )
    done = {}
    for name, subcommand, config, overrides in runs():
        path = finetune if config == "finetune" else REPO / config
        summary = start_run(
            subcommand, path, [*SHORT, *overrides], name=name, runs_dir=runs_dir, reporter=quiet
        )
        torch.save(KEPT.pop(), out_dir / f"{name}.rank{distributed.rank()}.pt")
        done[name] = {"status": summary["status"], "final": summary["final"]}
    if distributed.rank() == 0:
        (out_dir / "done.json").write_text(json.dumps(done, indent=2))


KEPT: list[dict[str, torch.Tensor]] = []


def keep_final_weights() -> None:
    """Each run's method state as this rank holds it when training ends (rank 0 alone
    writes last.pt, so every rank's own weights are taken here)."""
    from xdt_cli.engine import Engine

    fit = Engine.fit

    def fit_and_keep(self, trackers=()):
        summary = fit(self, trackers)
        state = self.method.state_dict()
        KEPT.append({k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)})
        return summary

    Engine.fit = fit_and_keep


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    keep_final_weights()
    main(Path(sys.argv[1]))
