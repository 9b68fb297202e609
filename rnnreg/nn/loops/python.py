"""The per-step loops of rnnreg's own recurrence, in Python: the twins of the C++ and Triton ones.

``rnnreg.nn.recurrence`` prepares everything that does not depend on the previous step; what
is left is a loop over time of one recurrent product and a few elementwise kernels, written
here (equations in ``rnnreg.nn.recurrence``) and, with the same signatures, in C++
(``_loops.cpp``) and Triton (``rnnreg.nn.loops.triton``). These run where neither of the others
can, or with ``RNNREG_ENGINE=python``; they are also the reference the other engines are
checked against. Which engine runs is ``rnnreg.nn.loops``' choice; this module holds only the
loops themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rnnreg.nn.loops.protocol import Loops
from rnnreg.nn.products import product_backward, product_forward

__all__ = ["PYTHON", "PythonLoops", "stop_at_lengths"]


def lstm_forward(projected: Tensor, w_hh: Tensor, packed: Tensor | None, mask: Tensor | None,
                 valid: Tensor | None, zone_h: Tensor | None, zone_c: Tensor | None, acts: Tensor,
                 cs: Tensor, tanh_c: Tensor, hs: Tensor, h_in: Tensor | None) -> None:
    steps, batch, gates = projected.shape
    hidden = gates // 4
    pre = projected.new_empty(batch, gates)
    pre_g = pre[:, 2 * hidden:3 * hidden]
    # Per-step views made once: indexing inside the loop costs more than the small kernels.
    i, f, g, o = (a.unbind(0) for a in acts.view(steps, batch, 4, hidden).unbind(2))
    p, masks = projected.unbind(0), _per_step(mask, steps)
    keep_h, keep_c = _per_step(zone_h, steps), _per_step(zone_c, steps)
    for t in range(steps):
        h = hs[t]
        x_t = h if mask is None else torch.mul(h, masks[t], out=h_in[t])
        product_forward(pre, x_t, p[t], w_hh, packed)
        # One sigmoid over all four gates (g's is overwritten next) beats three sigmoids
        # on slices: at these sizes a kernel launch costs more than the extra quarter.
        torch.sigmoid(pre, out=acts[t])
        torch.tanh(pre_g, out=g[t])
        c = torch.mul(f[t], cs[t], out=cs[t + 1]).addcmul_(i[t], g[t])
        torch.tanh(c, out=tanh_c[t])
        h_new = torch.mul(o[t], tanh_c[t], out=hs[t + 1])
        if zone_h is not None:  # zoneout: d * previous + (1 - d) * new, from the new values
            c.lerp_(cs[t], keep_c[t])
            h_new.lerp_(h, keep_h[t])
        if valid is not None:  # freeze finished sequences (out= may alias its own input)
            torch.where(valid[t], c, cs[t], out=c)
            torch.where(valid[t], h_new, h, out=h_new)


def lstm_backward(d_out: Tensor, d_h: Tensor, d_c: Tensor, acts: Tensor, cs: Tensor,
                  tanh_c: Tensor, valid: Tensor | None, w_hh: Tensor, onednn: bool,
                  mask: Tensor | None, passthrough: Tensor | None, zone_h: Tensor | None,
                  zone_c: Tensor | None, need_first: bool, d_gates: Tensor,
                  d_hin: Tensor) -> tuple[Tensor | None, Tensor | None]:
    steps, batch, gates = d_gates.shape
    hidden = gates // 4
    # The gate-derivative coefficients of every step at once (equations in recurrence._LSTM).
    i, f, g, o = acts.view(steps, batch, 4, hidden).unbind(2)
    coef = acts.new_empty(steps, batch, 4, hidden)
    torch.mul(g, i * (1 - i), out=coef[:, :, 0])
    torch.mul(cs[:-1], f * (1 - f), out=coef[:, :, 1])
    torch.mul(i, 1 - g * g, out=coef[:, :, 2])
    torch.mul(tanh_c, o * (1 - o), out=coef[:, :, 3])
    to_cell = o * (1 - tanh_c * tanh_c)  # dh(t)/dc(t)
    keep_c = stop_at_lengths(valid, coef, to_cell, f)
    if zone_h is not None:  # the gradient reaching the new h~ is (1 - d_h) dh: fold it in
        update_h = 1 - zone_h
        to_cell *= update_h
        coef[:, :, 3] *= update_h
        passthrough = zone_h.expand_as(to_cell)  # d_h dh goes straight to h(t-1)
    d_ifg = d_gates.view(steps, batch, 4, hidden)[:, :, :3].unbind(0)
    d_o = d_gates[:, :, 3 * hidden:].unbind(0)
    k_ifg, k_o = coef[:, :, :3].unbind(0), coef[:, :, 3].unbind(0)
    d_step, to_cell, keep_c = d_gates.unbind(0), to_cell.unbind(0), keep_c.unbind(0)
    masks, zones = _per_step(mask, steps), _per_step(zone_c, steps)
    dh, dc = d_out[-1] + d_h, d_c
    for t in range(steps - 1, -1, -1):
        if zones[t] is None:
            dcc = torch.addcmul(dc, dh, to_cell[t])
        else:  # zoneout: (1 - d_c) dc reaches the new cell c~, d_c dc goes to c(t-1)
            dcc = torch.addcmul(dc * (1 - zones[t]), dh, to_cell[t])
        torch.mul(dcc.unsqueeze(1), k_ifg[t], out=d_ifg[t])
        torch.mul(dh, k_o[t], out=d_o[t])
        if t == 0 and not need_first:
            return None, None
        if zones[t] is None:
            dc = dcc.mul_(keep_c[t])
        else:
            dc = torch.addcmul(dc * zones[t], dcc, keep_c[t])
        product_backward(d_hin[t], d_step[t], w_hh, onednn)
        dh = _previous(d_out, d_hin, masks, t, dh, passthrough)
    return dh, dc


def gru_forward(projected: Tensor, w_hh: Tensor, b_hh: Tensor | None, packed: Tensor | None,
                mask: Tensor | None, valid: Tensor | None, zone: Tensor | None, rec: Tensor,
                rz: Tensor, n: Tensor, hs: Tensor, h_in: Tensor | None) -> None:
    steps = projected.size(0)
    hidden = projected.size(2) // 3
    p_rz, p_n = (s.unbind(0) for s in projected.split([2 * hidden, hidden], 2))
    a_rz, a_n = (s.unbind(0) for s in rec.split([2 * hidden, hidden], 2))
    r, z = (s.unbind(0) for s in rz.split(hidden, 2))
    masks, keep = _per_step(mask, steps), _per_step(zone, steps)
    for t in range(steps):
        h = hs[t]
        x_t = h if mask is None else torch.mul(h, masks[t], out=h_in[t])
        product_forward(rec[t], x_t, b_hh, w_hh, packed)
        torch.add(p_rz[t], a_rz[t], out=rz[t]).sigmoid_()
        torch.addcmul(p_n[t], r[t], a_n[t], out=n[t]).tanh_()
        h_new = torch.lerp(n[t], h, z[t], out=hs[t + 1])  # n + z * (h - n), one kernel
        if zone is not None:
            h_new.lerp_(h, keep[t])
        if valid is not None:
            torch.where(valid[t], h_new, h, out=h_new)


def gru_backward(d_out: Tensor, d_h: Tensor, coef: Tensor, keep_h: Tensor | None, w_hh: Tensor,
                 onednn: bool, mask: Tensor | None, need_first: bool, d_rec: Tensor, d_hs: Tensor,
                 d_hin: Tensor) -> Tensor | None:
    steps, batch, gates = d_rec.shape
    d_rec_split = d_rec.view(steps, batch, 3, gates // 3)
    masks = _per_step(mask, steps)
    torch.add(d_out[-1], d_h, out=d_hs[-1])
    prev = None
    for t in range(steps - 1, -1, -1):
        dh = d_hs[t]
        torch.mul(dh.unsqueeze(1), coef[t], out=d_rec_split[t])
        if t == 0 and not need_first:
            return None
        product_backward(d_hin[t], d_rec[t], w_hh, onednn)
        prev = _previous(d_out, d_hin, masks, t, out=d_hs[t - 1] if t > 0 else None)
        prev.addcmul_(dh, keep_h[t])
    return prev


def elman_forward(projected: Tensor, w_hh: Tensor, packed: Tensor | None, mask: Tensor | None,
                  valid: Tensor | None, relu: bool, zone: Tensor | None, candidates: Tensor | None,
                  hs: Tensor, h_in: Tensor | None) -> None:
    steps = projected.size(0)
    p, masks, keep = projected.unbind(0), _per_step(mask, steps), _per_step(zone, steps)
    for t in range(steps):
        h = hs[t]
        x_t = h if mask is None else torch.mul(h, masks[t], out=h_in[t])
        target = hs[t + 1] if zone is None else candidates[t]
        h_new = product_forward(target, x_t, p[t], w_hh, packed)
        if relu:
            h_new.relu_()
        else:
            h_new.tanh_()
        if zone is not None:  # the candidate stays for act' in the backward
            h_new = torch.lerp(h_new, h, keep[t], out=hs[t + 1])
        if valid is not None:
            torch.where(valid[t], h_new, h, out=h_new)


def elman_backward(d_out: Tensor, d_h: Tensor, slope: Tensor, w_hh: Tensor, onednn: bool,
                   mask: Tensor | None, passthrough: Tensor | None, need_first: bool, d_pre: Tensor,
                   d_hin: Tensor) -> Tensor | None:
    steps = d_pre.size(0)
    masks = _per_step(mask, steps)
    dh = d_out[-1] + d_h
    for t in range(steps - 1, -1, -1):
        torch.mul(dh, slope[t], out=d_pre[t])
        if t == 0 and not need_first:
            return None
        product_backward(d_hin[t], d_pre[t], w_hh, onednn)
        dh = _previous(d_out, d_hin, masks, t, dh, passthrough)
    return dh


class PythonLoops:
    """The Python twins as an engine (:class:`~rnnreg.nn.loops.protocol.Loops`)."""

    lstm_forward = staticmethod(lstm_forward)
    lstm_backward = staticmethod(lstm_backward)
    gru_forward = staticmethod(gru_forward)
    gru_backward = staticmethod(gru_backward)
    elman_forward = staticmethod(elman_forward)
    elman_backward = staticmethod(elman_backward)


PYTHON: Loops = PythonLoops()


def stop_at_lengths(valid: Tensor | None, coef: Tensor, to_state: Tensor,
                    keep: Tensor) -> Tensor:
    """Make every step past a sequence's length the identity in the backward pass.

    Zeroes (in place) the gate coefficients ``coef (T, B, G, H)`` and the path into the new
    state ``to_state (T, B, H)`` there, and returns the factor that carries the state's
    gradient to the previous step: ``keep`` inside the sequence, 1 past its end.
    """
    if valid is None:
        return keep
    v = valid.to(coef.dtype)
    coef *= v.unsqueeze(3)
    to_state *= v
    return torch.where(valid, keep, 1)


def _per_step(mask: Tensor | None, steps: int) -> Sequence[Tensor | None]:
    """The mask (or zoneout factor) each step uses: row t of a fresh ``(T, B, H)`` one, or the
    one per-sequence ``(1, B, H)`` at every step; a list of None when there is none."""
    if mask is None:
        return [None] * steps
    return mask.unbind(0) if mask.size(0) > 1 else [mask[0]] * steps


def _previous(d_out: Tensor, d_hin: Tensor, masks: Sequence[Tensor | None], t: int,
              dh: Tensor | None = None, passthrough: Tensor | None = None,
              out: Tensor | None = None) -> Tensor:
    """dL/dh(t-1) from step t: through the masked recurrent product, plus the gradient of
    output t-1, plus (where the sequence has ended) dL/dh(t) copied through the frozen state."""
    m = masks[t]
    if t > 0:
        if m is None:
            prev = torch.add(d_out[t - 1], d_hin[t], out=out)
        else:
            prev = torch.addcmul(d_out[t - 1], d_hin[t], m, out=out)
    else:
        prev = d_hin[0].clone() if m is None else d_hin[0] * m
    if passthrough is not None:
        prev.addcmul_(dh, passthrough[t])
    return prev
