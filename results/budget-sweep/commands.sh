#!/usr/bin/env bash
set -euo pipefail
python3 -m rnnreg train --out runs/ptb-5min-full-h300 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 300 --dropout 0.25 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/ptb-5min-adaptive-h300 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 300 --no-tie-weights --softmax adaptive --dropout 0.25 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/ptb-5min-full-h500 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 500 --dropout 0.25 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/ptb-5min-adaptive-h500 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 500 --no-tie-weights --softmax adaptive --dropout 0.25 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/ptb-12min-full-h400 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --max-train-minutes 12.0
python3 -m rnnreg train --out runs/ptb-12min-adaptive-h400 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --no-tie-weights --softmax adaptive --max-train-minutes 12.0
python3 -m rnnreg train --out runs/ptb-12min-adaptive-h400-ema --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --no-tie-weights --softmax adaptive --ema-decay 0.999 --max-train-minutes 12.0
python3 -m rnnreg train --out runs/ptb-30min-full-h400 --no-progress --data-dir ../shared/data/ptb --preset cpu-30min
python3 -m rnnreg train --out runs/ptb-30min-adaptive-h500-p50-ema --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 500 --no-tie-weights --softmax adaptive --dropout 0.5 --ema-decay 0.999
python3 -m rnnreg train --out runs/ptb-30min-full-h400-ema --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --ema-decay 0.999
python3 -m rnnreg train --out runs/vimdoc-5min-full-h300 --no-progress --data-dir corpora/vimdoc --preset cpu-30min --hidden-size 300 --dropout 0.25 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/vimdoc-5min-adaptive-h300 --no-progress --data-dir corpora/vimdoc --preset cpu-30min --hidden-size 300 --no-tie-weights --softmax adaptive --dropout 0.25 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/vimdoc-12min-adaptive-h300-ema --no-progress --data-dir corpora/vimdoc --preset cpu-30min --hidden-size 300 --no-tie-weights --softmax adaptive --dropout 0.25 --ema-decay 0.999 --max-train-minutes 12.0
python3 -m rnnreg train --out runs/vimdoc-12min-adaptive-h400-ema --no-progress --data-dir corpora/vimdoc --preset cpu-30min --no-tie-weights --softmax adaptive --dropout 0.25 --ema-decay 0.999 --max-train-minutes 12.0
