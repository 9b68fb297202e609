"""The Triton engine's ONE-kernel step: the recurrent product inside the cell's kernel.

The loops of ``rnnreg.nn.loops.triton`` run each step, by default, as a cuBLAS product into a
buffer and a fused elementwise kernel. With ``RNNREG_TRITON_STEP=fused`` they launch the step
with this module's :data:`STEP` instead, where the two are one kernel (same results as the
Python twins in ``rnnreg.nn.loops.python``; equations in ``rnnreg.nn.recurrence``):

* Forward, step t: each program owns a tile of ``BLOCK_B`` batch rows by ``BLOCK_J`` hidden
  units j, and for every gate k computes its columns ``k*H + j`` of the recurrent product
  ``(m * h(t-1)) W_hh^T`` with ``tl.dot``, in one pass over the H inputs in ``BLOCK_K`` slices
  (each slice of the state loaded once for all gates). All
  gates of its units are then in registers, so the epilogue adds the projected input (and the
  GRU's b_hh), applies the gates, updates c and h, applies zoneout and the length freeze, and
  stores what the elementwise kernel of the two-kernel step stores: the activations the backward
  reads, h(t), c(t), and the masked h(t) the next step's product reads.
* Backward, step t: dL/dh(t) needs the product ``d_gates(t+1) W_hh`` over all gate columns of a
  row, which no single program of the same launch can form for the others; so the program that
  owns a tile first forms that product for its tile (``tl.dot`` over the G*H gate columns,
  stored as dL/d(m * h(t)) for the mask's and dW_hh's gradients), then, in the same kernel,
  gathers dL/dh(t) (the output gradient, the mask, any pass-through of a frozen or zoned-out
  state) and stores the gate gradients of step t, which the next launch multiplies. The
  product for h(0), dL/d(m * h(0)) = d_gates(0) W_hh, is one ``torch.mm`` after the last
  launch, only when the initial state or the mask needs a gradient. dW_hh stays one product over all
  ``T*B`` rows after the loop, in ``rnnreg.nn.recurrence``.

Each kernel takes the buffers' base pointers, the step index (not specialized on) and the
factors' step strides as runtime arguments, with 64-bit step offsets, so all steps share one
compiled variant (the last step another, for what it skips). The maths is float32 whatever the
buffers' dtype: under bfloat16/float16 autocast ``tl.dot`` multiplies the low-precision
operands and accumulates in float32; float32 operands are multiplied at the precision of the
two-kernel step's cuBLAS products, cuDNN's RNN setting (TF32 or IEEE float32,
``rnnreg.nn.loops.triton.precision()``, which the loop's record carries). Every backward
carries dL/dh (and the LSTM's dL/dc) between steps in float32, as the two-kernel step does.
The graph cache, the custom operators and the device guard of ``rnnreg.nn.loops.triton`` serve
both steps alike.

The default stays the two-kernel step until a GPU measurement shows which is faster.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

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

__all__ = ["STEP", "geometry"]

_BLOCK_K = 32  # inputs of the product per slice


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # WIDEN: Triton's interpreter multiplies bfloat16 operands' raw bits; there they are
    # widened to float32 first (exact), compiled kernels multiply them as they are.
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    # This program's batch rows and hidden units, their offsets in a (B, H) row block, and
    # which of them exist.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs = rows[:, None] * H + cols[None, :]
    live = (rows[:, None] < B) & (cols[None, :] < H)
    return rows, cols, offs, live


@triton.jit
def _w_t(w, gate, cols, ks, H):
    # The (BLOCK_K, BLOCK_J) tile of W_hh^T at inputs ks and columns gate*H + cols; W_hh is
    # (G*H, H), row-major.
    return tl.load(w + (gate * H + cols)[None, :] * H + ks[:, None],
                   mask=(ks[:, None] < H) & (cols[None, :] < H), other=0.0)


@triton.jit
def _products(src, w, rows, cols, B, H, G: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
              WIDEN: tl.constexpr):
    # Columns k*H + cols, k < G, of src (B, H) @ W_hh^T, each (BLOCK_B, BLOCK_J), in one pass
    # over the inputs: each slice of src is loaded once for all gates (those past G stay 0).
    # tl.full, not tl.zeros: Triton's standard-library functions are jit functions, which its
    # interpreter cannot call when Triton was imported before the interpreter was turned on.
    a0 = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    a1 = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    a2 = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    a3 = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(src + rows[:, None] * H + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < H), other=0.0)
        a0 = _dot(x, _w_t(w, 0, cols, ks, H), a0, PRECISION, WIDEN)
        if G > 1:
            a1 = _dot(x, _w_t(w, 1, cols, ks, H), a1, PRECISION, WIDEN)
        if G > 2:
            a2 = _dot(x, _w_t(w, 2, cols, ks, H), a2, PRECISION, WIDEN)
        if G > 3:
            a3 = _dot(x, _w_t(w, 3, cols, ks, H), a3, PRECISION, WIDEN)
    return a0, a1, a2, a3


@triton.jit
def _product_back(d_pre, w, rows, cols, B, H, K, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # Columns cols of d_pre (B, K) @ W_hh (K, H): dL/d(m * h) of this tile.
    acc = tl.full((BLOCK_B, BLOCK_J), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(d_pre + rows[:, None] * K + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < K), other=0.0)
        wt = tl.load(w + ks[:, None] * H + cols[None, :],
                     mask=(ks[:, None] < K) & (cols[None, :] < H), other=0.0)
        acc = _dot(d, wt, acc, PRECISION, WIDEN)
    return acc


@triton.jit
def _running(valid, row0, rows, B):
    # 1 where the sequence of each row is still running at the step whose flags start at row0.
    flags = tl.load(valid + row0 + rows, mask=rows < B, other=0)
    return (flags != 0)[:, None]


@triton.jit
def _kept(new, previous, keep, running, HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr):
    # The state a step leaves: zoneout's d * previous + (1 - d) * candidate (Krueger et al.
    # 2017), and the previous state unchanged where the sequence has ended.
    if HAS_ZONE:
        new = new + keep * (previous - new)
    if HAS_VALID:
        new = tl.where(running, new, previous)
    return new


@triton.jit
def _store_state(h, hs, h_in, mask, mask_step, t, B, H, offs, live, HAS_NEXT: tl.constexpr):
    # h(t+1) into row t+1 of hs, and the masked state the next step's product reads.
    tl.store(hs + _row(t + 1, B * H) + offs, h, mask=live)
    if HAS_NEXT:
        m = _load(mask + _row(t + 1, mask_step), offs, live)
        tl.store(h_in + _row(t + 1, B * H) + offs, h * m, mask=live)


@triton.jit(do_not_specialize=["t"])
def _lstm_forward_step(src, w, p, hs, cs, acts, tanh_c, h_in, mask, mask_step, zone_h,
                       zone_h_step, zone_c, zone_c_step, valid, t, B, H,
                       HAS_NEXT: tl.constexpr, HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = _row(t, B * H) + offs
    gate = _row(t, B * 4 * H) + rows[:, None] * 4 * H + cols[None, :]
    a_i, a_f, a_g, a_o = _products(src + _row(t, B * H), w, rows, cols, B, H, 4, BLOCK_B, BLOCK_J,
                                   BLOCK_K, PRECISION, WIDEN)
    i = _sigmoid(a_i + _load(p, gate, live))
    f = _sigmoid(a_f + _load(p, gate + H, live))
    g = _tanh(a_g + _load(p, gate + 2 * H, live))
    o = _sigmoid(a_o + _load(p, gate + 3 * H, live))
    tl.store(acts + gate, i, mask=live)
    tl.store(acts + gate + H, f, mask=live)
    tl.store(acts + gate + 2 * H, g, mask=live)
    tl.store(acts + gate + 3 * H, o, mask=live)
    cp = _load(cs, state, live)
    hp = _load(hs, state, live)
    c = f * cp + i * g
    tc = _tanh(c)
    tl.store(tanh_c + state, tc, mask=live)
    keep_h = 0.0
    keep_c = 0.0
    if HAS_ZONE:
        keep_h = _load(zone_h + _row(t, zone_h_step), offs, live)
        keep_c = _load(zone_c + _row(t, zone_c_step), offs, live)
    running = True
    if HAS_VALID:
        running = _running(valid, _row(t, B), rows, B)
    tl.store(cs + _row(t + 1, B * H) + offs, _kept(c, cp, keep_c, running, HAS_ZONE, HAS_VALID),
             mask=live)
    h = _kept(o * tc, hp, keep_h, running, HAS_ZONE, HAS_VALID)
    _store_state(h, hs, h_in, mask, mask_step, t, B, H, offs, live, HAS_NEXT)


@triton.jit(do_not_specialize=["t"])
def _gru_forward_step(src, w, b_hh, p, hs, rec, rz, n_out, h_in, mask, mask_step, zone,
                      zone_step, valid, t, B, H, HAS_BIAS: tl.constexpr,
                      HAS_NEXT: tl.constexpr, HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = _row(t, B * H) + offs
    gate = _row(t, B * 3 * H) + rows[:, None] * 3 * H + cols[None, :]
    a_r, a_z, a_n, _ = _products(src + _row(t, B * H), w, rows, cols, B, H, 3, BLOCK_B, BLOCK_J,
                                 BLOCK_K, PRECISION, WIDEN)
    if HAS_BIAS:  # b_hh: b_hn stays inside r * (W_hn h + b_hn)
        a_r += tl.load(b_hh + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        a_z += tl.load(b_hh + H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        a_n += tl.load(b_hh + 2 * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    tl.store(rec + gate, a_r, mask=live)
    tl.store(rec + gate + H, a_z, mask=live)
    tl.store(rec + gate + 2 * H, a_n, mask=live)
    r = _sigmoid(_load(p, gate, live) + a_r)
    z = _sigmoid(_load(p, gate + H, live) + a_z)
    cand = _tanh(_load(p, gate + 2 * H, live) + r * a_n)
    pair = _row(t, B * 2 * H) + rows[:, None] * 2 * H + cols[None, :]
    tl.store(rz + pair, r, mask=live)
    tl.store(rz + pair + H, z, mask=live)
    tl.store(n_out + state, cand, mask=live)
    hp = _load(hs, state, live)
    keep = 0.0
    if HAS_ZONE:
        keep = _load(zone + _row(t, zone_step), offs, live)
    running = True
    if HAS_VALID:
        running = _running(valid, _row(t, B), rows, B)
    h = _kept(cand + z * (hp - cand), hp, keep, running, HAS_ZONE, HAS_VALID)
    _store_state(h, hs, h_in, mask, mask_step, t, B, H, offs, live, HAS_NEXT)


@triton.jit(do_not_specialize=["t"])
def _elman_forward_step(src, w, p, hs, candidates, h_in, mask, mask_step, zone, zone_step,
                        valid, t, B, H, RELU: tl.constexpr, HAS_NEXT: tl.constexpr,
                        HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = _row(t, B * H) + offs
    a, _, _, _ = _products(src + _row(t, B * H), w, rows, cols, B, H, 1, BLOCK_B, BLOCK_J, BLOCK_K,
                           PRECISION, WIDEN)
    a += _load(p, state, live)
    if RELU:
        h = tl.maximum(a, 0.0)
    else:
        h = _tanh(a)
    keep = 0.0
    if HAS_ZONE:  # the candidate stays for act' in the backward
        tl.store(candidates + state, h, mask=live)
        keep = _load(zone + _row(t, zone_step), offs, live)
    running = True
    if HAS_VALID:
        running = _running(valid, _row(t, B), rows, B)
    h = _kept(h, _load(hs, state, live), keep, running, HAS_ZONE, HAS_VALID)
    _store_state(h, hs, h_in, mask, mask_step, t, B, H, offs, live, HAS_NEXT)


@triton.jit
def _from_product(d_pre, w, d_hin, mask, mask_step, t, B, H, G: tl.constexpr, rows, cols, offs,
                  live, HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # The gradient reaching h(t) through step t+1's masked product: d_pre(t+1) W_hh, stored as
    # dL/d(m * h(t)), times step t+1's mask.
    d_in = _product_back(d_pre + _row(t + 1, B * G * H), w, rows, cols, B, H, G * H, BLOCK_B,
                         BLOCK_J, BLOCK_K, PRECISION, WIDEN)
    tl.store(d_hin + _row(t + 1, B * H) + offs, d_in, mask=live)
    if HAS_MASK:
        d_in = d_in * _load(mask + _row(t + 1, mask_step), offs, live)
    return d_in


@triton.jit(do_not_specialize=["t"])
def _lstm_backward_step(d_gates, w, d_hin, dh, dc, d_out, mask, mask_step, zone_h, zone_h_step,
                        zone_c, zone_c_step, valid, acts, cs, tanh_c, t, B, H,
                        LAST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZONE: tl.constexpr,
                        HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = _row(t, B * H) + offs
    gate = _row(t, B * 4 * H) + rows[:, None] * 4 * H + cols[None, :]
    # dL/dh(t), gathered in place of dL/dh(t+1) (or of the final state's gradient).
    later = _load(dh, offs, live)
    d_h = _load(d_out, state, live)
    if LAST:
        d_h += later
    else:
        d_h += _from_product(d_gates, w, d_hin, mask, mask_step, t, B, H, 4, rows, cols, offs,
                             live, HAS_MASK, BLOCK_B, BLOCK_J, BLOCK_K, PRECISION, WIDEN)
        # the part of dL/dh(t+1) that passed h(t) through unchanged
        if HAS_ZONE:
            d_h += _load(zone_h + _row(t + 1, zone_h_step), offs, live) * later
        elif HAS_VALID:
            d_h += (1.0 - _running(valid, _row(t + 1, B), rows, B).to(tl.float32)) * later
    tl.store(dh + offs, d_h, mask=live)
    d_c = _load(dc, offs, live)
    i = _load(acts, gate, live)
    f = _load(acts, gate + H, live)
    g = _load(acts, gate + 2 * H, live)
    o = _load(acts, gate + 3 * H, live)
    tc = _load(tanh_c, state, live)
    keep_h = 0.0
    keep_c = 0.0
    if HAS_ZONE:
        keep_h = _load(zone_h + _row(t, zone_h_step), offs, live)
        keep_c = _load(zone_c + _row(t, zone_c_step), offs, live)
    v = 1.0
    if HAS_VALID:
        v = _running(valid, _row(t, B), rows, B).to(tl.float32)
    d_new_h = d_h * (1.0 - keep_h) * v  # reaches the candidate h~ of a running sequence
    d_cell = d_c * (1.0 - keep_c) + d_new_h * o * (1.0 - tc * tc)  # all of dL/dc~(t)
    d_cv = d_cell * v
    tl.store(d_gates + gate, d_cv * g * i * (1.0 - i), mask=live)
    tl.store(d_gates + gate + H, d_cv * _load(cs, state, live) * f * (1.0 - f), mask=live)
    tl.store(d_gates + gate + 2 * H, d_cv * i * (1.0 - g * g), mask=live)
    tl.store(d_gates + gate + 3 * H, d_new_h * tc * o * (1.0 - o), mask=live)
    # dL/dc(t-1): through f while running, copied past the end, d_c of it zoned out.
    tl.store(dc + offs, keep_c * d_c + d_cell * (v * f + 1.0 - v), mask=live)


@triton.jit(do_not_specialize=["t"])
def _carry_backward_step(d_pre, w, d_hin, dh, d_hs, d_out, mask, mask_step, keep, keep_step,
                         coef, t, B, H, G: tl.constexpr, LAST: tl.constexpr,
                         HAS_MASK: tl.constexpr, HAS_KEEP: tl.constexpr,
                         KEEP_ALL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # The GRU's and the Elman cell's backward step: dL/dh(t) into the float32 ``dh`` carried
    # between steps (it holds dL/dh(t+1), or the final state's gradient; with KEEP_ALL also
    # into row t of ``d_hs``, which the GRU's backward reads again after the loop), then the
    # pre-activation gradients d_pre[k] = dL/dh(t) * coef[k] of its G gates.
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    later = _load(dh, offs, live)
    d_h = _load(d_out + _row(t, B * H), offs, live)
    if LAST:
        d_h += later
    else:
        d_h += _from_product(d_pre, w, d_hin, mask, mask_step, t, B, H, G, rows, cols, offs,
                             live, HAS_MASK, BLOCK_B, BLOCK_J, BLOCK_K, PRECISION, WIDEN)
        if HAS_KEEP:
            d_h += _load(keep + _row(t + 1, keep_step), offs, live) * later
    tl.store(dh + offs, d_h, mask=live)
    if KEEP_ALL:
        tl.store(d_hs + _row(t, B * H) + offs, d_h, mask=live)
    coef += _row(t, B * G * H)
    d_pre += _row(t, B * G * H)
    for k in tl.static_range(G):
        at = rows[:, None] * G * H + k * H + cols[None, :]
        tl.store(d_pre + at, d_h * _load(coef, at, live), mask=live)


def _interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (imported with
    ``TRITON_INTERPRET=1``), where ``tl.dot`` needs bfloat16 operands widened."""
    return not isinstance(_lstm_forward_step, triton.runtime.JITFunction)


