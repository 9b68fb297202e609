"""A performance model of one LSTM recurrence step on an H100: PREDICTIONS, not measurements.

For each engine that can run rnnreg's recurrence on a GPU, per time step and layer, forward and
backward together: the kernel launches, the bytes moved to and from device memory, the FLOPs,
and the predicted microseconds; then the predicted milliseconds of one forward+backward
iteration of a whole layer stack, the quantity ``benchmarks/layers.py --device cuda`` measures.
docs/engines.md ("Performance model") holds this module's table; the GPU check
(``benchmarks/device_check.sh``) prints each measured speed beside its prediction, so that the
first GPU run says where the model is wrong.

The engines (docs/engines.md):

- ``cudnn``: ``torch.nn.LSTM`` (cuDNN's standard algorithm): per step a recurrent GEMM and one
  cell kernel each way, launched from C++;
- ``split``: the two-kernel Triton step (``RNNREG_TRITON_STEP=split``): one cuBLAS product and
  one fused elementwise Triton kernel each way, the loop replayed as a CUDA graph;
- ``fused``: the fused Triton step (``RNNREG_TRITON_STEP=fused``): one kernel per step each way,
  the product (``tl.dot``) with the cell update in its epilogue (forward) or d_gates in its
  prologue (backward), replayed as a CUDA graph;
- ``python``: the Python loop (``RNNREG_ENGINE=python``): eager torch ops, bound by the host's
  cost per op.

The model is a roofline per kernel: ``max(FLOPs / achieved peak, bytes / achieved bandwidth,
shortest kernel)``, plus a gap between consecutive kernels, and, for engines whose kernels are
launched one by one from the host, the step is as slow as the slower of device and host. Every
byte is counted as device-memory (HBM) traffic, although W_hh (6.8 MB at the medium shape, 36 MB
at the large one, in float32) fits in an H100's 50 MB L2 cache: the recurrent products may well
run faster than predicted, which is the first thing the GPU check's measurements will tell.

Run it to print the table: ``python benchmarks/perf_model.py [--device h200]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Sources of the peak figures (dense, i.e. without the 2:4 sparsity the datasheets' headline
# tensor-core figures assume, so half of those):
# - NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5): FP32 67 TFLOPS, TF32 tensor core
#   989 TFLOPS and BF16 1,979 TFLOPS with sparsity, GPU memory bandwidth 3.35 TB/s (HBM3);
#   https://www.nvidia.com/en-us/data-center/h100/
# - NVIDIA H200 datasheet (H200 SXM): the same compute peaks, 4.8 TB/s (HBM3e);
#   https://www.nvidia.com/en-us/data-center/h200/
# - NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 50 MB L2 cache.
# - Kernel gaps: NVIDIA's "Getting Started with CUDA Graphs" (developer.nvidia.com/blog/
#   cuda-graphs/, 2019) measured a chain of ~2.9 us kernels at 3.8 us per kernel launched
#   back to back on a stream and 3.4 us per kernel replayed from a graph: about 1 us and 0.5 us
#   between kernels.
# The remaining figures are this model's ASSUMPTIONS (no datasheet gives them); the GPU check's
# kernel-time profile measures each of them.


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float                 # bytes/s, device memory
    peaks: dict[str, float]          # FLOP/s of a GEMM by compute precision
    l2_bytes: float


H100 = Device("H100 SXM (80 GB HBM3)", 3.35e12,
              {"fp32": 67e12, "tf32": 989e12 / 2, "bf16": 1979e12 / 2}, 50e6)
H200 = Device("H200 SXM (141 GB HBM3e)", 4.8e12, H100.peaks, 50e6)
DEVICES = {"h100": H100, "h200": H200}


@dataclass(frozen=True)
class Assumptions:
    """Figures no datasheet gives: each is the model's guess, to be replaced by measurement."""

    efficiency: float = 0.7          # share of peak FLOP/s and bandwidth a kernel achieves
    shortest_kernel_us: float = 2.0  # a kernel that does almost nothing, start to end
    stream_gap_us: float = 1.0       # between kernels launched one by one (blog above)
    graph_gap_us: float = 0.5        # between kernels of a replayed CUDA graph (blog above)
    eager_op_host_us: float = 8.0    # host time of one eager torch op (dispatch + launch)
    cudnn_launch_host_us: float = 3.0  # host time of one launch from cuDNN's C++ loop
    graph_replay_host_us: float = 15.0  # host time of one graph replay (no argument copies)


