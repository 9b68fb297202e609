#!/usr/bin/env bash
# Every benchmark in one go, on an otherwise idle machine, with its output kept in results/.
# Usage: bash benchmarks/run_all.sh results/benchmarks
set -euo pipefail
out=${1:-results/benchmarks}
mkdir -p "$out"
{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- rnnreg benchmarks || echo -dirty)"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(python3 -c 'import torch; print("torch", torch.__version__)')"
} > "$out/machine.txt"
python3 benchmarks/masks.py | tee "$out/masks.md"
python3 benchmarks/matmul.py --markdown | tee "$out/matmul.md"
python3 benchmarks/layers.py --markdown | tee "$out/layers.md"
python3 benchmarks/precision.py | tee "$out/precision.md"
python3 benchmarks/softmax.py --markdown | tee "$out/softmax.md"
python3 benchmarks/flops.py --markdown | tee "$out/flops.md"
{
  python3 benchmarks/train.py --shapes small --windows 100 --repeats 5
  python3 benchmarks/train.py --shapes medium --windows 20 --repeats 3
} | tee "$out/train.md"
python3 benchmarks/distributed.py --shapes small --windows 30 --repeats 2 | tee "$out/distributed.md"
