"""Where a forward+backward of rnnreg.LSTM's own C++ loop spends its time, split per step.

The C++ LSTM loop names its per-step work for torch.profiler (``rnnreg::forward_step_product``,
``rnnreg::forward_step_pointwise``, ``rnnreg::backward_step_product``,
``rnnreg::backward_step_pointwise``); what the ops ``rnnreg::lstm_forward`` /
``rnnreg::lstm_backward`` spend outside those spans (their self time) is the loops' own
bookkeeping, argument checks and the copy of W_hh the product reads. Everything else (the input
projection, the weight gradients, mask sampling, autograd) is listed by op. Self times are
summed over threads: with two threads each block of rows records its own spans. Run from the
repository root:

    OMP_NUM_THREADS=2 python results/benchmarks/cpu-loop-small/profile_split.py --shape small
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import rnnreg

SHAPES = {"small": (20, 20, 200), "medium": (20, 35, 650)}
SPANS = ("rnnreg::forward_step_product", "rnnreg::forward_step_pointwise",
         "rnnreg::backward_step_product", "rnnreg::backward_step_pointwise",
         "rnnreg::lstm_forward", "rnnreg::lstm_backward")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=SHAPES)
    parser.add_argument("--strategy", default="variational")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
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
              f"(min {1e3 * times[0]:.2f}), threads {torch.get_num_threads()}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.iters):
            run(model)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nrnnreg {args.strategy}, {args.shape}, {args.iters} iterations; self CPU time per "
          f"iteration (summed over threads), total {total / 1e3 / args.iters:.2f} ms:")
    by_name = {e.key: e for e in events}
    for name in SPANS:
        e = by_name.get(name)
        if e is not None:
            print(f"  {name:34s} {e.self_cpu_time_total / 1e3 / args.iters:7.3f} ms  "
                  f"{100 * e.self_cpu_time_total / total:5.1f}%  "
                  f"{e.count // args.iters:5d} calls/iter")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
