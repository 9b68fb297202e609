#!/usr/bin/env bash
# After the 12-minute stage: the 30-minute PTB run (adaptive h500, dropout 0.5, EMA if it won at
# 12 minutes), the vimdoc 5-minute stage, then dynamic evaluation of the PTB 30- and 12-minute bests.
set -euo pipefail
cd .
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
while ! grep -q "^=== done" stage12.log; do sleep 5; done
R=runs
final() { python3 -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if '\"final\"' in l][-1]['valid_ppl'])" $R/$1/metrics.jsonl; }
plain=$(final ptb-12min-adaptive-h400); ema=$(final ptb-12min-adaptive-h400-ema)
echo "12 min: adaptive-h400 $plain, with EMA $ema"
if python3 -c "import sys; sys.exit(0 if float(sys.argv[2]) < float(sys.argv[1]) else 1)" $plain $ema; then
  name=ptb-30min-adaptive-h500-p50-ema; extra="--ema-decay 0.999"
else
  name=ptb-30min-adaptive-h500-p50; extra=""
fi
run() { echo "=== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; "$@"; }
run python3 -m rnnreg train --out $R/$name --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 500 --no-tie-weights --softmax adaptive --dropout 0.5 $extra --max-train-minutes 30.0
V=corpora/vimdoc
run python3 -m rnnreg train --out $R/vimdoc-5min-full-h300 --no-progress --data-dir $V --preset cpu-30min --hidden-size 300 --dropout 0.25 --max-train-minutes 5.0
run python3 -m rnnreg train --out $R/vimdoc-5min-adaptive-h300 --no-progress --data-dir $V --preset cpu-30min --hidden-size 300 --no-tie-weights --softmax adaptive --dropout 0.25 --max-train-minutes 5.0
run python3 -m rnnreg evaluate $R/$name --weights last --dynamic rms --no-progress
echo "=== done $(date -u +%FT%TZ)"
