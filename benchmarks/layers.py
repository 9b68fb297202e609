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

A second table times the own loop's engines (``rnnreg.nn.loops``) side by side with
``torch.nn.LSTM(dropout=p)`` in one process. On CPU, on the per-sequence ``variational``
strategy in float32: the default engine (``RNNREG_ENGINE``, ``auto`` unless set: the C++ loop;
its name is printed) and the Python loop (``RNNREG_ENGINE=python``). On GPU, for per-sequence
recurrent masks (``variational``) and ``zoneout``, in three precision modes (``fp32``: torch's
defaults, under which cuDNN's RNN runs TF32; ``fp32-ieee``: cuDNN's RNN in IEEE float32,
``torch.backends.cudnn.rnn.fp32_precision = "ieee"``; ``bf16``: bfloat16 autocast), four rows
against cuDNN: the fused Triton step (``RNNREG_TRITON_STEP=fused``), the two-kernel Triton
step (``RNNREG_TRITON_STEP=split``),
the Python loop, and ``nn.LSTM(dropout)`` itself; each beside the time
``benchmarks/perf_model.py`` PREDICTS for it, and a first table of the precision settings in
effect in each mode (read without raising under torch's legacy or new TF32 API). Rows are
printed as they are measured, so a run cut short keeps what it measured.

    python benchmarks/layers.py                        # medium and small, CPU
    python benchmarks/layers.py --shapes small --repeats 5 --threads 2 --markdown
    python benchmarks/layers.py --device cuda --shapes small,medium,large --markdown
    python benchmarks/layers.py --device cuda --shapes medium,large --tables engines
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import perf_model
import torch
from perf_model import Shape
from torch import nn

import rnnreg
from rnnreg.nn import engine_for, loops

# The Triton step kind (a fused kernel per step, or a cuBLAS product and an elementwise kernel).
STEP_VARIABLE = "RNNREG_TRITON_STEP"


# Zaremba et al. (2014), section 4.1: the small, medium and large Penn Treebank models, as the
# performance model has them; "tiny" only exercises the plumbing (benchmarks/device_check.py
# --quick), its times mean nothing.
SHAPES = {**perf_model.SHAPES, "tiny": Shape(batch=4, steps=5, hidden=16, layers=2)}


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
              engine: str | None = None, dtype: torch.dtype = torch.float32,
              env: dict[str, str] | None = None) -> Callable[[], float]:
    """A closure running one forward+backward iteration and returning its wall time; with
    ``engine`` the own loop runs that ``RNNREG_ENGINE`` setting (``env``: more variables for
    the call), with a ``dtype`` other than float32 the forward runs under autocast to it."""
    x = torch.randn(shape.steps, shape.batch, shape.hidden, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    settings = {**({} if engine is None else {loops.VARIABLE: engine}), **(env or {})}

    def step() -> float:
        model.zero_grad(set_to_none=True)
        x.grad = None
        sync()
        with _environment(settings):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out, _ = model(x)
            out.float().sum().backward()
            sync()
            return time.perf_counter() - start

    return step


@contextlib.contextmanager
def _environment(settings: dict[str, str]):
    """The environment variables ``settings`` for the block, the previous values after it."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _engine_setting(engine: str | None):
    """``RNNREG_ENGINE=engine`` for the block (unchanged for None)."""
    return _environment({} if engine is None else {loops.VARIABLE: engine})


def _read(get: Callable[[], object]) -> str:
    """A torch flag as text; torch's legacy TF32 getters raise once the new API set a flag."""
    try:
        return str(get())
    except (RuntimeError, AttributeError) as error:
        return "n/a (legacy getter refused)" if isinstance(error, RuntimeError) else "n/a"


def precision_settings() -> dict[str, str]:
    """The float32 precision settings in effect, under torch's new API
    (``fp32_precision``) and its legacy flags (``allow_tf32``), none of them raising."""
    backends = torch.backends
    return {
        "cuda.matmul.fp32_precision": _read(lambda: backends.cuda.matmul.fp32_precision),
        "cudnn.rnn.fp32_precision": _read(lambda: backends.cudnn.rnn.fp32_precision),
        "cuda.matmul.allow_tf32": _read(lambda: backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": _read(lambda: backends.cudnn.allow_tf32),
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
    }


PRECISIONS = {"fp32": torch.float32, "fp32-ieee": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def precision_mode(mode: str):
    """``fp32``: the settings as they are (torch's defaults: cuDNN's RNN in TF32);
    ``fp32-ieee``: cuDNN's RNN in IEEE float32 through torch's new API where it has one (the
    legacy ``cudnn.allow_tf32`` otherwise); ``bf16``: the settings as they are (the caller
    autocasts). The previous setting comes back after the block."""
    if mode != "fp32-ieee":
        yield
        return
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        saved = rnn.fp32_precision
        rnn.fp32_precision = "ieee"
        try:
            yield
        finally:
            rnn.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


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
    default = os.environ.get(loops.VARIABLE, "auto")  # the check's CPU rehearsal: python
    times = measure({
        "fused": make_step(fused, shape, device, dtype=dtype),
        "auto": make_step(candidate, shape, device, engine=default, dtype=dtype),
        "python": make_step(candidate, shape, device, engine="python", dtype=dtype),
    }, warmup, repeats)
    with _engine_setting(default):
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


# The GPU table's rows besides cuDNN: (perf_model's engine, label, environment of the call).
GPU_ROWS = (
    ("fused", "fused Triton step", {loops.VARIABLE: "triton", STEP_VARIABLE: "fused"}),
    ("split", "two-kernel Triton step", {loops.VARIABLE: "triton", STEP_VARIABLE: "split"}),
    ("python", "Python loop", {loops.VARIABLE: "python"}),
)
GPU_STRATEGIES = ("variational", "zoneout")  # per-sequence recurrent masks; zoneout
GPU_HEADERS = ("shape", "strategy", "precision", "row", "engine", "ms/iter",
               "vs nn.LSTM(dropout)", "vs Python loop", "PREDICTED ms/iter",
               "measured / predicted")


def run_gpu_engines(name: str, shape: Shape, p: float, device: torch.device, warmup: int,
                    repeats: int, strategy: str, mode: str,
                    model: perf_model.Device) -> list[dict[str, object]]:
    """cuDNN, the fused and the two-kernel Triton step and the Python loop on ``strategy``
    in precision ``mode``, interleaved; a row that cannot run says why instead of a time."""
    dtype = PRECISIONS[mode]
    h, n = shape.hidden, shape.layers
    torch.manual_seed(0)
    candidate = rnnreg.LSTM(h, h, n, **rnnreg.strategy(strategy, p)).to(device)
    baseline = nn.LSTM(h, h, n, dropout=p).to(device)
    steps = {"cudnn": make_step(baseline, shape, device, dtype=dtype)}
    rows = [{"key": "cudnn", "row": "nn.LSTM(dropout)", "engine": "cuDNN"}]
    with precision_mode(mode):
        for key, label, env in GPU_ROWS:
            row = {"key": key, "row": label, "engine": ""}
            rows.append(row)
            step = make_step(candidate, shape, device, dtype=dtype, env=env)
            try:
                step()  # compiles the kernels, and finds a row that cannot run
                with _environment(env):
                    row["engine"] = engine_for(candidate)
            except Exception as error:  # reported in its row; the other rows go on
                row["status"] = f"failed: {type(error).__name__}: {error}"[:160]
                continue
            steps[key] = step
        times = measure(steps, warmup, repeats)
    for row in rows:
        key = row["key"]
        row.update(shape=name, strategy=strategy, precision=mode)
        predicted = None
        if name in perf_model.SHAPES:
            predicted = perf_model.iteration_ms(key, perf_model.SHAPES[name], mode,
                                                zoneout=strategy == "zoneout", device=model)
        row["predicted"] = predicted
        if key not in times:
            continue
        row["ms"] = 1e3 * statistics.median(times[key])
        row["vs_cudnn"] = median_ratio(times["cudnn"], times[key])
        if "python" in times:
            row["vs_python"] = median_ratio(times["python"], times[key])
    print(f"  {name:<7} {strategy:<12} {mode:<10} engines done", file=sys.stderr, flush=True)
    return rows


def gpu_row_cells(row: dict[str, object]) -> tuple[str, ...]:
    def ratio(key: str) -> str:
        return f"{row[key]:.2f}x" if key in row else "-"

    predicted = row.get("predicted")
    measured = row.get("ms")
    status = str(row.get("status", "-")).replace("|", "/").replace("\n", " ")
    return (str(row["shape"]), str(row["strategy"]), str(row["precision"]), str(row["row"]),
            str(row["engine"]) or "-", status if measured is None else f"{measured:.2f}",
            ratio("vs_cudnn"), ratio("vs_python"),
            "-" if predicted is None else f"{predicted:.2f}",
            "-" if predicted is None or measured is None else f"{measured / predicted:.2f}")


def print_precisions(modes: list[str]) -> None:
    """The precision settings in effect in each mode, read inside it (none of them raising)."""
    names = list(precision_settings())
    print("\n| precision | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for mode in modes:
        with precision_mode(mode):
            settings = precision_settings()
        autocast = " (bfloat16 autocast)" if mode == "bf16" else ""
        print(f"| {mode}{autocast} | " + " | ".join(settings[n] for n in names) + " |")


def run_gpu_table(shapes: list[str], p: float, device: torch.device, warmup: int,
                  repeats: int, modes: list[str]) -> None:
    """The GPU engines table, a Markdown row printed (and flushed) as each is measured."""
    name = torch.cuda.get_device_name(device)
    model = perf_model.H200 if "H200" in name else perf_model.H100
    print_precisions(modes)
    print(f"\n*Own loop engines against nn.LSTM(dropout) (cuDNN), forward+backward, p={p}; "
          f"PREDICTED: benchmarks/perf_model.py for an {model.name} (a model, not a "
          "measurement); measured / predicted above 1: slower than the model says.*\n")
    print("| " + " | ".join(GPU_HEADERS) + " |")
    print("|" + "|".join(["---"] * 5 + ["---:"] * 5) + "|", flush=True)
    for shape_name in shapes:
        for mode in modes:
            for strategy in GPU_STRATEGIES:
                for row in run_gpu_engines(shape_name, SHAPES[shape_name], p, device, warmup,
                                           repeats, strategy, mode, model):
                    print("| " + " | ".join(gpu_row_cells(row)) + " |", flush=True)


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
    parser.add_argument("--tables", default="strategies,engines",
                        help="which tables, comma-separated: strategies (every strategy "
                             "against plain PyTorch), engines (the own loop's engines) "
                             "(default: %(default)s)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="the GPU engines table's precision modes (default: %(default)s)")
    args = parser.parse_args(argv)
    args.tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    if not args.tables or args.tables - {"strategies", "engines"}:
        parser.error("--tables: strategies, engines or both")
    args.precisions = [m.strip() for m in args.precisions.split(",") if m.strip()]
    if not args.precisions or set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
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
        # products) does not by default: the settings belong next to every ratio.
        name = (f"{torch.cuda.get_device_name(device)} ("
                + ", ".join(f"{k}={v}" for k, v in precision_settings().items()) + ")")
    header = (f"rnnreg {rnnreg.__version__}, torch {torch.__version__}, device {name}, "
              f"threads {torch.get_num_threads()}, p={args.p}, "
              f"{args.repeats} interleaved rounds (warm-up {args.warmup}), forward+backward; "
              "ratios are medians over rounds of baseline time / rnnreg time (above 1: rnnreg "
              "is faster)")
    print(f"*{header}*\n" if args.markdown else header)
    if "strategies" in args.tables:
        rows = []
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            if not args.markdown:
                print(f"# {shape_name}: batch {shape.batch}, {shape.steps} steps, "
                      f"{shape.hidden} units, {shape.layers} layers", file=sys.stderr)
            rows += run_shape(shape_name, shape, args.p, device, args.warmup, args.repeats)
        print_table(rows, args.markdown)
    if "engines" not in args.tables:
        return
    if device.type == "cuda":
        run_gpu_table(args.shapes, args.p, device, args.warmup, args.repeats, args.precisions)
        return
    print_engines([run_engines(shape_name, SHAPES[shape_name], args.p, device, args.warmup,
                               args.repeats, torch.float32)
                   for shape_name in args.shapes], args.markdown)


if __name__ == "__main__":
    main()
