"""Forward+backward throughput of rnnreg.LSTM per dropout strategy against plain PyTorch.

For every strategy in ``rnnreg.STRATEGIES`` (rate p, via ``rnnreg.strategy``) an ``rnnreg.LSTM``
is timed side by side with two plain-PyTorch baselines in the same process, interleaved
(baseline, baseline, candidate, baseline, baseline, candidate, ...) after a warm-up, so that
drifts in machine load hit all three alike:

1. ``torch.nn.LSTM(dropout=p)`` alone: the same between-layer dropout;
2. the hand-rolled Zaremba et al. (2014) network: ``nn.Dropout`` on the input,
   ``nn.LSTM(dropout=p)``, ``nn.Dropout`` on the output.

One iteration is a forward and a backward pass over a ``(steps, batch, hidden)`` input (the
input size equals the hidden size, as for a language model whose embedding matches the LSTM);
tokens = steps * batch. The engine column names where the strategy's recurrence ran
(``rnnreg.nn.engine_for``): weight drop (``awd``) and the batch-shared recurrent mask
(``variational_batch``) run on torch's fused kernel, per-sequence recurrent masks on rnnreg's
own loop. Reported throughput uses the median per-iteration time; a ratio is the
median over rounds of the per-round time ratio (robust to the machine slowing down), and a ratio
above 1 means rnnreg is faster than that baseline.

A second table times the own loop's engines (``rnnreg.nn.loops``) on the per-sequence
``variational`` strategy, side by side with ``torch.nn.LSTM(dropout=p)`` (cuDNN on GPU) in one
process: the device's default engine (``RNNREG_ENGINE=auto``: the Triton loop with CUDA graphs
on GPU, the C++ loop on CPU; its name is printed) and the Python loop (``RNNREG_ENGINE=python``),
in float32 and, on GPU, under bfloat16 autocast. For the paper's medium and large shapes:

    python benchmarks/layers.py                        # medium and small, CPU
    python benchmarks/layers.py --shapes small --repeats 5 --threads 2 --markdown
    python benchmarks/layers.py --device cuda --shapes small,medium,large --markdown
    python benchmarks/layers.py --device cuda --shapes medium,large
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import rnnreg
from rnnreg.nn import engine_for, loops


@dataclass(frozen=True)
class Shape:
    batch: int
    steps: int
    hidden: int
    layers: int


# Zaremba et al. (2014), section 4.1: the small, medium and large Penn Treebank models; "tiny"
# only exercises the plumbing (benchmarks/device_check.py --quick), its times mean nothing.
SHAPES = {
    "medium": Shape(batch=20, steps=35, hidden=650, layers=2),
    "small": Shape(batch=20, steps=20, hidden=200, layers=2),
    "large": Shape(batch=20, steps=35, hidden=1500, layers=2),
    "tiny": Shape(batch=4, steps=5, hidden=16, layers=2),
}


class HandRolledZaremba(nn.Module):
    """Zaremba's placements written with plain torch.nn: dropout on input, between, output."""

    def __init__(self, size: int, hidden: int, layers: int, p: float) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(p)
        self.lstm = nn.LSTM(size, hidden, layers, dropout=p)
        self.drop_out = nn.Dropout(p)

    def forward(self, x):
        out, state = self.lstm(self.drop_in(x))
        return self.drop_out(out), state


