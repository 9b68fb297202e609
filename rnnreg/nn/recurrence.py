"""rnnreg's own recurrence: the loop that runs when a dropout mask acts inside the recurrence.

torch's fused kernels (cuDNN, oneDNN) cannot take a mask on h(t-1) or a dropped ``weight_hh``,
so recurrent dropout (Gal & Ghahramani 2016), weight drop (Merity et al. 2018) and zoneout
(Krueger et al. 2017) run here. Gate order and equations are torch's, so weights load both
ways with ``torch.nn``.

Speed comes from doing by hand what plain autograd would do step by step:

* The input projection ``W_ih x(t) + b`` of every step is one matrix product outside the loop,
  so dx, dW_ih and db_ih are each one big product in the backward too.
* Each mode is a ``torch.autograd.Function`` whose forward writes gate activations and states
  into preallocated buffers (no autograd graph of ~10 nodes per step) and whose backward runs
  through time by hand (BPTT, Werbos 1990). Everything in the gate derivatives that does not
  depend on the incoming gradient is computed for all steps at once before the backward loop,
  so the loop is a recurrent matrix product plus two to five elementwise kernels per step.
* dW_hh = sum_t dgates(t)^T h_in(t) is ONE product over all ``T*B`` rows after the loop instead
  of ``T`` small products each accumulated into a ``(G*H, H)`` gradient.
* The loops themselves (``rnnreg.nn.loops``) run compiled C++ on CPU and cuBLAS products with
  fused Triton kernels, replayed as CUDA graphs, on GPU; on CPU the products go to oneDNN, the
  library behind torch's own CPU LSTM, at the widths where it is faster than ``torch.mm``
  (``rnnreg.nn.products``).

Double backward is not supported (the backward is ``once_differentiable``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rnnreg.errors import RnnregError
from rnnreg.nn import loops, products
from rnnreg.nn.loops.python import stop_at_lengths
from rnnreg.nn.products import project

__all__ = ["recurrence"]


def recurrence(mode, x, state, w_ih, w_hh, b_ih, b_hh, mask, lengths, zoneout=None):
    """Run one direction of one layer: ``x (T, B, F)`` -> ``(outputs (T, B, H), final state)``.

    ``mode`` is "LSTM", "GRU", "RNN_TANH" or "RNN_RELU"; ``state`` is ``(h,)`` or ``(h, c)``,
    each ``(B, H)``. ``mask`` (None or ``(T|1, B, H)``) multiplies h(t-1) where it enters the
    recurrent product (Gal & Ghahramani 2016, eq. 7 with a single mask shared by all gates); the
    LSTM cell path and the GRU's interpolation with h(t-1) use the unmasked state. ``lengths``
    (None or a ``(B,)`` LongTensor) freezes each sequence's state after its last step and zeroes
    its outputs from there on, so the final state is the one at that sequence's end.

    ``zoneout`` (None or ``(hidden, cell)``, each None or ``(T|1, B, H)``; ``cell`` only for the
    LSTM) holds Krueger et al.'s (2017) keep factors ``d``: each new state is
    ``d * previous + (1 - d) * candidate``, with ``d`` in {0, 1} in training and the rate itself
    (the expectation) in evaluation. ``mask`` acts on h(t-1) inside the product only; zoneout
    mixes in the undropped h(t-1).

    Everything is differentiable w.r.t. ``x``, ``state``, the weights and biases (which may
    already carry a DropConnect mask) and ``mask``; the zoneout factors are constants.
    """
    if x.size(0) == 0:
        raise RnnregError("x must have at least one time step, got shape (0, ...)")
    # Outside the loop b_hh is just a second input bias, except in the GRU where torch keeps
    # b_hn inside r * (W_hn h + b_hn); summing the two vectors first saves a (T, B, G*H) add.
    bias = b_ih
    if mode != "GRU" and b_hh is not None:
        bias = b_hh if b_ih is None else b_ih + b_hh
    projected = project(x, w_ih, bias, w_hh.size(1))
    valid = None
    if lengths is not None:
        steps = torch.arange(x.size(0), device=x.device).unsqueeze(1)
        valid = (steps < lengths.to(x.device).unsqueeze(0)).unsqueeze(2)  # (T, B, 1)
    # The loop writes into buffers of one dtype. Under autocast the projection comes out in the
    # low-precision dtype; like torch's fused kernels, run the whole recurrence in it. Outside
    # autocast every ``.to`` below returns its input unchanged.
    dtype = projected.dtype
    state = tuple(s.to(dtype) for s in state)
    w_hh = w_hh.to(dtype)
    b_hh = None if b_hh is None else b_hh.to(dtype)
    mask = None if mask is None else mask.to(dtype).contiguous()  # the loops read it raw
    if mode not in _MODES:
        raise RnnregError(f"unknown mode {mode!r}; choose LSTM, GRU, RNN_TANH or RNN_RELU")
    zone_h, zone_c = _zone_factors(mode, zoneout, valid, state[0], dtype)
    with torch.autocast(x.device.type, enabled=False):
        if mode == "LSTM":
            out, h, c = _LSTM.apply(projected, state[0], state[1], w_hh, mask, valid, zone_h,
                                    zone_c)
            return out, (h, c)
        if mode == "GRU":
            out, h = _GRU.apply(projected, state[0], w_hh, b_hh, mask, valid, zone_h)
        else:
            out, h = _Elman.apply(projected, state[0], w_hh, mask, valid, mode == "RNN_RELU",
                                  zone_h)
    return out, (h,)


_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


def _zone_factors(mode, zoneout, valid, h0, dtype):
    """The zoneout keep factors ``(hidden, cell)`` the loops use, each None or contiguous
    ``(T|1, B, H)``; both present for an LSTM with any zoneout, so its loops have one case.

    With ``valid`` the end of each sequence is folded in: past it the factor is 1, which is
    exactly the frozen state, and the loops then need no separate length handling.
    """
    hidden, cell = (None, None) if zoneout is None else zoneout
    if mode != "LSTM" and cell is not None:
        raise RnnregError(f"{mode} has no cell state: zoneout on the cell is for the LSTM only")
    if hidden is None and cell is None:
        return None, None
    factors = [hidden, cell] if mode == "LSTM" else [hidden]
    factors = [h0.new_zeros(1, *h0.shape) if f is None else f.to(dtype) for f in factors]
    if valid is not None:
        factors = [torch.where(valid, f, 1) for f in factors]
    factors = [f.contiguous() for f in factors]
    return factors[0], (factors[1] if mode == "LSTM" else None)


class _LSTM(torch.autograd.Function):
    """LSTM recurrence on projected inputs ``p(t) = W_ih x(t) + b_ih + b_hh``.

    Forward (torch's gate order; Zaremba et al. 2014, section 3, and Hochreiter & Schmidhuber
    1997), with ``m`` the recurrent dropout mask:

        [i, f, g, o] = [sigm, sigm, tanh, sigm](p(t) + W_hh (m * h(t-1)))
        c(t) = f * c(t-1) + i * g
        h(t) = o * tanh(c(t))

    Backward, with dh = dL/dh(t) and dc = dL/dc(t) arriving from step t+1:

        dc~ = dc + dh * o * (1 - tanh(c)^2)              (all of dL/dc(t))
        d[i, f, g]_pre = dc~ * [g i (1-i),  c(t-1) f (1-f),  i (1-g^2)]
        d o_pre = dh * tanh(c) o (1-o)
        dL/dc(t-1) = dc~ * f,   dL/dh(t-1) = m * (W_hh^T dgates) + dL/dout(t-1)

    With zoneout (Krueger et al. 2017) the step computes the candidate
    c~ = f * c(t-1) + i * g and h~ = o * tanh(c~) as above, then keeps each unit with factors
    d_c, d_h: c(t) = d_c c(t-1) + (1 - d_c) c~,  h(t) = d_h h(t-1) + (1 - d_h) h~. ``cs`` holds
    the kept states and ``tanh_c`` tanh(c~). The backward runs the equations above with
    dh -> (1 - d_h) dh and dc -> (1 - d_c) dc, and adds d_c dc and d_h dh to dL/dc(t-1) and
    dL/dh(t-1).

    The bracketed coefficients do not depend on dh or dc: the Python loop computes them for all
    steps at once before the loop, which then needs one product and five elementwise kernels per
    step; the compiled loop forms them per step inside one fused pass.
    Past a sequence's length the step is the identity on (h, c): the coefficients are zeroed
    there, f acts as 1 and dh passes straight to h(t-1).
    """

    @staticmethod
    def forward(ctx, projected, h0, c0, w_hh, mask, valid, zone_h, zone_c):
        steps, batch, gates = projected.shape
        hidden = gates // 4
        acts = projected.new_empty(steps, batch, gates)  # [i, f, g, o] after their nonlinearity
        hs = _states(h0, steps)
        cs = _states(c0, steps)
        tanh_c = projected.new_empty(steps, batch, hidden)
        h_in = None if mask is None else projected.new_empty(steps, batch, hidden)
        lengths = valid if zone_h is None else None  # else folded into the zoneout factors
        loops.engine(projected).lstm_forward(projected, w_hh,
                                             products.packed_weight(w_hh, batch), mask, lengths,
                                             zone_h, zone_c, acts, cs, tanh_c, hs, h_in)
        ctx.save_for_backward(acts, cs, tanh_c, hs, h_in, w_hh, mask, valid, zone_h, zone_c)
        return _outputs(hs, valid), hs[-1].clone(), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h, d_c):
        acts, cs, tanh_c, hs, h_in, w_hh, mask, valid, zone_h, zone_c = ctx.saved_tensors
        steps, batch, gates = acts.shape
        hidden = gates // 4
        d_out, passthrough = _freeze(d_out.contiguous(), valid)
        if zone_h is not None:  # the frozen steps are zoneout factors of 1
            valid = passthrough = None
        d_gates = acts.new_empty(steps, batch, gates)
        d_hin = acts.new_empty(steps, batch, hidden)  # dL/d(m * h(t-1))
        need_first = any(ctx.needs_input_grad[1:3]) or ctx.needs_input_grad[4]
        dh, dc = loops.engine(acts).lstm_backward(
            d_out, d_h, d_c, acts, cs, tanh_c, valid, w_hh,
            products.onednn_pays(w_hh, hidden, "step"), mask, passthrough, zone_h, zone_c,
            need_first, d_gates, d_hin)
        return (d_gates, dh, dc,
                _weight_grad(ctx, 3, d_gates, hs[:-1] if h_in is None else h_in),
                _mask_grad(ctx, 4, d_hin, hs, mask), None, None, None)


class _GRU(torch.autograd.Function):
    """GRU recurrence on projected inputs ``p(t) = W_ih x(t) + b_ih``, as torch defines it.

    Forward (Cho et al. 2014; b_hn stays inside the reset gate, torch's variant):

        a = W_hh (m * h(t-1)) + b_hh = [a_r, a_z, a_n]
        r = sigm(p_r + a_r),  z = sigm(p_z + a_z),  n = tanh(p_n + r * a_n)
        h(t) = (1 - z) * n + z * h(t-1)

    Backward, with dh = dL/dh(t) and A = (1 - z)(1 - n^2) = dh(t)/d(n's pre-activation):

        da = dh * [A a_n r (1-r),  (h(t-1) - n) z (1-z),  A r]
        dp = [da_r, da_z, dh * A]
        dL/dh(t-1) = m * (W_hh^T da) + z * dh + dL/dout(t-1)

    The coefficients are computed for all steps at once, so the loop is one product and three
    elementwise kernels per step; dp's n part is one product over all steps after the loop.
    Past a sequence's length the coefficients are zero and z acts as 1 (the state is copied).

    Zoneout (Krueger et al. 2017) keeps the new state h~ above only partly:
    h(t) = d h(t-1) + (1 - d) h~. In the backward that scales every coefficient by (1 - d) and
    carries z (1 - d) + d of dh to h(t-1); a finished sequence is the case d = 1.
    """

    @staticmethod
    def forward(ctx, projected, h0, w_hh, b_hh, mask, valid, zone):
        steps, batch, gates = projected.shape
        hidden = gates // 3
        rec = projected.new_empty(steps, batch, gates)  # a(t) = W_hh (m * h(t-1)) + b_hh
        rz = projected.new_empty(steps, batch, 2 * hidden)
        n = projected.new_empty(steps, batch, hidden)
        hs = _states(h0, steps)
        h_in = None if mask is None else projected.new_empty(steps, batch, hidden)
        loops.engine(projected).gru_forward(projected, w_hh, b_hh,
                                            products.packed_weight(w_hh, batch), mask,
                                            valid if zone is None else None, zone, rec, rz, n,
                                            hs, h_in)
        ctx.save_for_backward(rec, rz, n, hs, h_in, w_hh, b_hh, mask, valid, zone)
        return _outputs(hs, valid), hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h):
        rec, rz, n, hs, h_in, w_hh, b_hh, mask, valid, zone = ctx.saved_tensors
        steps, batch, gates = rec.shape
        hidden = gates // 3
        r, z = rz.split(hidden, 2)
        a_n = rec[:, :, 2 * hidden:]
        h_prev = hs[:-1]
        to_n = (1 - z) * (1 - n * n)  # dh(t)/d(n's pre-activation)
        # Stacked rather than written through out= into strided slices, which torch.compile
        # cannot trace.
        coef = torch.stack([to_n * a_n * (r * (1 - r)), (h_prev - n) * (z * (1 - z)),
                            to_n * r], dim=2)
        d_out, _ = _freeze(d_out, valid)  # z * dh already carries dh through a frozen state
        if zone is None:
            keep_h = stop_at_lengths(valid, coef, to_n, z)
        else:
            keep_h = _zone_out(zone, coef, to_n, z)

        d_rec = rec.new_empty(steps, batch, gates)
        d_hs = rec.new_empty(steps, batch, hidden)  # dL/dh(t), all paths; kept for dp_n
        d_hin = rec.new_empty(steps, batch, hidden)
        need_first = ctx.needs_input_grad[1] or ctx.needs_input_grad[4]
        d_h0 = loops.engine(rec).gru_backward(d_out, d_h, coef, keep_h, w_hh,
                                              products.onednn_pays(w_hh, hidden, "step"), mask,
                                              need_first, d_rec, d_hs, d_hin)
        d_w = _weight_grad(ctx, 2, d_rec, h_prev if h_in is None else h_in)
        d_b = d_rec.sum((0, 1)) if b_hh is not None and ctx.needs_input_grad[3] else None
        d_mask = _mask_grad(ctx, 4, d_hin, hs, mask)
        # d_rec is no longer needed: reuse it as dp, whose r and z parts are the same.
        d_rec[:, :, 2 * hidden:] = d_hs * to_n
        return d_rec, d_h0, d_w, d_b, d_mask, None, None


class _Elman(torch.autograd.Function):
    """Elman recurrence ``h(t) = act(p(t) + W_hh (m * h(t-1)))``, act = tanh or relu.

    Backward: ``dpre = dh * act'`` (``1 - h^2`` or ``h > 0``, from the saved outputs, as
    torch does), ``dL/dh(t-1) = m * (W_hh^T dpre) + dL/dout(t-1)``.

    Zoneout (Krueger et al. 2017): h(t) = d h(t-1) + (1 - d) h~ with h~ the step
    above, kept in ``candidates`` for act'; the backward scales the slope by (1 - d) and passes
    d dh straight to h(t-1), as a finished sequence (d = 1) does.
    """

    @staticmethod
    def forward(ctx, projected, h0, w_hh, mask, valid, relu, zone):
        steps, batch, hidden = projected.shape
        hs = _states(h0, steps)
        h_in = None if mask is None else projected.new_empty(steps, batch, hidden)
        candidates = None if zone is None else projected.new_empty(steps, batch, hidden)
        loops.engine(projected).elman_forward(projected, w_hh,
                                              products.packed_weight(w_hh, batch), mask,
                                              valid if zone is None else None, relu, zone,
                                              candidates, hs, h_in)
        ctx.relu = relu
        ctx.save_for_backward(hs, h_in, w_hh, mask, valid, zone, candidates)
        return _outputs(hs, valid), hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h):
        hs, h_in, w_hh, mask, valid, zone, candidates = ctx.saved_tensors
        out = hs[1:] if candidates is None else candidates
        slope = (out > 0).to(hs.dtype) if ctx.relu else 1 - out * out
        d_out, passthrough = _freeze(d_out, valid)
        if zone is not None:
            slope *= 1 - zone
            passthrough = zone.expand_as(slope)
        elif valid is not None:
            slope *= valid
        d_pre = torch.empty_like(out)
        d_hin = torch.empty_like(out)
        need_first = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        dh = loops.engine(hs).elman_backward(d_out, d_h, slope, w_hh,
                                             products.onednn_pays(w_hh, hs.size(2), "step"),
                                             mask, passthrough, need_first, d_pre, d_hin)
        return (d_pre, dh,
                _weight_grad(ctx, 2, d_pre, hs[:-1] if h_in is None else h_in),
                _mask_grad(ctx, 3, d_hin, hs, mask), None, None, None)


def _freeze(d_out, valid):
    """Output gradient and pass-through factor ``1 - valid`` for variable-length batches.

    Outputs past a sequence's length are the constant 0, so their gradient is dropped; the
    state is copied unchanged through those steps, so dL/dh(t) reaches h(t-1) with factor 1.
    """
    if valid is None:
        return d_out, None
    v = valid.to(d_out.dtype)
    return d_out * v, 1 - v


def _zone_out(zone, coef, to_state, keep):
    """Zoneout in the backward of a one-state cell (GRU): scale the coefficients ``coef
    (T, B, G, H)`` and ``to_state`` by ``1 - d`` in place and return the factor carrying dL/dh(t)
    to h(t-1), ``keep (1 - d) + d``."""
    update = 1 - zone
    coef *= update.unsqueeze(2)
    to_state *= update
    return keep * update + zone


def _states(initial, steps):
    """A ``(T+1, B, H)`` buffer for states 0..T holding ``initial`` in row 0, so that the
    states every step starts from, ``[:-1]``, are one contiguous tensor for dW_hh."""
    states = initial.new_empty(steps + 1, *initial.shape)
    states[0] = initial
    return states


def _outputs(hs, valid):
    """Outputs h(1)..h(T), zero past each length: a new tensor, not a view of the saved
    buffer, so callers may modify it in place as they could with the plain autograd loop."""
    return hs[1:].clone() if valid is None else hs[1:] * valid


def _weight_grad(ctx, index, d_pre, h_in):
    """dL/dW_hh = sum_t dpre(t)^T (m * h(t-1)) as one ``(G*H, T*B) x (T*B, H)`` product."""
    if not ctx.needs_input_grad[index]:
        return None
    d_rows, h_rows = d_pre.view(-1, d_pre.size(2)), h_in.view(-1, h_in.size(2))
    if products.onednn_pays(h_in, h_in.size(2), "rows"):
        return products.onednn_mm(d_rows.t(), h_rows)
    # Formed as (h_in^T dpre)^T: at the paper's sizes MKL runs this orientation faster.
    return h_rows.t().mm(d_rows).t()


def _mask_grad(ctx, index, d_hin, hs, mask):
    """dL/dm(t) = dL/d(m * h(t-1)) * h(t-1), summed over steps for a per-sequence mask."""
    if mask is None or not ctx.needs_input_grad[index]:
        return None
    return (d_hin * hs[:-1]).sum_to_size(mask.shape)
