"""An independent NumPy forward pass for stacked (bi)directional RNN/LSTM/GRU with explicit masks.

Written from the equations, one sequence and one time step at a time, so that it shares no code
(and no vectorisation trick) with ``rnnreg``. Gate orders are torch's:

* RNN:  h' = act(W_ih x + b_ih + W_hh h~ + b_hh)
* LSTM: [i, f, g, o] = W_ih x + b_ih + W_hh h~ + b_hh
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
* GRU:  r = sigmoid(W_ir x + b_ir + W_hr h~ + b_hr);  z = sigmoid(W_iz x + b_iz + W_hz h~ + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h~ + b_hn));  h' = (1 - z) * n + z * h

where ``h~ = m * h`` is h(t-1) multiplied by the recurrent mask (it only enters the product with
W_hh; the LSTM cell path and the GRU interpolation ``z * h`` use the unmasked h), and W_hh is
first multiplied elementwise by the weight mask (one mask per call).

Mask conventions (the ones of ``rnnreg.DropoutMasks``; a leading dimension of 1 broadcasts over
time):

* ``input``     ``(T|1, B, F)``    multiplies the network input at position t;
* ``between``   list, one per layer boundary, ``(T|1, B, D*H)`` multiplies the input of layer l>0;
* ``recurrent`` list, one per layer, ``(T|1, D, B, H)``: row k is used at the k-th step that
  the direction *processes* (for the backward direction of a sequence of length n, step k is
  position n-1-k);
* ``weight``    list, one per layer, ``(D, G*H, H)``;
* ``output``    ``(T|1, B, D*H)`` multiplies the network output at position t;
* ``zoneout``   list, one per layer, of None or a pair ``(hidden, cell)`` of None or
  ``(T|1, D, B, H)`` factors d, rows indexed like ``recurrent``. Zoneout (Krueger et al. 2017)
  takes the step above as a candidate (h', c') and keeps d of the previous state:
  ``c_t = d_c c + (1 - d_c) c'``, ``h_t = d_h h + (1 - d_h) h'``, where h' = sigmoid(o) tanh(c')
  uses the candidate cell, not the kept one.

Outputs past a sequence's length are zero, and its final state is the one after its last step.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


class Masks(NamedTuple):
    input: np.ndarray | None = None
    between: tuple | None = None
    recurrent: tuple | None = None
    weight: tuple | None = None
    output: np.ndarray | None = None
    zoneout: tuple | None = None


class Params(NamedTuple):
    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray | None
    b_hh: np.ndarray | None


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _row(mask: np.ndarray | None, t: int) -> np.ndarray | None:
    if mask is None:
        return None
    return mask[0] if mask.shape[0] == 1 else mask[t]


def _bias(b: np.ndarray | None, size: int) -> np.ndarray:
    return np.zeros(size) if b is None else b


def cell(mode: str, x: np.ndarray, h: np.ndarray, c: np.ndarray | None, p: Params,
         rec_mask: np.ndarray | None, w_hh: np.ndarray):
    """One step for one sequence: vectors x (F,), h (H,), c (H,) -> (h', c')."""
    hidden = h.shape[0]
    h_tilde = h if rec_mask is None else h * rec_mask
    b_ih = _bias(p.b_ih, w_hh.shape[0])
    b_hh = _bias(p.b_hh, w_hh.shape[0])
    if mode in ("RNN_TANH", "RNN_RELU"):
        pre = p.w_ih @ x + b_ih + w_hh @ h_tilde + b_hh
        return (np.tanh(pre) if mode == "RNN_TANH" else np.maximum(pre, 0.0)), None
    if mode == "LSTM":
        pre = p.w_ih @ x + b_ih + w_hh @ h_tilde + b_hh
        i, f, g, o = (pre[k * hidden:(k + 1) * hidden] for k in range(4))
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c_new), c_new
    if mode == "GRU":
        w_ir, w_iz, w_in = (p.w_ih[k * hidden:(k + 1) * hidden] for k in range(3))
        w_hr, w_hz, w_hn = (w_hh[k * hidden:(k + 1) * hidden] for k in range(3))
        b_ir, b_iz, b_in = (b_ih[k * hidden:(k + 1) * hidden] for k in range(3))
        b_hr, b_hz, b_hn = (b_hh[k * hidden:(k + 1) * hidden] for k in range(3))
        r = sigmoid(w_ir @ x + b_ir + w_hr @ h_tilde + b_hr)
        z = sigmoid(w_iz @ x + b_iz + w_hz @ h_tilde + b_hz)
        n = np.tanh(w_in @ x + b_in + r * (w_hn @ h_tilde + b_hn))
        return (1.0 - z) * n + z * h, None
    raise ValueError(mode)


def stacked_forward(mode: str, x: np.ndarray, h0: np.ndarray, c0: np.ndarray | None,
                    params: list[Params], *, num_layers: int, bidirectional: bool,
                    masks: Masks | None = None, lengths=None):
    """Run the whole network. ``x (T, B, F)``, ``h0``/``c0`` ``(L*D, B, H)``.

    ``params[l * D + d]`` holds layer l, direction d. Returns ``(output (T, B, D*H), h_n, c_n)``
    (``c_n`` is None unless LSTM).
    """
    masks = Masks() if masks is None else masks
    steps, batch, _ = x.shape
    dirs = 2 if bidirectional else 1
    hidden = h0.shape[-1]
    lengths = [steps] * batch if lengths is None else [int(n) for n in lengths]
    h_n = np.zeros_like(h0)
    c_n = None if c0 is None else np.zeros_like(c0)

    layer_in = x.copy()
    if masks.input is not None:
        layer_in = np.stack([layer_in[t] * _row(masks.input, t) for t in range(steps)])
    for layer in range(num_layers):
        if layer > 0 and masks.between is not None and masks.between[layer - 1] is not None:
            between = masks.between[layer - 1]
            layer_in = np.stack([layer_in[t] * _row(between, t) for t in range(steps)])
        layer_out = np.zeros((steps, batch, dirs * hidden))
        recurrent = None if masks.recurrent is None else masks.recurrent[layer]
        zone_h, zone_c = (None, None) if masks.zoneout is None or masks.zoneout[layer] is None \
            else masks.zoneout[layer]
        weight = None if masks.weight is None else masks.weight[layer]
        for d in range(dirs):
            idx = layer * dirs + d
            p = params[idx]
            w_hh = p.w_hh if weight is None else p.w_hh * weight[d]
            for b in range(batch):
                n = lengths[b]
                h = h0[idx, b].copy()
                c = None if c0 is None else c0[idx, b].copy()
                positions = range(n) if d == 0 else range(n - 1, -1, -1)
                for k, pos in enumerate(positions):
                    rec = _row(recurrent, k)
                    rec_mask = None if rec is None else rec[d, b]
                    h_new, c_new = cell(mode, layer_in[pos, b], h, c, p, rec_mask, w_hh)
                    d_h = _row(zone_h, k)
                    d_c = _row(zone_c, k)
                    if d_c is not None:
                        c_new = d_c[d, b] * c + (1.0 - d_c[d, b]) * c_new
                    if d_h is not None:
                        h_new = d_h[d, b] * h + (1.0 - d_h[d, b]) * h_new
                    h, c = h_new, c_new
                    layer_out[pos, b, d * hidden:(d + 1) * hidden] = h
                h_n[idx, b] = h
                if c_n is not None:
                    c_n[idx, b] = c
        layer_in = layer_out
    out = layer_in
    if masks.output is not None:
        out = np.stack([out[t] * _row(masks.output, t) for t in range(steps)])
    for b, n in enumerate(lengths):
        out[n:, b] = 0.0
    return out, h_n, c_n
