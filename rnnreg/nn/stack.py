"""A stack of single-layer rnnreg layers whose hidden sizes may differ from layer to layer.

``torch.nn.LSTM`` gives every layer one hidden size. AWD-LSTM (Merity et al. 2018, section 5)
needs 400 -> 1150 -> 1150 -> 400 so the last layer matches a tied embedding; :class:`StackedRNN`
chains one single-layer ``rnnreg.LSTM``/``GRU``/``RNN`` per size and keeps the regularization
keywords of the layers, acting where they do:

* ``input_dropout`` before layer 0, ``dropout`` between layers, ``output_dropout`` after the
  last: applied by the stack, fresh every step or one per sequence (``variational``);
* ``recurrent_dropout`` (shared as ``recurrent_mask`` says), ``weight_dropout`` and zoneout:
  handed to every layer, which applies them inside its recurrence (zoneout at its expectation
  in evaluation).

Its masks are a :class:`rnnreg.DropoutMasks` like a layer's (``between`` and the per-layer
masks simply have each layer's size), so code written for a uniform rnnreg layer, MC-dropout
evaluation included, runs unchanged. Its state is a tuple with one entry per layer, each that
layer's own state: ``(h, c)`` for an LSTM, ``h`` for a GRU/RNN, shaped ``(1, B, H_l)``.
Time-major ``(T, B, F)`` input, unidirectional only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from rnnreg.errors import RnnregError
from rnnreg.nn.functional import (
    check_bool,
    check_positive_int,
    check_probability,
    dropout_mask,
    is_positive_int,
)
from rnnreg.nn.layers import LAYERS, RATE_OPTIONS, regularization_repr
from rnnreg.nn.layout import check_placement
from rnnreg.nn.masks import DropoutMasks, apply_mask, mask_placement

__all__ = ["StackedRNN"]


class StackedRNN(nn.Module):
    """Layers of sizes ``layer_sizes`` on ``input_size`` features; see the module docstring.

    >>> stack = StackedRNN("lstm", 400, (1150, 1150, 400), dropout=0.25, weight_dropout=0.5,
    ...                    variational=True)
    >>> out, states = stack(torch.randn(70, 2, 400))   # out (70, 2, 400); 3 (h, c) pairs
    """

    def __init__(self, cell: str, input_size: int, layer_sizes: Sequence[int], *,
                 dropout: float = 0.0, input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0,
                 variational: bool = False, recurrent_mask: str = "sequence",
                 zoneout_hidden: float = 0.0, zoneout_cell: float = 0.0, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if cell not in LAYERS:
            raise RnnregError(f"cell must be one of {', '.join(LAYERS)}; got {cell!r}")
        sizes = tuple(layer_sizes) if isinstance(layer_sizes, Sequence) else ()
        if not sizes or not all(map(is_positive_int, sizes)):
            raise RnnregError(f"layer_sizes must be a non-empty sequence of positive integers, "
                              f"got {layer_sizes!r}")
        self.cell = cell
        self.input_size = check_positive_int("input_size", input_size)
        self.variational = check_bool("variational", variational)
        self.layer_sizes = sizes
        self.dropout = check_probability("dropout", dropout)
        self.input_dropout = check_probability("input_dropout", input_dropout)
        self.output_dropout = check_probability("output_dropout", output_dropout)
        zoneout = {"zoneout_hidden": zoneout_hidden}
        if zoneout_cell or cell == "lstm":  # a GRU/RNN refuses the keyword, with its reason
            zoneout["zoneout_cell"] = zoneout_cell
        inputs = (input_size, *sizes[:-1])
        self.layers = nn.ModuleList(
            LAYERS[cell](n_in, n_out, 1, bias=bias, recurrent_dropout=recurrent_dropout,
                         weight_dropout=weight_dropout, variational=variational,
                         recurrent_mask=recurrent_mask, device=device, dtype=dtype,
                         **zoneout)
            for n_in, n_out in zip(inputs, sizes))
        # Applied inside each layer's recurrence, so checked by the layers as they are built.
        first = self.layers[0]
        self.recurrent_dropout, self.weight_dropout = first.recurrent_dropout, first.weight_dropout
        self.recurrent_mask = first.recurrent_mask
        self.zoneout_hidden, self.zoneout_cell = first.zoneout_hidden, first.zoneout_cell

    @property
    def hidden_size(self) -> int:
        """The last layer's size: the width of the output."""
        return self.layer_sizes[-1]

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes)

    @property
    def bidirectional(self) -> bool:
        return False

    def sample_masks(self, steps: int, batch_size: int, *, device=None,
                     dtype=None) -> DropoutMasks:
        """Every mask of one forward call; leading dimension 1 when ``variational``."""
        device, dtype = mask_placement(self, device, dtype)
        t = 1 if self.variational else steps

        def sample(size: int, p: float) -> Tensor | None:
            if p == 0:
                return None
            return dropout_mask((t, batch_size, size), p, device=device, dtype=dtype)

        # Each layer samples its own recurrent and weight masks (it knows its gate count).
        own = [layer.sample_masks(steps, batch_size, device=device, dtype=dtype)
               for layer in self.layers]
        return DropoutMasks(
            input=sample(self.input_size, self.input_dropout),
            between=tuple(sample(size, self.dropout) for size in self.layer_sizes[:-1]),
            recurrent=tuple(m.recurrent[0] for m in own),
            weight=tuple(m.weight[0] for m in own),
            output=sample(self.hidden_size, self.output_dropout),
            zoneout=_per_layer_zoneout(own),
        )

    def forward(self, input: Tensor, hx=None):
        """``input (T, B, input_size)`` -> ``(output (T, B, H_last), per-layer states)``."""
        self._check_input(input, hx)  # before masks are drawn in the input's dtype
        if self.training:
            masks = self.sample_masks(input.size(0), input.size(1), device=input.device,
                                      dtype=input.dtype)
        else:
            masks = self._evaluation_masks(input.size(1), input.device, input.dtype)
        return self.forward_with_masks(input, hx, masks)

    def forward_with_masks(self, input: Tensor, hx, masks: DropoutMasks):
        """Forward with explicit masks, whatever the training flag (MC dropout, tests)."""
        self._check(input, hx, masks)
        states = (None,) * self.num_layers if hx is None else tuple(hx)
        x = apply_mask(input, masks.input)
        finals = []
        for index, layer in enumerate(self.layers):
            if index > 0:
                x = apply_mask(x, masks.between[index - 1])
            zoneout = None if masks.zoneout is None else (masks.zoneout[index],)
            own = DropoutMasks(input=None, between=(), recurrent=(masks.recurrent[index],),
                               weight=(masks.weight[index],), output=None, zoneout=zoneout)
            x, state = layer.forward_with_masks(x, states[index], own)
            finals.append(state)
        return apply_mask(x, masks.output), tuple(finals)

    def _evaluation_masks(self, batch_size: int, device, dtype) -> DropoutMasks:
        """Evaluation: no dropout; zoneout, if any, at its expectation (see rnnreg.LSTM)."""
        none = (None,) * self.num_layers
        own = [layer._evaluation_masks(batch_size, device, dtype) for layer in self.layers]
        return DropoutMasks(input=None, between=none[1:], recurrent=none, weight=none,
                            output=None, zoneout=_per_layer_zoneout(own))

    def _check(self, input, hx, masks: DropoutMasks) -> None:
        self._check_input(input, hx)
        for name, count in (("between", self.num_layers - 1), ("recurrent", self.num_layers),
                            ("weight", self.num_layers)):
            if len(getattr(masks, name)) != count:
                raise RnnregError(f"masks.{name} must have {count} entries for "
                                  f"{self.num_layers} layers, got {len(getattr(masks, name))}")

    def _check_input(self, input, hx) -> None:
        """The stack's own boundary: its masks act before the first layer sees the input, so
        shape, dtype and device are checked here (each layer checks its state)."""
        if (not isinstance(input, Tensor) or input.dim() != 3
                or input.size(-1) != self.input_size):
            got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise RnnregError(f"StackedRNN takes time-major input (T, B, {self.input_size}), "
                              f"got {got}")
        check_placement(self.layers[0], [("input", input)])
        if hx is not None and (not isinstance(hx, tuple | list) or len(hx) != self.num_layers):
            raise RnnregError(f"hx must be a tuple of {self.num_layers} per-layer states "
                              f"(one per entry of layer_sizes {self.layer_sizes})")

    def extra_repr(self) -> str:
        return regularization_repr(
            self, f"{self.cell}, {self.input_size}, layer_sizes={self.layer_sizes}",
            ("dropout", *RATE_OPTIONS))


def _per_layer_zoneout(own: list[DropoutMasks]):
    """The stack's ``zoneout`` entry from each single layer's masks: None when none has any."""
    if all(m.zoneout is None for m in own):
        return None
    return tuple(None if m.zoneout is None else m.zoneout[0] for m in own)
