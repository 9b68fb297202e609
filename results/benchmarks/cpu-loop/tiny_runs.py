"""Tiny training runs on the C++ loop, to compare a change's metrics with the code before it.

    python results/benchmarks/cpu-loop/tiny_runs.py OUTDIR      # PYTHONPATH selects the code
    python results/benchmarks/cpu-loop/tiny_runs.py --compare BEFORE AFTER

Each strategy that runs rnnreg's own recurrence (variational, naive, recurrent_only, zoneout)
trains a 2x32 LSTM for 2 epochs on a generated corpus, one thread, default engine (the C++
loop); --compare prints the largest relative difference of every number in metrics.jsonl,
wall-clock fields left out.
"""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("variational", "naive", "recurrent_only", "zoneout")
PHRASES = ("the cat sat on the mat", "the dog ran to the park", "a bird flew over the tree",
           "my friend ate a red apple", "the cat ate the fish", "a dog sat under the tree",
           "one big green frog jumped into the cold pond", "we saw many stars last night")
TIMING = ("time", "second", "wps", "tokens_per", "elapsed", "minutes", "speed")


def make(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 600), ("valid", 60), ("test", 60)):
        (corpus / f"{split}.txt").write_text("".join(rng.choice(PHRASES) + "\n"
                                                     for _ in range(n)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RNNREG_ENGINE="auto")
    for strategy in STRATEGIES:
        r = subprocess.run(
            [sys.executable, "-m", "rnnreg", "train", "--out", strategy, "--strategy", strategy,
             "--dropout", "0.3", "--epochs", "2", "--hidden-size", "32", "--num-layers", "2",
             "--batch-size", "4", "--bptt", "10", "--eval-bptt", "20", "--log-every", "5",
             "--data-dir", str(corpus), "--no-progress", "--no-download", "--device", "cpu",
             "--seed", "1"], env=env, capture_output=True, text=True, cwd=out)
        (out / f"{strategy}.out").write_text(f"rc={r.returncode}\n{r.stdout}--stderr\n{r.stderr}")
        print(strategy, "rc", r.returncode, flush=True)


def numbers(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            if not any(word in k.lower() for word in TIMING):
                yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(value, float | int) and not isinstance(value, bool):
        yield path, float(value)


def compare(before: Path, after: Path) -> None:
    worst_all = 0.0
    for strategy in STRATEGIES:
        a = [json.loads(line) for line in (before / strategy / "metrics.jsonl").read_text()
             .splitlines()]
        b = [json.loads(line) for line in (after / strategy / "metrics.jsonl").read_text()
             .splitlines()]
        assert len(a) == len(b), f"{strategy}: {len(a)} vs {len(b)} records"
        worst, where, count = 0.0, "", 0
        for x, y in zip(a, b):
            nx, ny = dict(numbers(x)), dict(numbers(y))
            assert nx.keys() == ny.keys()
            for k in nx:
                count += 1
                u, v = nx[k], ny[k]
                rel = 0.0 if u == v else abs(u - v) / max(abs(u), abs(v))
                if math.isnan(u) or math.isnan(v):
                    rel = 0.0 if math.isnan(u) and math.isnan(v) else math.inf
                if rel > worst:
                    worst, where = rel, f"{k} ({u!r} vs {v!r})"
        worst_all = max(worst_all, worst)
        print(f"{strategy:15s} {count} numbers, largest relative difference {worst:.2e} {where}")
    print(f"overall largest relative difference {worst_all:.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        make(Path(sys.argv[1]))
