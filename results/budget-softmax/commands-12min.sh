#!/usr/bin/env bash
set -euo pipefail
python3 -m rnnreg train --out runs/budget/runs/ptb-12min-full --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 150 --max-train-minutes 12.0
python3 -m rnnreg train --out runs/budget/runs/ptb-12min-adaptive --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 250 --no-tie-weights --softmax adaptive --max-train-minutes 12.0
python3 -m rnnreg train --out runs/budget/runs/vimdoc-12min-full --no-progress --data-dir runs/budget/corpora/vimdoc --preset cpu-30min --hidden-size 100 --max-train-minutes 12.0
python3 -m rnnreg train --out runs/budget/runs/vimdoc-12min-adaptive --no-progress --data-dir runs/budget/corpora/vimdoc --preset cpu-30min --hidden-size 250 --no-tie-weights --softmax adaptive --max-train-minutes 12.0
