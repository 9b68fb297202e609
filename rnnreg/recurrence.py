"""rnnreg's own recurrence: the loop that runs when a dropout mask acts inside the recurrence.

torch's fused kernels (cuDNN, oneDNN) cannot take a mask on h(t-1) or a dropped ``weight_hh``,
so recurrent dropout (Gal & Ghahramani 2016) and weight drop (Merity et al. 2018) run here.
Gate order and equations are torch's, so weights load both ways with ``torch.nn``.
"""

from __future__ import annotations

import torch

__all__ = ["recurrence"]


def recurrence(mode, x, state, w_ih, w_hh, b_ih, b_hh, mask, lengths):
    """Run one direction of one layer: ``x (T, B, F)`` -> ``(outputs (T, B, H), final state)``.

    The input projection of every step is one matrix product up front; the loop does only the
    recurrent product and the gate arithmetic. ``mask`` multiplies h(t-1) where it enters the
    recurrent product (Gal & Ghahramani 2016, eq. 7 with a single mask shared by all gates); the
    LSTM cell path and the GRU's interpolation with h(t-1) use the unmasked state.
    """
    projected = torch.nn.functional.linear(x, w_ih, b_ih)
    if mode != "GRU" and b_hh is not None:
        projected = projected + b_hh  # GRU keeps b_hh inside r * (W_hn h + b_hn)
    w_hh_t = w_hh.t()
    valid = None
    if lengths is not None:
        steps = torch.arange(x.size(0), device=x.device).unsqueeze(1)
        valid = (steps < lengths.to(x.device).unsqueeze(0)).unsqueeze(2)
    step = _STEPS[mode]
    outputs = []
    for t in range(x.size(0)):
        h_in = state[0] if mask is None else state[0] * mask[t if mask.size(0) > 1 else 0]
        new = step(projected[t], h_in, state, w_hh_t, b_hh)
        if valid is not None:
            new = tuple(torch.where(valid[t], n, s) for n, s in zip(new, state))
        state = new
        outputs.append(state[0])
    out = torch.stack(outputs)
    if valid is not None:
        out = out * valid
    return out, state


def _lstm_step(projected, h_in, state, w_hh_t, _b_hh):
    """Zaremba et al. (2014) eq. in section 3: i, f, g, o gates (torch's gate order)."""
    gates = torch.addmm(projected, h_in, w_hh_t)
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_step(projected, h_in, state, w_hh_t, b_hh):
    """Cho et al. (2014) GRU as torch defines it: n = tanh(W_in x + r * (W_hn h + b_hn))."""
    hidden = torch.mm(h_in, w_hh_t) if b_hh is None else torch.addmm(b_hh, h_in, w_hh_t)
    i_r, i_z, i_n = projected.chunk(3, 1)
    h_r, h_z, h_n = hidden.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (n + z * (state[0] - n),)


def _tanh_step(projected, h_in, _state, w_hh_t, _b_hh):
    return (torch.tanh(torch.addmm(projected, h_in, w_hh_t)),)


def _relu_step(projected, h_in, _state, w_hh_t, _b_hh):
    return (torch.relu(torch.addmm(projected, h_in, w_hh_t)),)


_STEPS = {"LSTM": _lstm_step, "GRU": _gru_step, "RNN_TANH": _tanh_step, "RNN_RELU": _relu_step}
