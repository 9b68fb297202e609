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
``recurrent_mask``     ``"sequence"`` (Gal: one per row) or ``"batch"`` (one per call)
``zoneout_hidden``     each unit of h keeps its previous value with this probability   Krueger
``zoneout_cell``       the same for the LSTM's cell state c                            Krueger
=====================  ==============================================================  ========

Zaremba et al. (2014, section 3.1, Figure 2) apply dropout only to non-recurrent connections:
L+1 times in an L-layer stack (input, L-1 between layers, output), never on h(t-1) -> h(t).
Those placements keep torch's fused kernels (cuDNN on GPU). A mask that is the same for every
row and step of a call is a weight for that call: weight drop runs the fused kernel with
``weight_hh * mask``, and so does a batch-shared recurrent mask. Only a mask that differs from
row to row on h(t-1), and zoneout, need rnnreg's own loop, which does all input projections in
one matrix product and only the recurrent product and gate arithmetic per step.
:func:`engine_for` is where that is decided, and its table says which setting runs where.

Per-row against batch-shared recurrent masks. Gal & Ghahramani (2016, section 3) draw the mask on
h(t-1) once per sequence: each row of a batch runs the recurrence with its own thinned copy of
the recurrent weights, so one batch averages the gradient over B weight samples of the
approximate posterior. ``recurrent_mask="batch"`` draws one mask on the units of h(t-1) per
forward call and shares it by every row and step; ``W_hh (m * h) = (W_hh diag(m)) h``, so that is
``weight_hh`` with the columns of the dropped units zeroed, i.e. DropConnect on whole columns,
and it runs on the fused kernel. Each unit keeps its rate and every row its expected value, but
the rows of a batch are no longer independent samples: one batch sees one weight sample, so its
gradient averages over fewer masks. It needs ``variational=True``: per-step masks differ by step
and cannot be one weight.

Zoneout (Krueger et al. 2017) is not dropout: a unit that zones out keeps its previous value
instead of being zeroed, and evaluation uses the expectation (each new state
``z * previous + (1 - z) * new``, z the rate), so it runs the own loop in evaluation too.

Axis convention: time-major ``(T, B, F)`` unless ``batch_first``; states are ``(L*D, B, H)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnreg.nn import layout
from rnnreg.nn.functional import check_probability, check_zoneout, dropout, dropout_mask
from rnnreg.nn.recurrence import recurrence
from rnnreg.nn.strategies import check_recurrent_mask

__all__ = ["FUSED", "GRU", "LSTM", "OWN_LOOP", "RNN", "DropoutMasks", "engine_for"]

# The two engines a layer's recurrence can run on (engine_for).
FUSED, OWN_LOOP = "fused", "own loop"

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
    recurrent:  one per layer, ``(T|1, D, B, H)``: independent per direction; ``(1, D, 1, H)``
                with ``recurrent_mask="batch"`` (one mask shared by every row and step)
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


