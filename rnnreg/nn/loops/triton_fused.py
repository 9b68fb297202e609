"""The Triton loops with ONE kernel per step: the recurrent product inside the cell's kernel.

``rnnreg.nn.loops.triton`` runs each step as a cuBLAS product into a buffer and a fused
elementwise kernel. Here the two are one kernel (same signatures and results as the Python twins
in ``rnnreg.nn.loops.python``; equations in ``rnnreg.nn.recurrence``):

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
  product for h(0), dL/d(m * h(0)) = d_gates(0) W_hh, is one ``torch.mm`` after the loop, only
  when the initial state or the mask needs a gradient. dW_hh stays one product over all
  ``T*B`` rows after the loop, in ``rnnreg.nn.recurrence``.

Each kernel takes the buffers' base pointers and the step index as runtime arguments (not
per-step views), so all steps share one compiled variant (the last step another, for what it
skips). The maths is float32 whatever the buffers' dtype: under bfloat16/float16 autocast
``tl.dot`` multiplies the low-precision operands and accumulates in float32; float32 operands
are multiplied in IEEE float32 (not TF32), as cuBLAS does by default. What the two-kernel step
keeps in float32 between steps (the LSTM's and the Elman cell's dL/dh and dL/dc) stays float32
here; the GRU keeps dL/dh(t) in the buffers' dtype.

Which step runs is ``RNNREG_TRITON_STEP`` (:func:`requested`): ``split`` (the default) or
``fused``. The default stays the two-kernel step until a GPU measurement shows which is faster.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

__all__ = ["LOOPS", "SETTINGS", "VARIABLE", "requested"]

# The environment variable that picks the Triton engine's step, and its values (default first).
VARIABLE = "RNNREG_TRITON_STEP"
SETTINGS = ("split", "fused")

_BLOCK_K = 32  # inputs of the product per slice


def requested(environ: Mapping[str, str] | None = None) -> str:
    """The setting of ``RNNREG_TRITON_STEP`` in ``environ`` (default ``os.environ``): ``split``
    (one cuBLAS product and one elementwise kernel per step; the default) or ``fused`` (one
    kernel per step); anything else is an error."""
    value = (os.environ if environ is None else environ).get(VARIABLE, "split").strip().lower()
    if value not in SETTINGS:
        raise ValueError(f"{VARIABLE}={value!r} is not a Triton step; choose one of "
                         f"{', '.join(SETTINGS)}")
    return value


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow at either end.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


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
def _load(ptr, offs, live):
    return tl.load(ptr + offs, mask=live, other=0.0).to(tl.float32)


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
    tl.store(hs + (t + 1) * B * H + offs, h, mask=live)
    if HAS_NEXT:
        m = _load(mask, (t + 1) * mask_step + offs, live)
        tl.store(h_in + (t + 1) * B * H + offs, h * m, mask=live)


@triton.jit(do_not_specialize=["t"])
def _lstm_forward_step(src, w, p, hs, cs, acts, tanh_c, h_in, mask, mask_step, zone_h,
                       zone_h_step, zone_c, zone_c_step, valid, t, B, H,
                       HAS_NEXT: tl.constexpr, HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = t * B * H + offs
    gate = t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
    a_i, a_f, a_g, a_o = _products(src + t * B * H, w, rows, cols, B, H, 4, BLOCK_B, BLOCK_J,
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
        keep_h = _load(zone_h, t * zone_h_step + offs, live)
        keep_c = _load(zone_c, t * zone_c_step + offs, live)
    running = True
    if HAS_VALID:
        running = _running(valid, t * B, rows, B)
    tl.store(cs + (t + 1) * B * H + offs, _kept(c, cp, keep_c, running, HAS_ZONE, HAS_VALID),
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
    state = t * B * H + offs
    gate = t * B * 3 * H + rows[:, None] * 3 * H + cols[None, :]
    a_r, a_z, a_n, _ = _products(src + t * B * H, w, rows, cols, B, H, 3, BLOCK_B, BLOCK_J,
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
    pair = t * B * 2 * H + rows[:, None] * 2 * H + cols[None, :]
    tl.store(rz + pair, r, mask=live)
    tl.store(rz + pair + H, z, mask=live)
    tl.store(n_out + state, cand, mask=live)
    hp = _load(hs, state, live)
    keep = 0.0
    if HAS_ZONE:
        keep = _load(zone, t * zone_step + offs, live)
    running = True
    if HAS_VALID:
        running = _running(valid, t * B, rows, B)
    h = _kept(cand + z * (hp - cand), hp, keep, running, HAS_ZONE, HAS_VALID)
    _store_state(h, hs, h_in, mask, mask_step, t, B, H, offs, live, HAS_NEXT)


@triton.jit(do_not_specialize=["t"])
def _elman_forward_step(src, w, p, hs, candidates, h_in, mask, mask_step, zone, zone_step,
                        valid, t, B, H, RELU: tl.constexpr, HAS_NEXT: tl.constexpr,
                        HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = t * B * H + offs
    a, _, _, _ = _products(src + t * B * H, w, rows, cols, B, H, 1, BLOCK_B, BLOCK_J, BLOCK_K,
                           PRECISION, WIDEN)
    a += _load(p, state, live)
    if RELU:
        h = tl.maximum(a, 0.0)
    else:
        h = _tanh(a)
    keep = 0.0
    if HAS_ZONE:  # the candidate stays for act' in the backward
        tl.store(candidates + state, h, mask=live)
        keep = _load(zone, t * zone_step + offs, live)
    running = True
    if HAS_VALID:
        running = _running(valid, t * B, rows, B)
    h = _kept(h, _load(hs, state, live), keep, running, HAS_ZONE, HAS_VALID)
    _store_state(h, hs, h_in, mask, mask_step, t, B, H, offs, live, HAS_NEXT)


@triton.jit
def _from_product(d_pre, w, d_hin, mask, mask_step, t, B, H, G: tl.constexpr, rows, cols, offs,
                  live, HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # The gradient reaching h(t) through step t+1's masked product: d_pre(t+1) W_hh, stored as
    # dL/d(m * h(t)), times step t+1's mask.
    d_in = _product_back(d_pre + (t + 1) * B * G * H, w, rows, cols, B, H, G * H, BLOCK_B,
                         BLOCK_J, BLOCK_K, PRECISION, WIDEN)
    tl.store(d_hin + (t + 1) * B * H + offs, d_in, mask=live)
    if HAS_MASK:
        d_in = d_in * _load(mask, (t + 1) * mask_step + offs, live)
    return d_in


@triton.jit(do_not_specialize=["t"])
def _lstm_backward_step(d_gates, w, d_hin, dh, dc, d_out, mask, mask_step, zone_h, zone_h_step,
                        zone_c, zone_c_step, valid, acts, cs, tanh_c, t, B, H,
                        LAST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZONE: tl.constexpr,
                        HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    state = t * B * H + offs
    gate = t * B * 4 * H + rows[:, None] * 4 * H + cols[None, :]
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
            d_h += _load(zone_h, (t + 1) * zone_h_step + offs, live) * later
        elif HAS_VALID:
            d_h += (1.0 - _running(valid, (t + 1) * B, rows, B).to(tl.float32)) * later
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
        keep_h = _load(zone_h, t * zone_h_step + offs, live)
        keep_c = _load(zone_c, t * zone_c_step + offs, live)
    v = 1.0
    if HAS_VALID:
        v = _running(valid, t * B, rows, B).to(tl.float32)
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
def _carry_backward_step(d_pre, w, d_hin, later, later_step, dh, dh_step, d_out, mask,
                         mask_step, keep, keep_step, coef, t, B, H, G: tl.constexpr,
                         LAST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KEEP: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # The GRU's and the Elman cell's backward step: dL/dh(t) (into row t of ``dh``; ``later``
    # holds dL/dh(t+1) in row t+1, or the final state's gradient), then the pre-activation
    # gradients d_pre[k] = dL/dh(t) * coef[k] of its G gates.
    rows, cols, offs, live = _tile(B, H, BLOCK_B, BLOCK_J)
    d_h = _load(d_out, t * B * H + offs, live)
    if LAST:
        d_h += _load(later, offs, live)
    else:
        d_h += _from_product(d_pre, w, d_hin, mask, mask_step, t, B, H, G, rows, cols, offs,
                             live, HAS_MASK, BLOCK_B, BLOCK_J, BLOCK_K, PRECISION, WIDEN)
        if HAS_KEEP:
            d_h += (_load(keep, (t + 1) * keep_step + offs, live)
                    * _load(later, (t + 1) * later_step + offs, live))
    tl.store(dh + t * dh_step + offs, d_h, mask=live)
    for k in tl.static_range(G):
        at = t * B * G * H + rows[:, None] * G * H + k * H + cols[None, :]
        tl.store(d_pre + at, d_h * _load(coef, at, live), mask=live)


def _interpreted():
    return not isinstance(_lstm_forward_step, triton.runtime.JITFunction)


def _launch(steps, batch, gates, hidden, like):
    """The grid and the tiling constexprs of a loop's kernels on ``like``'s device and dtype.

    One program per ``BLOCK_B`` rows (the batch, to at most 64) by ``BLOCK_J`` hidden units;
    ``tl.dot`` needs at least 16 of each. Each row tile reads all of W_hh per step, whatever
    ``BLOCK_J``, so the units are split 16 to a program wherever 32 would leave some of the
    GPU's multiprocessors without a program (at a batch of 20 and 650 units, 41 programs
    rather than 21); a heuristic, not yet timed. A kernel addresses the loop's
    ``(T + 1, B, G * H)`` buffers with 32-bit offsets from their start.
    """
    if (steps + 1) * batch * gates * hidden >= 2**31:
        raise ValueError(f"{steps} steps of batch {batch} and {gates} x {hidden} units are "
                         f"2**31 or more elements, more than the fused Triton kernels' 32-bit "
                         f"offsets reach")
    block_b = min(max(triton.next_power_of_2(batch), 16), 64)
    rows = triton.cdiv(batch, block_b)
    narrow = hidden <= 16 or rows * triton.cdiv(hidden, 32) < _processors(like.device)
    block_j = 16 if narrow else 32
    grid = (rows, triton.cdiv(hidden, block_j))
    return grid, dict(BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_K=_BLOCK_K, PRECISION="ieee",
                      WIDEN=like.dtype == torch.bfloat16 and _interpreted())


@functools.cache
def _processors(device):
    """The multiprocessors of a CUDA device; 0 elsewhere (the interpreter runs programs one
    after another, so fewer and larger is faster there)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _factor(tensor, steps, batch, hidden):
    """A ``(T|1, B, H|1)`` factor as ``(dense tensor, elements per step)``: the kernels read
    step t's ``(B, H)`` rows at ``t * step``; one shared row has step 0. ``(None, 0)`` without."""
    if tensor is None:
        return None, 0
    full = tensor.expand(steps, batch, hidden)
    if full.stride(0) == 0 and full[0].is_contiguous():
        return full, 0
    return full.contiguous(), batch * hidden


