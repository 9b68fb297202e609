"""Cases shared by the Triton loop tests (tests/nn/test_triton_loops.py in Triton's interpreter
on CPU, tests/nn/test_cuda.py compiled on a GPU): the own recurrence on two engines, and one
layer on the own loop against torch.nn with the same weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnreg.nn.engines import own_loop_layer
from rnnreg.nn.recurrence import recurrence


def interpreted_engine():
    """rnnreg's Triton engine imported with ``TRITON_INTERPRET=1`` (the interpreter must be on
    before Triton compiles the kernels; the environment is restored after), or the calling test
    module skipped where it was already imported compiled."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from rnnreg.nn.loops import triton as triton_loops  # imports triton_fused too
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if not triton_loops.interpreted():
        pytest.skip("the Triton loops were imported compiled before this module",
                    allow_module_level=True)
    return triton_loops


GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# mask: None, "fresh" (T, B, H) or "sequence" (1, B, H); zoneout: None, "train" (factors in
# {0, 1}) or "eval" (the rate itself, the expectation).
CASES = {
    "plain": dict(mask=None, lengths=False, zoneout=None),
    "fresh+lengths": dict(mask="fresh", lengths=True, zoneout=None),
    "sequence+zoneout": dict(mask="sequence", lengths=False, zoneout="train"),
    "fresh+lengths+zoneout": dict(mask="fresh", lengths=True, zoneout="train"),
    "zoneout-eval+lengths": dict(mask=None, lengths=True, zoneout="eval"),
}


def recurrence_inputs(mode, steps, batch, features, hidden, *, mask=None, lengths=False,
                      zoneout=None, device="cpu", seed=0, scale=0.5):
    """Leaves for ``recurrence`` (requiring grad, the mask too) and the constants; weights,
    inputs and states are normal with standard deviation ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    g = GATES[mode] * hidden

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    leaves = {"x": rand(steps, batch, features),
              "state": [rand(batch, hidden) for _ in range(2 if mode == "LSTM" else 1)],
              "weights": [rand(g, features), rand(g, hidden), rand(g), rand(g)]}
    if mask is not None:
        rows = steps if mask == "fresh" else 1
        keep = (torch.rand(rows, batch, hidden, generator=gen) > 0.3).float() / 0.7
        leaves["mask"] = keep.to(device).requires_grad_()
    constants = {"lengths": None, "zoneout": None}
    if lengths:
        ends = torch.randint(1, steps + 1, (batch,), generator=gen)
        ends[0] = steps
        constants["lengths"] = ends
    if zoneout == "train":
        draws = [(torch.rand(1, batch, hidden, generator=gen) < 0.4).float().to(device)
                 for _ in range(2)]
        constants["zoneout"] = (draws[0], draws[1] if mode == "LSTM" else None)
    elif zoneout == "eval":
        constants["zoneout"] = (torch.full((1, batch, hidden), 0.3, device=device),
                                torch.full((1, batch, hidden), 0.2, device=device)
                                if mode == "LSTM" else None)
    return leaves, constants


def run_recurrence(mode, leaves, constants, seed=1):
    """Outputs, final states, and the gradients of a random-weighted loss w.r.t. every leaf
    that requires one."""
    flat = [leaves["x"], *leaves["state"], *leaves["weights"]]
    mask = leaves.get("mask")
    out, final = recurrence(mode, leaves["x"], leaves["state"], *leaves["weights"], mask,
                            constants["lengths"], constants["zoneout"])
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape, generator=gen).to(out.device)
    loss = (out.float() * weights).sum() + sum((s.float() ** 2).sum() for s in final)
    wrt = [t for t in flat + ([mask] if mask is not None else []) if t.requires_grad]
    return [out, *final, *torch.autograd.grad(loss, wrt)]


def evaluated_twice(mode, leaves):
    """The recurrence's output run twice under inference_mode, as evaluation does (with a graph
    cache: the first call launches plainly, the second records), as an ordinary tensor."""
    with torch.inference_mode():
        for _ in range(2):
            out = recurrence(mode, leaves["x"], leaves["state"], *leaves["weights"],
                             leaves.get("mask"), None, None)[0]
    return out.clone()


def torch_module(mode, features, hidden, bidirectional, device="cpu", seed=0):
    torch.manual_seed(seed)
    if mode in ("RNN_TANH", "RNN_RELU"):
        nonlinearity = "tanh" if mode == "RNN_TANH" else "relu"
        module = nn.RNN(features, hidden, nonlinearity=nonlinearity,
                        bidirectional=bidirectional)
    else:
        module = getattr(nn, mode)(features, hidden, bidirectional=bidirectional)
    return module.to(device)


def own_loop_vs_torch(mode, steps, batch, features, hidden, *, bidirectional, lengths,
                      device="cpu", seed=0):
    """``(ours, torch's)``: outputs, final states and gradients (x, initial states, every
    weight) of one layer on the own loop with no mask, and of the same torch.nn module."""
    module = torch_module(mode, features, hidden, bidirectional, device, seed)
    directions = 2 if bidirectional else 1
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps, batch, features, generator=gen).to(device).requires_grad_()
    states = [torch.randn(directions, batch, hidden, generator=gen).to(device).requires_grad_()
              for _ in range(2 if mode == "LSTM" else 1)]
    ends = None
    if lengths:
        ends = torch.randint(1, steps + 1, (batch,), generator=gen)
        ends[0] = steps
    per_direction = len(module._flat_weights) // directions
    weights = [module._flat_weights[d * per_direction:(d + 1) * per_direction]
               for d in range(directions)]
    probe = torch.randn(steps, batch, directions * hidden, generator=gen).to(device)
    params = list(module.parameters())

    def grads(out, final):
        if ends is not None:
            out = out * (torch.arange(steps).unsqueeze(1) < ends).unsqueeze(2).to(device)
        loss = (out * probe).sum() + sum((s ** 2).sum() for s in final)
        return [out, *final, *torch.autograd.grad(loss, [x, *states, *params])]

    ours = grads(*own_loop_layer(module, x, ends, tuple(states), weights, None))
    hx = tuple(states) if mode == "LSTM" else states[0]
    if ends is None:
        out, final = module(x, hx)
    else:
        out, final = module(pack_padded_sequence(x, ends, enforce_sorted=False), hx)
        out, _ = pad_packed_sequence(out, total_length=steps)
    theirs = grads(out, final if mode == "LSTM" else (final,))
    return ours, theirs


def relative_error(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def assert_tracks_float32(mode, low, full, dtype):
    """Results under ``dtype`` autocast within that dtype's accuracy of float32: outputs and
    final states within 4 units of its rounding error (eps), gradients within 8; 25 for the
    relu cell's gradients, whose slope flips between 0 and 1 wherever rounding moves a
    pre-activation across 0."""
    eps = torch.finfo(dtype).eps
    states = 3 if mode == "LSTM" else 2  # the output and the final state(s)
    for k, (a, b) in enumerate(zip(low, full)):
        assert torch.isfinite(a).all(), f"result {k} is not finite"
        bound = 4 * eps if k < states else (25 if mode == "RNN_RELU" else 8) * eps
        assert relative_error(a, b) < bound, (k, relative_error(a, b), bound)


_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
                  torch.uint8: "*u8"}


def record_launches(module, names):
    """Replace the Triton kernels ``names`` of ``module`` by recorders; return the dict they fill:
    one entry ``(kernel, signature, constexprs, num_warps)`` per distinct specialization
    launched (the signature as Triton's compiler takes it, from the arguments' dtypes)."""
    launched = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, **constexprs):  # Triton's default warps
                values = dict(zip(self.kernel.arg_names, args)) | constexprs
                signature = {name: "constexpr" if name in constexprs
                             else _POINTER_TYPES[v.dtype] if isinstance(v, torch.Tensor)
                             else "i32" for name, v in values.items()}
                key = (self.kernel.fn.__name__, tuple(signature.items()),
                       tuple(constexprs.items()), num_warps)
                launched[key] = (self.kernel, signature, constexprs, num_warps)
            return launch

    for name in names:
        setattr(module, name, Recorder(getattr(module, name)))
    return launched


def compile_launched(launched, arch, control):
    """Compile every recorded specialization for compute capability ``arch``; return how many.
    ``control`` (constexprs that must not compile, such as a block that is not a power of two)
    is tried on the first one: if it compiles, this check would miss compile errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    for kernel, signature, constexprs, num_warps in launched.values():
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                       target=target, options={"num_warps": num_warps})
    kernel, signature, constexprs, num_warps = next(iter(launched.values()))
    try:
        triton.compile(ASTSource(fn=kernel, signature=signature,
                                 constexprs=constexprs | control), target=target,
                       options={"num_warps": num_warps})
    except triton.CompilationError:
        return len(launched)
    raise AssertionError(f"{control} compiled: this check would miss compile errors")


