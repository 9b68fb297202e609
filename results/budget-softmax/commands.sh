#!/usr/bin/env bash
set -euo pipefail
python3 -m rnnreg train --out runs/budget/runs/ptb-2min-full --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 100 --max-train-minutes 2.0
python3 -m rnnreg train --out runs/budget/runs/ptb-2min-adaptive --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 100 --no-tie-weights --softmax adaptive --max-train-minutes 2.0
python3 -m rnnreg train --out runs/budget/runs/ptb-5min-full --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 100 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/budget/runs/ptb-5min-adaptive --no-progress --data-dir ../shared/data/ptb --preset cpu-30min --hidden-size 150 --no-tie-weights --softmax adaptive --max-train-minutes 5.0
python3 -m rnnreg train --out runs/budget/runs/vimdoc-2min-full --no-progress --data-dir runs/budget/corpora/vimdoc --preset cpu-30min --hidden-size 100 --max-train-minutes 2.0
python3 -m rnnreg train --out runs/budget/runs/vimdoc-2min-adaptive --no-progress --data-dir runs/budget/corpora/vimdoc --preset cpu-30min --hidden-size 100 --no-tie-weights --softmax adaptive --max-train-minutes 2.0
python3 -m rnnreg train --out runs/budget/runs/vimdoc-5min-full --no-progress --data-dir runs/budget/corpora/vimdoc --preset cpu-30min --hidden-size 100 --max-train-minutes 5.0
python3 -m rnnreg train --out runs/budget/runs/vimdoc-5min-adaptive --no-progress --data-dir runs/budget/corpora/vimdoc --preset cpu-30min --hidden-size 150 --no-tie-weights --softmax adaptive --max-train-minutes 5.0
