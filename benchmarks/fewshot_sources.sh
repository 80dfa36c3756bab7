#!/usr/bin/env bash
# Few-shot fine-tuning on mnist5k (10 labels per class) from three digits source runs, and
# from scratch, seeds 0, 1, 2: does a source trained with augmentation transfer better?
# Judged on mnist5k's val split (the test split is reported, never used to choose).
#   bash benchmarks/fewshot_sources.sh [RUNS_DIR]      (about 6 minutes on 2 cores)
# Prints one line per run: name, mnist5k/val/acc, mnist5k/test/acc (the last step, as the
# shipped few-shot configs report). One torch thread, so the figures match docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/fewshot_sources}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
xdt() { python -m xdt_cli "$@"; }
show() {
  python -c "import json,sys; f=json.load(open(sys.argv[1]))['final']; \
print(sys.argv[2], round(f['mnist5k/val/acc'], 4), round(f['mnist5k/test/acc'], 4))" \
    "$runs/$1/summary.json" "$1"
}
source_cfg=configs/transfer/mnist5k_to_digits_target_oracle.yaml   # train-source on digits
fewshot=configs/transfer/digits_to_mnist5k_finetune_10shot.yaml
[ -f "$runs/src/summary.json" ] || xdt train-source $source_cfg --runs-dir "$runs" --name src -q
[ -f "$runs/srcA/summary.json" ] || xdt train-source $source_cfg --runs-dir "$runs" --name srcA -q \
  'data.source.transforms={train: [{random_crop: {size: 28, padding: 3}}]}'
[ -f "$runs/srcB/summary.json" ] || xdt train-source $source_cfg --runs-dir "$runs" --name srcB -q \
  'data.source.transforms={train: [{random_resized_crop: {size: 28, scale: [0.6, 1.0], ratio: [0.8, 1.25]}}]}'
for s in 0 1 2; do
  [ -f "$runs/scratch$s/summary.json" ] || xdt train-source configs/transfer/mnist5k_10shot_scratch.yaml \
    --runs-dir "$runs" --name "scratch$s" --seed "$s" -q
  show "scratch$s"
  for src in src srcA srcB; do
    name="ft_${src}_$s"
    [ -f "$runs/$name/summary.json" ] || xdt finetune $fewshot "init.from_run=$runs/$src" \
      --runs-dir "$runs" --name "$name" --seed "$s" -q
    show "$name"
  done
done
