#!/usr/bin/env bash
# Run on a machine with a CUDA GPU: the CUDA tests, then the quick start and the engine
# overhead benchmark on the GPU. Writes logs into $OUT (or ./gpu_check) and prints a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'
fi
. .venv/bin/activate
nvidia-smi | tee "$out/nvidia-smi.txt"
pytest -m cuda -v 2>&1 | tee "$out/cuda-tests.txt"
tests=${PIPESTATUS[0]}
xdt train-source configs/quickstart.yaml --device cuda --json --quiet --runs-dir "$out/runs" \
  > "$out/quickstart.json" 2> "$out/quickstart.err"
python benchmarks/overhead.py --device cuda 2>&1 | tee "$out/overhead.txt"
echo "cuda tests exit code: $tests"
exit "$tests"
