"""The matrix products of rnnreg's own recurrence, on oneDNN where that pays.

A layer on the own loop runs six kinds of product per window: the T thin per-step products with
``W_hh`` and their backward, and the products over all ``T*B`` rows at once (the input
projection, its backward, the weight gradients). oneDNN, the library behind torch's fused CPU
LSTM, beats ``torch.addmm``/``torch.mm`` on them from some width on (:data:`ONEDNN_MIN_HIDDEN`),
through private ops that a torch release may change, so they are checked once on tiny inputs
(:func:`onednn_works`) and otherwise left for torch.mm with a warning. Apart from the loops,
since the choice holds whichever loop runs: the recurrence makes it (:func:`onednn_pays`,
:func:`packed_weight`) and hands it to the C++ or the Python loops, and the Python ones run
their per-step products here (:func:`product_forward`, :func:`product_backward`).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["ONEDNN_MIN_HIDDEN", "onednn_mm", "onednn_pays", "onednn_works", "packed_weight",
           "product_backward", "product_forward", "project"]

# From how many hidden units on oneDNN's products beat torch.mm on CPU (benchmarks/matmul.py,
# results/benchmarks/matmul.md): the T thin per-step products with W_hh ("step", packing W_hh
# included) from about 256; the products over all T*B rows at once ("rows": the input
# projection, its backward, the weight gradients) only between 400 and 650.
ONEDNN_MIN_HIDDEN = {"step": 256, "rows": 512}


def onednn_pays(tensor, hidden, products):
    """Whether a layer of ``hidden`` units working on ``tensor`` runs its ``products`` ("step"
    or "rows") on oneDNN: on CPU, in float32, oneDNN enabled (``torch.backends.mkldnn.flags``),
    wide enough."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32
            and hidden >= ONEDNN_MIN_HIDDEN[products]
            # Under torch.compile the products stay on torch.mm, which the compiler knows.
            and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and onednn_works())


@functools.cache
def onednn_works():
    """Whether oneDNN's private linear ops exist with the schemas used here and compute
    ``X W^T (+ b, + other)``: checked once on tiny inputs, since a torch release may change
    them; if not, the products stay on torch.mm with a warning."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b, other = (torch.randn(shape, generator=gen) for shape in ((2, 3), (4, 3), (4,),
                                                                          (2, 4)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        plain = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        added = torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")
        ok = (torch.allclose(plain, torch.addmm(b, x, w.t()), atol=1e-5)
              and torch.allclose(added, torch.addmm(other, x, w.t()), atol=1e-5)
              and torch.allclose(onednn_mm(x, w.t()), x @ w.t(), atol=1e-5))
    except Exception as error:  # a missing or changed private op
        warnings.warn(f"rnnreg does not use oneDNN's linear ops on this torch "
                      f"({type(error).__name__}: {error}); its products run on torch.mm",
                      RuntimeWarning, stacklevel=3)
        return False
    if not ok:
        warnings.warn("rnnreg does not use oneDNN's linear ops on this torch: they differ from "
                      "torch.mm on a test product", RuntimeWarning, stacklevel=3)
    return ok


def packed_weight(w_hh, batch):
    """``W_hh`` packed into oneDNN's blocked layout for ``batch`` rows, once per call (as
    torch's fused CPU LSTM does), or None where :func:`onednn_pays` does not hold."""
    if not onednn_pays(w_hh, w_hh.size(1), "step"):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w_hh, batch)


def onednn_mm(a, b):
    """``a @ b`` on oneDNN: its linear computes ``X W^T``, and takes ``W = b^T`` strided."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def product_forward(out, x, add, weight, packed):
    """``out = add + x W^T``, with ``add`` None, a ``(G*H,)`` bias or a ``(B, G*H)`` tensor."""
    if packed is None:
        if add is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(add, x, weight.t(), out=out)
    if add is not None and add.dim() == 2:
        result = torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, "add")
    else:
        result = torch.ops.mkldnn._linear_pointwise(x, packed, add, "none", [], "")
    return out.copy_(result)


def product_backward(out, d, weight, onednn):
    """``out = d W``: the gradient reaching ``m * h(t-1)`` through the recurrent product."""
    if onednn:
        return out.copy_(onednn_mm(d, weight))
    return torch.mm(d, weight, out=out)


class _Projection(torch.autograd.Function):
    """``x W^T + b`` for every step at once, on oneDNN (:func:`onednn_pays`).

    Three of the six big products of a layer's forward and backward (``x W_ih^T``, ``dP W_ih``
    and ``dP^T x``) are this one's; oneDNN runs them about a quarter faster than torch.mm at
    the paper's medium shape. Used only where it pays; otherwise ``F.linear``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.reshape(-1, x.size(-1))
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows.size(0))
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        x, weight = ctx.saved_tensors
        d_rows = d_out.reshape(-1, d_out.size(-1))
        rows = x.reshape(-1, x.size(-1))
        d_x = onednn_mm(d_rows, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        d_w = onednn_mm(d_rows.t(), rows) if ctx.needs_input_grad[1] else None
        d_b = d_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_x, d_w, d_b


def project(x, weight, bias, hidden):
    """The input projection of every step, ``x W_ih^T + b``, on oneDNN where that pays."""
    if onednn_pays(weight, hidden, "rows") and not torch.is_autocast_enabled(x.device.type):
        return _Projection.apply(x, weight, bias)
    return F.linear(x, weight, bias)
