set -x
S=runs/strategy-study/runs/lstm-zaremba-p0.5-s1
E2=runs/ensemble/runs/lstm-zaremba-p0.5-s2
E3=runs/ensemble/runs/lstm-zaremba-p0.5-s3
for r in $S $E2 $E3; do python -m rnnreg evaluate $r --split test --data-dir ../shared/data/ptb --weights last; done
python -m rnnreg evaluate $S $E2 --split test --data-dir ../shared/data/ptb --weights last
python -m rnnreg evaluate $S $E2 $E3 --split test --data-dir ../shared/data/ptb --weights last
V=runs/strategy-study/runs/lstm-variational-p0.5-s1
for n in 0 1 2 5 10 20; do python -m rnnreg evaluate $V --split test --mc-samples $n --data-dir ../shared/data/ptb --weights last; done
