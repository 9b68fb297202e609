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
``zoneout_hidden``     each unit of h keeps its previous value with this probability   Krueger
``zoneout_cell``       the same for the LSTM's cell state c                            Krueger
=====================  ==============================================================  ========

Zaremba et al. (2014, section 3.1, Figure 2) apply dropout only to non-recurrent connections:
L+1 times in an L-layer stack (input, L-1 between layers, output), never on h(t-1) -> h(t).
Those placements keep torch's fused kernels (cuDNN on GPU). Only ``recurrent_dropout``,
``weight_dropout`` and zoneout need a mask *inside* the recurrence; then rnnreg runs its own
loop, which does all input projections in one matrix product and only the recurrent product and
gate arithmetic per step. Zoneout (Krueger et al. 2017) is not dropout: a unit that
zones out keeps its previous value instead of being zeroed, and evaluation uses the expectation
(each new state ``z * previous + (1 - z) * new``, z the rate), so it runs the own loop in
evaluation too.

Axis convention: time-major ``(T, B, F)`` unless ``batch_first``; states are ``(L*D, B, H)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnreg.nn.functional import check_probability, check_zoneout, dropout, dropout_mask
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
    zoneout:    None (no zoneout in any layer), or one entry per layer: None or a pair
                ``(hidden, cell)``, each None or ``(T|1, D, B, H)`` holding the zoneout factor
                d of every unit (Krueger et al. 2017): 1 keeps the previous value, 0 takes the
                new one; in {0, 1} when sampled, the rate itself in evaluation. Not scaled.
    """

    input: Tensor | None
    between: tuple[Tensor | None, ...]
    recurrent: tuple[Tensor | None, ...]
    weight: tuple[Tensor | None, ...]
    output: Tensor | None
    zoneout: tuple[tuple[Tensor | None, Tensor | None] | None, ...] | None = None


@dataclass(frozen=True)
class _Layout:
    """How the caller's input was laid out, so the output can be returned the same way."""

    batch_first: bool
    unbatched: bool
    packed: PackedSequence | None


