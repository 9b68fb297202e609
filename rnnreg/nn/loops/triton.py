"""The per-step loops of rnnreg's own recurrence for CUDA tensors: cuBLAS products and Triton.

Same signatures and results as the Python twins (``rnnreg.nn.loops.python``; equations in
``rnnreg.nn.recurrence``). Each step of a forward loop is ONE recurrent product on the masked
state (``torch.mm``/``torch.addmm`` with ``out=``, i.e. one cuBLAS call into a preallocated
buffer) and ONE fused elementwise Triton kernel, which adds the projected input, applies the
gates, updates c and h, applies zoneout and the length freeze, and writes both h(t) and the
masked h(t) the next product reads. Each step of a backward loop is one fused kernel (which
first gathers dL/dh(t) from the previous product, the output gradient and the pass-through of a
frozen or zoned-out state, then forms the gate gradients) and one product; dW_hh stays one
product over all ``T*B`` rows after the loop, in ``rnnreg.nn.recurrence``.

The kernels compute in float32 whatever the buffers' dtype (bfloat16 or float16 under
autocast); the LSTM's and the Elman cell's backward carry dL/dh (and dL/dc) between steps in
float32, while the GRU's keeps dL/dh(t) of every step in the buffers' dtype (its backward reads
them all again after the loop); cuBLAS accumulates the low-precision products in float32.

A loop of T steps is 2T launches of small kernels, each with a fixed launch cost on the host. On
CUDA each loop is therefore captured as a CUDA graph per shape, dtype and options, on the second
call of each (:class:`GraphCache`), and replayed with one launch: the arguments are
copied into the graph's static buffers, the graph runs, and the buffers the loop fills are
copied out. Where capture is not possible (Triton's interpreter, CPU tensors, a caller that is
itself capturing a graph, a capture that fails) the same steps run as plain launches.

This module imports Triton; ``rnnreg.nn.loops`` imports it only when the Triton engine is
chosen, so ``import rnnreg`` works without Triton. Under ``TRITON_INTERPRET=1`` (set before
Triton is imported) the kernels run on CPU tensors, which is how they are tested without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import types
import warnings

import torch
import triton
import triton.language as tl

from rnnreg.nn.loops import triton_fused

__all__ = ["GraphCache", "LOOPS", "interpreted"]

_BLOCK = 512  # elements of the (B, H) state per program


def interpreted():
    """Whether this module's kernels run in Triton's interpreter: decided when the module was
    imported, by ``TRITON_INTERPRET=1`` then."""
    return not isinstance(_lstm_forward_step, triton.runtime.JITFunction)


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
def _load(ptr, offs, live):
    return tl.load(ptr + offs, mask=live, other=0.0).to(tl.float32)


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


@triton.jit
def _lstm_forward_step(rec, p, c_prev, h_prev, acts, c_new, tanh_c, h_new, mask_next,
                       h_in_next, zone_h, zone_c, valid, n, H,
                       HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                       HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    gate = b * 4 * H + offs - b * H  # gate 0's element in a (B, 4H) row
    i = _sigmoid(_load(rec, gate, live) + _load(p, gate, live))
    f = _sigmoid(_load(rec, gate + H, live) + _load(p, gate + H, live))
    g = _tanh(_load(rec, gate + 2 * H, live) + _load(p, gate + 2 * H, live))
    o = _sigmoid(_load(rec, gate + 3 * H, live) + _load(p, gate + 3 * H, live))
    tl.store(acts + gate, i, mask=live)
    tl.store(acts + gate + H, f, mask=live)
    tl.store(acts + gate + 2 * H, g, mask=live)
    tl.store(acts + gate + 3 * H, o, mask=live)
    cp = _load(c_prev, offs, live)
    hp = _load(h_prev, offs, live)
    c = f * cp + i * g
    tc = _tanh(c)
    tl.store(tanh_c + offs, tc, mask=live)
    tl.store(c_new + offs, _kept(c, cp, zone_c, valid, b, offs, live, HAS_ZONE, HAS_VALID),
             mask=live)
    h = _kept(o * tc, hp, zone_h, valid, b, offs, live, HAS_ZONE, HAS_VALID)
    _store_state(h, h_new, mask_next, h_in_next, offs, live, HAS_NEXT)


@triton.jit
def _gru_forward_step(rec, p, h_prev, rz, n_out, h_new, mask_next, h_in_next, zone, valid,
                      n, H, HAS_ZONE: tl.constexpr, HAS_VALID: tl.constexpr,
                      HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    j = offs - b * H
    gate = b * 3 * H + j
    r = _sigmoid(_load(rec, gate, live) + _load(p, gate, live))
    z = _sigmoid(_load(rec, gate + H, live) + _load(p, gate + H, live))
    cand = _tanh(_load(p, gate + 2 * H, live) + r * _load(rec, gate + 2 * H, live))
    tl.store(rz + b * 2 * H + j, r, mask=live)
    tl.store(rz + b * 2 * H + H + j, z, mask=live)
    tl.store(n_out + offs, cand, mask=live)
    hp = _load(h_prev, offs, live)
    h = _kept(cand + z * (hp - cand), hp, zone, valid, b, offs, live, HAS_ZONE, HAS_VALID)
    _store_state(h, h_new, mask_next, h_in_next, offs, live, HAS_NEXT)


@triton.jit
def _elman_forward_step(rec, p, h_prev, candidate, h_new, mask_next, h_in_next, zone, valid,
                        n, H, RELU: tl.constexpr, HAS_ZONE: tl.constexpr,
                        HAS_VALID: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    a = _load(rec, offs, live) + _load(p, offs, live)
    if RELU:
        h = tl.maximum(a, 0.0)
    else:
        h = _tanh(a)
    if HAS_ZONE:  # the candidate stays for act' in the backward
        tl.store(candidate + offs, h, mask=live)
    h = _kept(h, _load(h_prev, offs, live), zone, valid, b, offs, live, HAS_ZONE, HAS_VALID)
    _store_state(h, h_new, mask_next, h_in_next, offs, live, HAS_NEXT)


@triton.jit
def _gathered(dh_next, d_out, d_hin_next, mask_next, offs, live, LAST: tl.constexpr,
              HAS_MASK: tl.constexpr):
    # dL/dh(t) without the pass-through term: the output gradient plus, below the last step,
    # the gradient through step t+1's masked product.
    d = _load(d_out, offs, live)
    if LAST:
        d += _load(dh_next, offs, live)  # the final state's gradient
    else:
        from_product = _load(d_hin_next, offs, live)
        if HAS_MASK:
            from_product = from_product * _load(mask_next, offs, live)
        d += from_product
    return d


@triton.jit
def _lstm_backward_step(dh, dc, d_out, d_hin_next, mask_next, zone_h_next, valid_next, acts,
                        c_prev, tanh_c, zone_h, zone_c, valid, d_gates, n, H,
                        LAST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZONE: tl.constexpr,
                        HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    gate = b * 4 * H + offs - b * H
    # dL/dh(t), gathered in place of dL/dh(t+1) (read first, elementwise).
    later = _load(dh, offs, live)
    d_h = _gathered(dh, d_out, d_hin_next, mask_next, offs, live, LAST, HAS_MASK)
    if not LAST:  # the part of dL/dh(t+1) that passed h(t) through unchanged
        if HAS_ZONE:
            d_h += _load(zone_h_next, offs, live) * later
        elif HAS_VALID:
            d_h += (tl.load(valid_next + b, mask=live, other=0) == 0).to(tl.float32) * later
    tl.store(dh + offs, d_h, mask=live)
    d_c = _load(dc, offs, live)
    i = _load(acts, gate, live)
    f = _load(acts, gate + H, live)
    g = _load(acts, gate + 2 * H, live)
    o = _load(acts, gate + 3 * H, live)
    tc = _load(tanh_c, offs, live)
    keep_h = 0.0
    keep_c = 0.0
    if HAS_ZONE:
        keep_h = _load(zone_h, offs, live)
        keep_c = _load(zone_c, offs, live)
    v = 1.0
    if HAS_VALID:
        v = (tl.load(valid + b, mask=live, other=0) != 0).to(tl.float32)
    d_new_h = d_h * (1.0 - keep_h) * v  # reaches the candidate h~ of a running sequence
    d_cell = d_c * (1.0 - keep_c) + d_new_h * o * (1.0 - tc * tc)  # all of dL/dc~(t)
    d_cv = d_cell * v
    tl.store(d_gates + gate, d_cv * g * i * (1.0 - i), mask=live)
    tl.store(d_gates + gate + H, d_cv * _load(c_prev, offs, live) * f * (1.0 - f), mask=live)
    tl.store(d_gates + gate + 2 * H, d_cv * i * (1.0 - g * g), mask=live)
    tl.store(d_gates + gate + 3 * H, d_new_h * tc * o * (1.0 - o), mask=live)
    # dL/dc(t-1): through f while running, copied past the end, d_c of it zoned out.
    tl.store(dc + offs, keep_c * d_c + d_cell * (v * f + 1.0 - v), mask=live)


@triton.jit
def _carry_backward_step(dh_next, dh, d_out, d_hin_next, mask_next, keep_next, coef, d_pre, n,
                         H, G: tl.constexpr, LAST: tl.constexpr, HAS_MASK: tl.constexpr,
                         HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
    # The GRU's and the Elman cell's backward step: dL/dh(t) (into ``dh``), then the
    # pre-activation gradients d_pre[k] = dL/dh(t) * coef[k] of its G gates.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    b = offs // H
    j = offs - b * H
    d_h = _gathered(dh_next, d_out, d_hin_next, mask_next, offs, live, LAST, HAS_MASK)
    if not LAST and HAS_KEEP:
        d_h += _load(keep_next, offs, live) * _load(dh_next, offs, live)
    tl.store(dh + offs, d_h, mask=live)
    for k in tl.static_range(G):
        at = (b * G + k) * H + j
        tl.store(d_pre + at, d_h * _load(coef, at, live), mask=live)


def _grid(batch, hidden, gates):
    """One program per ``_BLOCK`` elements of the ``(B, H)`` state. A kernel addresses one
    step's ``(B, gates * H)`` rows with 32-bit offsets from each row's start."""
    if batch * gates * hidden >= 2**31:
        raise ValueError(f"a step of batch {batch} and {gates} x {hidden} units has 2**31 or "
                         f"more elements, more than the Triton kernels' 32-bit offsets reach")
    return (triton.cdiv(batch * hidden, _BLOCK),)


def _products(w_hh, b_hh, masks, hs, h_in, recs):
    """Each forward step's recurrent product ``W_hh (m * h(t-1)) (+ b_hh)`` into ``recs[t]``,
    yielding ``(t, following)``; ``following``: the step's kernel writes the masked state the
    next product reads. The first masked state is formed here."""
    masked = masks[0] is not None
    if masked:
        torch.mul(hs[0], masks[0], out=h_in[0])
    for t, rec in enumerate(recs):
        state = h_in[t] if masked else hs[t]
        if b_hh is None:
            torch.mm(state, w_hh.t(), out=rec)
        else:
            torch.addmm(b_hh, state, w_hh.t(), out=rec)
        yield t, masked and t + 1 < len(recs)


def _rows(tensor, steps, like):
    """Row t of a ``(T|1, B, H|1)`` factor as a contiguous ``(B, H)`` view for each step (the
    kernels index rows densely), or None for every step when there is no factor."""
    if tensor is None:
        return [None] * steps
    full = tensor.expand(steps, *like.shape)
    if not full[0].is_contiguous():
        full = full.contiguous()
    return full.unbind(0)


def _flags(valid):
    """``valid (T, B, 1)`` as bytes the kernels read per row, or None."""
    return None if valid is None else valid.contiguous().view(torch.uint8)


def _or(tensor, stand_in):
    """A pointer argument whose kernel branch is off still needs a tensor."""
    return stand_in if tensor is None else tensor


def lstm_forward(projected, w_hh, packed, mask, valid, zone_h, zone_c, acts, cs, tanh_c, hs,
                 h_in):
    steps, batch, gates = projected.shape
    hidden = gates // 4
    projected = projected.contiguous()  # the kernels index each step's rows densely
    rec = projected.new_empty(batch, gates)
    masks = _rows(mask, steps, hs[0])
    keep_h, keep_c = _rows(zone_h, steps, hs[0]), _rows(zone_c, steps, hs[0])
    flags = _flags(valid)
    for t, following in _products(w_hh, None, masks, hs, h_in, [rec] * steps):
        _lstm_forward_step[_grid(batch, hidden, 4)](
            rec, projected[t], cs[t], hs[t], acts[t], cs[t + 1], tanh_c[t], hs[t + 1],
            masks[t + 1] if following else rec, h_in[t + 1] if following else rec,
            _or(keep_h[t], rec), _or(keep_c[t], rec), rec if flags is None else flags[t],
            batch * hidden, hidden, HAS_ZONE=zone_h is not None, HAS_VALID=flags is not None,
            HAS_NEXT=following, BLOCK=_BLOCK)


def lstm_backward(d_out, d_h, d_c, acts, cs, tanh_c, valid, w_hh, onednn, mask, passthrough,
                  zone_h, zone_c, need_first, d_gates, d_hin):
    # ``passthrough`` is 1 - valid: the kernel reads ``valid`` itself.
    steps, batch, gates = d_gates.shape
    hidden = gates // 4
    d_out, acts, cs, tanh_c = (t.contiguous() for t in (d_out, acts, cs, tanh_c))
    dh, dc = _carried(d_h), _carried(d_c)
    masks = _rows(mask, steps, dh)
    keep_h, keep_c = _rows(zone_h, steps, dh), _rows(zone_c, steps, dh)
    flags = _flags(valid)
    for t in range(steps - 1, -1, -1):
        last = t == steps - 1
        nxt = t if last else t + 1
        _lstm_backward_step[_grid(batch, hidden, 4)](
            dh, dc, d_out[t], d_hin[nxt], _or(masks[nxt], dh), _or(keep_h[nxt], dh),
            dh if flags is None else flags[nxt], acts[t], cs[t], tanh_c[t], _or(keep_h[t], dh),
            _or(keep_c[t], dh), dh if flags is None else flags[t], d_gates[t],
            batch * hidden, hidden, LAST=last, HAS_MASK=mask is not None,
            HAS_ZONE=zone_h is not None, HAS_VALID=flags is not None, BLOCK=_BLOCK)
        if t == 0 and not need_first:
            return None, None
        torch.mm(d_gates[t], w_hh, out=d_hin[t])
    first = _first_state_grad(d_hin, masks[0], dh,
                              keep_h[0] if zone_h is not None else _ended(flags))
    return first.to(d_h.dtype), dc.to(d_c.dtype)


def _carried(grad):
    """A fresh float32 copy of a ``(B, H)`` gradient, carried between steps and updated in
    place (never the caller's tensor)."""
    return torch.empty(grad.shape, dtype=torch.float32, device=grad.device).copy_(grad)


def _ended(flags):
    """1 where a sequence has ended before step 0 (has no steps), else 0: the factor that
    carries dL/dh(0) to h(0) unchanged; None without lengths."""
    return None if flags is None else (flags[0] == 0).float()


def _first_state_grad(d_hin, mask, dh, keep):
    """dL/dh(0): through step 0's masked product, plus what passed h(0) through unchanged."""
    first = _carried(d_hin[0]) if mask is None else d_hin[0] * mask.float()
    return first if keep is None else first.addcmul_(keep.float(), dh)


def gru_forward(projected, w_hh, b_hh, packed, mask, valid, zone, rec, rz, n, hs, h_in):
    steps, batch, gates = projected.shape
    hidden = gates // 3
    projected = projected.contiguous()
    masks, keep = _rows(mask, steps, hs[0]), _rows(zone, steps, hs[0])
    flags = _flags(valid)
    for t, following in _products(w_hh, b_hh, masks, hs, h_in, rec):
        _gru_forward_step[_grid(batch, hidden, 3)](
            rec[t], projected[t], hs[t], rz[t], n[t], hs[t + 1],
            masks[t + 1] if following else rec, h_in[t + 1] if following else rec,
            _or(keep[t], rec), rec if flags is None else flags[t], batch * hidden, hidden,
            HAS_ZONE=zone is not None, HAS_VALID=flags is not None, HAS_NEXT=following,
            BLOCK=_BLOCK)


def gru_backward(d_out, d_h, coef, keep_h, w_hh, onednn, mask, need_first, d_rec, d_hs, d_hin):
    steps, batch, gates = d_rec.shape
    hidden = gates // 3
    keep = _rows(keep_h, steps, d_hs[0])
    masks = _rows(mask, steps, d_hs[0])
    coef, d_out, d_h = coef.contiguous(), d_out.contiguous(), d_h.contiguous()
    for t in range(steps - 1, -1, -1):
        last = t == steps - 1
        _carry_step(3, last, d_h if last else d_hs[t + 1], d_hs[t], d_out[t],
                    d_hin[t if last else t + 1], masks[t if last else t + 1],
                    keep[t if last else t + 1], coef[t], d_rec[t], batch, hidden)
        if t == 0 and not need_first:
            return None
        torch.mm(d_rec[t], w_hh, out=d_hin[t])
    return _first_state_grad(d_hin, masks[0], d_hs[0].float(), keep[0]).to(d_hs.dtype)


def _carry_step(gates, last, dh_next, dh, d_out, d_hin_next, mask_next, keep_next, coef, d_pre,
                batch, hidden):
    _carry_backward_step[_grid(batch, hidden, gates)](
        dh_next, dh, d_out, d_hin_next, _or(mask_next, dh), _or(keep_next, dh), coef, d_pre,
        batch * hidden, hidden, G=gates, LAST=last, HAS_MASK=mask_next is not None,
        HAS_KEEP=keep_next is not None, BLOCK=_BLOCK)


def elman_forward(projected, w_hh, packed, mask, valid, relu, zone, candidates, hs, h_in):
    steps, batch, hidden = projected.shape
    projected = projected.contiguous()
    rec = projected.new_empty(batch, hidden)
    masks, keep = _rows(mask, steps, hs[0]), _rows(zone, steps, hs[0])
    flags = _flags(valid)
    for t, following in _products(w_hh, None, masks, hs, h_in, [rec] * steps):
        _elman_forward_step[_grid(batch, hidden, 1)](
            rec, projected[t], hs[t], rec if candidates is None else candidates[t], hs[t + 1],
            masks[t + 1] if following else rec, h_in[t + 1] if following else rec,
            _or(keep[t], rec), rec if flags is None else flags[t], batch * hidden, hidden,
            RELU=bool(relu), HAS_ZONE=zone is not None, HAS_VALID=flags is not None,
            HAS_NEXT=following, BLOCK=_BLOCK)


def elman_backward(d_out, d_h, slope, w_hh, onednn, mask, passthrough, need_first, d_pre,
                   d_hin):
    steps, batch, hidden = d_pre.shape
    d_out = d_out.contiguous()
    dh = _carried(d_h)
    keep = _rows(passthrough, steps, dh)
    masks = _rows(mask, steps, dh)
    slope = slope.contiguous()
    for t in range(steps - 1, -1, -1):
        last = t == steps - 1
        nxt = t if last else t + 1
        _carry_step(1, last, dh, dh, d_out[t], d_hin[nxt], masks[nxt], keep[nxt], slope[t],
                    d_pre[t], batch, hidden)
        if t == 0 and not need_first:
            return None
        torch.mm(d_pre[t], w_hh, out=d_hin[t])
    return _first_state_grad(d_hin, masks[0], dh, keep[0]).to(d_h.dtype)


# The buffers each loop fills, copied out of a graph's static buffers after a replay; all other
# tensor arguments are inputs, copied in (of ``hs`` and ``cs`` only row 0, the initial state).
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

    A graph replays the kernels it recorded on the memory it recorded them on, so each entry
    owns static copies of its loop's arguments: a call copies its inputs in, replays, and
    copies the filled buffers (and the returned gradients) out. A key is captured on its
    second call (the first launches plainly), so shapes that come once (an epoch's last
    batch, one evaluation) cost no capture; ``size`` entries are kept, the least recently used
    dropped first. Capture needs a CUDA device, compiled (not interpreted) kernels and a stream
    that is not already capturing; otherwise, after a capture that fails (with a warning),
    while torch.compile traces, and while ``enabled`` is False (to compare the two, or to rule
    graphs out), :meth:`run` launches the steps plainly. The key includes the matmul settings
    cuBLAS reads (TF32, reduced-precision reductions), which a replay keeps from its capture.
    """

    def __init__(self, size=16, enabled=True):
        self.size = size
        self.enabled = enabled
        self.entries = collections.OrderedDict()
        self.seen = collections.OrderedDict()  # keys called once, not captured yet
        self.failed = False  # a capture failed: plain launches from then on
        self.captures = 0  # graphs captured so far (replays of cached ones are not counted)

    def usable(self, device):
        """Whether loops on ``device`` would run as graph replays (from a key's second call)."""
        return self.enabled and not self.failed and _capturable(device)

    def run(self, name, loop, args):
        """``loop(*args)`` as a graph replay where :meth:`usable`, else plainly; on the
        arguments' device, which need not be the current one (Triton launches its kernels,
        and torch captures graphs, on the current device)."""
        if torch.compiler.is_compiling():  # traced as plain launches
            return loop(*args)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return self._run(name, loop, args, device)

    def _run(self, name, loop, args, device):
        if not self.usable(device) or torch.cuda.is_current_stream_capturing():
            return loop(*args)
        key = (name, loop, device, _matmul_settings(), *(_signature(a) for a in args))
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry.replay(args, _FILLED[name])
        if self.seen.pop(key, None) is None:  # a first call
            self.seen[key] = True
            if len(self.seen) > 4 * self.size:
                self.seen.popitem(last=False)
            return loop(*args)
        try:
            entry = _Captured(loop, args)
        except Exception as error:  # e.g. a driver or allocator that cannot capture
            self.failed = True
            warnings.warn(f"rnnreg could not capture its Triton loops as CUDA graphs, so "
                          f"they launch step by step ({type(error).__name__}: {error})",
                          RuntimeWarning, stacklevel=4)
            return loop(*args)
        self.captures += 1
        self.entries[key] = entry
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return entry.replay(args, _FILLED[name])


def _capturable(device):
    """Whether loops on ``device`` can be captured at all: CUDA, with compiled kernels."""
    return torch.device(device).type == "cuda" and not interpreted()


def _matmul_settings():
    """The settings cuBLAS reads when a product is captured: a replay keeps them."""
    matmul = torch.backends.cuda.matmul
    return (matmul.allow_tf32, torch.get_float32_matmul_precision(),
            matmul.allow_bf16_reduced_precision_reduction,
            matmul.allow_fp16_reduced_precision_reduction)


def _signature(arg):
    if isinstance(arg, torch.Tensor):
        return (tuple(arg.shape), tuple(arg.stride()), arg.dtype)
    return arg


class _Captured:
    """One recorded loop with its static arguments.

    ``record(run)`` records ``run()`` and returns ``(replay, result)``: ``replay()`` repeats it
    on the same memory, refreshing ``result``'s tensors in place (:func:`_cuda_graph`).
    """

    def __init__(self, loop, args, record=None):
        self.names = _LOOP_PARAMETERS[loop.__name__]
        # Ordinary tensors even when the first call comes under inference_mode, so that later
        # calls outside it may copy into them; no_grad, since leaving inference_mode turns
        # gradients back on.
        with torch.inference_mode(False), torch.no_grad():
            self.static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.repeat, self.result = (record or _cuda_graph)(lambda: loop(*self.static))

    def replay(self, args, filled):
        """``loop(*args)`` by replay: inputs copied in, ``filled`` buffers and results out."""
        for name, static, arg in zip(self.names, self.static, args):
            if isinstance(arg, torch.Tensor) and name not in filled:
                static.copy_(arg)
            elif name in _INITIAL_ROW:
                static[0].copy_(arg[0])
        self.repeat()
        for name, static, arg in zip(self.names, self.static, args):
            if name in filled and arg is not None:
                arg.copy_(static)
        if isinstance(self.result, tuple):
            return tuple(None if r is None else r.clone() for r in self.result)
        return None if self.result is None else self.result.clone()


def _cuda_graph(run):
    """``run()`` captured as a CUDA graph: ``(graph.replay, the tensors run() returned)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels, sets up cuBLAS
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    caller = torch.cuda.current_stream()
    try:
        # thread_local: the backward loops are captured on autograd's thread, while other
        # threads (a data loader's) may use CUDA.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            result = run()
    except BaseException:
        # When ending a failed capture raises, torch.cuda.graph leaves its capture stream
        # current; the plain launches that follow belong on the caller's stream.
        torch.cuda.set_stream(caller)
        raise
    return graph.replay, result


_STEPS = types.SimpleNamespace(
    lstm_forward=lstm_forward, lstm_backward=lstm_backward, gru_forward=gru_forward,
    gru_backward=gru_backward, elman_forward=elman_forward, elman_backward=elman_backward)
_LOOP_PARAMETERS = {name: tuple(fn.__code__.co_varnames[:fn.__code__.co_argcount])
                    for name, fn in vars(_STEPS).items()}

GRAPHS = GraphCache()


def _graphed(name):
    # The one place the step is chosen, per call (RNNREG_TRITON_STEP): the two-kernel step
    # above, or one kernel per step (rnnreg.nn.loops.triton_fused).
    def call(*args):
        steps = triton_fused.LOOPS if triton_fused.requested() == "fused" else _STEPS
        return GRAPHS.run(name, getattr(steps, name), args)

    call.__name__ = name
    call.__doc__ = f"``{name}`` (the Python twin's signature), as a CUDA graph where it can be."
    return call


# The engine: the Python twins' signatures, each loop a graph replay where capture works.
LOOPS = types.SimpleNamespace(**{name: _graphed(name) for name in vars(_STEPS)})
