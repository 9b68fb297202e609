"""torch's input layouts for recurrent layers, adapted to the one rnnreg's per-layer path runs on.

``torch.nn.LSTM`` accepts time-major ``(T, B, F)``, batch-first ``(B, T, F)``, unbatched
``(T, F)`` and ``PackedSequence`` input, with states ``(L*D, B, H)`` (``(L*D, H)`` unbatched).
rnnreg's layer-by-layer path works on padded time-major tensors with explicit lengths; these
functions check the caller's input once, convert it, and give the output back in the caller's
layout, so the layers themselves hold only the regularization.

``layer`` below is an rnnreg (or torch) recurrent layer: the functions read its sizes and flags
(``mode``, ``input_size``, ``hidden_size``, ``proj_size``, ``num_layers``, ``bidirectional``,
``batch_first``) and never change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnreg.errors import RnnregError

__all__ = ["Layout", "check_input", "check_placement", "initial_states", "pack_states",
           "restore_layout", "reverse", "to_time_major"]


@dataclass(frozen=True)
class Layout:
    """How the caller's input was laid out, so the output can be returned the same way."""

    batch_first: bool
    unbatched: bool
    packed: PackedSequence | None


def check_input(layer, input, hx) -> None:
    """Fail at the boundary with the expected shape rather than deep inside a kernel."""
    if isinstance(input, PackedSequence):
        data, batch = input.data, int(input.batch_sizes[0])
        if data.dim() != 2:
            raise RnnregError(f"packed input data must be 2-D, got shape {tuple(data.shape)}")
        unbatched = False
    elif isinstance(input, Tensor):
        if input.dim() not in (2, 3):
            raise RnnregError(
                f"input must be 3-D ({'B, T' if layer.batch_first else 'T, B'}, input_size) "
                f"or 2-D (T, input_size) unbatched, got shape {tuple(input.shape)}")
        data, unbatched = input, input.dim() == 2
        batch = 1 if unbatched else input.size(0 if layer.batch_first else 1)
    else:
        raise RnnregError(
            f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if data.size(-1) != layer.input_size:
        raise RnnregError(
            f"input has {data.size(-1)} features but input_size={layer.input_size}")
    _check_states(layer, hx, batch, unbatched)
    states = () if hx is None else hx if layer.mode == "LSTM" else (hx,)
    check_placement(layer, zip(("input", "h_0", "c_0"), (data, *states)))


def check_placement(layer, tensors) -> None:
    """Every ``(name, tensor)`` on the weights' device and, outside autocast, of their dtype.

    torch's fused kernel checks the input dtype (and, later, the devices); rnnreg's own loop
    would fail deep inside a matrix product. One check here gives both engines the same
    contract. Under autocast the kernels cast for themselves, as torch's own check allows.
    """
    weight = layer.weight_ih_l0
    cast = torch.is_autocast_enabled(weight.device.type)
    for name, tensor in tensors:
        if tensor.device != weight.device:
            raise RnnregError(f"{name} is on device {tensor.device} but the weights are on "
                              f"{weight.device}: move it with .to({str(weight.device)!r})")
        if tensor.dtype != weight.dtype and not cast:
            model = f", or convert the model: model.to({tensor.dtype})" if (
                tensor.is_floating_point()) else ""
            raise RnnregError(f"{name} dtype ({tensor.dtype}) does not match weight dtype "
                              f"({weight.dtype}). Convert {name}: {name}.to({weight.dtype})"
                              f"{model}")


def _check_states(layer, hx, batch: int, unbatched: bool) -> None:
    if hx is None:
        return
    tensors = hx if layer.mode == "LSTM" else (hx,)
    if layer.mode == "LSTM" and not (isinstance(hx, tuple) and len(hx) == 2):
        raise RnnregError("hx for an LSTM must be a tuple (h_0, c_0)")
    lead = layer.num_layers * _directions(layer)
    sizes = (layer.proj_size or layer.hidden_size, layer.hidden_size)  # h is projected, c not
    for name, tensor, size in zip(("h_0", "c_0"), tensors, sizes):
        expected = (lead, size) if unbatched else (lead, batch, size)
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise RnnregError(f"{name} must have shape {expected} "
                              f"(num_layers*num_directions, batch, hidden_size), got {got}")


def _directions(layer) -> int:
    return 2 if layer.bidirectional else 1


def to_time_major(input, batch_first: bool) -> tuple[Tensor, Tensor | None, Layout]:
    """Padded ``(T, B, F)``, the lengths (None unless packed), and the layout to restore."""
    if isinstance(input, PackedSequence):
        padded, lengths = pad_packed_sequence(input)
        return padded, lengths, Layout(False, False, input)
    unbatched = input.dim() == 2
    if unbatched:
        return input.unsqueeze(1), None, Layout(batch_first, True, None)
    x = input.transpose(0, 1) if batch_first else input
    return x, None, Layout(batch_first, False, None)


def restore_layout(x: Tensor, lengths: Tensor | None, layout: Layout):
    """Time-major output ``x`` in the layout the caller's input had."""
    if layout.packed is not None:
        order = layout.packed.sorted_indices
        if order is not None:
            x, lengths = x.index_select(1, order), lengths.index_select(0, order.cpu())
        repacked = pack_padded_sequence(x, lengths, enforce_sorted=True)
        return PackedSequence(repacked.data, repacked.batch_sizes, order,
                              layout.packed.unsorted_indices)
    if layout.unbatched:
        return x.squeeze(1)
    return x.transpose(0, 1) if layout.batch_first else x


def initial_states(layer, hx, x: Tensor, unbatched: bool) -> tuple[Tensor, ...]:
    """States as a tuple (h,) or (h, c), each ``(L*D, B, H)``; zeros where ``hx`` is None."""
    count = 2 if layer.mode == "LSTM" else 1
    if hx is None:
        shape = (layer.num_layers * _directions(layer), x.size(1), layer.hidden_size)
        return tuple(x.new_zeros(shape) for _ in range(count))
    states = hx if count == 2 else (hx,)
    return tuple(s.unsqueeze(1) if unbatched else s for s in states)


def pack_states(states: tuple[Tensor, ...], unbatched: bool, lstm: bool):
    """The final states as torch returns them: ``(h, c)`` for an LSTM, ``h`` otherwise."""
    if unbatched:
        states = tuple(s.squeeze(1) for s in states)
    return states if lstm else states[0]


def reverse(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence in time within its own length; padding stays where it is."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.size(0), device=x.device).unsqueeze(1)
    lens = lengths.to(x.device).unsqueeze(0)
    index = torch.where(steps < lens, lens - 1 - steps, steps)
    return x.gather(0, index.unsqueeze(2).expand_as(x))