class _RegularizedRecurrence:
    """Shared behaviour of rnnreg.LSTM/GRU/RNN; mixed in before the ``torch.nn`` class."""

    # Class defaults, so that layers pickled before zoneout existed still run.
    zoneout_hidden = 0.0
    zoneout_cell = 0.0

    def _init_regularization(self, *, input_dropout: float, output_dropout: float,
                             recurrent_dropout: float, weight_dropout: float,
                             variational: bool, zoneout_hidden: float = 0.0,
                             zoneout_cell: float = 0.0) -> None:
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.output_dropout = check_probability("output_dropout", output_dropout)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        self.weight_dropout = check_probability("weight_dropout", weight_dropout)
        self.zoneout_hidden = check_zoneout("zoneout_hidden", zoneout_hidden)
        self.zoneout_cell = check_zoneout("zoneout_cell", zoneout_cell)
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
        if self._zoneout():  # its evaluation (the expectation) also runs the own loop
            return True
        inside = self.recurrent_dropout > 0 or self.weight_dropout > 0
        return self.training and (inside or self.variational or self._faster_between())

    def _zoneout(self) -> bool:
        return self.zoneout_hidden > 0 or self.zoneout_cell > 0

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

        def zone(rate):  # a unit keeps its previous value (factor 1) with probability rate
            if rate == 0:
                return None
            return (torch.rand((t, d, batch_size, h), device=device) < rate).to(dtype)

        layers = range(self.num_layers)
        return DropoutMasks(
            input=sample((t, batch_size, self.input_size), self.input_dropout),
            between=tuple(sample((t, batch_size, d * h), self.dropout) for _ in layers[1:]),
            recurrent=tuple(sample((t, d, batch_size, h), self.recurrent_dropout) for _ in layers),
            weight=tuple(sample((d, gates * h, h), self.weight_dropout) for _ in layers),
            output=sample((t, batch_size, d * h), self.output_dropout),
            zoneout=tuple((zone(self.zoneout_hidden), zone(self.zoneout_cell))
                          for _ in layers) if self._zoneout() else None,
        )

    def _expected_masks(self, batch_size: int, device, dtype) -> DropoutMasks:
        """Evaluation with zoneout: no dropout, and every zoneout factor at its expectation,
        the rate (Krueger et al. 2017, as dropout's test-time scaling)."""
        shape = (1, self.num_directions, batch_size, self.hidden_size)

        def expected(rate):
            return torch.full(shape, rate, device=device, dtype=dtype) if rate > 0 else None

        none = (None,) * self.num_layers
        pair = (expected(self.zoneout_hidden), expected(self.zoneout_cell))
        return DropoutMasks(input=None, between=none[1:], recurrent=none, weight=none,
                            output=None,
                            zoneout=(pair,) * self.num_layers if self._zoneout() else None)

    def forward(self, input, hx=None):
        """Same contract as ``torch.nn.LSTM.forward``: ``(output, h_n)`` or ``(output, (h, c))``."""
        self._check_input(input, hx)
        if not self._needs_own_masks():
            dropped = _dropout_data(input, self.input_dropout, self.training)
            output, state = super().forward(dropped, hx)
            return _dropout_data(output, self.output_dropout, self.training), state
        x, lengths, layout = self._to_time_major(input)
        if self.training:
            masks = self.sample_masks(x.size(0), x.size(1), device=x.device, dtype=x.dtype)
        else:
            masks = self._expected_masks(x.size(1), x.device, x.dtype)
        return self._forward_masked(x, lengths, layout, hx, masks)

    def forward_with_masks(self, input, hx, masks: DropoutMasks):
        """Forward with explicit masks, whatever the training flag (MC dropout, tests)."""
        self._check_input(input, hx)
        return self._forward_masked(*self._to_time_major(input), hx, masks)

    def _forward_masked(self, x: Tensor, lengths: Tensor | None, layout: _Layout, hx,
                        masks: DropoutMasks):
        """The stack layer by layer on time-major ``x``, every mask given (checked input)."""
        if self.proj_size:
            raise ValueError("explicit masks need rnnreg's per-layer path, which has no proj_size")
        states = self._initial_states(hx, x, layout.unbatched)
        x = _apply(x, masks.input)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = _apply(x, masks.between[layer - 1])
            x, layer_states = self._run_layer(layer, x, lengths, states, masks)
            finals.append(layer_states)
        x = _apply(x, masks.output)
        final = tuple(torch.cat([s[i] for s in finals]) for i in range(len(states)))
        return self._restore_layout(x, lengths, layout), self._pack_states(final, layout.unbatched)

    # --- layout --------------------------------------------------------------------------

    def _check_input(self, input, hx) -> None:
        """Fail at the boundary with the expected shape rather than deep inside a kernel."""
        if isinstance(input, PackedSequence):
            data, batch = input.data, int(input.batch_sizes[0])
            if data.dim() != 2:
                raise ValueError(f"packed input data must be 2-D, got shape {tuple(data.shape)}")
            unbatched = False
        elif isinstance(input, Tensor):
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input must be 3-D ({'B, T' if self.batch_first else 'T, B'}, input_size) "
                    f"or 2-D (T, input_size) unbatched, got shape {tuple(input.shape)}")
            data, unbatched = input, input.dim() == 2
            batch = 1 if unbatched else input.size(0 if self.batch_first else 1)
        else:
            raise ValueError(
                f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
        if data.size(-1) != self.input_size:
            raise ValueError(
                f"input has {data.size(-1)} features but input_size={self.input_size}")
        self._check_states(hx, batch, unbatched)

    def _check_states(self, hx, batch: int, unbatched: bool) -> None:
        if hx is None:
            return
        tensors = hx if self.mode == "LSTM" else (hx,)
        if self.mode == "LSTM" and not (isinstance(hx, tuple) and len(hx) == 2):
            raise ValueError("hx for an LSTM must be a tuple (h_0, c_0)")
        lead = self.num_layers * self.num_directions
        sizes = (self.proj_size or self.hidden_size, self.hidden_size)  # h is projected, c not
        for name, tensor, size in zip(("h_0", "c_0"), tensors, sizes):
            expected = (lead, size) if unbatched else (lead, batch, size)
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected:
                got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must have shape {expected} "
                                 f"(num_layers*num_directions, batch, hidden_size), got {got}")

    def _to_time_major(self, input) -> tuple[Tensor, Tensor | None, _Layout]:
        if isinstance(input, PackedSequence):
            padded, lengths = pad_packed_sequence(input)
            return padded, lengths, _Layout(False, False, input)
        unbatched = input.dim() == 2
        if unbatched:
            return input.unsqueeze(1), None, _Layout(self.batch_first, True, None)
        x = input.transpose(0, 1) if self.batch_first else input
        return x, None, _Layout(self.batch_first, False, None)

    def _restore_layout(self, x: Tensor, lengths: Tensor | None, layout: _Layout):
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

    def _initial_states(self, hx, x: Tensor, unbatched: bool) -> tuple[Tensor, ...]:
        """States as a tuple (h,) or (h, c), each ``(L*D, B, H)``."""
        count = 2 if self.mode == "LSTM" else 1
        if hx is None:
            shape = (self.num_layers * self.num_directions, x.size(1), self.hidden_size)
            return tuple(x.new_zeros(shape) for _ in range(count))
        states = hx if count == 2 else (hx,)
        return tuple(s.unsqueeze(1) if unbatched else s for s in states)

    def _pack_states(self, states: tuple[Tensor, ...], unbatched: bool):
        if unbatched:
            states = tuple(s.squeeze(1) for s in states)
        return states if self.mode == "LSTM" else states[0]

    # --- one layer -----------------------------------------------------------------------

    def _run_layer(self, layer: int, x: Tensor, lengths: Tensor | None,
                   states: tuple[Tensor, ...], masks: DropoutMasks):
        d = self.num_directions
        rows = slice(layer * d, (layer + 1) * d)
        layer_states = tuple(s[rows] for s in states)
        weights = self.all_weights[rows]
        recurrent, weight = masks.recurrent[layer], masks.weight[layer]
        zoneout = None if masks.zoneout is None else masks.zoneout[layer]
        if zoneout is not None and all(z is None for z in zoneout):
            zoneout = None
        if recurrent is None and weight is None and zoneout is None:
            return self._fused_layer(x, lengths, layer_states, weights)
        return self._custom_layer(x, lengths, layer_states, weights, recurrent, weight, zoneout)

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

    def _custom_layer(self, x, lengths, states, weights, recurrent_mask, weight_mask,
                      zoneout=None):
        """One layer on rnnreg's own loop, used when a mask acts inside the recurrence."""
        outputs, finals = [], []
        for direction, params in enumerate(weights):
            w_ih, w_hh, b_ih, b_hh = params if self.bias else (*params, None, None)
            if weight_mask is not None:
                w_hh = w_hh * weight_mask[direction]
            mask = None if recurrent_mask is None else recurrent_mask[:, direction]
            state = tuple(s[direction] for s in states)
            seq = x if direction == 0 else _reverse(x, lengths)
            zone = None if zoneout is None else tuple(
                None if z is None else z[:, direction] for z in zoneout)
            out, final = recurrence(self.mode, seq, state, w_ih, w_hh, b_ih, b_hh, mask, lengths,
                                    zone)
            outputs.append(out if direction == 0 else _reverse(out, lengths))
            finals.append(final)
        stacked = tuple(torch.stack([f[i] for f in finals]) for i in range(len(states)))
        return torch.cat(outputs, dim=2), stacked

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        for name in ("input_dropout", "output_dropout", "recurrent_dropout", "weight_dropout",
                     "zoneout_hidden", "zoneout_cell"):
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


