#!/usr/bin/env bash
# Run on a machine with a CUDA GPU: the CUDA tests (the 2-rank DDP one with 2+ GPUs), then
# the quick start, the engine overhead benchmark and (2+ GPUs) 1 vs N ranks on the GPU.
# Writes logs into $OUT (or ./gpu_check) and prints a summary.
#
# Where the machine's python3 already holds torch (a lent GPU machine with no network),
# the missing pure-Python dependencies come from wheels in ./.whl (`pip download` them for
# that python first); elsewhere a .venv is created with `pip install -e '.[dev]'`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
if python3 -c "import torch" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
  else
    export PYTHONPATH="$PWD"
  fi
  py=python3
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'
  fi
  py=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
nvidia-smi | tee "$out/nvidia-smi.txt"
"$py" -m pytest -m cuda -v -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.txt"
tests=${PIPESTATUS[0]}
"$py" -m xdt_cli train-source configs/quickstart.yaml --device cuda --json --quiet \
  --runs-dir "$out/runs" > "$out/quickstart.json" 2> "$out/quickstart.err"
echo "quickstart on cuda exit code: $?"
"$py" benchmarks/overhead.py --device cuda 2>&1 | tee "$out/overhead.txt"
# DistributedDataParallel on CUDA (NCCL): 1 rank against N = every GPU (at least 2)
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 2 ]; then
  "$py" benchmarks/ddp.py --device cuda --procs "$gpus" --threads 4 --seeds 0 \
    2>&1 | tee "$out/ddp.txt"
else
  echo "one GPU: the N-rank DDP check needs 2 or more (NCCL: one rank per GPU)" | tee "$out/ddp.txt"
fi
echo "cuda tests exit code: $tests"
exit "$tests"
