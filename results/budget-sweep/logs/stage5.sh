#!/usr/bin/env bash
# 5-minute PTB sweep: softmax (full tied / adaptive) x hidden (300 / 500), dropout 0.25
set -euo pipefail
cd .
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
D=../shared/data/ptb
R=runs
run() { name=$1; shift; echo "=== $name $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"; python3 -m rnnreg train --out $R/$name --no-progress --data-dir $D --preset cpu-30min "$@"; }
run ptb-5min-full-h300 --max-train-minutes 5 --hidden-size 300 --dropout 0.25
run ptb-5min-adaptive-h300 --max-train-minutes 5 --hidden-size 300 --dropout 0.25 --softmax adaptive --no-tie-weights
run ptb-5min-full-h500 --max-train-minutes 5 --hidden-size 500 --dropout 0.25
run ptb-5min-adaptive-h500 --max-train-minutes 5 --hidden-size 500 --dropout 0.25 --softmax adaptive --no-tie-weights
echo "=== done $(date -u +%FT%TZ)"
