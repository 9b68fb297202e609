"""Data-parallel training throughput: 2 processes (gloo, CPU) against 1, same global batch.

Both sides are the ``rnnreg train`` command for one epoch on a synthetic 10k-word corpus (the
one ``benchmarks/train.py`` writes): one process as ``python -m rnnreg train``, two as
``torchrun --standalone --nproc-per-node 2 -m rnnreg train``. The number compared is the
tokens/s the trainer logs: tokens of the global batch over training time, evaluation excluded,
the slowest rank's time for each step. Each process gets ``--threads`` threads, so two
processes use twice the cores. Runs alternate (1, 2, 1, 2, ...) so drifts in machine load hit
both sides; medians are reported.

    python benchmarks/distributed.py --shapes small --windows 40 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from train import write_corpus  # benchmarks/train.py, beside this script

from rnnreg.lm.presets import preset_config
from rnnreg.lm.rundir.metrics import read_records

REPO_ROOT = Path(__file__).resolve().parents[1]


def launch(processes: int) -> list[str]:
    """The command that starts ``rnnreg`` on ``processes`` processes of this machine."""
    if processes == 1:
        return [sys.executable, "-m", "rnnreg"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(processes), "-m", "rnnreg"]


def tokens_per_s(processes: int, shape: str, data_dir: Path, out: Path, threads: int) -> float:
    """One epoch of ``shape`` on ``processes`` processes; the tokens/s its metrics record."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [*launch(processes), "train", "--preset", shape, "--epochs", "1",
               "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu",
               "--checkpoint-minutes", "0", "--eval-bptt", "200", "--no-progress"]
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return read_records(out, "epoch")[0]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small", help="presets whose sizes to use")
    parser.add_argument("--windows", type=int, default=60, help="training windows per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu, gloo; {os.cpu_count()} cores; {args.threads} "
          f"thread(s) per process; {args.windows} windows per epoch, {args.repeats} "
          f"alternating repeats")
    print("| shape | 1 process tok/s | 2 processes tok/s | speed-up |\n|---|---|---|---|")
    for shape in args.shapes.split(","):
        config = preset_config(shape)
        tokens = args.windows * config.bptt * config.batch_size + 1
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "corpus"
            data_dir.mkdir()
            write_corpus(data_dir, tokens, seed=0)
            speeds: dict[int, list[float]] = {1: [], 2: []}
            for repeat in range(args.repeats):
                for processes in speeds:
                    out = Path(tmp) / f"run-{processes}-{repeat}"
                    speeds[processes].append(
                        tokens_per_s(processes, shape, data_dir, out, args.threads))
            one, two = (statistics.median(speeds[n]) for n in (1, 2))
            print(f"| {shape} (B{config.batch_size} T{config.bptt} H{config.hidden_size} "
                  f"p{config.strategy_p}) | {one:,.0f} | {two:,.0f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
