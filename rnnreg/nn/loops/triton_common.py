"""What the Triton engine's two steps share: the device functions both kinds of kernel call,
and the helpers both read a loop's record with.

``rnnreg.nn.loops.triton`` (the loops, the two-kernel step, the graph cache) and
``rnnreg.nn.loops.triton_fused`` (the one-kernel step) both import this module; it imports
neither, so the loops can choose the one-kernel step without a circular import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__: list[str] = []  # shared by the two step modules, not a public interface

# A loop's record (``rnnreg.nn.loops.triton._loop``): the tensors and options every step of one
# loop reads, their names those of the loop's parameters plus the launch's own.
LoopRecord = SimpleNamespace
# Launches step t of a loop: ``(a, t) -> None``, ``a`` the loop's record.
StepLaunch = Callable[[LoopRecord, int], None]


@dataclass(frozen=True)
class StepLaunchers:
    """How each step of the Triton loops is launched: ``geometry(batch, hidden, gates, w_hh)``
    (what the kernels' launches need besides the tensors, once per loop) and one
    :data:`StepLaunch` per loop. The two-kernel step (``rnnreg.nn.loops.triton``) and the
    one-kernel step (``rnnreg.nn.loops.triton_fused``) are one each."""

    geometry: Callable[[int, int, int, Tensor], Any]
    lstm_forward: StepLaunch
    gru_forward: StepLaunch
    elman_forward: StepLaunch
    lstm_backward: StepLaunch
    gru_backward: StepLaunch
    elman_backward: StepLaunch


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow at either end.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load(ptr, offs, live):
    return tl.load(ptr + offs, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _row(step, size):
    # The first element of row ``step`` of a tensor whose rows hold ``size`` elements, in 64
    # bits: a whole (T, B, 4H) buffer may pass 2**31 elements where one step does not.
    return step.to(tl.int64) * size


def _or(tensor: Tensor | None, stand_in: Tensor) -> Tensor:
    """A pointer argument whose kernel branch is off still needs a tensor."""
    return stand_in if tensor is None else tensor


def _product_input(a: LoopRecord, t: int) -> Tensor:
    """The ``(T, B, H)`` buffer whose row t step t's recurrent product reads, for the loop
    record ``a``: the states, or their masked copies, of which the first is formed here and
    every later one by the previous step's kernel."""
    if not a.masked:
        return a.hs
    if t == 0:
        torch.mul(a.hs[0], a.mask[0], out=a.h_in[0])
    return a.h_in
