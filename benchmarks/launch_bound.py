"""Is the own recurrence launch-bound? Kernels per step and device busy time against cuDNN.

rnnreg's own recurrence (recurrent dropout, weight drop) runs a Python loop over time on GPUs:
one recurrent product and a few elementwise kernels per step and direction, forward and
backward, each launched separately. cuDNN runs the whole layer in a handful of launches. When
each launch does only microseconds of work, the GPU idles between launches and the loop is
bound by launch overhead, not by arithmetic; the remedies are fewer kernels per step or a CUDA
graph over the time loop. This script measures the symptom, side by side in one process:

- ``ms/iter``: forward+backward wall time (median, synchronized), as benchmarks/layers.py;
- ``us/step``: that time per time step and layer (what one step of the loop costs);
- ``ops/iter``: device operations one iteration runs (CUDA kernels, copies and memsets on a GPU;
  aten operators on CPU), read from ``torch.profiler``;
- ``busy``: the fraction of the iteration's wall time in which at least one such operation ran.
  Far below 1 with many ops per step means launch-bound.

On a GPU a third row times the same own-loop layer captured whole in CUDA graphs
(``torch.cuda.make_graphed_callables``, forward and backward replayed without per-kernel
launches): how close that comes to cuDNN bounds what removing the launch overhead can buy,
before anything in rnnreg changes. A capture that fails is reported as such
(``--no-whole-graph`` leaves that row out).

``--top N`` adds a kernel-time profile: the N device operations (CUDA kernels on a GPU, aten
operators on CPU) that took the most time in one forward+backward iteration of the own loop
(``torch.profiler``), with their calls per step and layer and time per call, to set beside the
kernels benchmarks/perf_model.py predicts. On a GPU each row of the first table also shows the
model's PREDICTED microseconds and launches per step and layer in fp32. Both tables record the
precision settings in effect.

    python benchmarks/launch_bound.py --device cuda --shapes small,medium,large
    python benchmarks/launch_bound.py --device cuda --shapes medium,large --top 12
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import perf_model
import torch
from layers import SHAPES, STEP_VARIABLE, precision_settings
from perf_model import Shape
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import rnnreg

OWN_LOOP = "rnnreg variational (own loop)"


def models(shape: Shape, p: float, device: torch.device) -> dict[str, nn.Module]:
    """The fused baseline and the own recurrence (variational: a mask inside the recurrence)."""
    torch.manual_seed(0)
    h, n = shape.hidden, shape.layers
    return {
        "nn.LSTM(dropout) (cuDNN on GPU)": nn.LSTM(h, h, n, dropout=p).to(device),
        OWN_LOOP: rnnreg.LSTM(
            h, h, n, **rnnreg.strategy("variational", p)).to(device),
    }


class OutputOnly(nn.Module):
    """The layer's output alone: what a graphed callable returns (the state is unused)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


class WithState(nn.Module):
    """Back to the ``(output, state)`` contract that :func:`iteration` expects."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), None


def graphed(model: nn.Module, shape: Shape, device: torch.device) -> nn.Module:
    """``model`` captured in CUDA graphs for its forward and backward (dropout masks included:
    the CUDA generator advances inside a captured graph)."""
    model.train()
    sample = torch.randn(shape.steps, shape.batch, shape.hidden, device=device,
                         requires_grad=True)
    return WithState(torch.cuda.make_graphed_callables(OutputOnly(model), (sample,)))


def iteration(model: nn.Module, x: torch.Tensor, sync) -> float:
    model.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    out, _ = model(x)
    out.sum().backward()
    sync()
    return time.perf_counter() - start


def busy_fraction(events, device_type) -> tuple[int, float]:
    """Count of ``device_type`` events and the share of their span covered by at least one."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == device_type)
    if not spans:
        return 0, 0.0
    covered, (start, end) = 0.0, spans[0]
    first = start
    for s, e in spans[1:]:
        if s > end:
            covered += end - start
            start, end = s, e
        else:
            end = max(end, e)
    covered += end - start
    total = max(e for _, e in spans) - first
    return len(spans), covered / total if total > 0 else 1.0


