# MC-dropout curve on run C (per-sequence masks held over the whole test stream; N passes as one batch).
set -x
V=runs/cpu-30min-variational
for n in 0 1 2 5 10 20 50; do   # the N=50 pass was stopped to free the CPU: not reported
  python -m rnnreg evaluate $V --split test --mc-samples $n --data-dir ../shared/data/ptb --weights last --no-progress
done
