#!/usr/bin/env bash
# Dynamic evaluation of the 30-minute PTB run (weights: last = the EMA of the last weights),
# run from a clean checkout of the commit in the log: RUN=runs/ptb-30min-full-h400-ema.
set -euo pipefail
cd "$(dirname "$0")"
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
RUN=${RUN:?}
run() { echo "=== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD): $*"; "$@"; }
run python3 -m rnnreg evaluate $RUN --weights last --split test --dynamic rms --dynamic-segment 20 --dynamic-stat-windows 200 --dynamic-tune-tokens 20000 --no-progress
run python3 -m rnnreg evaluate $RUN --weights last --split test --dynamic sgd --dynamic-segment 20 --dynamic-tune-tokens 20000 --no-progress
run python3 -m rnnreg evaluate $RUN --weights last --split test --dynamic rms --dynamic-segment 5 --dynamic-stat-windows 800 --dynamic-tune-tokens 10000 --no-progress
echo "=== done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
