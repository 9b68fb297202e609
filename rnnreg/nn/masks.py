"""The masks of one forward call as data: :class:`DropoutMasks`, and where masks are made.

The layers (``rnnreg.nn.layers``), :class:`rnnreg.StackedRNN` and the engine choice
(``rnnreg.nn.engines``) all read the same record of masks; it has no behaviour of its own, so
it stands apart from the modules that sample and apply it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["DropoutMasks", "apply_mask", "apply_output_mask", "mask_placement"]


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


def mask_placement(module: nn.Module, device, dtype) -> tuple:
    """Device and dtype for a module's masks: the given ones, else those of its parameters."""
    first = next(module.parameters())
    return (first.device if device is None else device,
            first.dtype if dtype is None else dtype)


def apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` times ``mask``, or ``x`` itself where the mask is off (None)."""
    return x if mask is None else x * mask


def apply_output_mask(output: Tensor, mask: Tensor | None) -> Tensor:
    """The stack's output times its output mask, in the output's own dtype.

    Under bfloat16 autocast the last layer gives bfloat16, and the output dropout keeps that
    dtype, as ``torch.nn.functional.dropout`` keeps its input's: what the decoder reads is the
    same whether the mask was drawn ahead (here) or by a dropout on the output.
    """
    return output if mask is None else output * mask.to(output.dtype)