class _RegularizedRecurrence:
    """Shared behaviour of rnnreg.LSTM/GRU/RNN; mixed in before the ``torch.nn`` class."""

    # Class defaults, so that layers pickled before these options existed still run.
    recurrent_mask = "sequence"
    zoneout_hidden = 0.0
    zoneout_cell = 0.0

    def _init_regularization(self, *, dropout: float, input_dropout: float,
                             output_dropout: float, recurrent_dropout: float,
                             weight_dropout: float, variational: bool,
                             recurrent_mask: str = "sequence", zoneout_hidden: float = 0.0,
                             zoneout_cell: float = 0.0) -> None:
        self.dropout = float(dropout)  # the caller's rate, even where torch was given 0
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.output_dropout = check_probability("output_dropout", output_dropout)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        self.weight_dropout = check_probability("weight_dropout", weight_dropout)
        self.zoneout_hidden = check_zoneout("zoneout_hidden", zoneout_hidden)
        self.zoneout_cell = check_zoneout("zoneout_cell", zoneout_cell)
        if not isinstance(variational, bool):
            raise ValueError(f"variational must be True or False, got {variational!r}")
        self.variational = variational
        self.recurrent_mask = check_recurrent_mask(recurrent_mask)
        if recurrent_mask == "batch" and not variational:
            raise ValueError("recurrent_mask='batch' shares one mask by every row and step of a "
                             "call, which needs variational=True: per-step masks (variational="
                             "False) differ by step and cannot be one weight")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _needs_own_masks(self) -> bool:
        """True when rnnreg samples the masks itself and runs the stack layer by layer.

        That is needed when a mask outlives one step or acts on the recurrence (on h(t-1) or on
        ``weight_hh``; :func:`engine_for` says which engine then runs each layer), and pays on
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
        recurrent = (1, d, 1, h) if self.recurrent_mask == "batch" else (t, d, batch_size, h)
        return DropoutMasks(
            input=sample((t, batch_size, self.input_size), self.input_dropout),
            between=tuple(sample((t, batch_size, d * h), self.dropout) for _ in layers[1:]),
            recurrent=tuple(sample(recurrent, self.recurrent_dropout) for _ in layers),
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
        layout.check_input(self, input, hx)
        if not self._needs_own_masks():
            dropped = _dropout_data(input, self.input_dropout, self.training)
            output, state = super().forward(dropped, hx)
            return _dropout_data(output, self.output_dropout, self.training), state
        x, lengths, given = layout.to_time_major(input, self.batch_first)
        if self.training:
            masks = self.sample_masks(x.size(0), x.size(1), device=x.device, dtype=x.dtype)
        else:
            masks = self._expected_masks(x.size(1), x.device, x.dtype)
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
        recurrent = masks.recurrent[layer]
        per_row = recurrent if _per_row(recurrent) else None  # else a weight, or None
        if per_row is not None and per_row.size(2) != x.size(1):
            # e.g. (T, D, 1, H), shared by the rows but not the steps: the loops read one mask
            # row per batch row
            per_row = per_row.expand(-1, -1, x.size(1), -1)
        weights = _call_weights(self.all_weights[rows], masks.weight[layer],
                                None if per_row is not None else recurrent)
        if engine_for(self, masks, layer=layer) == FUSED:
            return self._fused_layer(x, lengths, layer_states, weights)
        return self._custom_layer(x, lengths, layer_states, weights, per_row,
                                  _layer_zoneout(masks, layer))

    def _fused_layer(self, x, lengths, states, weights):
        """One layer on torch's fused kernel (cuDNN on GPU, oneDNN on CPU)."""
        kernel = _KERNELS[self.mode]
        flat = [w for direction in weights for w in direction]
        if x.is_cuda:
            flat = _one_buffer(flat)
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

    def _custom_layer(self, x, lengths, states, weights, recurrent_mask, zoneout=None):
        """One layer on rnnreg's own loop, for masks that differ by row on h(t-1) and zoneout.

        ``weights`` already carry the masks that are weights for this call (_call_weights).
        """
        outputs, finals = [], []
        for direction, params in enumerate(weights):
            w_ih, w_hh, b_ih, b_hh = params if self.bias else (*params, None, None)
            mask = None if recurrent_mask is None else recurrent_mask[:, direction]
            state = tuple(s[direction] for s in states)
            seq = x if direction == 0 else layout.reverse(x, lengths)
            zone = None if zoneout is None else tuple(
                None if z is None else z[:, direction] for z in zoneout)
            out, final = recurrence(self.mode, seq, state, w_ih, w_hh, b_ih, b_hh, mask, lengths,
                                    zone)
            outputs.append(out if direction == 0 else layout.reverse(out, lengths))
            finals.append(final)
        stacked = tuple(torch.stack([f[i] for f in finals]) for i in range(len(states)))
        return torch.cat(outputs, dim=2), stacked

    def extra_repr(self) -> str:
        return regularization_repr(self, super().extra_repr(), RATE_OPTIONS)


# The keyword rates a layer shows in its repr when non-zero (torch shows its own dropout).
RATE_OPTIONS = ("input_dropout", "output_dropout", "recurrent_dropout", "weight_dropout",
               "zoneout_hidden", "zoneout_cell")


