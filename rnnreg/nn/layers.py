"""Regularized recurrent layers that drop into code written for ``torch.nn.LSTM``/``GRU``/``RNN``.

``rnnreg.LSTM`` *is* a ``torch.nn.LSTM``: same constructor, forward signature, parameter names
and ``state_dict`` keys. The extra regularization is keyword-only and named by where it acts:

=====================  ==============================================================  ========
option                 where the mask acts                                             source
=====================  ==============================================================  ========
``input_dropout``      input of the first layer (x -> h)                               Zaremba
``dropout``            between stacked layers (torch's own meaning)                    Zaremba
``output_dropout``     output of the last layer (h -> y); final states are never dropped  Zaremba
``recurrent_dropout``  h(t-1) where it enters the recurrent matrix product               Gal
``weight_dropout``     DropConnect on the hidden-to-hidden weights, one mask per call  AWD
``variational``        one mask per sequence, reused at every step, for every placement Gal
=====================  ==============================================================  ========

Zaremba et al. (2014, section 3.1, Figure 2) apply dropout only to non-recurrent connections:
L+1 times in an L-layer stack (input, L-1 between layers, output), never on h(t-1) -> h(t).
Those placements keep torch's fused kernels (cuDNN on GPU). Only ``recurrent_dropout`` and
``weight_dropout`` need a mask *inside* the recurrence; then rnnreg runs its own loop, which does
all input projections in one matrix product and only the recurrent product and gate arithmetic
per step.

Axis convention: time-major ``(T, B, F)`` unless ``batch_first``; states are ``(L*D, B, H)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnreg.nn import layout
from rnnreg.nn.functional import check_probability, dropout, dropout_mask
from rnnreg.nn.recurrence import recurrence

__all__ = ["GRU", "LSTM", "RNN", "DropoutMasks"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_KERNELS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh,
            "RNN_RELU": torch.rnn_relu}


@dataclass(frozen=True)
class DropoutMasks:
    """Every mask one forward call applies, already scaled (entries 0 or 1/(1-p)); None = off.

    Leading dimension is ``T`` for fresh per-step masks or 1 for one mask per sequence.
    Keeping the masks explicit lets a caller reuse them, e.g. fixed over a whole stream for
    MC-dropout evaluation (Gal & Ghahramani 2016, section 4), or inject them in tests.

    input:      ``(T|1, B, input_size)``
    between:    one per layer boundary, ``(T|1, B, D*H)``
    recurrent:  one per layer, ``(T|1, D, B, H)``: independent per direction
    weight:     one per layer, ``(D, G*H, H)`` on ``weight_hh``
    output:     ``(T|1, B, D*H)``
    """

    input: Tensor | None
    between: tuple[Tensor | None, ...]
    recurrent: tuple[Tensor | None, ...]
    weight: tuple[Tensor | None, ...]
    output: Tensor | None


class _RegularizedRecurrence:
    """Shared behaviour of rnnreg.LSTM/GRU/RNN; mixed in before the ``torch.nn`` class."""

    def _init_regularization(self, *, input_dropout: float, output_dropout: float,
                             recurrent_dropout: float, weight_dropout: float,
                             variational: bool) -> None:
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.output_dropout = check_probability("output_dropout", output_dropout)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        self.weight_dropout = check_probability("weight_dropout", weight_dropout)
        if not isinstance(variational, bool):
            raise ValueError(f"variational must be True or False, got {variational!r}")
        self.variational = variational

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _needs_own_masks(self) -> bool:
        """True when rnnreg samples the masks itself and runs the stack layer by layer.

        That is needed when a mask outlives one step or acts inside the recurrence, and pays on
        CPU for fresh between-layer masks. Otherwise (Zaremba's placements on GPU, or without
        between-layer dropout) torch's fused stack runs in one call and only the input and
        output get a dropout around it.
        """
        inside = self.recurrent_dropout > 0 or self.weight_dropout > 0
        return self.training and (inside or self.variational or self._faster_between())

    def _faster_between(self) -> bool:
        """On CPU, layer-by-layer fused calls with rnnreg's masks between them beat torch's
        multi-layer call, whose between-layer dropout samples with the slower ``bernoulli_``
        (benchmarks/masks.py). cuDNN's one-call stack stays faster on GPU.
        """
        weight = next(self.parameters())
        return (weight.device.type == "cpu" and self.dropout > 0 and self.num_layers > 1
                and not self.proj_size)

    def sample_masks(self, steps: int, batch_size: int, *, device=None,
                     dtype=None) -> DropoutMasks:
        """Sample the masks for one forward call over ``steps`` steps and ``batch_size`` rows."""
        device, dtype = mask_placement(self, device, dtype)
        t = 1 if self.variational else steps
        d, h = self.num_directions, self.hidden_size
        gates = _GATES[self.mode]

        def sample(shape, p):
            return dropout_mask(shape, p, device=device, dtype=dtype) if p > 0 else None

        layers = range(self.num_layers)
        return DropoutMasks(
            input=sample((t, batch_size, self.input_size), self.input_dropout),
            between=tuple(sample((t, batch_size, d * h), self.dropout) for _ in layers[1:]),
            recurrent=tuple(sample((t, d, batch_size, h), self.recurrent_dropout) for _ in layers),
            weight=tuple(sample((d, gates * h, h), self.weight_dropout) for _ in layers),
            output=sample((t, batch_size, d * h), self.output_dropout),
        )

    def forward(self, input, hx=None):
        """Same contract as ``torch.nn.LSTM.forward``: ``(output, h_n)`` or ``(output, (h, c))``."""
        layout.check_input(self, input, hx)
        if not self._needs_own_masks():
            dropped = _dropout_data(input, self.input_dropout, self.training)
            output, state = super().forward(dropped, hx)
            return _dropout_data(output, self.output_dropout, self.training), state
        x, lengths, given = layout.to_time_major(input, self.batch_first)
        masks = self.sample_masks(x.size(0), x.size(1), device=x.device, dtype=x.dtype)
        return self._forward_masked(x, lengths, given, hx, masks)

    def forward_with_masks(self, input, hx, masks: DropoutMasks):
        """Forward with explicit masks, whatever the training flag (MC dropout, tests)."""
        layout.check_input(self, input, hx)
        return self._forward_masked(*layout.to_time_major(input, self.batch_first), hx, masks)

    def _forward_masked(self, x: Tensor, lengths: Tensor | None, given: layout.Layout, hx,
                        masks: DropoutMasks):
        """The stack layer by layer on time-major ``x``, every mask given (checked input)."""
        if self.proj_size:
            raise ValueError("explicit masks need rnnreg's per-layer path, which has no proj_size")
        states = layout.initial_states(self, hx, x, given.unbatched)
        x = _apply(x, masks.input)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = _apply(x, masks.between[layer - 1])
            x, layer_states = self._run_layer(layer, x, lengths, states, masks)
            finals.append(layer_states)
        x = _apply(x, masks.output)
        final = tuple(torch.cat([s[i] for s in finals]) for i in range(len(states)))
        return (layout.restore_layout(x, lengths, given),
                layout.pack_states(final, given.unbatched, self.mode == "LSTM"))

    # --- one layer -----------------------------------------------------------------------

    def _run_layer(self, layer: int, x: Tensor, lengths: Tensor | None,
                   states: tuple[Tensor, ...], masks: DropoutMasks):
        d = self.num_directions
        rows = slice(layer * d, (layer + 1) * d)
        layer_states = tuple(s[rows] for s in states)
        weights = self.all_weights[rows]
        recurrent, weight = masks.recurrent[layer], masks.weight[layer]
        if recurrent is None and weight is None:
            return self._fused_layer(x, lengths, layer_states, weights)
        return self._custom_layer(x, lengths, layer_states, weights, recurrent, weight)

    def _fused_layer(self, x, lengths, states, weights):
        """One layer on torch's fused kernel (cuDNN on GPU): no mask acts inside the recurrence."""
        kernel = _KERNELS[self.mode]
        flat = [w for direction in weights for w in direction]
        hx = states if self.mode == "LSTM" else states[0]
        if lengths is None:
            out, *final = kernel(x, hx, flat, self.bias, 1, 0.0, self.training,
                                 self.bidirectional, False)
            return out, tuple(final)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order) for s in states)
        out, *final = kernel(packed.data, packed.batch_sizes,
                             hx if self.mode == "LSTM" else hx[0], flat, self.bias, 1, 0.0,
                             self.training, self.bidirectional)
        out, _ = pad_packed_sequence(
            PackedSequence(out, packed.batch_sizes, order, unorder), total_length=x.size(0))
        return out, tuple(s.index_select(1, unorder) for s in final)

    def _custom_layer(self, x, lengths, states, weights, recurrent_mask, weight_mask):
        """One layer on rnnreg's own loop, used when a mask acts inside the recurrence."""
        outputs, finals = [], []
        for direction, params in enumerate(weights):
            w_ih, w_hh, b_ih, b_hh = params if self.bias else (*params, None, None)
            if weight_mask is not None:
                w_hh = w_hh * weight_mask[direction]
            mask = None if recurrent_mask is None else recurrent_mask[:, direction]
            state = tuple(s[direction] for s in states)
            seq = x if direction == 0 else layout.reverse(x, lengths)
            out, final = recurrence(self.mode, seq, state, w_ih, w_hh, b_ih, b_hh, mask, lengths)
            outputs.append(out if direction == 0 else layout.reverse(out, lengths))
            finals.append(final)
        stacked = tuple(torch.stack([f[i] for f in finals]) for i in range(len(states)))
        return torch.cat(outputs, dim=2), stacked

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        for name in ("input_dropout", "output_dropout", "recurrent_dropout", "weight_dropout"):
            if getattr(self, name) > 0:
                parts.append(f"{name}={getattr(self, name)}")
        if self.variational:
            parts.append("variational=True")
        return ", ".join(parts)