def geometry(batch: int, hidden: int, gates: int,
             w_hh: Tensor) -> tuple[tuple[int, int], dict[str, Any]]:
    """``(grid, tiles)``: the grid and the tiling constexprs of a loop's kernels, for W_hh
    ``w_hh``'s device and dtype.

    One program per ``BLOCK_B`` rows (the batch, to at most 64) by ``BLOCK_J`` hidden units;
    ``tl.dot`` needs at least 16 of each. Each row tile reads all of W_hh per step, whatever
    ``BLOCK_J``, so the units are split 16 to a program wherever 32 would leave some of the
    GPU's multiprocessors without a program (at a batch of 20 and 650 units, 41 programs
    rather than 21); a heuristic, not yet timed. A kernel addresses one step's
    ``(B, G * H)`` rows and W_hh's ``G * H * H`` elements with 32-bit offsets (the step's own
    offset is 64-bit), so a larger step or W_hh is refused.
    """
    if batch * gates * hidden >= 2**31 or gates * hidden * hidden >= 2**31:
        raise ValueError(f"a step of batch {batch} and {gates} x {hidden} units has 2**31 or "
                         f"more elements in a step or in W_hh, more than the fused Triton "
                         f"kernels' 32-bit offsets reach")
    block_b = min(max(triton.next_power_of_2(batch), 16), 64)
    rows = triton.cdiv(batch, block_b)
    narrow = hidden <= 16 or rows * triton.cdiv(hidden, 32) < _processors(w_hh.device)
    block_j = 16 if narrow else 32
    grid = (rows, triton.cdiv(hidden, block_j))
    return grid, dict(BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_K=_BLOCK_K,
                      WIDEN=w_hh.dtype == torch.bfloat16 and _interpreted())


