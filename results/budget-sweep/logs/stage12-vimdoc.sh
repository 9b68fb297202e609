#!/usr/bin/env bash
# The vimdoc 12-minute stage of the budget sweep (after CI has finished: the machine otherwise idle).
set -euo pipefail
cd "$(dirname "$0")"
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
while ! grep -q "^rc " notes/ci5.log; do sleep 5; done
echo "=== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD): python3 benchmarks/budget_sweep.py --out SWEEP --stage vimdoc-12 --ptb-dir ../shared/data/ptb"
python3 benchmarks/budget_sweep.py --out sweep --stage vimdoc-12 --ptb-dir ../shared/data/ptb
echo "=== done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
