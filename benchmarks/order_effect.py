"""The small-shape layer ratio before and after the process has made large allocations.

``benchmarks/layers.py`` times the small shape after the medium one in the same process, and
the small shape's ratio of rnnreg's variational LSTM to ``torch.nn.LSTM(dropout)`` reads lower
there than in a fresh process. This times the two side by side, interleaved, at the paper's
small shape (batch 20, 20 steps, 200 units, 2 layers, p=0.5): first in the fresh process, then
after a few forward+backward passes of a medium-size ``nn.LSTM`` (35 x 20 x 650), the kind of
allocations a training process makes anyway. Ratios are medians of per-round time ratios
(above 1: rnnreg is faster).

    python benchmarks/order_effect.py --rounds 80
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import rnnreg


def one_pass(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out, _ = model(x)
    out.sum().backward()
    return time.perf_counter() - start


def measure(baseline: nn.Module, candidate: nn.Module, x: torch.Tensor,
            rounds: int) -> tuple[float, float, float]:
    """Median baseline ms, median candidate ms, median per-round baseline/candidate ratio."""
    for _ in range(3):
        one_pass(baseline, x)
        one_pass(candidate, x)
    base, cand = [], []
    for _ in range(rounds):
        base.append(one_pass(baseline, x))
        cand.append(one_pass(candidate, x))
    ratio = statistics.median(b / c for b, c in zip(base, cand))
    return 1e3 * statistics.median(base), 1e3 * statistics.median(cand), ratio


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    baseline = nn.LSTM(200, 200, 2, dropout=0.5)
    candidate = rnnreg.LSTM(200, 200, 2, **rnnreg.strategy("variational", 0.5))
    x = torch.randn(20, 20, 200, requires_grad=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, small shape "
          f"(B20 T20 H200, 2 layers), variational p=0.5, {args.rounds} interleaved rounds")
    print("| process state | nn.LSTM(dropout) ms | rnnreg variational ms | ratio |")
    print("|---|---:|---:|---:|")
    rows = [("fresh", measure(baseline, candidate, x, args.rounds))]
    big, xb = nn.LSTM(650, 650, 2), torch.randn(35, 20, 650)
    for _ in range(3):
        big(xb)[0].sum().backward()
    rows.append(("after a medium-size nn.LSTM", measure(baseline, candidate, x, args.rounds)))
    for name, (base_ms, cand_ms, ratio) in rows:
        print(f"| {name} | {base_ms:.2f} | {cand_ms:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