def _flags(valid):
    """``valid (T, B, 1)`` as bytes the kernels read per row, or None."""
    return None if valid is None else valid.contiguous().view(torch.uint8)


def _or(tensor, stand_in):
    """A pointer argument whose kernel branch is off still needs a tensor."""
    return stand_in if tensor is None else tensor


def _carried(grad):
    """A fresh float32 copy of a ``(B, H)`` gradient, carried between steps and updated in
    place (never the caller's tensor)."""
    return torch.empty(grad.shape, dtype=torch.float32, device=grad.device).copy_(grad)


def _first_state_grad(d_hin, mask, dh, keep):
    """dL/dh(0): through step 0's masked product, plus what passed h(0) through unchanged."""
    first = _carried(d_hin[0]) if mask is None else d_hin[0] * mask[0].float()
    return first if keep is None else first.addcmul_(keep.float(), dh)


def _masked_first(hs, mask, h_in):
    """The first step's product input: h(0), or m(0) * h(0) formed into ``h_in[0]``."""
    if mask is None:
        return hs
    torch.mul(hs[0], mask[0], out=h_in[0])
    return h_in


def lstm_forward(projected, w_hh, packed, mask, valid, zone_h, zone_c, acts, cs, tanh_c, hs,
                 h_in):
    steps, batch, gates = projected.shape
    hidden = gates // 4
    grid, tiles = _launch(steps, batch, 4, hidden, projected)
    projected, w_hh = projected.contiguous(), w_hh.contiguous()
    mask, mask_step = _factor(mask, steps, batch, hidden)
    zone_h, zh_step = _factor(zone_h, steps, batch, hidden)
    zone_c, zc_step = _factor(zone_c, steps, batch, hidden)
    flags = _flags(valid)
    src = _masked_first(hs, mask, h_in)
    for t in range(steps):
        _lstm_forward_step[grid](
            src, w_hh, projected, hs, cs, acts, tanh_c, _or(h_in, hs), _or(mask, hs), mask_step,
            _or(zone_h, hs), zh_step, _or(zone_c, hs), zc_step, _or(flags, hs), t, batch,
            hidden, HAS_NEXT=mask is not None and t + 1 < steps, HAS_ZONE=zone_h is not None,
            HAS_VALID=flags is not None, **tiles)