ASSUMED = Assumptions()


@dataclass(frozen=True)
class Shape:
    batch: int
    steps: int
    hidden: int
    layers: int


# Zaremba et al. (2014), section 4.1 (benchmarks/layers.py times these, and a tiny one).
SHAPES = {
    "small": Shape(batch=20, steps=20, hidden=200, layers=2),
    "medium": Shape(batch=20, steps=35, hidden=650, layers=2),
    "large": Shape(batch=20, steps=35, hidden=1500, layers=2),
}
ENGINES = ("cudnn", "split", "fused", "python")
ENGINE_NAMES = {"cudnn": "nn.LSTM(dropout) (cuDNN)", "split": "two-kernel Triton step",
                "fused": "fused Triton step", "python": "Python loop"}
# Precision modes of the GPU check's speed tables: the compute precision of the recurrent
# products. "fp32" is torch's default, where cuDNN's RNN runs TF32
# (torch.backends.cudnn.rnn.fp32_precision = "tf32") and the own loop's products follow the
# same setting; "fp32-ieee" sets it to "ieee"; "bf16" is bfloat16 autocast.
PRECISIONS = {"fp32": ("tf32", 4), "fp32-ieee": ("fp32", 4), "bf16": ("bf16", 2)}
# Eager torch ops per step of the Python loop (rnnreg/nn/loops/python.py, LSTM): forward mask,
# product, sigmoid, tanh, mul+addcmul, tanh, mul; backward addcmul, two muls, mul_, product,
# mask and sum of the next dL/dh. Zoneout adds two lerps forward and two ops backward.
PYTHON_OPS = {"forward": 8, "backward": 7, "zoneout": 2}


@dataclass(frozen=True)
class Kernel:
    flops: float
    bytes: float


@dataclass(frozen=True)
class Step:
    """One engine's step of one layer, forward and backward together (PREDICTED)."""

    launches: int
    bytes: float
    flops: float
    us: float


def _gemm(rows: int, inner: int, cols: int, size: int, weight_rows: int, weight_cols: int
          ) -> Kernel:
    """(rows x inner) @ (inner x cols): the weight read once, the activations in and out."""
    return Kernel(2.0 * rows * inner * cols,
                  size * (weight_rows * weight_cols + rows * inner + rows * cols))


def _elementwise(elements: int, size: int) -> Kernel:
    return Kernel(0.0, float(elements * size))


