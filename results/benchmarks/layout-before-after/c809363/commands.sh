#!/usr/bin/env bash
# Before (1b250d8) and after (main HEAD) benchmarks, alternating, idle machine.
set -u
out=notes/bench/final
after=$(cd . && git rev-parse --short HEAD)
echo "after=$after before=1b250d8 date=$(date -u +%FT%TZ)" > $out/machine.txt
lscpu | sed -n 's/^Model name: *//p' >> $out/machine.txt
b() { (cd before && PYTHONPATH=before python3 "$@"); }
a() { (cd . && PYTHONPATH=. python3 "$@"); }
for i in 1 2; do
  b benchmarks/train.py --shapes small --windows 100 --repeats 5 > $out/train-small-1b250d8-$i.md 2>&1
  a benchmarks/train.py --shapes small --windows 100 --repeats 5 > $out/train-small-$after-$i.md 2>&1
done
b benchmarks/train.py --shapes medium --windows 20 --repeats 3 > $out/train-medium-1b250d8.md 2>&1
a benchmarks/train.py --shapes medium --windows 20 --repeats 3 > $out/train-medium-$after.md 2>&1
b benchmarks/layers.py --markdown > $out/layers-1b250d8.md 2>&1
a benchmarks/layers.py --markdown > $out/layers-$after.md 2>&1
echo done $(date -u +%FT%TZ) >> $out/machine.txt
# then, alone, to check the first after-run's medium rows (zaremba 0.86x, variational_batch 0.82x):
#   python3 benchmarks/layers.py --shapes medium --markdown   -> layers-medium-c809363-rerun.md