def lstm_backward(d_out, d_h, d_c, acts, cs, tanh_c, valid, w_hh, onednn, mask, passthrough,
                  zone_h, zone_c, need_first, d_gates, d_hin):
    # ``passthrough`` is 1 - valid: the kernel reads ``valid`` itself.
    steps, batch, gates = d_gates.shape
    hidden = gates // 4
    grid, tiles = _launch(steps, batch, 4, hidden, d_gates)
    d_out, acts, cs, tanh_c, w_hh = (t.contiguous() for t in (d_out, acts, cs, tanh_c, w_hh))
    dh, dc = _carried(d_h), _carried(d_c)
    mask, mask_step = _factor(mask, steps, batch, hidden)
    zone_h, zh_step = _factor(zone_h, steps, batch, hidden)
    zone_c, zc_step = _factor(zone_c, steps, batch, hidden)
    flags = _flags(valid)
    for t in range(steps - 1, -1, -1):
        _lstm_backward_step[grid](
            d_gates, w_hh, d_hin, dh, dc, d_out, _or(mask, dh), mask_step, _or(zone_h, dh),
            zh_step, _or(zone_c, dh), zc_step, _or(flags, dh), acts, cs, tanh_c, t, batch,
            hidden, LAST=t == steps - 1, HAS_MASK=mask is not None,
            HAS_ZONE=zone_h is not None, HAS_VALID=flags is not None, **tiles)
    if not need_first:
        return None, None
    torch.mm(d_gates[0], w_hh, out=d_hin[0])
    if zone_h is not None:
        keep = zone_h[0]
    else:  # 1 where a sequence has no steps: dL/dh(0) is carried to h(0) unchanged
        keep = None if flags is None else (flags[0] == 0).float()
    return _first_state_grad(d_hin, mask, dh, keep).to(d_h.dtype), dc.to(d_c.dtype)


