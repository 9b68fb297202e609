"""What an engine of the own recurrence offers: :class:`Loops`, six per-step loops.

``rnnreg.nn.recurrence`` prepares everything that does not depend on the previous step and
calls an engine for the rest: for each cell (LSTM, GRU, Elman), a forward loop that fills the
buffers the backward needs, and a backward loop that fills the gradient buffers and returns
dL/d(initial state). Every engine (:class:`~rnnreg.nn.loops.python.PythonLoops`, the C++
:class:`~rnnreg.nn.loops.cpp.CppLoops`, :class:`~rnnreg.nn.loops.triton.TritonLoops`) has these
six methods with these parameters, so the recurrence calls whichever :func:`rnnreg.nn.loops.choose`
picks without knowing which, and :func:`rnnreg.nn.loops.check.agrees_with_python` compares one
with the Python twins loop by loop (:func:`loops_by_name`).

Shapes (T steps, B rows, H units, G gates): ``projected (T, B, G*H)`` is W_ih x + b_ih;
``mask``, ``zone*`` are ``(T|1, B, H)`` (a fresh factor per step, or one per sequence);
``valid (T, B, 1)`` is True inside each sequence (None without lengths); ``packed`` is oneDNN's
packed W_hh or None (:mod:`rnnreg.nn.products`). A backward returns None (or a pair of None)
for the initial state's gradient when ``need_first`` is False. The equations are in
``rnnreg.nn.recurrence``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

__all__ = ["Loops", "loops_by_name"]


class Loops(Protocol):
    """One engine's six loops (the Python twins' signatures)."""

    def lstm_forward(self, projected: Tensor, w_hh: Tensor, packed: Tensor | None,
                     mask: Tensor | None, valid: Tensor | None, zone_h: Tensor | None,
                     zone_c: Tensor | None, acts: Tensor, cs: Tensor, tanh_c: Tensor, hs: Tensor,
                     h_in: Tensor | None) -> None:
        """Fill ``acts (T, B, 4H)``, ``cs``, ``hs (T+1, B, H)`` (row 0 given), ``tanh_c``
        and, with a mask, ``h_in`` (the masked h(t-1))."""

    def lstm_backward(self, d_out: Tensor, d_h: Tensor, d_c: Tensor, acts: Tensor, cs: Tensor,
                      tanh_c: Tensor, valid: Tensor | None, w_hh: Tensor, onednn: bool,
                      mask: Tensor | None, passthrough: Tensor | None, zone_h: Tensor | None,
                      zone_c: Tensor | None, need_first: bool, d_gates: Tensor,
                      d_hin: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Fill ``d_gates (T, B, 4H)`` and ``d_hin``; return (dL/dh(0), dL/dc(0))."""

    def gru_forward(self, projected: Tensor, w_hh: Tensor, b_hh: Tensor | None,
                    packed: Tensor | None, mask: Tensor | None, valid: Tensor | None,
                    zone: Tensor | None, rec: Tensor, rz: Tensor, n: Tensor, hs: Tensor,
                    h_in: Tensor | None) -> None:
        """Fill ``rec (T, B, 3H)`` (W_hh h + b_hh), ``rz``, ``n``, ``hs`` and ``h_in``."""

    def gru_backward(self, d_out: Tensor, d_h: Tensor, coef: Tensor, keep_h: Tensor | None,
                     w_hh: Tensor, onednn: bool, mask: Tensor | None, need_first: bool,
                     d_rec: Tensor, d_hs: Tensor, d_hin: Tensor) -> Tensor | None:
        """Fill ``d_rec (T, B, 3H)``, ``d_hs`` and ``d_hin``; return dL/dh(0)."""

    def elman_forward(self, projected: Tensor, w_hh: Tensor, packed: Tensor | None,
                      mask: Tensor | None, valid: Tensor | None, relu: bool,
                      zone: Tensor | None, candidates: Tensor | None, hs: Tensor,
                      h_in: Tensor | None) -> None:
        """Fill ``hs``, ``h_in`` and, with zoneout, ``candidates`` (the new h before it)."""

    def elman_backward(self, d_out: Tensor, d_h: Tensor, slope: Tensor, w_hh: Tensor,
                       onednn: bool, mask: Tensor | None, passthrough: Tensor | None,
                       need_first: bool, d_pre: Tensor, d_hin: Tensor) -> Tensor | None:
        """Fill ``d_pre (T, B, H)`` and ``d_hin``; return dL/dh(0)."""


def loops_by_name(loops: Loops) -> dict[str, Callable]:
    """The engine's loops by their names: what a check or a report iterates over."""
    return {"lstm_forward": loops.lstm_forward, "lstm_backward": loops.lstm_backward,
            "gru_forward": loops.gru_forward, "gru_backward": loops.gru_backward,
            "elman_forward": loops.elman_forward, "elman_backward": loops.elman_backward}