def regularization_repr(module: nn.Module, head: str, rates: tuple[str, ...]) -> str:
    """``head`` and the module's regularization that is on: the non-zero ``rates``, per-sequence
    masks, and a recurrent mask shared by the batch (rnnreg's layers and StackedRNN)."""
    parts = [head, *(f"{name}={getattr(module, name)}" for name in rates
                     if getattr(module, name) > 0)]
    if module.variational:
        parts.append("variational=True")
    if module.recurrent_mask != "sequence":
        parts.append(f"recurrent_mask={module.recurrent_mask!r}")
    return ", ".join(parts)


def engine_for(module: nn.Module, masks: DropoutMasks | None = None, *,
               layer: int | None = None) -> str:
    """The engine that runs the recurrence: :data:`FUSED` (torch's kernel: cuDNN on GPU, oneDNN
    on CPU) or :data:`OWN_LOOP` (:func:`rnnreg.nn.recurrence.recurrence`).

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

    ``masks``: those of one call (as :meth:`forward_with_masks` takes them); None = the masks
    a forward of ``module`` in its present mode would sample. ``layer``: one layer's engine;
    None = the stack's (the own loop if any layer runs it). ``module`` is an rnnreg layer or
    :class:`rnnreg.StackedRNN`.
    """
    if masks is None:
        if not module.training:  # evaluation: no dropout, zoneout at its expectation
            return OWN_LOOP if module.zoneout_hidden > 0 or module.zoneout_cell > 0 else FUSED
        masks = module.sample_masks(1, 2)  # two rows tell a per-row mask from a shared one
    layers = range(len(masks.recurrent)) if layer is None else (layer,)
    own = any(_per_row(masks.recurrent[k]) or _layer_zoneout(masks, k) is not None
              for k in layers)
    return OWN_LOOP if own else FUSED


def _layer_zoneout(masks: DropoutMasks, layer: int):
    """The ``(hidden, cell)`` zoneout factors of one layer, or None where it has none."""
    zoneout = None if masks.zoneout is None else masks.zoneout[layer]
    if zoneout is None or all(z is None for z in zoneout):
        return None
    return zoneout


def _call_weights(weights, weight_mask, shared_mask):
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


def _per_row(mask: Tensor | None) -> bool:
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


def _torch_dropout(dropout: float, num_layers: int) -> float:
    """The between-layer rate to give torch's constructor.

    With one layer there is no layer boundary, so between-layer dropout is a no-op, for torch as
    for rnnreg; torch warns about it, though a strategy applied to a one-layer model is a normal
    setting. torch is given 0 there and the layer keeps the caller's rate.
    """
    return dropout if num_layers > 1 else 0.0


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
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        if proj_size and (recurrent_dropout or weight_dropout or variational or zoneout_hidden
                          or zoneout_cell):
            raise ValueError("proj_size > 0 runs only on torch's fused kernel: it cannot be "
                             "combined with recurrent_dropout, weight_dropout, variational or "
                             "zoneout")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         _torch_dropout(dropout, num_layers), bidirectional, proj_size,
                         device=device, dtype=dtype)
        self._init_regularization(dropout=dropout, input_dropout=input_dropout,
                                  output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  recurrent_mask=recurrent_mask, zoneout_hidden=zoneout_hidden,
                                  zoneout_cell=zoneout_cell)


class GRU(_RegularizedRecurrence, nn.GRU):
    """``torch.nn.GRU`` with every dropout placement; see the module docstring for the options."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         _torch_dropout(dropout, num_layers), bidirectional, device=device,
                         dtype=dtype)
        self._init_regularization(dropout=dropout, input_dropout=input_dropout,
                                  output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  recurrent_mask=recurrent_mask,
                                  zoneout_hidden=zoneout_hidden)


class RNN(_RegularizedRecurrence, nn.RNN):
    """``torch.nn.RNN`` (tanh by default) with every dropout placement."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, *,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability("dropout", dropout)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first,
                         _torch_dropout(dropout, num_layers), bidirectional, device=device,
                         dtype=dtype)
        self._init_regularization(dropout=dropout, input_dropout=input_dropout,
                                  output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  recurrent_mask=recurrent_mask,
                                  zoneout_hidden=zoneout_hidden)