def gru_forward(projected, w_hh, b_hh, packed, mask, valid, zone, rec, rz, n, hs, h_in):
    steps, batch, gates = projected.shape
    hidden = gates // 3
    grid, tiles = _launch(steps, batch, 3, hidden, projected)
    projected, w_hh = projected.contiguous(), w_hh.contiguous()
    mask, mask_step = _factor(mask, steps, batch, hidden)
    zone, zone_step = _factor(zone, steps, batch, hidden)
    flags = _flags(valid)
    src = _masked_first(hs, mask, h_in)
    for t in range(steps):
        _gru_forward_step[grid](
            src, w_hh, _or(b_hh, hs), projected, hs, rec, rz, n, _or(h_in, hs), _or(mask, hs),
            mask_step, _or(zone, hs), zone_step, _or(flags, hs), t, batch, hidden,
            HAS_BIAS=b_hh is not None, HAS_NEXT=mask is not None and t + 1 < steps,
            HAS_ZONE=zone is not None, HAS_VALID=flags is not None, **tiles)


def gru_backward(d_out, d_h, coef, keep_h, w_hh, onednn, mask, need_first, d_rec, d_hs, d_hin):
    steps, batch, gates = d_rec.shape
    hidden = gates // 3
    grid, tiles = _launch(steps, batch, 3, hidden, d_rec)
    d_out, d_h, coef, w_hh = (t.contiguous() for t in (d_out, d_h, coef, w_hh))
    keep, keep_step = _factor(keep_h, steps, batch, hidden)
    mask, mask_step = _factor(mask, steps, batch, hidden)
    for t in range(steps - 1, -1, -1):
        last = t == steps - 1
        _carry_backward_step[grid](
            d_rec, w_hh, d_hin, d_h if last else d_hs, 0 if last else batch * hidden, d_hs,
            batch * hidden, d_out, _or(mask, d_hs), mask_step, _or(keep, d_hs), keep_step,
            coef, t, batch, hidden, G=3, LAST=last, HAS_MASK=mask is not None,
            HAS_KEEP=keep is not None, **tiles)
    if not need_first:
        return None
    torch.mm(d_rec[0], w_hh, out=d_hin[0])
    first = _first_state_grad(d_hin, mask, d_hs[0].float(), None if keep is None else keep[0])
    return first.to(d_hs.dtype)


