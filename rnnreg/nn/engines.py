"""Which engine runs one layer's recurrence, and how each engine is called.

A layer's recurrence runs on torch's fused kernel (:data:`FUSED`: cuDNN on GPU, oneDNN on CPU)
or on rnnreg's own loop (``rnnreg.nn.recurrence``), whose per-step loops have three engines
(:mod:`rnnreg.nn.loops`: :data:`~rnnreg.nn.loops.CPP_LOOP`,
:data:`~rnnreg.nn.loops.TRITON_GRAPHS` or :data:`~rnnreg.nn.loops.TRITON_LOOP`,
:data:`~rnnreg.nn.loops.PYTHON_LOOP`). The fused kernels take weights and states, nothing per
row inside the loop, so a mask that is the same for every row and step of a call is folded into
the weights for that call (:func:`call_weights`) and keeps the fused kernel; a mask that differs
by row on h(t-1), and zoneout, need the own loop. :func:`engine_for` decides that; the layers
(``rnnreg.nn.layers``) only ask it and call the engine, so the choice and its table live here,
apart from the layers' options and masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnreg.nn import layout, loops
from rnnreg.nn.masks import DropoutMasks
from rnnreg.nn.recurrence import recurrence

__all__ = ["FUSED", "call_weights", "engine_for", "fused_layer", "layer_zoneout", "needs_own_loop",
           "own_loop_layer", "per_row"]

# torch's fused kernel (cuDNN on GPU, oneDNN on CPU), as engine_for names it; the own loop's
# engines are named by rnnreg.nn.loops.
FUSED = "fused"

# One layer's zoneout factors (hidden, cell), each None where that rate is 0.
ZoneoutPair = tuple[Tensor | None, Tensor | None]

_KERNELS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh,
            "RNN_RELU": torch.rnn_relu}


def engine_for(module: nn.Module, masks: DropoutMasks | None = None, *,
               layer: int | None = None) -> str:
    """The engine that will run the recurrence: :data:`FUSED` (torch's kernel: cuDNN on GPU,
    oneDNN on CPU) where :func:`needs_own_loop` does not hold, else the own loop's engine for
    the module's device and the ``RNNREG_ENGINE`` setting (:func:`rnnreg.nn.loops.name`):
    :data:`~rnnreg.nn.loops.CPP_LOOP`, :data:`~rnnreg.nn.loops.TRITON_GRAPHS`,
    :data:`~rnnreg.nn.loops.TRITON_LOOP` or :data:`~rnnreg.nn.loops.PYTHON_LOOP`.

    ``masks``, ``layer``: as for :func:`needs_own_loop`.
    """
    if not needs_own_loop(module, masks, layer=layer):
        return FUSED
    weight = next(module.parameters())
    return loops.name(weight.device, weight.dtype)


def needs_own_loop(module: nn.Module, masks: DropoutMasks | None = None, *,
                   layer: int | None = None) -> bool:
    """Whether the recurrence needs rnnreg's own loop (:func:`rnnreg.nn.recurrence.recurrence`)
    rather than torch's fused kernel.

    torch's kernels take weights and states, nothing per row inside the loop, so a mask may stay
    on them only when it is the same for every row and step of the call: then it is folded into
    ``weight_hh`` for that call.

    ==========================================================  ==========  ===================
    placement                                                   engine      how
    ==========================================================  ==========  ===================
    none, or eval mode                                          fused       torch's call
    ``input_dropout``, ``dropout``, ``output_dropout``          fused       masks outside
    ``weight_dropout``                                          fused       ``weight_hh * M``
    ``recurrent_dropout``, ``recurrent_mask="batch"``           fused       columns of W_hh
    ``recurrent_dropout``, ``recurrent_mask="sequence"``        own loop    mask on h(t-1)
    zoneout (Krueger et al. 2017)                               own loop    keeps h(t-1) per row
    ==========================================================  ==========  ===================

    Placements combine: a layer runs its own loop if any of its masks needs it.

    ``masks``: those of one call (as a layer's ``forward_with_masks`` takes them); None = the
    masks a forward of ``module`` in its present mode would sample, judged from its record
    (:meth:`rnnreg.nn.Regularization.needs_own_loop`) without drawing them. ``layer``: one
    layer's engine; None = the stack's (the own loop if any layer runs it). ``module`` is an
    rnnreg layer or :class:`rnnreg.StackedRNN`.
    """
    if masks is None:
        return module.regularization.needs_own_loop(module.training)
    layers = range(len(masks.recurrent)) if layer is None else (layer,)
    return any(per_row(masks.recurrent[k]) or layer_zoneout(masks, k) is not None
               for k in layers)


def layer_zoneout(masks: DropoutMasks, layer: int) -> ZoneoutPair | None:
    """The ``(hidden, cell)`` zoneout factors of one layer, or None where it has none."""
    zoneout = None if masks.zoneout is None else masks.zoneout[layer]
    if zoneout is None or all(z is None for z in zoneout):
        return None
    return zoneout


def call_weights(weights: Sequence[Sequence[Tensor]], weight_mask: Tensor | None,
                 shared_mask: Tensor | None) -> Sequence[Sequence[Tensor]]:
    """The layer's weights for one call: ``weight_hh`` times the weight-drop mask and, on
    its columns, a recurrent mask shared by every row and step (``W (m * h) = (W m) h``).

    Gradients reach the raw ``weight_hh`` (and the masks) through the products, as in the
    own loop. Without masks the parameters themselves are returned.
    """
    if weight_mask is None and shared_mask is None:
        return weights
    dropped = []
    for direction, params in enumerate(weights):
        w_hh = params[1]
        if weight_mask is not None:
            w_hh = w_hh * weight_mask[direction]
        if shared_mask is not None:
            w_hh = w_hh * shared_mask[0, direction]  # (1, H): broadcast over the G*H rows
        dropped.append((params[0], w_hh, *params[2:]))
    return dropped


def per_row(mask: Tensor | None) -> bool:
    """Whether a ``(T|1, D, B|1, H)`` recurrent mask differs by step or row (not a weight)."""
    return mask is not None and (mask.size(0) > 1 or mask.size(2) > 1)


def _one_buffer(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors as views into one fresh contiguous buffer, in the order given.

    cuDNN runs on weights laid out back to back in its order (w_ih, w_hh, b_ih, b_hh per
    direction, which is the order given) and otherwise warns that they "are not part of single
    contiguous chunk of memory" and compacts them itself at every call. A layer's slice of the
    module's flattened weights or a masked ``weight_hh`` is not such a chunk; one ``cat`` makes
    it one, differentiably.
    """
    buffer = torch.cat([t.reshape(-1) for t in tensors])
    pieces = buffer.split([t.numel() for t in tensors])
    return [piece.view_as(t) for piece, t in zip(pieces, tensors)]


def fused_layer(module: nn.Module, x: Tensor, lengths: Tensor | None,
                states: tuple[Tensor, ...],
                weights: Sequence[Sequence[Tensor]]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer on torch's fused kernel (cuDNN on GPU, oneDNN on CPU)."""
    kernel = _KERNELS[module.mode]
    flat = [w for direction in weights for w in direction]
    if x.is_cuda:
        flat = _one_buffer(flat)
    hx = states if module.mode == "LSTM" else states[0]
    if lengths is None:
        out, *final = kernel(x, hx, flat, module.bias, 1, 0.0, module.training,
                             module.bidirectional, False)
        return out, tuple(final)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    hx = tuple(s.index_select(1, order) for s in states)
    out, *final = kernel(packed.data, packed.batch_sizes,
                         hx if module.mode == "LSTM" else hx[0], flat, module.bias, 1, 0.0,
                         module.training, module.bidirectional)
    out, _ = pad_packed_sequence(
        PackedSequence(out, packed.batch_sizes, order, unorder), total_length=x.size(0))
    return out, tuple(s.index_select(1, unorder) for s in final)


def own_loop_layer(module: nn.Module, x: Tensor, lengths: Tensor | None,
                   states: tuple[Tensor, ...], weights: Sequence[Sequence[Tensor]],
                   row_mask: Tensor | None,
                   zoneout: ZoneoutPair | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer on rnnreg's own loop, for masks that differ by row on h(t-1) and zoneout.

    ``weights`` already carry the masks that are weights for this call (:func:`call_weights`);
    ``row_mask`` is the layer's ``(T|1, D, B, H)`` mask on h(t-1), or None.
    """
    outputs, finals = [], []
    for direction, params in enumerate(weights):
        w_ih, w_hh, b_ih, b_hh = params if module.bias else (*params, None, None)
        mask = None if row_mask is None else row_mask[:, direction]
        state = tuple(s[direction] for s in states)
        seq = x if direction == 0 else layout.reverse(x, lengths)
        zone = None if zoneout is None else tuple(
            None if z is None else z[:, direction] for z in zoneout)
        out, final = recurrence(module.mode, seq, state, w_ih, w_hh, b_ih, b_hh, mask, lengths,
                                zone)
        outputs.append(out if direction == 0 else layout.reverse(out, lengths))
        finals.append(final)
    stacked = tuple(torch.stack([f[i] for f in finals]) for i in range(len(states)))
    return torch.cat(outputs, dim=2), stacked
