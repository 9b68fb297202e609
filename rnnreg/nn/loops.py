"""The per-step loops of rnnreg's own recurrence, and the engine that runs them.

``rnnreg.nn.recurrence`` prepares everything that does not depend on the previous step (the input
projection, the gate-derivative coefficients, the buffers); what is left is a loop over time of
one recurrent matrix product and a few elementwise kernels. At the paper's shapes each kernel
takes microseconds, so on CPU the Python interpreter between them cost as much as the kernels.
The loops therefore exist twice with one signature: in C++ (``_loops.cpp``: the same ATen
calls, plus one fused pass for the LSTM's plain gate arithmetic; compiled with torch's
extension builder on first use and cached) and here in Python, which runs on GPUs, where the
C++ build is unavailable (no compiler), or when the environment sets ``RNNREG_NATIVE=0``. The
tests run both and compare each with independent references.

The C++ loops are operators ``torch.ops.rnnreg.*`` with schemas whose argument names are the
Python twins' parameter names; they are called by keyword and check their inputs. On first
use they are compared with the Python twins on tiny inputs (:func:`compiled`); any build,
schema or result mismatch leaves the Python loops, with a warning, rather than failing (or
computing wrong gradients) later in training. oneDNN's private linear ops get the same check
(:func:`onednn_pays`).

The recurrent products go to oneDNN where that pays (:func:`onednn_pays`), as torch's fused
CPU LSTM does; otherwise to ``torch.addmm``/``torch.mm``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import sys
import types
import warnings
from pathlib import Path

import torch

__all__ = ["engine", "compiled", "onednn_pays", "onednn_mm", "packed_weight", "stop_at_lengths",
           "PYTHON"]

_SOURCE = Path(__file__).with_name("_loops.cpp")
# The build is named after its source's hash: checkouts of different versions on one machine
# (a user's two virtual environments, CI beside a working copy) keep one cached build each,
# instead of rebuilding over each other's every time either loads.
_NAME = "rnnreg_loops_" + hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]

# From how many hidden units on oneDNN's products beat torch.mm on CPU (benchmarks/matmul.py,
# results/benchmarks/matmul.md): the T thin per-step products with W_hh ("step", packing W_hh
# included) from about 256; the products over all T*B rows at once ("rows": the input
# projection, its backward, the weight gradients) only between 400 and 650.
ONEDNN_MIN_HIDDEN = {"step": 256, "rows": 512}


# The engine a self-test is checking, whatever the device (see _running); None otherwise.
_forced = None


def engine(tensor):
    """The loops for ``tensor``'s device: the compiled ones on CPU when they build, else Python."""
    if _forced is not None:
        return _forced
    if tensor.device.type == "cpu":
        native = _resolved[-1] if torch.compiler.is_compiling() and _resolved else compiled()
        if native is not None:
            return native
    return PYTHON


@functools.cache
def compiled():
    """The C++ loops, built once per machine (under a minute here) and cached by torch, as an
    engine calling the ops ``torch.ops.rnnreg.*`` by keyword.

    None when ``RNNREG_NATIVE=0``, when the build fails (no C++ compiler, no headers), or when
    the ops do not match their Python twins on a first tiny run (a schema that changed, a
    oneDNN op the C++ calls that changed): then the Python loops run, with the same results,
    slower on CPU.
    """
    native = _build_and_check()
    _resolved[:] = [native]
    return native


# The last answer of compiled(), for engine() while torch.compile traces: the build and the
# check must not be traced into the graph (dynamo would trace through functools.cache).
_resolved: list = []


