#!/usr/bin/env bash
# 30-minute PTB run: cpu-30min (the rule's 30-minute PTB row) + EMA of the weights (decay 0.999).
set -euo pipefail
cd "$(dirname "$0")"
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
run() { echo "=== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; "$@"; }
run python3 -m rnnreg train --out runs/ptb-30min-full-h400-ema --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --ema-decay 0.999
echo "=== done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