@functools.cache
def _processors(device: torch.device) -> int:
    """The multiprocessors of a CUDA device; 0 elsewhere (the interpreter runs programs one
    after another, so fewer and larger is faster there)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


# --- one step of each loop: ``(a, t)``, ``a`` the loop's record (rnnreg.nn.loops.triton) -----
# ``a.precision`` is cuDNN's RNN setting, ``tl.dot``'s input_precision for float32 operands.


def _lstm_forward(a: LoopRecord, t: int) -> None:
    grid, tiles = a.geometry
    _lstm_forward_step[grid](
        _product_input(a, t), a.w_hh, a.projected, a.hs, a.cs, a.acts, a.tanh_c,
        _or(a.h_in, a.hs), a.mask, a.mask_step, a.zone_h, a.zone_h_step, a.zone_c,
        a.zone_c_step, a.valid, t, a.batch, a.hidden, HAS_NEXT=a.masked and t + 1 < a.steps,
        HAS_ZONE=a.zoned, HAS_VALID=a.limited, PRECISION=a.precision, **tiles)


def _gru_forward(a: LoopRecord, t: int) -> None:
    grid, tiles = a.geometry
    _gru_forward_step[grid](
        _product_input(a, t), a.w_hh, _or(a.b_hh, a.hs), a.projected, a.hs, a.rec, a.rz,
        a.n_out, _or(a.h_in, a.hs), a.mask, a.mask_step, a.zone_h, a.zone_h_step, a.valid, t,
        a.batch, a.hidden, HAS_BIAS=a.b_hh is not None, HAS_NEXT=a.masked and t + 1 < a.steps,
        HAS_ZONE=a.zoned, HAS_VALID=a.limited, PRECISION=a.precision, **tiles)


def _elman_forward(a: LoopRecord, t: int) -> None:
    grid, tiles = a.geometry
    _elman_forward_step[grid](
        _product_input(a, t), a.w_hh, a.projected, a.hs, _or(a.candidates, a.hs),
        _or(a.h_in, a.hs), a.mask, a.mask_step, a.zone_h, a.zone_h_step, a.valid, t, a.batch,
        a.hidden, RELU=a.relu, HAS_NEXT=a.masked and t + 1 < a.steps, HAS_ZONE=a.zoned,
        HAS_VALID=a.limited, PRECISION=a.precision, **tiles)


def _first_product(a: LoopRecord, t: int, d_pre: Tensor) -> None:
    """After step 0's kernel, dL/d(m * h(0)) = d_pre(0) W_hh, where the initial state or the
    mask needs it (every later row is formed by the kernel of the step before it)."""
    if t == 0 and a.need_first:
        torch.mm(d_pre[0], a.w_hh, out=a.d_hin[0])


def _lstm_backward(a: LoopRecord, t: int) -> None:
    grid, tiles = a.geometry
    _lstm_backward_step[grid](
        a.d_gates, a.w_hh, a.d_hin, a.dh, a.dc, a.d_out, a.mask, a.mask_step, a.zone_h,
        a.zone_h_step, a.zone_c, a.zone_c_step, a.valid, a.acts, a.cs, a.tanh_c, t, a.batch,
        a.hidden, LAST=t == a.steps - 1, HAS_MASK=a.masked, HAS_ZONE=a.zoned,
        HAS_VALID=a.limited, PRECISION=a.precision, **tiles)
    _first_product(a, t, a.d_gates)


def _carry_backward(a: LoopRecord, t: int) -> None:
    grid, tiles = a.geometry
    _carry_backward_step[grid](
        a.d_pre, a.w_hh, a.d_hin, a.dh, _or(a.d_hs, a.dh), a.d_out, a.mask, a.mask_step,
        a.zone_h, a.zone_h_step, a.coef, t, a.batch, a.hidden, G=a.gates,
        LAST=t == a.steps - 1, HAS_MASK=a.masked, HAS_KEEP=a.zoned,
        KEEP_ALL=a.d_hs is not None, PRECISION=a.precision, **tiles)
    _first_product(a, t, a.d_pre)


# The one-kernel step, as rnnreg.nn.loops.triton's loops launch it (RNNREG_TRITON_STEP=fused).
STEP = StepLaunchers(
    geometry=geometry, lstm_forward=_lstm_forward, gru_forward=_gru_forward,
    elman_forward=_elman_forward, lstm_backward=_lstm_backward,
    gru_backward=_carry_backward, elman_backward=_carry_backward)