def measure(model: nn.Module, shape: Shape, device: torch.device, warmup: int,
            repeats: int) -> dict[str, float]:
    x = torch.randn(shape.steps, shape.batch, shape.hidden, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    for _ in range(warmup):
        iteration(model, x, sync)
    seconds = statistics.median(iteration(model, x, sync) for _ in range(repeats))
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        iteration(model, x, sync)
    ops, busy = busy_fraction(prof.events(), DeviceType.CUDA if cuda else DeviceType.CPU)
    if cuda and ops == 0:  # a profiler that reports kernels only alongside CPU activity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            iteration(model, x, sync)
        ops, busy = busy_fraction(prof.events(), DeviceType.CUDA)
    return {"ms": 1e3 * seconds, "us_step": 1e6 * seconds / (shape.steps * shape.layers),
            "ops": ops, "ops_step": ops / (shape.steps * shape.layers), "busy": busy}


def _device_time(event) -> float:
    """An averaged event's own device time, us (torch renamed cuda_* to device_* in 2.4)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def top_operations(model: nn.Module, shape: Shape, device: torch.device, warmup: int,
                   count: int) -> list[dict[str, object]]:
    """The ``count`` device operations with the most time in one forward+backward iteration,
    after ``warmup`` (so compiling and graph capture are over)."""
    x = torch.randn(shape.steps, shape.batch, shape.hidden, device=device, requires_grad=True)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    for _ in range(warmup):
        iteration(model, x, sync)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        iteration(model, x, sync)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    spent = (lambda e: _device_time(e)) if cuda else (lambda e: float(e.self_cpu_time_total))
    total = sum(spent(e) for e in events) or 1.0
    steps = shape.steps * shape.layers
    return [{"name": e.key, "calls": e.count, "us": spent(e), "share": spent(e) / total,
             "per_step": e.count / steps}
            for e in sorted(events, key=spent, reverse=True)[:count]]


def print_top(shape_name: str, shape: Shape, device: torch.device, warmup: int,
              count: int, p: float) -> None:
    top = top_operations(models(shape, p, device)[OWN_LOOP], shape, device, warmup, count)
    cuda = device.type == "cuda"
    what, clock = ("CUDA kernel", "device") if cuda else ("aten operator", "CPU")
    print(f"\n*{shape_name}: the {count} {what}s with the most {clock} "
          f"time in one forward+backward of the own loop ({OWN_LOOP}), torch.profiler*\n")
    print(f"| shape | {what} | calls | calls/step/layer | us | us/call | share |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for op in top:
        name = str(op["name"]).replace("|", "/")
        name = name if len(name) <= 90 else name[:87] + "..."
        print(f"| {shape_name} | `{name}` | {op['calls']} | {op['per_step']:.2f} | "
              f"{op['us']:.0f} | {op['us'] / max(op['calls'], 1):.1f} | {op['share']:.0%} |",
              flush=True)


def predicted(shape_name: str, label: str, device_name: str) -> tuple[str, str]:
    """benchmarks/perf_model.py's PREDICTION for a row on a GPU, in fp32: us per step and
    layer of the whole iteration, and launches per step and layer; the own loop's as
    "two-kernel step / fused step" (whichever RNNREG_TRITON_STEP chose ran)."""
    if device_name == "cpu" or shape_name not in perf_model.SHAPES or "whole layer" in label:
        return "-", "-"
    shape = perf_model.SHAPES[shape_name]
    model = perf_model.H200 if "H200" in device_name else perf_model.H100
    engines = ("cudnn",) if label != OWN_LOOP else ("split", "fused")
    us = [1e3 * perf_model.iteration_ms(e, shape, "fp32", device=model)
          / (shape.steps * shape.layers) for e in engines]
    launches = [perf_model.step(e, shape, "fp32", device=model).launches for e in engines]
    return " / ".join(f"{u:.0f}" for u in us), " / ".join(map(str, launches))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,medium,large",
                        help=f"comma-separated, from {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--top", type=int, default=0,
                        help="also profile the own loop: its N costliest device operations")
    parser.add_argument("--no-whole-graph", action="store_true",
                        help="leave out the row of the whole layer captured in CUDA graphs")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be >= 0")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or any(s not in SHAPES for s in shapes):
        parser.error(f"--shapes: choose from {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    what = "CUDA kernels, copies, memsets" if device.type == "cuda" else "aten operators"
    settings = ", ".join(f"{k}={v}" for k, v in precision_settings().items())
    settings += f", {STEP_VARIABLE}={os.environ.get(STEP_VARIABLE, '(unset: the default step)')}"
    print(f"*torch {torch.__version__}, {name}; forward+backward, median of {args.repeats} "
          f"after {args.warmup} warm-up; ops = {what} per iteration (torch.profiler); busy = "
          f"share of the iteration's span in which one of them ran; {settings}; PREDICTED: "
          "benchmarks/perf_model.py in fp32, a model, not a measurement (own loop: two-kernel "
          "step / fused step)*\n")
    print("| shape | model | ms/iter | us/step/layer | ops/iter | ops/step/layer | busy | "
          "PREDICTED us/step/layer | PREDICTED launches/step/layer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        candidates = models(shape, args.p, device)
        if device.type == "cuda" and not args.no_whole_graph:
            label = "rnnreg variational (own loop, whole layer in CUDA graphs)"
            try:
                candidates[label] = graphed(candidates[OWN_LOOP],
                                            shape, device)
            except Exception as error:  # an experiment: report it, keep the other rows
                print(f"| {shape_name} | {label} | capture failed: {type(error).__name__} "
                      "| | | | | | |", flush=True)
                print(f"  capture failed: {error!r}", file=sys.stderr, flush=True)
        for label, model in candidates.items():
            try:
                r = measure(model, shape, device, args.warmup, args.repeats)
            except Exception as error:
                if "CUDA graphs" not in label:
                    raise
                print(f"| {shape_name} | {label} | replay failed: {type(error).__name__} "
                      "| | | | | | |", flush=True)
                print(f"  replay failed: {error!r}", file=sys.stderr, flush=True)
                continue
            us, launches = predicted(shape_name, label, name)
            print(f"| {shape_name} | {label} | {r['ms']:.2f} | {r['us_step']:.0f} | "
                  f"{r['ops']:.0f} | {r['ops_step']:.1f} | {r['busy']:.0%} | {us} | "
                  f"{launches} |", flush=True)
            print(f"  {shape_name} {label} done", file=sys.stderr, flush=True)
    for shape_name in shapes if args.top else ():
        print_top(shape_name, SHAPES[shape_name], device, args.warmup, args.top, args.p)


if __name__ == "__main__":
    main()