def _kernels(engine: str, shape: Shape, size: int, zoneout: bool) -> dict[str, list[Kernel]]:
    """The kernels of one step and layer, by direction. Element counts follow
    rnnreg/nn/loops/triton.py: BH is one (batch, hidden) state, 4BH the four gates."""
    b, h = shape.batch, shape.hidden
    bh = b * h
    zone = 2 * bh if zoneout else 0
    forward_product = _gemm(b, h, 4 * h, size, 4 * h, h)   # rec = h_in @ W_hh^T
    backward_product = _gemm(b, 4 * h, h, size, 4 * h, h)  # d_hin = d_gates @ W_hh
    # Forward cell: reads rec, p (4BH each), c, h, the next mask; writes the 4 gates, c,
    # tanh c, h and the next masked state. Backward cell: reads dh, d_out, d_hin, the mask,
    # dc, the 4 gates, tanh c, c; writes dh, d_gates (4BH), dc.
    forward_cell = _elementwise(8 * bh + 3 * bh + 4 * bh + 4 * bh + zone, size)
    backward_cell = _elementwise(5 * bh + 4 * bh + 2 * bh + 6 * bh + zone, size)
    if engine == "fused":  # rec and d_gates never leave the kernel
        return {"forward": [Kernel(forward_product.flops, forward_product.bytes
                                   + forward_cell.bytes - size * 8 * bh)],
                "backward": [Kernel(backward_product.flops, backward_product.bytes
                                    + backward_cell.bytes - size * 8 * bh)]}
    if engine == "python":  # one kernel per eager op: the cell spread over several
        ops = {d: PYTHON_OPS[d] + (PYTHON_OPS["zoneout"] if zoneout else 0)
               for d in ("forward", "backward")}
        cells = {"forward": forward_cell, "backward": backward_cell}
        products = {"forward": forward_product, "backward": backward_product}
        return {d: [products[d]] + [Kernel(0.0, cells[d].bytes / (ops[d] - 1))] * (ops[d] - 1)
                for d in ops}
    return {"forward": [forward_product, forward_cell],
            "backward": [backward_cell, backward_product]}


def _kernel_us(kernel: Kernel, peak: float, device: Device, a: Assumptions) -> float:
    return max(1e6 * kernel.flops / (peak * a.efficiency),
               1e6 * kernel.bytes / (device.bandwidth * a.efficiency), a.shortest_kernel_us)


def step(engine: str, shape: Shape, precision: str, *, zoneout: bool = False,
         device: Device = H100, a: Assumptions = ASSUMED) -> Step:
    """One step of one layer, forward and backward (PREDICTED)."""
    compute, size = PRECISIONS[precision]
    kernels = [k for ks in _kernels(engine, shape, size, zoneout).values() for k in ks]
    gap = a.graph_gap_us if engine in ("split", "fused") else a.stream_gap_us
    device_us = sum(_kernel_us(k, device.peaks[compute], device, a) for k in kernels)
    device_us += gap * len(kernels)
    host_us = {"cudnn": a.cudnn_launch_host_us * len(kernels),
               "python": a.eager_op_host_us * len(kernels)}.get(engine, 0.0)
    return Step(len(kernels), sum(k.bytes for k in kernels), sum(k.flops for k in kernels),
                max(device_us, host_us))


def iteration_ms(engine: str, shape: Shape, precision: str, *, zoneout: bool = False,
                 device: Device = H100, a: Assumptions = ASSUMED) -> float:
    """One forward+backward of the whole stack (PREDICTED): every step of every layer, and per
    layer the products over all steps that every engine shares (the input projection, its two
    gradients and dW_hh), and, for the graph engines, one replay each way."""
    compute, size = PRECISIONS[precision]
    rows, h = shape.steps * shape.batch, shape.hidden
    shared = [_gemm(rows, h, 4 * h, size, 4 * h, h), _gemm(rows, 4 * h, h, size, 4 * h, h),
              _gemm(4 * h, rows, h, size, rows, 4 * h), _gemm(4 * h, rows, h, size, rows, 4 * h)]
    layer_us = sum(_kernel_us(k, device.peaks[compute], device, a) for k in shared)
    layer_us += shape.steps * step(engine, shape, precision, zoneout=zoneout, device=device,
                                   a=a).us
    if engine in ("split", "fused"):
        layer_us += 2 * a.graph_replay_host_us
    return shape.layers * layer_us / 1e3


