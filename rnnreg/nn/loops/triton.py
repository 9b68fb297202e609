"""The per-step loops of rnnreg's own recurrence for CUDA tensors: cuBLAS products and Triton.

Same signatures and results as the Python twins (``rnnreg.nn.loops.python``; equations in
``rnnreg.nn.recurrence``). Each step of a forward loop is ONE recurrent product on the masked
state (``torch.mm``/``torch.addmm`` with ``out=``, i.e. one cuBLAS call into a preallocated
buffer) and ONE fused elementwise Triton kernel, which adds the projected input, applies the
gates, updates c and h, applies zoneout and the length freeze, and writes both h(t) and the
masked h(t) the next product reads. Each step of a backward loop is one fused kernel (which
first gathers dL/dh(t) from the previous product, the output gradient and the pass-through of a
frozen or zoned-out state, then forms the gate gradients) and one product; dW_hh stays one
product over all ``T*B`` rows after the loop, in ``rnnreg.nn.recurrence``. That is the
default, two-kernel step; with ``RNNREG_TRITON_STEP=fused`` each step is ONE kernel, the
product by ``tl.dot`` with the cell update in its epilogue (:mod:`rnnreg.nn.loops.triton_fused`).
:func:`_step_launchers` is the one place the step is chosen; the loops, their buffers, the
graph cache and the custom operators below serve both.

The kernels take the base pointers of whole ``(T, B, ...)`` buffers, the step index and the
step strides as runtime arguments (the step index is not specialized on): each kernel compiles
once per set of options and alignment class, not once per step.

Precision. The kernels compute in float32 whatever the buffers' dtype (bfloat16 or float16
under autocast); every backward carries dL/dh (and the LSTM's dL/dc) between steps in float32.
The recurrent products of float32 tensors (cuBLAS's, or the one-kernel step's ``tl.dot``)
follow the setting cuDNN's RNN follows, ``torch.backends.cudnn.rnn.fp32_precision``
(:func:`precision`): TF32 where cuDNN's RNN would use it (torch's default), IEEE float32
otherwise, so the loop and ``torch.nn.LSTM`` compute at the same precision; the low-precision
products accumulate in float32.

A loop of T steps is 2T launches of small kernels, each with a fixed launch cost on the host. On
CUDA each loop is therefore captured as a CUDA graph per shape, dtype and options, on the second
call of each (:class:`GraphCache`), and replayed with one launch. The graph's static buffers
are the loop's results: after a replay the caller's output buffers are made to share them (no
copy out), parameters and the saved activations a backward reads are read where they are (no
copy in). Where capture is not possible (Triton's interpreter, CPU tensors, a caller that is
itself capturing a graph, a key whose capture failed) the same steps run as plain launches.
Under torch.compile the loops are the custom operators ``torch.ops.rnnreg_triton.*``.

This module imports Triton; ``rnnreg.nn.loops`` imports it only when the Triton engine is
chosen, so ``import rnnreg`` works without Triton. Under ``TRITON_INTERPRET=1`` (set before
Triton is imported) the kernels run on CPU tensors, which is how they are tested without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from rnnreg.errors import RnnregError
from rnnreg.nn.loops import triton_fused
from rnnreg.nn.loops.protocol import Loops
from rnnreg.nn.loops.triton_common import (
    LoopRecord,
    StepLaunchers,
    _load,
    _or,
    _product_input,
    _row,
    _sigmoid,
    _tanh,
)

__all__ = ["GraphCache", "LOOPS", "STEP_VARIABLE", "TritonLoops", "interpreted",
           "launch_geometry",
           "precision", "step_kind"]

# The environment variable that picks how one step is launched (:func:`step_kind`).
STEP_VARIABLE = "RNNREG_TRITON_STEP"
STEP_KINDS = ("split", "fused")


def interpreted() -> bool:
    """Whether this module's kernels (and the one-kernel step's, imported with them) run in
    Triton's interpreter: decided when the module was imported, by ``TRITON_INTERPRET=1``
    then."""
    return not isinstance(_lstm_forward_step, triton.runtime.JITFunction)


def precision() -> str:
    """``"tf32"`` or ``"ieee"``: the precision of the loops' float32 recurrent products (the
    two-kernel step's cuBLAS products and the one-kernel step's ``tl.dot``), the one cuDNN's
    RNN uses (``torch.backends.cudnn.rnn.fp32_precision``; on a torch without that setting,
    the legacy ``torch.backends.cudnn.allow_tf32``). Read at each call, so benchmarks can
    record it beside their timings."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is None:  # torch before the fp32_precision settings (2.9)
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32" if rnn.fp32_precision == "tf32" else "ieee"


_PRECISION_LOCK = threading.Lock()
_precision_users = [0, None]  # loops running, and the matmul setting they found