def make_step(model: nn.Module, shape: Shape, device: torch.device, *,
              engine: str | None = None,
              dtype: torch.dtype = torch.float32) -> Callable[[], float]:
    """A closure running one forward+backward iteration and returning its wall time; with
    ``engine`` the own loop runs that ``RNNREG_ENGINE`` setting, with a ``dtype`` other than
    float32 the forward runs under autocast to it."""
    x = torch.randn(shape.steps, shape.batch, shape.hidden, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()

    def step() -> float:
        model.zero_grad(set_to_none=True)
        x.grad = None
        sync()
        with _engine_setting(engine):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out, _ = model(x)
            out.float().sum().backward()
            sync()
            return time.perf_counter() - start

    return step


@contextlib.contextmanager
def _engine_setting(engine: str | None):
    """``RNNREG_ENGINE=engine`` for the block (unchanged for None)."""
    saved = os.environ.get(loops.VARIABLE)
    if engine is not None:
        os.environ[loops.VARIABLE] = engine
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(loops.VARIABLE, None)
        else:
            os.environ[loops.VARIABLE] = saved


def measure(steps: dict[str, Callable[[], float]], warmup: int,
            repeats: int) -> dict[str, list[float]]:
    """Interleave the closures round-robin; return each one's iteration times, by round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    return times


def median_ratio(baseline: list[float], candidate: list[float]) -> float:
    """Median over rounds of baseline / candidate time: a slow spell of the machine hits both
    members of a round alike, so per-round ratios drift far less than the times themselves."""
    return statistics.median(b / c for b, c in zip(baseline, candidate))


def run_shape(name: str, shape: Shape, p: float, device: torch.device, warmup: int,
              repeats: int) -> list[dict[str, object]]:
    tokens = shape.steps * shape.batch
    rows = []
    for strategy in rnnreg.STRATEGIES:
        torch.manual_seed(0)
        candidate = rnnreg.LSTM(shape.hidden, shape.hidden, shape.layers,
                                **rnnreg.strategy(strategy, p)).to(device)
        same_between = nn.LSTM(shape.hidden, shape.hidden, shape.layers, dropout=p).to(device)
        zaremba = HandRolledZaremba(shape.hidden, shape.hidden, shape.layers, p).to(device)
        times = measure({
            "same_between": make_step(same_between, shape, device),
            "zaremba": make_step(zaremba, shape, device),
            "candidate": make_step(candidate, shape, device),
        }, warmup, repeats)
        ours = statistics.median(times["candidate"])
        rows.append({
            "shape": name,
            "strategy": strategy,
            "engine": engine_for(candidate),
            "tokens_per_s": tokens / ours,
            "ms": 1e3 * ours,
            "vs_same_between": median_ratio(times["same_between"], times["candidate"]),
            "vs_zaremba": median_ratio(times["zaremba"], times["candidate"]),
        })
        print(f"  {name:<7} {strategy:<15} done", file=sys.stderr, flush=True)
    return rows


def run_engines(name: str, shape: Shape, p: float, device: torch.device, warmup: int,
                repeats: int, dtype: torch.dtype) -> dict[str, object]:
    """The own loop's default engine and the Python loop against ``nn.LSTM(dropout=p)``, on
    the per-sequence ``variational`` strategy (which runs the own loop), interleaved."""
    torch.manual_seed(0)
    candidate = rnnreg.LSTM(shape.hidden, shape.hidden, shape.layers,
                            **rnnreg.strategy("variational", p)).to(device)
    fused = nn.LSTM(shape.hidden, shape.hidden, shape.layers, dropout=p).to(device)
    times = measure({
        "fused": make_step(fused, shape, device, dtype=dtype),
        "auto": make_step(candidate, shape, device, engine="auto", dtype=dtype),
        "python": make_step(candidate, shape, device, engine="python", dtype=dtype),
    }, warmup, repeats)
    with _engine_setting("auto"):
        engine = engine_for(candidate)
    print(f"  {name:<7} {str(dtype):<15} engines done", file=sys.stderr, flush=True)
    return {"shape": name, "dtype": str(dtype).removeprefix("torch."), "engine": engine,
            "ms": 1e3 * statistics.median(times["auto"]),
            "auto": median_ratio(times["fused"], times["auto"]),
            "python": median_ratio(times["fused"], times["python"])}


ENGINE_HEADERS = ("shape", "dtype", "default loop engine", "ms/iter",
                  "default engine vs nn.LSTM(dropout)", "Python loop vs nn.LSTM(dropout)")


def print_engines(rows: list[dict[str, object]], markdown: bool) -> None:
    cells = [(str(r["shape"]), str(r["dtype"]), str(r["engine"]), f"{r['ms']:.1f}",
              f"{r['auto']:.2f}x", f"{r['python']:.2f}x") for r in rows]
    if markdown:
        print("\n| " + " | ".join(ENGINE_HEADERS) + " |")
        print("|" + "|".join(["---", "---", "---", "---:", "---:", "---:"]) + "|")
        for line in cells:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(ENGINE_HEADERS)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(ENGINE_HEADERS, widths)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths))))


HEADERS = ("shape", "strategy", "engine", "tokens/s", "ms/iter", "vs nn.LSTM(dropout)",
           "vs hand-rolled Zaremba")


def format_row(row: dict[str, object]) -> tuple[str, ...]:
    return (str(row["shape"]), str(row["strategy"]), str(row["engine"]),
            f"{row['tokens_per_s']:,.0f}",
            f"{row['ms']:.1f}", f"{row['vs_same_between']:.2f}x", f"{row['vs_zaremba']:.2f}x")


def print_table(rows: list[dict[str, object]], markdown: bool) -> None:
    cells = [format_row(row) for row in rows]
    if markdown:
        print("| " + " | ".join(HEADERS) + " |")
        print("|" + "|".join(["---", "---", "---", "---:", "---:", "---:", "---:"]) + "|")
        for line in cells:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)))
    print("  ".join("-" * w for w in widths))
    for line in cells:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(line, widths))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="medium,small",
                        help=f"comma-separated, from {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed iterations per model (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed iterations per model first (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--p", type=float, default=0.5, help="dropout rate (default: 0.5)")
    parser.add_argument("--markdown", action="store_true",
                        help="print a Markdown table for the README")
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = "cpu"
    if device.type == "cuda":
        # cuDNN may run float32 RNNs on TF32 tensor cores while torch.mm (the own recurrence's
        # products) does not by default: the flags belong next to every ratio.
        name = (f"{torch.cuda.get_device_name(device)} (cudnn.allow_tf32="
                f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32="
                f"{torch.backends.cuda.matmul.allow_tf32})")
    header = (f"rnnreg {rnnreg.__version__}, torch {torch.__version__}, device {name}, "
              f"threads {torch.get_num_threads()}, p={args.p}, "
              f"{args.repeats} interleaved rounds (warm-up {args.warmup}), forward+backward; "
              "ratios are medians over rounds of baseline time / rnnreg time (above 1: rnnreg "
              "is faster)")
    print(f"*{header}*\n" if args.markdown else header)
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        if not args.markdown:
            print(f"# {shape_name}: batch {shape.batch}, {shape.steps} steps, "
                  f"{shape.hidden} units, {shape.layers} layers", file=sys.stderr)
        rows += run_shape(shape_name, shape, args.p, device, args.warmup, args.repeats)
    print_table(rows, args.markdown)
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    print_engines([run_engines(shape_name, SHAPES[shape_name], args.p, device, args.warmup,
                               args.repeats, dtype)
                   for shape_name in args.shapes for dtype in dtypes], args.markdown)


if __name__ == "__main__":
    main()
