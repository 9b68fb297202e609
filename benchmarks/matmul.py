"""Where oneDNN's matrix products beat torch.mm on this CPU, for the products of one layer.

rnnreg's own recurrence (recurrent dropout, weight drop) runs six kinds of product per layer and
window; this times each with plain PyTorch (``torch.addmm``/``torch.mm``, MKL on x86 CPUs) and
with oneDNN's linear (what torch's fused CPU LSTM uses), side by side in one process, for a
range of hidden sizes at batch 20. A ratio above 1 means oneDNN is faster. The per-step forward
product includes packing ``W_hh`` once per window of ``--steps`` steps, as rnnreg does.
``rnnreg.nn.products.ONEDNN_MIN_HIDDEN`` is set from this table.

    python benchmarks/matmul.py --markdown
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

LINEAR = torch.ops.mkldnn._linear_pointwise
PACK = torch.ops.mkldnn._reorder_linear_weight


def per_call(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call over ``repeats`` timed calls, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def products(hidden: int, batch: int, steps: int):
    """(name, torch version, oneDNN version) of each product of one LSTM layer and window."""
    gates = 4 * hidden
    rows = batch * steps
    w = torch.randn(gates, hidden)
    h, add = torch.randn(batch, hidden), torch.randn(batch, gates)
    d_step = torch.randn(batch, gates)
    x, d_all = torch.randn(rows, hidden), torch.randn(rows, gates)

    def step_forward_onednn():
        packed = PACK(w, batch)
        for _ in range(steps):
            LINEAR.binary(h, add, packed, None, "add")

    def step_forward_torch():
        for _ in range(steps):
            torch.addmm(add, h, w.t())

    return [
        ("step forward (x W_hh^T, T steps + packing)", step_forward_torch, step_forward_onednn),
        ("step backward (d W_hh)", lambda: torch.mm(d_step, w),
         lambda: LINEAR(d_step, w.t(), None, "none", [], "")),
        ("projection (x W_ih^T, T*B rows)", lambda: torch.mm(x, w.t()),
         lambda: LINEAR(x, PACK(w, rows), None, "none", [], "")),
        ("projection backward (dP W_ih)", lambda: torch.mm(d_all, w),
         lambda: LINEAR(d_all, w.t(), None, "none", [], "")),
        ("weight gradient (dP^T x)", lambda: x.t().mm(d_all).t(),
         lambda: LINEAR(d_all.t(), x.t(), None, "none", [], "")),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+",
                        default=[200, 256, 300, 400, 650, 1000, 1500])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.steps} steps per window, median of {args.repeats} calls each; "
          "ratio = torch time / oneDNN time (above 1: oneDNN faster)\n")
    kinds = [name for name, _, _ in products(8, 2, 2)]
    header = ["product"] + [f"H={h}" for h in args.hidden]
    table = {name: [] for name in kinds}
    for hidden in args.hidden:
        for name, plain, onednn in products(hidden, args.batch, args.steps):
            plain_s, onednn_s = [], []
            for _ in range(3):  # alternate, so drifts in machine load hit both alike
                plain_s.append(per_call(plain, args.repeats))
                onednn_s.append(per_call(onednn, args.repeats))
            table[name].append(min(plain_s) / min(onednn_s))
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * len(args.hidden))
        for name, ratios in table.items():
            print(f"| {name} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    else:
        width = max(len(n) for n in kinds)
        print(f"{'product':<{width}}  " + "  ".join(f"{h:>7}" for h in header[1:]))
        for name, ratios in table.items():
            print(f"{name:<{width}}  " + "  ".join(f"{r:>6.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
