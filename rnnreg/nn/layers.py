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

The keywords build the layer's :class:`rnnreg.nn.Regularization` record, which checks them,
draws their masks and says which engine they need; a record can also be given whole, as
``regularization=`` (what :func:`rnnreg.strategy` and ``rnnreg.Config`` produce). The layer
reads its options back from it (``layer.input_dropout`` is ``layer.regularization.input_dropout``).

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
from rnnreg.nn.functional import check_positive_int, dropout
from rnnreg.nn.masks import DropoutMasks, apply_mask, apply_output_mask, mask_placement
from rnnreg.nn.regularization import MaskSizes, Regularization

__all__ = ["GRU", "LAYERS", "LSTM", "RNN"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _keyword(name: str) -> property:
    """A regularization keyword read back from the layer's record, as torch reads a layer's
    constructor arguments back from its attributes."""
    return property(lambda self: getattr(self.regularization, name),
                    doc=f"``regularization.{name}`` (:class:`rnnreg.nn.Regularization`)")


class _Keywords:
    """The regularization keywords a layer and a stack both read back from their record
    (``dropout`` is torch's own attribute on a layer, so only the stack adds it)."""

    input_dropout = _keyword("input_dropout")
    output_dropout = _keyword("output_dropout")
    recurrent_dropout = _keyword("recurrent_dropout")
    weight_dropout = _keyword("weight_dropout")
    variational = _keyword("variational")
    recurrent_mask = _keyword("recurrent_mask")
    zoneout_hidden = _keyword("zoneout_hidden")
    zoneout_cell = _keyword("zoneout_cell")


class _RegularizedRecurrence(_Keywords):
    """Shared behaviour of rnnreg.LSTM/GRU/RNN; mixed in before the ``torch.nn`` class."""

    def _init_regularization(self, regularization: Regularization) -> None:
        if regularization.zoneout_cell and self.mode != "LSTM":
            raise RnnregError(f"`zoneout_cell` needs a cell state, which only the LSTM has; "
                              f"this {type(self).__name__} has `zoneout_hidden` only")
        self.regularization = regularization
        self.dropout = regularization.dropout  # the caller's rate, even where torch was given 0

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _needs_own_masks(self) -> bool:
        """True when rnnreg samples the masks itself and runs the stack layer by layer
        (:meth:`Regularization.draws_own_masks`), or when that pays on CPU for fresh
        between-layer masks. Otherwise (Zaremba's placements on GPU, or without between-layer
        dropout) torch's fused stack runs in one call and only the input and output get a
        dropout around it.
        """
        own = self.regularization.draws_own_masks(self.training)
        return own or (self.training and self._faster_between())

    def _faster_between(self) -> bool:
        """On CPU, layer-by-layer fused calls with rnnreg's masks between them beat torch's
        multi-layer call, whose between-layer dropout samples with the slower ``bernoulli_``
        (benchmarks/masks.py). cuDNN's one-call stack stays faster on GPU.
        """
        weight = next(self.parameters())
        return (weight.device.type == "cpu" and self.dropout > 0 and self.num_layers > 1
                and not self.proj_size)

    def _mask_sizes(self) -> MaskSizes:
        return MaskSizes(self.input_size, (self.hidden_size,) * self.num_layers,
                         self.num_directions, _GATES[self.mode])

    def sample_masks(self, steps: int, batch_size: int, *, device=None,
                     dtype=None) -> DropoutMasks:
        """Sample the masks for one forward call over ``steps`` steps and ``batch_size`` rows
        (:meth:`Regularization.sample_masks`)."""
        device, dtype = mask_placement(self, device, dtype)
        return self.regularization.sample_masks(self._mask_sizes(), steps, batch_size,
                                                device=device, dtype=dtype)

    def forward(self, input, hx=None):
        """Same contract as ``torch.nn.LSTM.forward``: ``(output, h_n)`` or ``(output, (h, c))``."""
        output, _, state = self.forward_with_hidden(input, hx)
        return output, state

    def forward_with_masks(self, input, hx, masks: DropoutMasks):
        """Forward with explicit masks, whatever the training flag (MC dropout, tests)."""
        output, _, state = self.forward_with_hidden(input, hx, masks)
        return output, state

    def forward_with_hidden(self, input, hx=None, masks: DropoutMasks | None = None):
        """:meth:`forward`, also giving the last layer's output before ``output_dropout``:
        ``(output, hidden, state)``. AWD-LSTM's activation penalties (Merity et al. 2018,
        section 4.6) read both: AR the dropped output, TAR the output before the dropout.

        ``masks``: explicit masks whatever the training flag (as :meth:`forward_with_masks`);
        None draws them as :meth:`forward` does.
        """
        layout.check_input(self, input, hx)
        if masks is None and not self._needs_own_masks():
            dropped = _dropout_data(input, self.input_dropout, self.training)
            hidden, state = super().forward(dropped, hx)
            return (_dropout_data(hidden, self.output_dropout, self.training), hidden, state)
        x, lengths, given = layout.to_time_major(input, self.batch_first)
        if masks is None and self.training:
            masks = self.sample_masks(x.size(0), x.size(1), device=x.device, dtype=x.dtype)
        elif masks is None:
            masks = self.regularization.evaluation_masks(self._mask_sizes(), x.size(1),
                                                         device=x.device, dtype=x.dtype)
        hidden, state = self._forward_masked(x, lengths, hx, masks, given.unbatched)
        output = apply_output_mask(hidden, masks.output)
        restored = layout.restore_layout(output, lengths, given)
        if masks.output is not None:
            hidden = layout.restore_layout(hidden, lengths, given)
        else:
            hidden = restored
        return restored, hidden, state

    def _forward_masked(self, x: Tensor, lengths: Tensor | None, hx, masks: DropoutMasks,
                        unbatched: bool):
        """The stack layer by layer on time-major ``x`` up to the output dropout, every mask
        given (checked input): the last layer's time-major output, and the final state."""
        if self.proj_size:
            raise RnnregError("explicit masks need rnnreg's per-layer path, which has no proj_size")
        states = layout.initial_states(self, hx, x, unbatched)
        x = apply_mask(x, masks.input)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = apply_mask(x, masks.between[layer - 1])
            x, layer_states = self._run_layer(layer, x, lengths, states, masks)
            finals.append(layer_states)
        final = tuple(torch.cat([s[i] for s in finals]) for i in range(len(states)))
        return x, layout.pack_states(final, unbatched, self.mode == "LSTM")

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


def _torch_dropout(regularization: Regularization, num_layers: int) -> float:
    """The between-layer rate to give torch's constructor (checked by the record, with rnnreg's
    message, before torch's own check sees it).

    With one layer there is no layer boundary, so between-layer dropout is a no-op, for torch as
    for rnnreg; torch warns about it, though a strategy applied to a one-layer model is a normal
    setting. torch is given 0 there and the layer keeps the caller's rate.
    """
    return regularization.dropout if num_layers > 1 else 0.0


def _record(regularization: Regularization | None, **keywords) -> Regularization:
    """The layer's regularization: the record given, or the one its keywords build (the
    torch-style way to write one); both at once would leave one of them unused."""
    built = Regularization(**keywords)
    if regularization is None:
        return built
    if not isinstance(regularization, Regularization):
        raise RnnregError(f"`regularization` must be an rnnreg.nn.Regularization, got "
                          f"{type(regularization).__name__}")
    if built != Regularization():
        raise RnnregError(f"give the regularization either as `regularization` or as keywords, "
                          f"not both: got {regularization!r} and {built!r}")
    return regularization


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
                 proj_size: int = 0, *, regularization: Regularization | None = None,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        record = _record(regularization, dropout=dropout, input_dropout=input_dropout,
                         output_dropout=output_dropout, recurrent_dropout=recurrent_dropout,
                         weight_dropout=weight_dropout, variational=variational,
                         recurrent_mask=recurrent_mask, zoneout_hidden=zoneout_hidden,
                         zoneout_cell=zoneout_cell)
        if proj_size and (record.recurrent_dropout or record.weight_dropout
                          or record.variational or record.zoneout):
            raise RnnregError("proj_size > 0 runs only on torch's fused kernel: it cannot be "
                              "combined with recurrent_dropout, weight_dropout, variational or "
                              "zoneout")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         _torch_dropout(record, num_layers), bidirectional, proj_size,
                         device=device, dtype=dtype)
        self._init_regularization(record)


