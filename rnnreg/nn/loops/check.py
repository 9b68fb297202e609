"""The check an engine's loops pass before they run: the same results as the Python twins.

Every loop of an engine has its Python twin's signature and fills the same buffers, so the check
needs no recurrence around it: :func:`agrees_with_python` builds tiny random arguments for each
loop (with and without a recurrent mask, lengths and zoneout; with oneDNN's products where they
work), runs the candidate and the twin on copies, and compares every buffer and result. The
backward loops are plain arithmetic on their arguments, so random gate activations serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rnnreg.nn import products
from rnnreg.nn.loops.protocol import Loops, loops_by_name
from rnnreg.nn.loops.python import PYTHON

__all__ = ["agrees_with_python"]

# A batch of 8 rows: with two or more threads the C++ LSTM loop splits it into blocks of
# rows, one per thread, so the check covers that path too.
_STEPS, _BATCH, _HIDDEN = 3, 8, 3


def agrees_with_python(candidate: Loops, device: torch.device, *, rtol: float = 1e-4,
                       atol: float = 1e-5) -> None:
    """Raise RuntimeError unless every loop of ``candidate`` fills the same buffers and returns
    the same results as the Python twin, in float32 on ``device``."""
    gen = torch.Generator().manual_seed(0)
    onednn = (False, True) if device.type == "cpu" and products.onednn_works() else (False,)
    ours_by_name, twins_by_name = loops_by_name(candidate), loops_by_name(PYTHON)
    for case in ("plain", "masked, lengths", "masked, zoneout"):
        for fast in onednn:
            for name, arguments in _arguments(gen, case, fast).items():
                arguments = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                             for k, v in arguments.items()}
                ours = _run(ours_by_name[name], arguments)
                twin = _run(twins_by_name[name], arguments)
                for a, b in zip(ours, twin):
                    if (a is None) != (b is None) or (
                            a is not None and not torch.allclose(a, b, rtol=rtol, atol=atol)):
                        raise RuntimeError(f"{name} differs from its Python twin ({case}, "
                                           f"oneDNN {'on' if fast else 'off'})")


def _run(loop: Callable, arguments: dict[str, Any]) -> list[torch.Tensor | None]:
    """The loop on copies of ``arguments``: every tensor argument after the call, then the
    results. oneDNN's packed weight is read only, and is not copied."""
    copies = {k: v.clone() if _dense(v) else v for k, v in arguments.items()}
    result = loop(*copies.values())
    results = result if isinstance(result, tuple) else (result,)
    return [v for v in copies.values() if _dense(v)] + list(results)


def _dense(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided


def _arguments(gen: torch.Generator, case: str, onednn: bool) -> dict[str, dict[str, Any]]:
    """Each loop's arguments, by its twin's parameter names, for one case."""
    steps, batch, hidden = _STEPS, _BATCH, _HIDDEN

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.5

    def unit(*shape):  # gate activations
        return torch.rand(*shape, generator=gen)

    mask = valid = zone_h = zone_c = passthrough = None
    if case != "plain":
        mask = (torch.rand(steps, batch, hidden, generator=gen) > 0.3).float() / 0.7
    if case == "masked, lengths":
        lengths = torch.arange(batch) % steps + 1  # blocks of rows see different lengths
        valid = torch.arange(steps).unsqueeze(1) < lengths.unsqueeze(0)
        valid = valid.unsqueeze(2)
        passthrough = 1 - valid.float()
    if case == "masked, zoneout":
        zone_h = (torch.rand(1, batch, hidden, generator=gen) > 0.5).float()
        zone_c = zone_h.flip(2)

    def packed(gates):
        weight = rand(gates * hidden, hidden)
        return weight, (torch.ops.mkldnn._reorder_linear_weight(weight, batch) if onednn
                        else None)

    def states():
        buffer = torch.zeros(steps + 1, batch, hidden)
        buffer[0] = rand(batch, hidden)
        return buffer

    def h_in():
        return None if mask is None else torch.zeros(steps, batch, hidden)

    w4, p4 = packed(4)
    w3, p3 = packed(3)
    w1, p1 = packed(1)
    shared = dict(d_out=rand(steps, batch, hidden), d_h=rand(batch, hidden))
    return {
        "lstm_forward": dict(
            projected=rand(steps, batch, 4 * hidden), w_hh=w4, packed=p4, mask=mask, valid=valid,
            zone_h=zone_h, zone_c=zone_c, acts=torch.zeros(steps, batch, 4 * hidden),
            cs=states(), tanh_c=torch.zeros(steps, batch, hidden), hs=states(), h_in=h_in()),
        "lstm_backward": dict(
            **shared, d_c=rand(batch, hidden), acts=unit(steps, batch, 4 * hidden),
            cs=rand(steps + 1, batch, hidden), tanh_c=rand(steps, batch, hidden), valid=valid,
            w_hh=w4, onednn=onednn, mask=mask, passthrough=passthrough, zone_h=zone_h,
            zone_c=zone_c, need_first=True, d_gates=torch.zeros(steps, batch, 4 * hidden),
            d_hin=torch.zeros(steps, batch, hidden)),
        "gru_forward": dict(
            projected=rand(steps, batch, 3 * hidden), w_hh=w3, b_hh=rand(3 * hidden), packed=p3,
            mask=mask, valid=valid, zone=zone_h, rec=torch.zeros(steps, batch, 3 * hidden),
            rz=torch.zeros(steps, batch, 2 * hidden), n=torch.zeros(steps, batch, hidden),
            hs=states(), h_in=h_in()),
        "gru_backward": dict(
            **shared, coef=rand(steps, batch, 3, hidden), keep_h=unit(steps, batch, hidden),
            w_hh=w3, onednn=onednn, mask=mask, need_first=True,
            d_rec=torch.zeros(steps, batch, 3 * hidden), d_hs=torch.zeros(steps, batch, hidden),
            d_hin=torch.zeros(steps, batch, hidden)),
        "elman_forward": dict(
            projected=rand(steps, batch, hidden), w_hh=w1, packed=p1, mask=mask, valid=valid,
            relu=case == "masked, lengths", zone=zone_h,
            candidates=None if zone_h is None else torch.zeros(steps, batch, hidden),
            hs=states(), h_in=h_in()),
        "elman_backward": dict(
            **shared, slope=unit(steps, batch, hidden), w_hh=w1, onednn=onednn, mask=mask,
            passthrough=passthrough if zone_h is None else zone_h.expand(steps, -1, -1),
            need_first=True, d_pre=torch.zeros(steps, batch, hidden),
            d_hin=torch.zeros(steps, batch, hidden)),
    }
