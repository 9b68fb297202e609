#!/usr/bin/env bash
# The vimdoc 12-minute stage of the budget sweep, started once the machine was otherwise idle;
# SWEEP is the sweep directory (it holds corpora/vimdoc, built by the script).
set -euo pipefail
cd "$(dirname "$0")"
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
echo "=== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD): python3 benchmarks/budget_sweep.py --out SWEEP --stage vimdoc-12 --ptb-dir ../shared/data/ptb"
python3 benchmarks/budget_sweep.py --out "${SWEEP:?}" --stage vimdoc-12 --ptb-dir ../shared/data/ptb
echo "=== done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
