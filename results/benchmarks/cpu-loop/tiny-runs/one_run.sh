# One tiny training run, as tiny_runs.py makes them, for one strategy, engine and seed:
#   bash one_run.sh CODE_DIR OUT_DIR CORPUS_DIR STRATEGY ENGINE SEED
# (CORPUS_DIR: the corpus tiny_runs.py generates). Used for the naive runs of seed 2 and the
# Python-loop run of seed 1 in tiny-naive-seeds.log.
cd "$2" && PYTHONPATH="$1" TORCH_EXTENSIONS_DIR="$1/.torch_ext" OMP_NUM_THREADS=1 \
  MKL_NUM_THREADS=1 RNNREG_ENGINE="$5" python -m rnnreg train --out "$4-$5-$6" \
  --strategy "$4" --dropout 0.3 --epochs 2 --hidden-size 32 --num-layers 2 --batch-size 4 \
  --bptt 10 --eval-bptt 20 --log-every 5 --data-dir "$3" --no-progress --no-download \
  --device cpu --seed "$6" > "$4-$5-$6.out" 2>&1
