#!/usr/bin/env bash
# Which digits source serves few-shot fine-tuning on mnist5k (10 labels per class) best?
# Trains five digits source runs (seed 0) and fine-tunes each on 3 draws of the 100 labelled
# mnist5k images x seeds 0, 1, 2, next to training from scratch on the same draws:
#   plain    digits as embedded (configs/transfer/mnist5k_to_digits_target_oracle.yaml)
#   layout   digits drawn into MNIST's 20-pixel box (resize 20, center_crop 28)
#   shift    layout + random_crop padding 3 (translation augmentation)
#   affine   layout + random_affine + color_jitter, 3,000 steps
#   shipped  configs/transfer/digits_source_mnist_layout.yaml (affine + levels 0.35-0.75
#            for MNIST's stroke contrast, on every split)
# Sources are judged on mnist5k's VAL split; the test split is printed, never used to choose.
#   bash benchmarks/fewshot_sources.sh [RUNS_DIR]      (about 12 minutes on 2 cores)
# Prints, per row: mnist5k val and test accuracy at the last step, mean over the 9 runs.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/fewshot_sources}"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
xdt() { python -m xdt_cli "$@"; }
oracle=configs/transfer/mnist5k_to_digits_target_oracle.yaml
layout='{resize: {size: 20}}, {center_crop: {size: 28}}'
levels="$layout, {levels: {low: 0.35, high: 0.75}}"
augment='{random_affine: {degrees: 20, translate: [0.15, 0.15], scale: [0.7, 1.2], shear: 15}}'
augment="$augment, {color_jitter: {brightness: 0.3, contrast: 0.5}}"
fewshot=configs/transfer/digits_to_mnist5k_finetune_10shot.yaml
scratch=configs/transfer/mnist5k_10shot_scratch.yaml

source_run() {  # NAME CONFIG [OVERRIDES...]
  local name=$1 config=$2
  shift 2
  [ -f "$runs/src_$name/summary.json" ] ||
    xdt train-source "$config" --runs-dir "$runs" --name "src_$name" -q "$@" >/dev/null
}
source_run plain $oracle
source_run layout $oracle "data.source.transforms={train: [$layout], eval: [$layout]}"
source_run shift $oracle \
  "data.source.transforms={train: [$layout, {random_crop: {size: 28, padding: 3}}], eval: [$layout]}"
source_run affine configs/transfer/digits_source_mnist_layout.yaml \
  "data.source.transforms={train: [$layout, $augment], eval: [$layout]}"
source_run shipped configs/transfer/digits_source_mnist_layout.yaml

for draw in 0 1 2; do
  for seed in 0 1 2; do
    run="scratch-d$draw-s$seed"
    [ -f "$runs/$run/summary.json" ] || xdt train-source $scratch --runs-dir "$runs" \
      --name "$run" --seed $seed -q "data.source.labels_seed=$draw" >/dev/null
    for src in plain layout shift affine shipped; do
      # the source section reports digits as its source saw them
      case $src in
        plain) eval_tf="data.source.transforms={}" ;;
        shipped) eval_tf="data.source.transforms={eval: [$levels]}" ;;
        *) eval_tf="data.source.transforms={eval: [$layout]}" ;;
      esac
      run="ft_$src-d$draw-s$seed"
      [ -f "$runs/$run/summary.json" ] || xdt finetune $fewshot "init.from_run=$runs/src_$src" \
        "$eval_tf" "data.target.labels_seed=$draw" --runs-dir "$runs" --name "$run" \
        --seed $seed -q >/dev/null
    done
  done
done

python - "$runs" <<'PY'
import json, statistics, sys
from pathlib import Path

runs = Path(sys.argv[1])
def final(run):
    return json.loads((runs / run / "summary.json").read_text())["final"]
print(f"{'row':<12} {'mnist5k/val/acc':>16} {'mnist5k/test/acc':>17}   (mean of 3 draws x 3 seeds)")
for row in ["scratch", "ft_plain", "ft_layout", "ft_shift", "ft_affine", "ft_shipped"]:
    got = [final(f"{row}-d{d}-s{s}") for d in range(3) for s in range(3)]
    val = statistics.mean(f["mnist5k/val/acc"] for f in got)
    test = statistics.mean(f["mnist5k/test/acc"] for f in got)
    print(f"{row:<12} {val:>16.4f} {test:>17.4f}")
for src in ["plain", "layout", "shift", "affine", "shipped"]:
    print(f"source {src}: zero-shot mnist5k/val/acc {final('src_' + src)['mnist5k/val/acc']:.4f}")
PY
