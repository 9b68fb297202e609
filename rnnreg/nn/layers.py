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
:func:`rnnreg.nn.engines.engine_for` names the engine, and the table of
:func:`rnnreg.nn.engines.needs_own_loop` says which placement runs where.

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

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnreg.errors import RnnregError
from rnnreg.nn import layout
from rnnreg.nn.engines import (
    call_weights,
    fused_layer,
    layer_zoneout,
    needs_own_loop,
    own_loop_layer,
    per_row,
)
from rnnreg.nn.functional import (
    check_bool,
    check_positive_int,
    check_probability,
    check_zoneout,
    dropout,
    dropout_mask,
)
from rnnreg.nn.masks import DropoutMasks, apply_mask, mask_placement
from rnnreg.nn.strategies import check_recurrent_mask

__all__ = ["GRU", "LAYERS", "LSTM", "RNN"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class _RegularizedRecurrence:
    """Shared behaviour of rnnreg.LSTM/GRU/RNN; mixed in before the ``torch.nn`` class."""

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
        self.variational = check_bool("variational", variational)
        self.recurrent_mask = check_recurrent_mask(recurrent_mask)
        if recurrent_mask == "batch" and not variational:
            raise RnnregError("recurrent_mask='batch' shares one mask by every row and step of a "
                              "call, which needs variational=True: per-step masks (variational="
                              "False) differ by step and cannot be one weight")

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _needs_own_masks(self) -> bool:
        """True when rnnreg samples the masks itself and runs the stack layer by layer.

        That is needed when a mask outlives one step or acts on the recurrence (on h(t-1) or on
        ``weight_hh``; :func:`~rnnreg.nn.engines.engine_for` says which engine then runs each
        layer), and pays on CPU for fresh between-layer masks. Otherwise (Zaremba's placements on
        GPU, or without between-layer dropout) torch's fused stack runs in one call and only the
        input and output get a dropout around it.
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

    def _evaluation_masks(self, batch_size: int, device, dtype) -> DropoutMasks:
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
            masks = self._evaluation_masks(x.size(1), x.device, x.dtype)
        return self._forward_masked(x, lengths, given, hx, masks)

    def forward_with_masks(self, input, hx, masks: DropoutMasks):
        """Forward with explicit masks, whatever the training flag (MC dropout, tests)."""
        layout.check_input(self, input, hx)
        return self._forward_masked(*layout.to_time_major(input, self.batch_first), hx, masks)

    def _forward_masked(self, x: Tensor, lengths: Tensor | None, given: layout.Layout, hx,
                        masks: DropoutMasks):
        """The stack layer by layer on time-major ``x``, every mask given (checked input)."""
        if self.proj_size:
            raise RnnregError("explicit masks need rnnreg's per-layer path, which has no proj_size")
        states = layout.initial_states(self, hx, x, given.unbatched)
        x = apply_mask(x, masks.input)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = apply_mask(x, masks.between[layer - 1])
            x, layer_states = self._run_layer(layer, x, lengths, states, masks)
            finals.append(layer_states)
        x = apply_mask(x, masks.output)
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
        row_mask = recurrent if per_row(recurrent) else None  # else a weight, or None
        if row_mask is not None and row_mask.size(2) != x.size(1):
            # e.g. (T, D, 1, H), shared by the rows but not the steps: the loops read one mask
            # row per batch row
            row_mask = row_mask.expand(-1, -1, x.size(1), -1)
        weights = call_weights(self.all_weights[rows], masks.weight[layer],
                               None if row_mask is not None else recurrent)
        if not needs_own_loop(self, masks, layer=layer):
            return fused_layer(self, x, lengths, layer_states, weights)
        return own_loop_layer(self, x, lengths, layer_states, weights, row_mask,
                              layer_zoneout(masks, layer))

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


def _dropout_data(seq, p: float, training: bool):
    """Fresh-mask dropout on a tensor or on the data of a PackedSequence."""
    if not training or p == 0:
        return seq
    if isinstance(seq, PackedSequence):
        return seq._replace(data=dropout(seq.data, p))
    return dropout(seq, p)


def _torch_dropout(dropout: float, num_layers: int) -> float:
    """The between-layer rate to give torch's constructor, once checked (with rnnreg's message,
    before torch's own check sees it).

    With one layer there is no layer boundary, so between-layer dropout is a no-op, for torch as
    for rnnreg; torch warns about it, though a strategy applied to a one-layer model is a normal
    setting. torch is given 0 there and the layer keeps the caller's rate.
    """
    check_probability("dropout", dropout)
    return dropout if num_layers > 1 else 0.0


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_positive_int(name, value)


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
        if proj_size and (recurrent_dropout or weight_dropout or variational or zoneout_hidden
                          or zoneout_cell):
            raise RnnregError("proj_size > 0 runs only on torch's fused kernel: it cannot be "
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
        if nonlinearity not in ("tanh", "relu"):
            raise RnnregError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first,
                         _torch_dropout(dropout, num_layers), bidirectional, device=device,
                         dtype=dtype)
        self._init_regularization(dropout=dropout, input_dropout=input_dropout,
                                  output_dropout=output_dropout,
                                  recurrent_dropout=recurrent_dropout,
                                  weight_dropout=weight_dropout, variational=variational,
                                  recurrent_mask=recurrent_mask,
                                  zoneout_hidden=zoneout_hidden)


# The layers by cell name: how StackedRNN, rnnreg.lm's Config and its model name them.
LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