def rows(device: Device = H100, strategy: str = "variational") -> list[dict[str, object]]:
    """The table's rows: every shape, precision and engine (PREDICTED)."""
    zoneout = strategy == "zoneout"
    out = []
    for shape_name, shape in SHAPES.items():
        for precision in PRECISIONS:
            cudnn = iteration_ms("cudnn", shape, precision, zoneout=zoneout, device=device)
            for engine in ENGINES:
                s = step(engine, shape, precision, zoneout=zoneout, device=device)
                ms = iteration_ms(engine, shape, precision, zoneout=zoneout, device=device)
                out.append({"shape": shape_name, "precision": precision, "engine": engine,
                            "launches": s.launches, "mb": s.bytes / 1e6,
                            "mflop": s.flops / 1e6, "us": s.us, "ms": ms,
                            "vs_cudnn": cudnn / ms})
    return out


def markdown(device: Device = H100, strategy: str = "variational") -> str:
    """The predictions as a Markdown table."""
    lines = [f"*PREDICTED for an {device.name}, {strategy} masks, not measured: per step and "
             "layer, forward and backward together; ms/iter is one forward+backward of the "
             "2-layer stack; vs cuDNN above 1 means faster than nn.LSTM(dropout).*", "",
             "| shape | precision | engine | launches | MB moved | MFLOP | predicted us/step "
             "| predicted ms/iter | predicted vs cuDNN |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['precision']} | {ENGINE_NAMES[r['engine']]} | "
              f"{r['launches']} | {r['mb']:.2f} | {r['mflop']:.1f} | {r['us']:.1f} | "
              f"{r['ms']:.2f} | {r['vs_cudnn']:.2f}x |" for r in rows(device, strategy)]
    return "\n".join(lines) + "\n"


def figures(device: Device = H100, a: Assumptions = ASSUMED) -> str:
    """The figures the model assumes, with where each comes from, as a Markdown table."""
    tera = {k: v / 1e12 for k, v in device.peaks.items()}
    rows = [
        ("device-memory bandwidth", f"{device.bandwidth / 1e12:g} TB/s",
         "NVIDIA H100 / H200 datasheets (SXM)"),
        ("FP32 peak (`fp32-ieee`)", f"{tera['fp32']:g} TFLOP/s", "NVIDIA H100 datasheet"),
        ("TF32 tensor-core peak (`fp32`)", f"{tera['tf32']:g} TFLOP/s",
         "NVIDIA H100 datasheet: 989 with sparsity, halved for dense"),
        ("BF16 tensor-core peak (`bf16`)", f"{tera['bf16']:g} TFLOP/s",
         "NVIDIA H100 datasheet: 1,979 with sparsity, halved for dense"),
        ("gap between kernels launched one by one", f"{a.stream_gap_us:g} us",
         "NVIDIA blog \"Getting Started with CUDA Graphs\": 3.8 us per ~2.9 us kernel"),
        ("gap between kernels of a CUDA graph", f"{a.graph_gap_us:g} us",
         "the same blog: 3.4 us per ~2.9 us kernel"),
        ("share of peak FLOP/s and bandwidth achieved", f"{a.efficiency:g}", "assumption"),
        ("shortest kernel, start to end", f"{a.shortest_kernel_us:g} us", "assumption"),
        ("host time per eager torch op", f"{a.eager_op_host_us:g} us", "assumption"),
        ("host time per launch from cuDNN", f"{a.cudnn_launch_host_us:g} us", "assumption"),
        ("host time per graph replay", f"{a.graph_replay_host_us:g} us", "assumption"),
    ]
    lines = [f"*Figures assumed for an {device.name}*", "", "| figure | value | source |",
             "|---|---:|---|"]
    lines += [f"| {name} | {value} | {source} |" for name, value, source in rows]
    return "\n".join(lines) + "\n"


def document(device: Device = H100, strategy: str = "variational") -> str:
    """What docs/engines.md holds between its perf_model.py markers: the figures, the table."""
    return figures(device) + "\n" + markdown(device, strategy)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--strategy", choices=("variational", "zoneout"), default="variational")
    args = parser.parse_args(argv)
    print(document(DEVICES[args.device], args.strategy), end="")


if __name__ == "__main__":
    main()
