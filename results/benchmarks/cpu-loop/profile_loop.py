"""Where a forward+backward of rnnreg.LSTM's own loop spends its time (torch.profiler).

The C++ loop calls ATen through the dispatcher, so the profiler sees each per-step product and
elementwise kernel inside ``rnnreg::lstm_forward`` / ``rnnreg::lstm_backward``; the ops' self
time is then the hand-written passes plus the per-step bookkeeping. Run from the repository root:

    OMP_NUM_THREADS=2 python results/benchmarks/cpu-loop/profile_loop.py --shape small
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import rnnreg

SHAPES = {"small": (20, 20, 200), "medium": (20, 35, 650)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=SHAPES)
    parser.add_argument("--strategy", default="variational")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    batch, steps, hidden = SHAPES[args.shape]
    torch.manual_seed(0)
    model = rnnreg.LSTM(hidden, hidden, 2, **rnnreg.strategy(args.strategy, 0.5))
    fused = nn.LSTM(hidden, hidden, 2, dropout=0.5)
    x = torch.randn(steps, batch, hidden, requires_grad=True)

    def run(m):
        out, _ = m(x)
        out.sum().backward()

    for m in (model, fused):
        for _ in range(5):
            run(m)
    for name, m in (("nn.LSTM(dropout)", fused), (f"rnnreg {args.strategy}", model)):
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            run(m)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"{name}: median {1e3 * times[len(times) // 2]:.2f} ms/iter "
              f"(min {1e3 * times[0]:.2f})")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.iters):
            run(model)
    print(f"\nrnnreg {args.strategy}, {args.shape}, {args.iters} iterations, self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