class GRU(_RegularizedRecurrence, nn.GRU):
    """``torch.nn.GRU`` with every dropout placement; see the module docstring for the options."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 regularization: Regularization | None = None,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        record = _record(regularization, dropout=dropout, input_dropout=input_dropout,
                         output_dropout=output_dropout, recurrent_dropout=recurrent_dropout,
                         weight_dropout=weight_dropout, variational=variational,
                         recurrent_mask=recurrent_mask, zoneout_hidden=zoneout_hidden)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first,
                         _torch_dropout(record, num_layers), bidirectional, device=device,
                         dtype=dtype)
        self._init_regularization(record)


class RNN(_RegularizedRecurrence, nn.RNN):
    """``torch.nn.RNN`` (tanh by default) with every dropout placement."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, *,
                 regularization: Regularization | None = None,
                 input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, device=None,
                 dtype=None) -> None:
        _check_sizes(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        if nonlinearity not in ("tanh", "relu"):
            raise RnnregError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        record = _record(regularization, dropout=dropout, input_dropout=input_dropout,
                         output_dropout=output_dropout, recurrent_dropout=recurrent_dropout,
                         weight_dropout=weight_dropout, variational=variational,
                         recurrent_mask=recurrent_mask, zoneout_hidden=zoneout_hidden)
        super().__init__(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first,
                         _torch_dropout(record, num_layers), bidirectional, device=device,
                         dtype=dtype)
        self._init_regularization(record)


# The layers by cell name: how StackedRNN, rnnreg.lm's Config and its model name them.
LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
