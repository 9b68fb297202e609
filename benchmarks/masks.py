"""Fresh-mask dropout, forward+backward: ``rnnreg.nn.functional.dropout`` against ``F.dropout``.

rnnreg samples CPU masks by comparing uniforms with p instead of torch's Bernoulli sampler;
this measures what that buys on the activations of the paper's shapes (steps x batch x hidden)
and checks that the kept fraction matches. Both run interleaved in one process; the ratio is
torch time / rnnreg time, so above 1 means rnnreg is faster.

    python benchmarks/masks.py
    python benchmarks/masks.py --threads 2 --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rnnreg import functional as RF

SHAPES = {"medium": (35, 20, 650), "small": (20, 20, 200)}


def time_once(fn, x: torch.Tensor, p: float) -> float:
    x.grad = None
    start = time.perf_counter()
    fn(x, p).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = {"F.dropout": lambda x, p: F.dropout(x, p, True), "rnnreg": RF.dropout}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, p={args.p}")
    print("| shape | elements | F.dropout ms | rnnreg ms | ratio | kept (rnnreg) |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        x = torch.randn(*shape, requires_grad=True)
        times = {k: [] for k in candidates}
        for i in range(args.repeats + 10):
            for label, fn in candidates.items():
                elapsed = time_once(fn, x, args.p)
                if i >= 10:  # warm-up
                    times[label].append(elapsed)
        base, ours = (statistics.median(times[k]) * 1e3 for k in candidates)
        kept = float((RF.dropout(torch.ones(*shape), args.p) != 0).float().mean())
        print(f"| {name} {shape} | {x.numel():,} | {base:.3f} | {ours:.3f} | "
              f"{base / ours:.2f} | {kept:.4f} |")


if __name__ == "__main__":
    main()