def _build_and_check():
    if os.environ.get("RNNREG_NATIVE", "1") == "0":
        return None
    from torch.utils import cpp_extension

    if not _already_built(cpp_extension):
        print("rnnreg: compiling its C++ recurrence loops (once per machine, under a minute)",
              file=sys.stderr, flush=True)
    try:
        # Loads the library into the process, which registers the ops (once: loading the same
        # file again is a no-op).
        cpp_extension.load(_NAME, [str(_SOURCE)], extra_cflags=["-O3"], is_python_module=False)
        _register_fakes()
        native = _native_engine()
    except Exception as error:  # any build failure leaves the Python loops, which always work
        warnings.warn(f"rnnreg could not compile its C++ loops, so its own recurrence runs "
                      f"the slower Python loops ({type(error).__name__}: {error}). Set "
                      "RNNREG_NATIVE=0 to skip the attempt.", RuntimeWarning, stacklevel=2)
        return None
    try:
        # First use may come inside an autograd Function's forward, under no_grad or
        # inference_mode, or under autocast: the check needs plain float32 autograd.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            _self_test(native)
    except Exception as error:  # a schema, dispatch or numerical mismatch
        warnings.warn(f"rnnreg's C++ loops failed their first-use check against the Python "
                      f"loops, so its own recurrence runs the Python loops "
                      f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)
        return None
    return native


@functools.cache
def _register_fakes():
    """Fake (meta) kernels, so that torch.compile can trace the ops without running them: the
    forward loops only fill their buffers, the backward loops return fresh ``(B, H)``s."""
    def fills_buffers(*args, **kwargs):
        return None

    for name in ("lstm_forward", "gru_forward", "elman_forward"):
        torch.library.register_fake(f"rnnreg::{name}", fills_buffers)

    @torch.library.register_fake("rnnreg::lstm_backward")
    def _(d_out, d_h, d_c, *args):
        return torch.empty_like(d_h, memory_format=torch.contiguous_format), torch.empty_like(
            d_c, memory_format=torch.contiguous_format)

    for name in ("gru_backward", "elman_backward"):
        torch.library.register_fake(
            f"rnnreg::{name}",
            lambda d_out, d_h, *args: torch.empty_like(d_h, memory_format=torch.contiguous_format))


def _native_engine():
    """The ops as an engine with the Python twins' signatures, each called by keyword."""
    return types.SimpleNamespace(**{name: _by_keyword(getattr(PYTHON, name), name)
                                    for name in vars(PYTHON)})


def _by_keyword(twin, name):
    op = getattr(torch.ops.rnnreg, name)
    names = tuple(inspect.signature(twin).parameters)

    def call(*args):
        arguments = dict(zip(names, args, strict=True))
        result = op(**arguments)
        if arguments.get("need_first") is False:  # the twins return None(s) there
            return (None, None) if isinstance(result, tuple | list) else None
        return result

    call.__name__ = name
    return call


@contextlib.contextmanager
def _running(native, onednn):
    """Make every recurrence run ``native``, and oneDNN at any width if ``onednn``."""
    global _forced, ONEDNN_MIN_HIDDEN
    saved = _forced, ONEDNN_MIN_HIDDEN
    _forced = native
    if onednn:
        ONEDNN_MIN_HIDDEN = {"step": 1, "rows": 1}
    try:
        yield
    finally:
        _forced, ONEDNN_MIN_HIDDEN = saved


def _self_test(native):
    """Run every loop of ``native`` and of the Python twins on tiny inputs (masks, lengths,
    zoneout; with oneDNN's products where they work) and raise if any result differs."""
    from rnnreg.nn.recurrence import recurrence  # it imports this module

    gen = torch.Generator().manual_seed(0)
    steps, batch, features, hidden = 3, 2, 2, 3
    lengths = torch.tensor([3, 1])
    for mode, gates in (("LSTM", 4), ("GRU", 3), ("RNN_TANH", 1), ("RNN_RELU", 1)):
        weights = [torch.randn(shape, generator=gen) * 0.5 for shape in (
            (gates * hidden, features), (gates * hidden, hidden), (gates * hidden,),
            (gates * hidden,))]
        mask = (torch.rand(steps, batch, hidden, generator=gen) > 0.3).float() / 0.7
        zone = (torch.rand(1, batch, hidden, generator=gen) > 0.5).float()
        zoneout = (zone, zone.flip(2) if mode == "LSTM" else None)
        for case_mask, case_lengths, case_zone in ((None, None, None), (mask, lengths, None),
                                                   (mask, lengths, zoneout)):
            x = torch.randn(steps, batch, features, generator=gen)
            state = [torch.randn(batch, hidden, generator=gen)
                     for _ in range(2 if mode == "LSTM" else 1)]
            for onednn in (False, True) if _onednn_works() else (False,):
                results = []
                for candidate in (native, PYTHON):
                    with _running(candidate, onednn):
                        leaves = [t.clone().requires_grad_() for t in (x, *state, *weights)]
                        out, final = recurrence(mode, leaves[0], leaves[1:1 + len(state)],
                                                *leaves[1 + len(state):], case_mask,
                                                case_lengths, case_zone)
                        loss = out.sum() + sum((s * s).sum() for s in final)
                        results.append([out, *final, *torch.autograd.grad(loss, leaves)])
                for ours, twin in zip(*results):
                    if not torch.allclose(ours, twin, rtol=1e-4, atol=1e-5):
                        raise RuntimeError(f"{mode} loops differ from the Python twin "
                                           f"(oneDNN {'on' if onednn else 'off'})")