def _reverse(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence in time within its own length; padding stays where it is."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.size(0), device=x.device).unsqueeze(1)
    lens = lengths.to(x.device).unsqueeze(0)
    index = torch.where(steps < lens, lens - 1 - steps, steps)
    return x.gather(0, index.unsqueeze(2).expand_as(x))


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
                 variational: bool = False, zoneout_hidden: float = 0.0,
                 zoneout_cell: float = 0.0, device=None, dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        if proj_size and (recurrent_dropout or weight_dropout or variational or zoneout_hidden
                          or zoneout_cell):
            raise ValueError("proj_size > 0 runs only on torch's fused kernel: it cannot be "
                             "combined with recurrent_dropout, weight_dropout, variational or "
                             "zoneout")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device=device, dtype=dtype)
        self._init_regularization(input_dropout=input_dropout, output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  zoneout_hidden=zoneout_hidden, zoneout_cell=zoneout_cell)


class GRU(_RegularizedRecurrence, nn.GRU):
    """``torch.nn.GRU`` with every dropout placement; see the module docstring for the options."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, zoneout_hidden: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self._init_regularization(input_dropout=input_dropout, output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  zoneout_hidden=zoneout_hidden)


class RNN(_RegularizedRecurrence, nn.RNN):
    """``torch.nn.RNN`` (tanh by default) with every dropout placement."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, zoneout_hidden: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype)
        self._init_regularization(input_dropout=input_dropout, output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  zoneout_hidden=zoneout_hidden)