def mask_placement(module: nn.Module, device, dtype) -> tuple:
    """Device and dtype for a module's masks: the given ones, else those of its parameters."""
    first = next(module.parameters())
    return (first.device if device is None else device,
            first.dtype if dtype is None else dtype)


def _dropout_data(seq, p: float, training: bool):
    """Fresh-mask dropout on a tensor or on the data of a PackedSequence."""
    if not training or p == 0:
        return seq
    if isinstance(seq, PackedSequence):
        return seq._replace(data=dropout(seq.data, p))
    return dropout(seq, p)


def _apply(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class LSTM(_RegularizedRecurrence, nn.LSTM):
    """``torch.nn.LSTM`` with every dropout placement; see the module docstring for the options.

    >>> lstm = LSTM(10, 20, num_layers=2, dropout=0.5, input_dropout=0.5, output_dropout=0.5)
    >>> out, (h, c) = lstm(torch.randn(35, 4, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, device=None, dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        if proj_size and (recurrent_dropout or weight_dropout or variational):
            raise ValueError("proj_size > 0 runs only on torch's fused kernel: it cannot be "
                             "combined with recurrent_dropout, weight_dropout or variational")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device=device, dtype=dtype)
        self._init_regularization(input_dropout=input_dropout, output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational)


class GRU(_RegularizedRecurrence, nn.GRU):
    """``torch.nn.GRU`` with every dropout placement; see the module docstring for the options."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, device=None, dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self._init_regularization(input_dropout=input_dropout, output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational)


class RNN(_RegularizedRecurrence, nn.RNN):
    """``torch.nn.RNN`` (tanh by default) with every dropout placement."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, device=None, dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype)
        self._init_regularization(input_dropout=input_dropout, output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational)