@contextlib.contextmanager
def _products_at(value: str) -> Iterator[None]:
    """cuBLAS's float32 matmul precision set to ``value`` while a loop runs (and while it is
    captured: a graph keeps the setting it was captured with), then restored. Set and read
    through the same (new) API, so that neither torch's legacy getters nor its new ones see a
    mix; counted, so that loops on several threads restore the caller's setting once, last."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch before 2.9: the legacy flag
        with _PRECISION_LOCK:
            saved, matmul.allow_tf32 = matmul.allow_tf32, value == "tf32"
        try:
            yield
        finally:
            with _PRECISION_LOCK:
                matmul.allow_tf32 = saved
        return
    with _PRECISION_LOCK:
        if _precision_users[0] == 0:
            _precision_users[1] = matmul.fp32_precision
        _precision_users[0] += 1
        matmul.fp32_precision = value
    try:
        yield
    finally:
        with _PRECISION_LOCK:
            _precision_users[0] -= 1
            if _precision_users[0] == 0:
                matmul.fp32_precision = _precision_users[1]


def launch_geometry(batch: int, hidden: int, gates: int) -> tuple[tuple[int], int, int]:
    """``(grid, BLOCK, num_warps)`` for one step's elementwise kernel over the ``(B, H)``
    state.

    A heuristic, not a measurement: a step has only ``B * H`` elements (13,000 at the paper's
    medium shape, 30,000 at large), so the block is sized for at least ~264 programs' worth of
    work (two per SM of a 132-SM H100) between 128 and 1024 elements, a power of two, with one
    warp per 128 elements (four elements per thread, one 16-byte load of float32). A kernel
    addresses one step's ``(B, gates * H)`` rows with 32-bit offsets from the row's start (the
    step's own offset is 64-bit), so a step of 2**31 or more elements is refused.
    """
    if batch * gates * hidden >= 2**31:
        raise RnnregError(f"a step of batch {batch} and {gates} x {hidden} units has 2**31 or "
                          f"more elements, more than the Triton kernels' 32-bit offsets reach")
    n = batch * hidden
    block = min(1024, max(128, triton.next_power_of_2(triton.cdiv(n, 264))))
    return (triton.cdiv(n, block),), block, block // 128


def step_kind(environ: Mapping[str, str] | None = None) -> str:
    """How each step is launched, from ``RNNREG_TRITON_STEP`` in ``environ`` (default
    ``os.environ``): ``split`` (default; a cuBLAS product, then one elementwise kernel) or
    ``fused`` (one kernel per step, :mod:`rnnreg.nn.loops.triton_fused`); anything else is an
    error. Read at every call of a loop, so one process can time both."""
    value = (os.environ if environ is None else environ).get(STEP_VARIABLE, "split")
    value = value.strip().lower()
    if value not in STEP_KINDS:
        raise RnnregError(f"{STEP_VARIABLE}={value!r} is not a step kind; choose one of "
                          f"{', '.join(STEP_KINDS)}")
    return value


@triton.jit
def _kept(new, previous, zone, valid, b, offs, live, HAS_ZONE: tl.constexpr,
          HAS_VALID: tl.constexpr):
    # The state a step leaves: zoneout's d * previous + (1 - d) * candidate (Krueger et al.
    # 2017), and the previous state unchanged where the sequence has ended.
    if HAS_ZONE:
        new = new + _load(zone, offs, live) * (previous - new)
    if HAS_VALID:
        new = tl.where(tl.load(valid + b, mask=live, other=0) != 0, new, previous)
    return new


@triton.jit
def _store_state(h, h_new, mask_next, h_in_next, offs, live, HAS_NEXT: tl.constexpr):
    # h(t), and the masked state the next step's product reads.
    tl.store(h_new + offs, h, mask=live)
    if HAS_NEXT:
        tl.store(h_in_next + offs, h * _load(mask_next, offs, live), mask=live)


# Every kernel below runs step ``t`` of a loop: its tensor arguments are whole (T|T+1|1, ...)
# buffers, ``t`` and the ``*_step`` strides (0 for a factor shared by all steps) place the step.
# ``t`` changes every launch, so it is not specialized on.


@triton.jit(do_not_specialize=["t"])
def _lstm_forward_step(rec, p, cs, hs, acts, tanh_c, mask, h_in, zone_h, zone_c, valid, t, n,
                       H, mask_step, zone_h_step, zone_c_step, HAS_ZONE: tl.constexpr,
                       HAS_VALID: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    gate = b * 4 * H + offs - b * H  # gate 0's element in a (B, 4H) row
    p += _row(t, 4 * n)
    acts += _row(t, 4 * n)
    row = _row(t, n)
    i = _sigmoid(_load(rec, gate, live) + _load(p, gate, live))
    f = _sigmoid(_load(rec, gate + H, live) + _load(p, gate + H, live))
    g = _tanh(_load(rec, gate + 2 * H, live) + _load(p, gate + 2 * H, live))
    o = _sigmoid(_load(rec, gate + 3 * H, live) + _load(p, gate + 3 * H, live))
    tl.store(acts + gate, i, mask=live)
    tl.store(acts + gate + H, f, mask=live)
    tl.store(acts + gate + 2 * H, g, mask=live)
    tl.store(acts + gate + 3 * H, o, mask=live)
    cp = _load(cs + row, offs, live)
    hp = _load(hs + row, offs, live)
    c = f * cp + i * g
    tc = _tanh(c)
    tl.store(tanh_c + row + offs, tc, mask=live)
    flags = valid + _row(t, n // H)
    tl.store(cs + row + n + offs,
             _kept(c, cp, zone_c + _row(t, zone_c_step), flags, b, offs, live, HAS_ZONE,
                   HAS_VALID), mask=live)
    h = _kept(o * tc, hp, zone_h + _row(t, zone_h_step), flags, b, offs, live, HAS_ZONE,
              HAS_VALID)
    _store_state(h, hs + row + n, mask + _row(t + 1, mask_step), h_in + row + n, offs, live,
                 HAS_NEXT)


@triton.jit(do_not_specialize=["t"])
def _gru_forward_step(rec, p, hs, rz, n_out, mask, h_in, zone, valid, t, n, H, mask_step,
                      zone_step, HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                      HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    j = offs - b * H
    gate = b * 3 * H + j
    rec += _row(t, 3 * n)
    p += _row(t, 3 * n)
    rz += _row(t, 2 * n)
    row = _row(t, n)
    r = _sigmoid(_load(rec, gate, live) + _load(p, gate, live))
    z = _sigmoid(_load(rec, gate + H, live) + _load(p, gate + H, live))
    cand = _tanh(_load(p, gate + 2 * H, live) + r * _load(rec, gate + 2 * H, live))
    tl.store(rz + b * 2 * H + j, r, mask=live)
    tl.store(rz + b * 2 * H + H + j, z, mask=live)
    tl.store(n_out + row + offs, cand, mask=live)
    hp = _load(hs + row, offs, live)
    h = _kept(cand + z * (hp - cand), hp, zone + _row(t, zone_step), valid + _row(t, n // H),
              b, offs, live, HAS_ZONE, HAS_VALID)
    _store_state(h, hs + row + n, mask + _row(t + 1, mask_step), h_in + row + n, offs, live,
                 HAS_NEXT)


@triton.jit(do_not_specialize=["t"])
def _elman_forward_step(rec, p, hs, candidates, mask, h_in, zone, valid, t, n, H, mask_step,
                        zone_step, RELU: tl.constexpr, HAS_ZONE: tl.constexpr,
                        HAS_VALID: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    row = _row(t, n)
    a = _load(rec, offs, live) + _load(p + row, offs, live)
    if RELU:
        h = tl.maximum(a, 0.0)
    else:
        h = _tanh(a)
    if HAS_ZONE:  # the candidate stays for act' in the backward
        tl.store(candidates + row + offs, h, mask=live)
    h = _kept(h, _load(hs + row, offs, live), zone + _row(t, zone_step),
              valid + _row(t, n // H), b, offs, live, HAS_ZONE, HAS_VALID)
    _store_state(h, hs + row + n, mask + _row(t + 1, mask_step), h_in + row + n, offs, live,
                 HAS_NEXT)


@triton.jit
def _gathered(dh, d_out, d_hin_next, mask_next, offs, live, LAST: tl.constexpr,
              HAS_MASK: tl.constexpr):
    # dL/dh(t) without the pass-through term: the output gradient plus, at the last step, the
    # final state's gradient (in ``dh``), below it the gradient through step t+1's product.
    d = _load(d_out, offs, live)
    if LAST:
        d += _load(dh, offs, live)
    else:
        from_product = _load(d_hin_next, offs, live)
        if HAS_MASK:
            from_product = from_product * _load(mask_next, offs, live)
        d += from_product
    return d


@triton.jit(do_not_specialize=["t"])
def _lstm_backward_step(dh, dc, d_out, d_hin, mask, zone_h, zone_c, valid, acts, cs, tanh_c,
                        d_gates, t, n, H, mask_step, zone_h_step, zone_c_step,
                        LAST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZONE: tl.constexpr,
                        HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    gate = b * 4 * H + offs - b * H
    row = _row(t, n)
    flags = valid + _row(t, n // H)
    # dL/dh(t), gathered in place of dL/dh(t+1) (read first, elementwise; float32).
    later = _load(dh, offs, live)
    d_h = _gathered(dh, d_out + row, d_hin + row + n, mask + _row(t + 1, mask_step), offs, live,
                    LAST, HAS_MASK)
    if not LAST:  # the part of dL/dh(t+1) that passed h(t) through unchanged
        if HAS_ZONE:
            d_h += _load(zone_h + _row(t + 1, zone_h_step), offs, live) * later
        elif HAS_VALID:
            ended = tl.load(flags + n // H + b, mask=live, other=0) == 0
            d_h += ended.to(tl.float32) * later
    tl.store(dh + offs, d_h, mask=live)
    d_c = _load(dc, offs, live)
    acts += _row(t, 4 * n)
    i = _load(acts, gate, live)
    f = _load(acts, gate + H, live)
    g = _load(acts, gate + 2 * H, live)
    o = _load(acts, gate + 3 * H, live)
    tc = _load(tanh_c + row, offs, live)
    keep_h = 0.0
    keep_c = 0.0
    if HAS_ZONE:
        keep_h = _load(zone_h + _row(t, zone_h_step), offs, live)
        keep_c = _load(zone_c + _row(t, zone_c_step), offs, live)
    v = 1.0
    if HAS_VALID:
        v = (tl.load(flags + b, mask=live, other=0) != 0).to(tl.float32)
    d_new_h = d_h * (1.0 - keep_h) * v  # reaches the candidate h~ of a running sequence
    d_cell = d_c * (1.0 - keep_c) + d_new_h * o * (1.0 - tc * tc)  # all of dL/dc~(t)
    d_cv = d_cell * v
    d_gates += _row(t, 4 * n)
    tl.store(d_gates + gate, d_cv * g * i * (1.0 - i), mask=live)
    tl.store(d_gates + gate + H, d_cv * _load(cs + row, offs, live) * f * (1.0 - f), mask=live)
    tl.store(d_gates + gate + 2 * H, d_cv * i * (1.0 - g * g), mask=live)
    tl.store(d_gates + gate + 3 * H, d_new_h * tc * o * (1.0 - o), mask=live)
    # dL/dc(t-1): through f while running, copied past the end, d_c of it zoned out.
    tl.store(dc + offs, keep_c * d_c + d_cell * (v * f + 1.0 - v), mask=live)


@triton.jit(do_not_specialize=["t"])
def _carry_backward_step(dh, d_hs, d_out, d_hin, mask, keep, coef, d_pre, t, n, H, mask_step,
                         keep_step, G: tl.constexpr, LAST: tl.constexpr,
                         HAS_MASK: tl.constexpr, HAS_KEEP: tl.constexpr,
                         KEEP_ALL: tl.constexpr, BLOCK: tl.constexpr):
    # The GRU's and the Elman cell's backward step: dL/dh(t) into the float32 ``dh`` carried
    # between steps (and, with KEEP_ALL, into row t of ``d_hs``, which the GRU's backward reads
    # again after the loop), then the pre-activation gradients d_pre[k] = dL/dh(t) * coef[k] of
    # the G gates.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    j = offs - b * H
    row = _row(t, n)
    later = _load(dh, offs, live)
    d_h = _gathered(dh, d_out + row, d_hin + row + n, mask + _row(t + 1, mask_step), offs, live,
                    LAST, HAS_MASK)
    if not LAST and HAS_KEEP:
        d_h += _load(keep + _row(t + 1, keep_step), offs, live) * later
    tl.store(dh + offs, d_h, mask=live)
    if KEEP_ALL:
        tl.store(d_hs + row + offs, d_h, mask=live)
    coef += _row(t, G * n)
    d_pre += _row(t, G * n)
    for k in tl.static_range(G):
        at = (b * G + k) * H + j
        tl.store(d_pre + at, d_h * _load(coef, at, live), mask=live)


def _factor(tensor: Tensor | None, steps: int, batch: int,
            hidden: int) -> tuple[Tensor | None, int]:
    """``(buffer, step)``: a ``(T|1, B, H|1)`` factor (a mask, zoneout's keep factors, a
    pass-through) as a contiguous ``(T|1, B, H)`` buffer the kernels index by step, and the
    elements between its steps (0 where one row serves every step); ``(None, 0)`` without a
    factor."""
    if tensor is None:
        return None, 0
    if tensor.size(0) == 1 or tensor.stride(0) == 0:
        return tensor[:1].expand(1, batch, hidden).contiguous(), 0
    return tensor.expand(steps, batch, hidden).contiguous(), batch * hidden


def _flags(valid: Tensor | None) -> Tensor | None:
    """``valid (T, B, 1)`` as bytes the kernels read per row, or None."""
    return None if valid is None else valid.contiguous().view(torch.uint8)


def _loop(step: StepLaunchers, steps: int, batch: int, hidden: int, gates: int,
          stand_in: Tensor, *, w_hh: Tensor, mask: Tensor | None = None,
          zone_h: Tensor | None = None, zone_c: Tensor | None = None,
          valid: Tensor | None = None, **tensors: Any) -> LoopRecord:
    """What every step of one loop reads: its tensors (None ones replaced by ``stand_in`` for
    the kernels' pointer arguments, their presence kept as flags; W_hh contiguous), factors
    with their step strides (``zone_h``: in the GRU's and Elman backward, the factor that
    passes dL/dh(t) to h(t-1)), the precision of the float32 products (:func:`precision`, for
    the one-kernel step's ``tl.dot``; cuBLAS's is set around the whole loop) and the launch
    geometry of ``step``'s kernels (the ``StepLaunchers`` of :func:`_step_launchers`)."""
    mask, mask_step = _factor(mask, steps, batch, hidden)
    zone_h, zone_h_step = _factor(zone_h, steps, batch, hidden)
    zone_c, zone_c_step = _factor(zone_c, steps, batch, hidden)
    flags = _flags(valid)
    w_hh = w_hh.contiguous()  # the parameter itself, as a rule: a replay reads it in place
    return LoopRecord(
        steps=steps, batch=batch, n=batch * hidden, hidden=hidden, gates=gates, w_hh=w_hh,
        precision=precision(), geometry=step.geometry(batch, hidden, gates, w_hh),
        masked=mask is not None, zoned=zone_h is not None, limited=flags is not None,
        mask=_or(mask, stand_in), mask_step=mask_step, zone_h=_or(zone_h, stand_in),
        zone_h_step=zone_h_step, zone_c=_or(zone_c, stand_in), zone_c_step=zone_c_step,
        valid=_or(flags, stand_in), **tensors)


def _forward_product(a: LoopRecord, t: int, out: Tensor) -> None:
    """Step t's recurrent product ``W_hh (m * h(t-1)) (+ b_hh)`` into ``out``."""
    state = _product_input(a, t)[t]
    if a.b_hh is None:
        torch.mm(state, a.w_hh.t(), out=out)
    else:
        torch.addmm(a.b_hh, state, a.w_hh.t(), out=out)


# --- one step of each loop, split: a cuBLAS product and one elementwise kernel ---------------


def _split_lstm_forward(a: LoopRecord, t: int) -> None:
    _forward_product(a, t, a.rec)
    grid, block, warps = a.geometry
    _lstm_forward_step[grid](
        a.rec, a.projected, a.cs, a.hs, a.acts, a.tanh_c, a.mask, _or(a.h_in, a.rec), a.zone_h,
        a.zone_c, a.valid, t, a.n, a.hidden, a.mask_step, a.zone_h_step, a.zone_c_step,
        HAS_ZONE=a.zoned, HAS_VALID=a.limited, HAS_NEXT=a.masked and t + 1 < a.steps,
        BLOCK=block, num_warps=warps)


def _split_gru_forward(a: LoopRecord, t: int) -> None:
    _forward_product(a, t, a.rec[t])
    grid, block, warps = a.geometry
    _gru_forward_step[grid](
        a.rec, a.projected, a.hs, a.rz, a.n_out, a.mask, _or(a.h_in, a.rec), a.zone_h,
        a.valid, t, a.n, a.hidden, a.mask_step, a.zone_h_step, HAS_ZONE=a.zoned,
        HAS_VALID=a.limited, HAS_NEXT=a.masked and t + 1 < a.steps, BLOCK=block,
        num_warps=warps)


def _split_elman_forward(a: LoopRecord, t: int) -> None:
    _forward_product(a, t, a.rec)
    grid, block, warps = a.geometry
    _elman_forward_step[grid](
        a.rec, a.projected, a.hs, _or(a.candidates, a.rec), a.mask, _or(a.h_in, a.rec),
        a.zone_h, a.valid, t, a.n, a.hidden, a.mask_step, a.zone_h_step, RELU=a.relu,
        HAS_ZONE=a.zoned, HAS_VALID=a.limited, HAS_NEXT=a.masked and t + 1 < a.steps,
        BLOCK=block, num_warps=warps)


def _split_lstm_backward(a: LoopRecord, t: int) -> None:
    grid, block, warps = a.geometry
    _lstm_backward_step[grid](
        a.dh, a.dc, a.d_out, a.d_hin, a.mask, a.zone_h, a.zone_c, a.valid, a.acts, a.cs,
        a.tanh_c, a.d_gates, t, a.n, a.hidden, a.mask_step, a.zone_h_step, a.zone_c_step,
        LAST=t == a.steps - 1, HAS_MASK=a.masked, HAS_ZONE=a.zoned, HAS_VALID=a.limited,
        BLOCK=block, num_warps=warps)
    if t > 0 or a.need_first:
        torch.mm(a.d_gates[t], a.w_hh, out=a.d_hin[t])


def _split_carry_backward(a: LoopRecord, t: int) -> None:
    grid, block, warps = a.geometry
    _carry_backward_step[grid](
        a.dh, _or(a.d_hs, a.dh), a.d_out, a.d_hin, a.mask, a.zone_h, a.coef, a.d_pre, t, a.n,
        a.hidden, a.mask_step, a.zone_h_step, G=a.gates, LAST=t == a.steps - 1,
        HAS_MASK=a.masked, HAS_KEEP=a.zoned, KEEP_ALL=a.d_hs is not None, BLOCK=block,
        num_warps=warps)
    if t > 0 or a.need_first:
        torch.mm(a.d_pre[t], a.w_hh, out=a.d_hin[t])


def _split_geometry(batch: int, hidden: int, gates: int,
                    w_hh: Tensor) -> tuple[tuple[int], int, int]:
    return launch_geometry(batch, hidden, gates)


_SPLIT = StepLaunchers(
    geometry=_split_geometry, lstm_forward=_split_lstm_forward, gru_forward=_split_gru_forward,
    elman_forward=_split_elman_forward, lstm_backward=_split_lstm_backward,
    gru_backward=_split_carry_backward, elman_backward=_split_carry_backward)


def _step_launchers() -> StepLaunchers:
    """How each step of a loop is launched, for the kind :func:`step_kind` names: the one
    place where the step is chosen: the two-kernel step here, or the one-kernel step of
    :mod:`rnnreg.nn.loops.triton_fused` (each a ``StepLaunchers``, whose launches take the
    loop's :func:`_loop` record)."""
    return triton_fused.STEP if step_kind() == "fused" else _SPLIT


# --- the loops: the Python twins' signatures --------------------------------------------------


def lstm_forward(projected: Tensor, w_hh: Tensor, packed: Tensor | None, mask: Tensor | None,
                 valid: Tensor | None, zone_h: Tensor | None, zone_c: Tensor | None, acts: Tensor,
                 cs: Tensor, tanh_c: Tensor, hs: Tensor, h_in: Tensor | None) -> None:
    steps, batch, gates = projected.shape
    step = _step_launchers()
    a = _loop(step, steps, batch, gates // 4, 4, hs, mask=mask, zone_h=zone_h, zone_c=zone_c,
              valid=valid, projected=projected.contiguous(), w_hh=w_hh, b_hh=None,
              rec=projected.new_empty(batch, gates), acts=acts, cs=cs, tanh_c=tanh_c, hs=hs,
              h_in=h_in)
    for t in range(steps):
        step.lstm_forward(a, t)


def lstm_backward(d_out: Tensor, d_h: Tensor, d_c: Tensor, acts: Tensor, cs: Tensor,
                  tanh_c: Tensor, valid: Tensor | None, w_hh: Tensor, onednn: bool,
                  mask: Tensor | None, passthrough: Tensor | None, zone_h: Tensor | None,
                  zone_c: Tensor | None, need_first: bool, d_gates: Tensor,
                  d_hin: Tensor) -> tuple[Tensor | None, Tensor | None]:
    # ``passthrough`` is 1 - valid: the kernel reads ``valid`` itself.
    steps, batch, gates = d_gates.shape
    dh, dc = _carried(d_h), _carried(d_c)
    step = _step_launchers()
    a = _loop(step, steps, batch, gates // 4, 4, dh, mask=mask, zone_h=zone_h, zone_c=zone_c,
              valid=valid, dh=dh, dc=dc, d_out=d_out.contiguous(), acts=acts.contiguous(),
              cs=cs.contiguous(), tanh_c=tanh_c.contiguous(), w_hh=w_hh, need_first=need_first,
              d_gates=d_gates, d_hin=d_hin)
    for t in range(steps - 1, -1, -1):
        step.lstm_backward(a, t)
    if not need_first:
        return None, None
    keep = a.zone_h[0] if a.zoned else _ended(_flags(valid))
    first = _first_state_grad(d_hin, a.mask[0] if a.masked else None, dh, keep)
    return first.to(d_h.dtype), dc.to(d_c.dtype)


def _carried(grad: Tensor) -> Tensor:
    """A fresh float32 copy of a ``(B, H)`` gradient, carried between steps and updated in
    place (never the caller's tensor)."""
    return torch.empty(grad.shape, dtype=torch.float32, device=grad.device).copy_(grad)


def _ended(flags: Tensor | None) -> Tensor | None:
    """1 where a sequence has ended before step 0 (has no steps), else 0: the factor that
    carries dL/dh(0) to h(0) unchanged; None without lengths."""
    return None if flags is None else (flags[0] == 0).float()


def _first_state_grad(d_hin: Tensor, mask: Tensor | None, dh: Tensor,
                      keep: Tensor | None) -> Tensor:
    """dL/dh(0): through step 0's masked product, plus what passed h(0) through unchanged."""
    first = _carried(d_hin[0]) if mask is None else d_hin[0] * mask.float()
    return first if keep is None else first.addcmul_(keep.float(), dh)


def gru_forward(projected: Tensor, w_hh: Tensor, b_hh: Tensor | None, packed: Tensor | None,
                mask: Tensor | None, valid: Tensor | None, zone: Tensor | None, rec: Tensor,
                rz: Tensor, n: Tensor, hs: Tensor, h_in: Tensor | None) -> None:
    steps, batch, gates = projected.shape
    step = _step_launchers()
    a = _loop(step, steps, batch, gates // 3, 3, hs, mask=mask, zone_h=zone, valid=valid,
              projected=projected.contiguous(), w_hh=w_hh, b_hh=b_hh, rec=rec, rz=rz, n_out=n,
              hs=hs, h_in=h_in)
    for t in range(steps):
        step.gru_forward(a, t)


def gru_backward(d_out: Tensor, d_h: Tensor, coef: Tensor, keep_h: Tensor | None, w_hh: Tensor,
                 onednn: bool, mask: Tensor | None, need_first: bool, d_rec: Tensor, d_hs: Tensor,
                 d_hin: Tensor) -> Tensor | None:
    steps, batch, gates = d_rec.shape
    dh = _carried(d_h)
    step = _step_launchers()
    a = _loop(step, steps, batch, gates // 3, 3, dh, mask=mask, zone_h=keep_h, dh=dh, d_hs=d_hs,
              d_out=d_out.contiguous(), coef=coef.contiguous(), d_pre=d_rec, d_hin=d_hin,
              w_hh=w_hh, need_first=need_first)
    for t in range(steps - 1, -1, -1):
        step.gru_backward(a, t)
    if not need_first:
        return None
    keep = a.zone_h[0] if a.zoned else None
    return _first_state_grad(d_hin, a.mask[0] if a.masked else None, dh, keep).to(d_hs.dtype)


def elman_forward(projected: Tensor, w_hh: Tensor, packed: Tensor | None, mask: Tensor | None,
                  valid: Tensor | None, relu: bool, zone: Tensor | None, candidates: Tensor | None,
                  hs: Tensor, h_in: Tensor | None) -> None:
    steps, batch, hidden = projected.shape
    step = _step_launchers()
    a = _loop(step, steps, batch, hidden, 1, hs, mask=mask, zone_h=zone, valid=valid,
              projected=projected.contiguous(), w_hh=w_hh, b_hh=None,
              rec=projected.new_empty(batch, hidden), candidates=candidates, hs=hs, h_in=h_in,
              relu=bool(relu))
    for t in range(steps):
        step.elman_forward(a, t)


def elman_backward(d_out: Tensor, d_h: Tensor, slope: Tensor, w_hh: Tensor, onednn: bool,
                   mask: Tensor | None, passthrough: Tensor | None, need_first: bool, d_pre: Tensor,
                   d_hin: Tensor) -> Tensor | None:
    steps, batch, hidden = d_pre.shape
    dh = _carried(d_h)
    step = _step_launchers()
    a = _loop(step, steps, batch, hidden, 1, dh, mask=mask, zone_h=passthrough, dh=dh, d_hs=None,
              d_out=d_out.contiguous(), coef=slope.contiguous(), d_pre=d_pre, d_hin=d_hin,
              w_hh=w_hh, need_first=need_first)
    for t in range(steps - 1, -1, -1):
        step.elman_backward(a, t)
    if not need_first:
        return None
    keep = a.zone_h[0] if a.zoned else None
    return _first_state_grad(d_hin, a.mask[0] if a.masked else None, dh, keep).to(d_h.dtype)


# The buffers each loop fills: after a replay the caller's are made to share the graph's static
# ones (no copy out). All other tensor arguments are inputs (of ``hs`` and ``cs`` also row 0,
# the initial state).
_FILLED = {
    "lstm_forward": ("acts", "cs", "tanh_c", "hs", "h_in"),
    "lstm_backward": ("d_gates", "d_hin"),
    "gru_forward": ("rec", "rz", "n", "hs", "h_in"),
    "gru_backward": ("d_rec", "d_hs", "d_hin"),
    "elman_forward": ("candidates", "hs", "h_in"),
    "elman_backward": ("d_pre", "d_hin"),
}
_INITIAL_ROW = ("hs", "cs")


class GraphCache:
    """Each loop captured as a CUDA graph per shape, dtype and options, and replayed.

    A graph replays the kernels it recorded on the memory it recorded them on. An entry owns
    static copies of the inputs that are new at every call (the projected inputs, masks, the
    output gradients), copied in before a replay; inputs that stay put are read where they
    are, with their addresses in the key: parameters (whose in-place updates, an optimizer's
    step, a replay sees as the plain launches would) and the buffers another entry filled
    (the activations a forward replay saved for its backward). The buffers a loop fills are
    the entry's own, and after a replay the caller's buffer tensors share their memory
    (``Tensor.set_``): nothing is copied out. While anything outside the entry still holds
    those buffers (a forward's saved activations until its backward has run, a returned
    gradient until autograd consumed it), the entry is busy and the next call at its key
    records another one (up to ``per_key``, then plain launches), so no replay overwrites
    results still in use. The small returned gradients are cloned, as autograd may hold them
    past the next replay.

    A key is captured on its second call (the first launches plainly), so shapes that come once
    (an epoch's last batch, one evaluation) cost no capture; ``size`` graphs are kept, the
    least recently used dropped first. Capture needs a CUDA device, compiled (not interpreted)
    kernels and a stream that is not already capturing; otherwise, after a capture of the key
    that failed (with one warning; an out-of-memory included: other keys still capture), and
    while ``enabled`` is False (to compare the two, or to rule graphs out), :meth:`run`
    launches the steps plainly (under torch.compile the engine calls the custom operators,
    which launch plainly, instead). The key includes the recurrent
    products' precision and cuBLAS's reduced-precision settings, which a replay keeps from its
    capture, and the step kind. A lock makes the cache safe for several threads (DataParallel's
    replicas), and a replay on another stream than the entry's last first waits for that one.
    """

    def __init__(self, size: int = 16, enabled: bool = True, per_key: int = 4) -> None:
        self.size = size
        self.per_key = per_key
        self.enabled = enabled
        self.entries = collections.OrderedDict()  # key -> [_Captured, ...]
        self.seen = collections.OrderedDict()  # keys called once, not captured yet
        self.failed = set()  # keys whose capture failed: launched plainly from then on
        self.captures = 0  # graphs captured so far (replays of cached ones are not counted)
        self._lock = threading.Lock()

    def usable(self, device: torch.device | str) -> bool:
        """Whether loops on ``device`` would run as graph replays (from a key's second call)."""
        return self.enabled and _capturable(device)

    def graphs(self) -> int:
        """How many graphs are kept."""
        return sum(len(entries) for entries in self.entries.values())

    def run(self, name: str, loop: Callable, args: tuple) -> Any:
        """``loop(*args)`` as a graph replay where :meth:`usable`, else plainly; on the
        arguments' device, which need not be the current one (Triton launches its kernels,
        and torch captures graphs, on the current device)."""
        device = _device_of(args)
        with _on(device), _products_at(precision()):
            if self.usable(device) and not torch.cuda.is_current_stream_capturing():
                with self._lock:
                    replayed, result = self._run(name, loop, args, device)
                if replayed:
                    return result
            return loop(*args)  # outside the lock: other threads' replays need not wait

    def _run(self, name: str, loop: Callable, args: tuple,
             device: torch.device) -> tuple[bool, Any]:
        """``(True, result)`` after a replay (of a graph recorded now, maybe), ``(False,
        None)`` where the caller launches the steps plainly."""
        owned = self._owned()
        shared = [_stays_put(a, owned) for a in args]
        key = (name, device, _settings(), step_kind(),
               *(_signature(a, s) for a, s in zip(args, shared)))
        if key in self.failed:
            return False, None
        entries = self.entries.get(key)
        if entries is not None:
            self.entries.move_to_end(key)
            entry = next((e for e in entries if e.idle()), None)
            if entry is not None:
                return True, entry.replay(args)
            if len(entries) >= self.per_key:  # all busy: results still in use
                return False, None
        elif self.seen.pop(key, None) is None:  # a first call
            self.seen[key] = True
            if len(self.seen) > 4 * self.size:
                self.seen.popitem(last=False)
            return False, None
        try:
            entry = _Captured(name, loop, args, shared, device)
        except Exception as error:  # a driver or allocator that cannot capture, out of memory
            self.failed.add(key)
            warnings.warn(f"rnnreg could not capture a Triton loop ({name}) as a CUDA graph, "
                          f"so this shape launches step by step ({type(error).__name__}: "
                          f"{error})", RuntimeWarning, stacklevel=4)
            return False, None
        self.captures += 1
        self.entries.setdefault(key, []).append(entry)
        self.entries.move_to_end(key)
        while self.graphs() > self.size:
            oldest = next(iter(self.entries))
            self.entries[oldest].pop(0)
            if not self.entries[oldest]:
                del self.entries[oldest]
        return True, entry.replay(args)

    def _owned(self) -> set[int]:
        """The storages of every kept entry's filled buffers, by address."""
        return {p for entries in self.entries.values() for e in entries for p in e.filled_at}


def _device_of(args: Sequence[object]) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """The device guard: Triton launches on the current device, torch captures there."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturable(device: torch.device | str) -> bool:
    """Whether loops on ``device`` can be captured at all: CUDA, with compiled kernels."""
    return torch.device(device).type == "cuda" and not interpreted()


def _settings() -> tuple[str, bool, bool]:
    """What a replay keeps from its capture besides shapes: the recurrent products' float32
    precision and cuBLAS's reduced-precision reductions (neither getter raises under torch's
    legacy or new precision API)."""
    matmul = torch.backends.cuda.matmul
    return (precision(), matmul.allow_bf16_reduced_precision_reduction,
            matmul.allow_fp16_reduced_precision_reduction)


def _stays_put(arg: object, owned: set[int]) -> bool:
    """Whether a replay reads ``arg`` where it is instead of a static copy: a parameter, or a
    buffer a kept entry filled."""
    if not isinstance(arg, torch.Tensor):
        return False
    return isinstance(arg, torch.nn.Parameter) or arg.untyped_storage().data_ptr() in owned


def _signature(arg: object, stays_put: bool = False) -> object:
    if isinstance(arg, torch.Tensor):
        where = arg.data_ptr() if stays_put else None
        return (tuple(arg.shape), tuple(arg.stride()), arg.dtype, where)
    return arg


def _elsewhere(tensor: Tensor) -> bool:
    """Whether anything besides ``tensor`` itself holds its storage (a tensor sharing it, a
    view, autograd's saved copy of it)."""
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata) > 2  # ``tensor`` and ``storage``


class _Captured:
    """One recorded loop with its static arguments.

    ``record(run, device)`` records ``run()`` and returns ``(replay, result)``: ``replay()``
    repeats it on the same memory, refreshing ``result``'s tensors in place
    (:func:`_cuda_graph`).
    """

    def __init__(self, name: str, loop: Callable, args: tuple, shared: Sequence[bool],
                 device: torch.device, record: Callable | None = None) -> None:
        self.names = _LOOP_PARAMETERS[name]
        self.filled = _FILLED[name]
        # Ordinary tensors even when the first call comes under inference_mode, so that later
        # calls outside it may use them; no_grad, since leaving inference_mode turns gradients
        # back on.
        with torch.inference_mode(False), torch.no_grad():
            self.bound = [a if s or not isinstance(a, torch.Tensor) else a.clone()
                          for a, s in zip(args, shared)]
            self.repeat, self.result = (record or _cuda_graph)(lambda: loop(*self.bound),
                                                               device)
        # What stays put is the caller's: not held here (the key holds its address, so a replay
        # only ever reads it while a caller holds it). ``bound`` holds it only during a
        # recording or a replay, for a recorder that runs the loop again.
        self.shared = shared
        self.static = [None if s else a for a, s in zip(self.bound, shared)]
        self._unbind()
        self.mine = [(name, a) for name, a in zip(self.names, self.static)
                     if name in self.filled and a is not None]
        self.filled_at = {a.untyped_storage().data_ptr() for _, a in self.mine}
        self.stream = None

    def idle(self) -> bool:
        """Whether no one outside holds the buffers the last replay filled."""
        return not any(_elsewhere(a) for _, a in self.mine)

    def replay(self, args: tuple) -> Any:
        """``loop(*args)`` by replay: the changing inputs copied in; the caller's filled
        buffers then share the static ones; returned gradients cloned."""
        self._follow_stream(args)
        for name, static, arg in zip(self.names, self.static, args):
            if static is None or not isinstance(arg, torch.Tensor):
                continue
            if name not in self.filled:
                static.copy_(arg)
            elif name in _INITIAL_ROW:
                static[0].copy_(arg[0])
        self.bound = [arg if s else b for arg, s, b in zip(args, self.shared, self.bound)]
        self.repeat()
        self._unbind()
        for name, static in self.mine:
            args[self.names.index(name)].set_(static)
        if isinstance(self.result, tuple):
            return tuple(None if r is None else r.clone() for r in self.result)
        return None if self.result is None else self.result.clone()

    def _unbind(self) -> None:
        self.bound = [None if s else b for s, b in zip(self.shared, self.bound)]

    def _follow_stream(self, args: tuple) -> None:
        """A replay on another stream than the last one waits for it: the static buffers it
        wrote (and the inputs it read) are then safe to reuse."""
        device = _device_of(args)
        if device.type != "cuda":
            return
        stream = torch.cuda.current_stream(device)
        if self.stream is not None and self.stream != stream:
            stream.wait_stream(self.stream)
        self.stream = stream


_CAPTURE_STREAMS = {}
_STREAMS_LOCK = threading.Lock()


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for warm-up and capture, made on that device: the stream
    ``torch.cuda.graph`` would otherwise use is made once, on the device current at the
    process's first capture, for every later one."""
    with _STREAMS_LOCK:
        stream = _CAPTURE_STREAMS.get(device)
        if stream is None:
            stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
        return stream


def _cuda_graph(run: Callable, device: torch.device) -> tuple[Callable, Any]:
    """``run()`` captured as a CUDA graph on ``device``: ``(graph.replay, the tensors run()
    returned)``."""
    side = _capture_stream(device)
    caller = torch.cuda.current_stream(device)
    side.wait_stream(caller)
    with torch.cuda.stream(side):  # compiles the kernels, sets up cuBLAS
        run()
    caller.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: the backward loops are captured on autograd's thread, while other
        # threads (a data loader's) may use CUDA.
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            result = run()
    except BaseException:
        # When ending a failed capture raises, torch.cuda.graph leaves its capture stream
        # current; the plain launches that follow belong on the caller's stream.
        torch.cuda.set_stream(caller)
        raise
    caller.wait_stream(side)
    return graph.replay, result


# The loops launched step by step, by name: what a graph records and the operators run.
_STEP_LOOPS: dict[str, Callable] = {
    "lstm_forward": lstm_forward, "lstm_backward": lstm_backward, "gru_forward": gru_forward,
    "gru_backward": gru_backward, "elman_forward": elman_forward,
    "elman_backward": elman_backward}
# Each loop's parameter names: a captured graph copies its arguments in and out by name.
_LOOP_PARAMETERS = {name: tuple(inspect.signature(fn).parameters)
                    for name, fn in _STEP_LOOPS.items()}

GRAPHS = GraphCache()


# --- the engine and its custom operators ------------------------------------------------------


def _plainly(name: str) -> Callable:
    """Loop ``name`` launched step by step, on its tensors' device and at the products'
    precision: what the custom operators run."""
    loop = _STEP_LOOPS[name]

    def run(*args):
        with _on(_device_of(args)), _products_at(precision()):
            return loop(*args)

    return run


_OPTIONAL = Tensor | None


def _lstm_forward_op(projected: Tensor, w_hh: Tensor, packed: _OPTIONAL, mask: _OPTIONAL,
                     valid: _OPTIONAL, zone_h: _OPTIONAL, zone_c: _OPTIONAL, acts: Tensor,
                     cs: Tensor, tanh_c: Tensor, hs: Tensor, h_in: _OPTIONAL) -> None:
    _plainly("lstm_forward")(projected, w_hh, packed, mask, valid, zone_h, zone_c, acts, cs,
                             tanh_c, hs, h_in)


def _lstm_backward_op(d_out: Tensor, d_h: Tensor, d_c: Tensor, acts: Tensor, cs: Tensor,
                      tanh_c: Tensor, valid: _OPTIONAL, w_hh: Tensor, onednn: bool,
                      mask: _OPTIONAL, passthrough: _OPTIONAL, zone_h: _OPTIONAL,
                      zone_c: _OPTIONAL, need_first: bool, d_gates: Tensor,
                      d_hin: Tensor) -> tuple[Tensor, Tensor]:
    dh, dc = _plainly("lstm_backward")(d_out, d_h, d_c, acts, cs, tanh_c, valid, w_hh, onednn,
                                       mask, passthrough, zone_h, zone_c, need_first, d_gates,
                                       d_hin)
    return _or(dh, torch.zeros_like(d_h)), _or(dc, torch.zeros_like(d_c))


def _gru_forward_op(projected: Tensor, w_hh: Tensor, b_hh: _OPTIONAL, packed: _OPTIONAL,
                    mask: _OPTIONAL, valid: _OPTIONAL, zone: _OPTIONAL, rec: Tensor,
                    rz: Tensor, n: Tensor, hs: Tensor, h_in: _OPTIONAL) -> None:
    _plainly("gru_forward")(projected, w_hh, b_hh, packed, mask, valid, zone, rec, rz, n, hs,
                            h_in)


def _gru_backward_op(d_out: Tensor, d_h: Tensor, coef: Tensor, keep_h: _OPTIONAL,
                     w_hh: Tensor, onednn: bool, mask: _OPTIONAL, need_first: bool,
                     d_rec: Tensor, d_hs: Tensor, d_hin: Tensor) -> Tensor:
    first = _plainly("gru_backward")(d_out, d_h, coef, keep_h, w_hh, onednn, mask, need_first,
                                     d_rec, d_hs, d_hin)
    return _or(first, torch.zeros_like(d_h))


def _elman_forward_op(projected: Tensor, w_hh: Tensor, packed: _OPTIONAL, mask: _OPTIONAL,
                      valid: _OPTIONAL, relu: bool, zone: _OPTIONAL, candidates: _OPTIONAL,
                      hs: Tensor, h_in: _OPTIONAL) -> None:
    _plainly("elman_forward")(projected, w_hh, packed, mask, valid, relu, zone, candidates, hs,
                              h_in)


def _elman_backward_op(d_out: Tensor, d_h: Tensor, slope: Tensor, w_hh: Tensor, onednn: bool,
                       mask: _OPTIONAL, passthrough: _OPTIONAL, need_first: bool,
                       d_pre: Tensor, d_hin: Tensor) -> Tensor:
    first = _plainly("elman_backward")(d_out, d_h, slope, w_hh, onednn, mask, passthrough,
                                       need_first, d_pre, d_hin)
    return _or(first, torch.zeros_like(d_h))


def _register(name: str, implementation: Callable) -> Callable:
    """Loop ``name`` as the operator ``torch.ops.rnnreg_triton.<name>``, which mutates the
    buffers the loop fills; a backward returns fresh ``(B, H)``s (zeros where the caller
    asked for none), so its fake kernel needs no data."""
    op = torch.library.custom_op(f"rnnreg_triton::{name}", implementation,
                                 mutates_args=tuple(a for a in _FILLED[name]))
    if name == "lstm_backward":
        op.register_fake(lambda d_out, d_h, d_c, *rest: (torch.empty_like(d_h),
                                                           torch.empty_like(d_c)))
    elif name.endswith("backward"):
        op.register_fake(lambda d_out, d_h, *rest: torch.empty_like(d_h))
    else:
        op.register_fake(lambda *args: None)
    return op


_OPS = {name: _register(name, fn) for name, fn in (
    ("lstm_forward", _lstm_forward_op), ("lstm_backward", _lstm_backward_op),
    ("gru_forward", _gru_forward_op), ("gru_backward", _gru_backward_op),
    ("elman_forward", _elman_forward_op), ("elman_backward", _elman_backward_op))}


def _run_loop(name: str, args: tuple) -> Any:
    """Loop ``name`` on ``args``: a CUDA graph replay where it can be (:data:`GRAPHS`), the
    operator ``torch.ops.rnnreg_triton.<name>`` under torch.compile (traced as one operator,
    whose backward returns zeros where the caller asked for no gradient)."""
    if not torch.compiler.is_compiling():
        return GRAPHS.run(name, _STEP_LOOPS[name], args)
    return _OPS[name](*args)


class TritonLoops:
    """The Triton loops as an engine (:class:`~rnnreg.nn.loops.protocol.Loops`): each loop a
    graph replay where capture works, plain launches elsewhere, an operator under
    torch.compile. A backward returns None where ``need_first`` is False, as its twin does."""

    def lstm_forward(self, projected: Tensor, w_hh: Tensor, packed: Tensor | None,
                     mask: Tensor | None, valid: Tensor | None, zone_h: Tensor | None,
                     zone_c: Tensor | None, acts: Tensor, cs: Tensor, tanh_c: Tensor, hs: Tensor,
                     h_in: Tensor | None) -> None:
        _run_loop("lstm_forward", (projected, w_hh, packed, mask, valid, zone_h, zone_c, acts,
                                   cs, tanh_c, hs, h_in))

    def lstm_backward(self, d_out: Tensor, d_h: Tensor, d_c: Tensor, acts: Tensor, cs: Tensor,
                      tanh_c: Tensor, valid: Tensor | None, w_hh: Tensor, onednn: bool,
                      mask: Tensor | None, passthrough: Tensor | None, zone_h: Tensor | None,
                      zone_c: Tensor | None, need_first: bool, d_gates: Tensor,
                      d_hin: Tensor) -> tuple[Tensor | None, Tensor | None]:
        firsts = _run_loop("lstm_backward", (d_out, d_h, d_c, acts, cs, tanh_c, valid, w_hh,
                                             onednn, mask, passthrough, zone_h, zone_c,
                                             need_first, d_gates, d_hin))
        return firsts if need_first else (None, None)

    def gru_forward(self, projected: Tensor, w_hh: Tensor, b_hh: Tensor | None,
                    packed: Tensor | None, mask: Tensor | None, valid: Tensor | None,
                    zone: Tensor | None, rec: Tensor, rz: Tensor, n: Tensor, hs: Tensor,
                    h_in: Tensor | None) -> None:
        _run_loop("gru_forward", (projected, w_hh, b_hh, packed, mask, valid, zone, rec, rz, n,
                                  hs, h_in))

    def gru_backward(self, d_out: Tensor, d_h: Tensor, coef: Tensor, keep_h: Tensor | None,
                     w_hh: Tensor, onednn: bool, mask: Tensor | None, need_first: bool,
                     d_rec: Tensor, d_hs: Tensor, d_hin: Tensor) -> Tensor | None:
        first = _run_loop("gru_backward", (d_out, d_h, coef, keep_h, w_hh, onednn, mask,
                                           need_first, d_rec, d_hs, d_hin))
        return first if need_first else None

    def elman_forward(self, projected: Tensor, w_hh: Tensor, packed: Tensor | None,
                      mask: Tensor | None, valid: Tensor | None, relu: bool, zone: Tensor | None,
                      candidates: Tensor | None, hs: Tensor, h_in: Tensor | None) -> None:
        _run_loop("elman_forward", (projected, w_hh, packed, mask, valid, relu, zone,
                                    candidates, hs, h_in))

    def elman_backward(self, d_out: Tensor, d_h: Tensor, slope: Tensor, w_hh: Tensor, onednn: bool,
                       mask: Tensor | None, passthrough: Tensor | None, need_first: bool,
                       d_pre: Tensor, d_hin: Tensor) -> Tensor | None:
        first = _run_loop("elman_backward", (d_out, d_h, slope, w_hh, onednn, mask,
                                             passthrough, need_first, d_pre, d_hin))
        return first if need_first else None


# The engine.
LOOPS: Loops = TritonLoops()
