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
from dataclasses import replace

from torch import Tensor, nn

from rnnreg.errors import RnnregError
from rnnreg.nn.functional import check_positive_int, is_positive_int
from rnnreg.nn.layers import (
    LAYERS,
    RATE_OPTIONS,
    _keyword,
    _Keywords,
    _record,
    regularization_repr,
)
from rnnreg.nn.layout import check_placement
from rnnreg.nn.masks import DropoutMasks, apply_mask, apply_output_mask, mask_placement
from rnnreg.nn.regularization import MaskSizes, Regularization

__all__ = ["StackedRNN"]


class StackedRNN(_Keywords, nn.Module):
    """Layers of sizes ``layer_sizes`` on ``input_size`` features; see the module docstring.

    >>> stack = StackedRNN("lstm", 400, (1150, 1150, 400), dropout=0.25, weight_dropout=0.5,
    ...                    variational=True)
    >>> out, states = stack(torch.randn(70, 2, 400))   # out (70, 2, 400); 3 (h, c) pairs
    """

    dropout = _keyword("dropout")

    def __init__(self, cell: str, input_size: int, layer_sizes: Sequence[int], *,
                 regularization: Regularization | None = None,
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
        self.layer_sizes = sizes
        self.regularization = _record(
            regularization, dropout=dropout, input_dropout=input_dropout,
            output_dropout=output_dropout, recurrent_dropout=recurrent_dropout,
            weight_dropout=weight_dropout, variational=variational,
            recurrent_mask=recurrent_mask, zoneout_hidden=zoneout_hidden,
            zoneout_cell=zoneout_cell)
        # The layers apply what acts inside their recurrence; the stack applies the rest.
        inside = self.regularization.inside()
        inputs = (input_size, *sizes[:-1])
        self.layers = nn.ModuleList(
            LAYERS[cell](n_in, n_out, 1, bias=bias, regularization=inside, device=device,
                         dtype=dtype)
            for n_in, n_out in zip(inputs, sizes))

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

    def _mask_sizes(self) -> MaskSizes:
        return MaskSizes(self.input_size, self.layer_sizes, 1, self.layers[0]._mask_sizes().gates)

    def sample_masks(self, steps: int, batch_size: int, *, device=None,
                     dtype=None) -> DropoutMasks:
        """Every mask of one forward call; leading dimension 1 when ``variational``.

        Each layer draws the masks acting inside its recurrence, bottom to top, then the
        stack those on its input, its layer boundaries and its output, all through
        :meth:`rnnreg.nn.Regularization.sample_masks`.
        """
        device, dtype = mask_placement(self, device, dtype)
        own = [layer.sample_masks(steps, batch_size, device=device, dtype=dtype)
               for layer in self.layers]
        outside = self.regularization.outside().sample_masks(
            self._mask_sizes(), steps, batch_size, device=device, dtype=dtype)
        zoneout = None if own[0].zoneout is None else tuple(m.zoneout[0] for m in own)
        return replace(outside, recurrent=tuple(m.recurrent[0] for m in own),
                       weight=tuple(m.weight[0] for m in own), zoneout=zoneout)

    def forward(self, input: Tensor, hx=None):
        """``input (T, B, input_size)`` -> ``(output (T, B, H_last), per-layer states)``."""
        output, _, states = self.forward_with_hidden(input, hx)
        return output, states

    def forward_with_masks(self, input: Tensor, hx, masks: DropoutMasks):
        """Forward with explicit masks, whatever the training flag (MC dropout, tests)."""
        output, _, states = self.forward_with_hidden(input, hx, masks)
        return output, states

    def forward_with_hidden(self, input: Tensor, hx=None, masks: DropoutMasks | None = None):
        """:meth:`forward`, also giving the last layer's output before ``output_dropout``:
        ``(output, hidden, states)``, as :meth:`rnnreg.LSTM.forward_with_hidden`.

        ``masks``: explicit masks whatever the training flag; None draws them as
        :meth:`forward` does.
        """
        self._check_input(input, hx)  # before masks are drawn in the input's dtype
        if masks is None and self.training:
            masks = self.sample_masks(input.size(0), input.size(1), device=input.device,
                                      dtype=input.dtype)
        elif masks is None:
            masks = self.regularization.evaluation_masks(
                self._mask_sizes(), input.size(1), device=input.device, dtype=input.dtype)
        self._check(masks)
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
        return apply_output_mask(x, masks.output), x, tuple(finals)

    def _check(self, masks: DropoutMasks) -> None:
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