def compile_every_launch(arch=90):
    """Compile, for an NVIDIA GPU of compute capability ``arch`` (90: the H100/H200), every
    kernel specialization the Triton loops launch over :data:`CASES`, all four modes, float32
    and both autocast dtypes; return how many. Nothing runs: the launches are recorded on CPU
    tensors (the products run, the kernels are only compiled), so compile-time errors that
    Triton's interpreter lets pass (constexpr use, block shapes, dtype casts) show up on any
    machine with Triton's bundled ptxas. Must run in a process that imported Triton without
    ``TRITON_INTERPRET``."""
    from rnnreg.nn import loops
    from rnnreg.nn.loops import triton as triton_loops

    assert not triton_loops.interpreted(), "Triton was imported with TRITON_INTERPRET=1"
    launched = record_launches(triton_loops, (
        "_lstm_forward_step", "_gru_forward_step", "_elman_forward_step",
        "_lstm_backward_step", "_carry_backward_step"))
    triton_loops.interpreted = lambda: True  # lets the engine take CPU tensors
    os.environ[loops.VARIABLE] = "triton"
    for mode in GATES:
        for case in CASES.values():
            leaves, constants = recurrence_inputs(mode, 3, 2, 2, 5, **case)
            for dtype in (None, torch.bfloat16, torch.float16):
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                    enabled=dtype is not None):
                    run_recurrence(mode, leaves, constants)
    # The control: a block that is not a power of two compiles in the interpreter, not here.
    return compile_launched(launched, arch, {"BLOCK": 500})