def elman_forward(projected, w_hh, packed, mask, valid, relu, zone, candidates, hs, h_in):
    steps, batch, hidden = projected.shape
    grid, tiles = _launch(steps, batch, 1, hidden, projected)
    projected, w_hh = projected.contiguous(), w_hh.contiguous()
    mask, mask_step = _factor(mask, steps, batch, hidden)
    zone, zone_step = _factor(zone, steps, batch, hidden)
    flags = _flags(valid)
    src = _masked_first(hs, mask, h_in)
    for t in range(steps):
        _elman_forward_step[grid](
            src, w_hh, projected, hs, _or(candidates, hs), _or(h_in, hs), _or(mask, hs),
            mask_step, _or(zone, hs), zone_step, _or(flags, hs), t, batch, hidden,
            RELU=bool(relu), HAS_NEXT=mask is not None and t + 1 < steps,
            HAS_ZONE=zone is not None, HAS_VALID=flags is not None, **tiles)


def elman_backward(d_out, d_h, slope, w_hh, onednn, mask, passthrough, need_first, d_pre,
                   d_hin):
    steps, batch, hidden = d_pre.shape
    grid, tiles = _launch(steps, batch, 1, hidden, d_pre)
    d_out, slope, w_hh = (t.contiguous() for t in (d_out, slope, w_hh))
    dh = _carried(d_h)  # dL/dh(t), in place, float32
    keep, keep_step = _factor(passthrough, steps, batch, hidden)
    mask, mask_step = _factor(mask, steps, batch, hidden)
    for t in range(steps - 1, -1, -1):
        _carry_backward_step[grid](
            d_pre, w_hh, d_hin, dh, 0, dh, 0, d_out, _or(mask, dh), mask_step, _or(keep, dh),
            keep_step, slope, t, batch, hidden, G=1, LAST=t == steps - 1,
            HAS_MASK=mask is not None, HAS_KEEP=keep is not None, **tiles)
    if not need_first:
        return None
    torch.mm(d_pre[0], w_hh, out=d_hin[0])
    return _first_state_grad(d_hin, mask, dh, None if keep is None else keep[0]).to(d_h.dtype)


# The fused step's loops: the Python twins' signatures and names.
LOOPS = types.SimpleNamespace(
    lstm_forward=lstm_forward, lstm_backward=lstm_backward, gru_forward=gru_forward,
    gru_backward=gru_backward, elman_forward=elman_forward, elman_backward=elman_backward)