def _already_built(cpp_extension):
    """Whether torch's extension cache holds a build (only decides whether to announce one)."""
    try:
        directory = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
    except Exception:  # a private helper: if it moves, skip the announcement, not the build
        return True
    return any(directory.glob(f"{_NAME}*.so"))


# --- the recurrent products ------------------------------------------------------------------


def onednn_pays(tensor, hidden, products):
    """Whether a layer of ``hidden`` units working on ``tensor`` runs its ``products`` ("step"
    or "rows") on oneDNN: on CPU, in float32, oneDNN enabled (``torch.backends.mkldnn.flags``),
    wide enough."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32
            and hidden >= ONEDNN_MIN_HIDDEN[products]
            # Under torch.compile the products stay on torch.mm, which the compiler knows.
            and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and _onednn_works())


@functools.cache
def _onednn_works():
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


def _product_forward(out, x, add, weight, packed):
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


def _product_backward(out, d, weight, onednn):
    """``out = d W``: the gradient reaching ``m * h(t-1)`` through the recurrent product."""
    if onednn:
        return out.copy_(onednn_mm(d, weight))
    return torch.mm(d, weight, out=out)


# --- the Python loops (equations in rnnreg.nn.recurrence) ---------------------------------------


def lstm_forward(projected, w_hh, packed, mask, valid, zone_h, zone_c, acts, cs, tanh_c, hs,
                 h_in):
    steps, batch, gates = projected.shape
    hidden = gates // 4
    pre = projected.new_empty(batch, gates)
    pre_g = pre[:, 2 * hidden:3 * hidden]
    # Per-step views made once: indexing inside the loop costs more than the small kernels.
    i, f, g, o = (a.unbind(0) for a in acts.view(steps, batch, 4, hidden).unbind(2))
    p, masks = projected.unbind(0), _per_step(mask, steps)
    keep_h, keep_c = _per_step(zone_h, steps), _per_step(zone_c, steps)
    for t in range(steps):
        h = hs[t]
        x_t = h if mask is None else torch.mul(h, masks[t], out=h_in[t])
        _product_forward(pre, x_t, p[t], w_hh, packed)
        # One sigmoid over all four gates (g's is overwritten next) beats three sigmoids
        # on slices: at these sizes a kernel launch costs more than the extra quarter.
        torch.sigmoid(pre, out=acts[t])
        torch.tanh(pre_g, out=g[t])
        c = torch.mul(f[t], cs[t], out=cs[t + 1]).addcmul_(i[t], g[t])
        torch.tanh(c, out=tanh_c[t])
        h_new = torch.mul(o[t], tanh_c[t], out=hs[t + 1])
        if zone_h is not None:  # zoneout: d * previous + (1 - d) * new, from the new values
            c.lerp_(cs[t], keep_c[t])
            h_new.lerp_(h, keep_h[t])
        if valid is not None:  # freeze finished sequences (out= may alias its own input)
            torch.where(valid[t], c, cs[t], out=c)
            torch.where(valid[t], h_new, h, out=h_new)


def lstm_backward(d_out, d_h, d_c, acts, cs, tanh_c, valid, w_hh, onednn, mask, passthrough,
                  zone_h, zone_c, need_first, d_gates, d_hin):
    steps, batch, gates = d_gates.shape
    hidden = gates // 4
    # The gate-derivative coefficients of every step at once (equations in recurrence._LSTM).
    i, f, g, o = acts.view(steps, batch, 4, hidden).unbind(2)
    coef = acts.new_empty(steps, batch, 4, hidden)
    torch.mul(g, i * (1 - i), out=coef[:, :, 0])
    torch.mul(cs[:-1], f * (1 - f), out=coef[:, :, 1])
    torch.mul(i, 1 - g * g, out=coef[:, :, 2])
    torch.mul(tanh_c, o * (1 - o), out=coef[:, :, 3])
    to_cell = o * (1 - tanh_c * tanh_c)  # dh(t)/dc(t)
    keep_c = stop_at_lengths(valid, coef, to_cell, f)
    if zone_h is not None:  # the gradient reaching the new h~ is (1 - d_h) dh: fold it in
        update_h = 1 - zone_h
        to_cell *= update_h
        coef[:, :, 3] *= update_h
        passthrough = zone_h.expand_as(to_cell)  # d_h dh goes straight to h(t-1)
    d_ifg = d_gates.view(steps, batch, 4, hidden)[:, :, :3].unbind(0)
    d_o = d_gates[:, :, 3 * hidden:].unbind(0)
    k_ifg, k_o = coef[:, :, :3].unbind(0), coef[:, :, 3].unbind(0)
    d_step, to_cell, keep_c = d_gates.unbind(0), to_cell.unbind(0), keep_c.unbind(0)
    masks, zones = _per_step(mask, steps), _per_step(zone_c, steps)
    dh, dc = d_out[-1] + d_h, d_c
    for t in range(steps - 1, -1, -1):
        if zones[t] is None:
            dcc = torch.addcmul(dc, dh, to_cell[t])
        else:  # zoneout: (1 - d_c) dc reaches the new cell c~, d_c dc goes to c(t-1)
            dcc = torch.addcmul(dc * (1 - zones[t]), dh, to_cell[t])
        torch.mul(dcc.unsqueeze(1), k_ifg[t], out=d_ifg[t])
        torch.mul(dh, k_o[t], out=d_o[t])
        if t == 0 and not need_first:
            return None, None
        if zones[t] is None:
            dc = dcc.mul_(keep_c[t])
        else:
            dc = torch.addcmul(dc * zones[t], dcc, keep_c[t])
        _product_backward(d_hin[t], d_step[t], w_hh, onednn)
        dh = _previous(d_out, d_hin, masks, t, dh, passthrough)
    return dh, dc


def gru_forward(projected, w_hh, b_hh, packed, mask, valid, zone, rec, rz, n, hs, h_in):
    steps = projected.size(0)
    hidden = projected.size(2) // 3
    p_rz, p_n = (s.unbind(0) for s in projected.split([2 * hidden, hidden], 2))
    a_rz, a_n = (s.unbind(0) for s in rec.split([2 * hidden, hidden], 2))
    r, z = (s.unbind(0) for s in rz.split(hidden, 2))
    masks, keep = _per_step(mask, steps), _per_step(zone, steps)
    for t in range(steps):
        h = hs[t]
        x_t = h if mask is None else torch.mul(h, masks[t], out=h_in[t])
        _product_forward(rec[t], x_t, b_hh, w_hh, packed)
        torch.add(p_rz[t], a_rz[t], out=rz[t]).sigmoid_()
        torch.addcmul(p_n[t], r[t], a_n[t], out=n[t]).tanh_()
        h_new = torch.lerp(n[t], h, z[t], out=hs[t + 1])  # n + z * (h - n), one kernel
        if zone is not None:
            h_new.lerp_(h, keep[t])
        if valid is not None:
            torch.where(valid[t], h_new, h, out=h_new)


def gru_backward(d_out, d_h, coef, keep_h, w_hh, onednn, mask, need_first, d_rec, d_hs, d_hin):
    steps, batch, gates = d_rec.shape
    d_rec_split = d_rec.view(steps, batch, 3, gates // 3)
    masks = _per_step(mask, steps)
    torch.add(d_out[-1], d_h, out=d_hs[-1])
    prev = None
    for t in range(steps - 1, -1, -1):
        dh = d_hs[t]
        torch.mul(dh.unsqueeze(1), coef[t], out=d_rec_split[t])
        if t == 0 and not need_first:
            return None
        _product_backward(d_hin[t], d_rec[t], w_hh, onednn)
        prev = _previous(d_out, d_hin, masks, t, out=d_hs[t - 1] if t > 0 else None)
        prev.addcmul_(dh, keep_h[t])
    return prev


def elman_forward(projected, w_hh, packed, mask, valid, relu, zone, candidates, hs, h_in):
    steps = projected.size(0)
    p, masks, keep = projected.unbind(0), _per_step(mask, steps), _per_step(zone, steps)
    for t in range(steps):
        h = hs[t]
        x_t = h if mask is None else torch.mul(h, masks[t], out=h_in[t])
        target = hs[t + 1] if zone is None else candidates[t]
        h_new = _product_forward(target, x_t, p[t], w_hh, packed)
        if relu:
            h_new.relu_()
        else:
            h_new.tanh_()
        if zone is not None:  # the candidate stays for act' in the backward
            h_new = torch.lerp(h_new, h, keep[t], out=hs[t + 1])
        if valid is not None:
            torch.where(valid[t], h_new, h, out=h_new)


def elman_backward(d_out, d_h, slope, w_hh, onednn, mask, passthrough, need_first, d_pre,
                   d_hin):
    steps = d_pre.size(0)
    masks = _per_step(mask, steps)
    dh = d_out[-1] + d_h
    for t in range(steps - 1, -1, -1):
        torch.mul(dh, slope[t], out=d_pre[t])
        if t == 0 and not need_first:
            return None
        _product_backward(d_hin[t], d_pre[t], w_hh, onednn)
        dh = _previous(d_out, d_hin, masks, t, dh, passthrough)
    return dh


PYTHON = types.SimpleNamespace(
    lstm_forward=lstm_forward, lstm_backward=lstm_backward, gru_forward=gru_forward,
    gru_backward=gru_backward, elman_forward=elman_forward, elman_backward=elman_backward)


def stop_at_lengths(valid, coef, to_state, keep):
    """Make every step past a sequence's length the identity in the backward pass.

    Zeroes (in place) the gate coefficients ``coef (T, B, G, H)`` and the path into the new
    state ``to_state (T, B, H)`` there, and returns the factor that carries the state's
    gradient to the previous step: ``keep`` inside the sequence, 1 past its end.
    """
    if valid is None:
        return keep
    v = valid.to(coef.dtype)
    coef *= v.unsqueeze(3)
    to_state *= v
    return torch.where(valid, keep, 1)


def _per_step(mask, steps):
    """The mask (or zoneout factor) each step uses: row t of a fresh ``(T, B, H)`` one, or the
    one per-sequence ``(1, B, H)`` at every step; a list of None when there is none."""
    if mask is None:
        return [None] * steps
    return mask.unbind(0) if mask.size(0) > 1 else [mask[0]] * steps


def _previous(d_out, d_hin, masks, t, dh=None, passthrough=None, out=None):
    """dL/dh(t-1) from step t: through the masked recurrent product, plus the gradient of
    output t-1, plus (where the sequence has ended) dL/dh(t) copied through the frozen state."""
    m = masks[t]
    if t > 0:
        if m is None:
            prev = torch.add(d_out[t - 1], d_hin[t], out=out)
        else:
            prev = torch.addcmul(d_out[t - 1], d_hin[t], m, out=out)
    else:
        prev = d_hin[0].clone() if m is None else d_hin[0] * m
    if passthrough is not None:
        prev.addcmul_(dh, passthrough[t])
    return prev
