"""The C++ LSTM loop's blocks of batch rows, one per thread, against the Python twin.

With more than one thread the compiled LSTM loop runs each block of rows through all its steps
on its own thread (``row_blocks`` in ``_loops.cpp``). The tests elsewhere run with one thread,
so here two threads and batches that split unevenly, with every per-row feature (fresh and
per-sequence masks, lengths, zoneout), checked against the Python loop and for exact repeats.
"""

from __future__ import annotations

import pytest
import torch

from rnnreg.nn import loops
from rnnreg.nn.recurrence import recurrence

pytestmark = pytest.mark.skipif(loops.name("cpu") != loops.CPP_LOOP,
                                reason="the C++ loops are off (RNNREG_ENGINE) or not built")


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _inputs(steps, batch, hidden, mask_kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * 0.5).requires_grad_()

    mask = None
    if mask_kind != "none":
        rows = steps if mask_kind == "fresh" else 1
        keep = torch.rand(rows, batch, hidden, generator=gen, dtype=dtype) > 0.3
        mask = (keep / 0.7).to(dtype).requires_grad_()
    return dict(x=rand(steps, batch, hidden), state=(rand(batch, hidden), rand(batch, hidden)),
                w_ih=rand(4 * hidden, hidden), w_hh=rand(4 * hidden, hidden),
                b_ih=rand(4 * hidden), b_hh=rand(4 * hidden), mask=mask)


def _run(inputs, lengths, zoneout):
    out, (h, c) = recurrence("LSTM", inputs["x"], inputs["state"], inputs["w_ih"],
                             inputs["w_hh"], inputs["b_ih"], inputs["b_hh"], inputs["mask"],
                             lengths, zoneout)
    gen = torch.Generator().manual_seed(1)
    loss = sum((torch.randn(t.shape, generator=gen, dtype=t.dtype) * t).sum()
               for t in (out, h, c))
    wrt = [v for v in (inputs["x"], *inputs["state"], inputs["w_ih"], inputs["w_hh"],
                       inputs["b_ih"], inputs["b_hh"], inputs["mask"]) if v is not None]
    return [out, h, c, *torch.autograd.grad(loss, wrt)]


def _zoneout(steps, batch, hidden, dtype):
    gen = torch.Generator().manual_seed(2)
    return tuple((torch.rand(steps, batch, hidden, generator=gen) < rate).to(dtype)
                 for rate in (0.1, 0.5))


@pytest.mark.parametrize("mask_kind", ["none", "fresh", "per_sequence"])
@pytest.mark.parametrize("extra", ["none", "lengths", "zoneout"])
@pytest.mark.parametrize(("batch", "hidden"), [(13, 24), (20, 24), (29, 37)])
def test_row_blocks_match_the_python_loop(two_threads, monkeypatch, mask_kind, extra, batch,
                                          hidden):
    # 29 rows and 37 units: blocks of more rows than one tile of the float32 product holds,
    # and product widths (148 and 37) that end in part of a vector.
    steps = 6
    inputs = _inputs(steps, batch, hidden, mask_kind, torch.float32)
    lengths = (torch.arange(batch) % steps + 1) if extra == "lengths" else None
    zoneout = _zoneout(steps, batch, hidden, torch.float32) if extra == "zoneout" else None
    ours = _run(inputs, lengths, zoneout)
    again = _run(inputs, lengths, zoneout)
    for a, b in zip(ours, again):  # the same blocks every run: exactly the same numbers
        assert torch.equal(a, b)
    monkeypatch.setenv(loops.VARIABLE, "python")
    twin = _run(inputs, lengths, zoneout)
    for a, b in zip(ours, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_row_blocks_pass_a_float64_gradient_check(two_threads):
    steps, batch, hidden = 3, 9, 3
    inputs = _inputs(steps, batch, hidden, "fresh", torch.float64)
    lengths = torch.tensor([3, 1, 2, 3, 3, 1, 2, 3, 2])

    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask):
        out, (h, c) = recurrence("LSTM", x, (h0, c0), w_ih, w_hh, b_ih, b_hh, mask, lengths)
        return out, h, c

    args = (inputs["x"], *inputs["state"], inputs["w_ih"], inputs["w_hh"], inputs["b_ih"],
            inputs["b_hh"], inputs["mask"])
    assert torch.autograd.gradcheck(f, args)
