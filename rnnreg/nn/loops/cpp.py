"""The C++ loops of rnnreg's own recurrence (``_loops.cpp``): built, loaded and checked.

The C++ loops compute what their Python twins (``rnnreg.nn.loops.python``) compute without the
Python interpreter between the small kernels of each step: the GRU and Elman loops with the same
ATen calls, the LSTM's with one product and one hand-written, vectorized pass per step, its
batch split into blocks of rows, one per thread (see ``_loops.cpp``). They are compiled with
torch's extension builder on first use and cached, and registered as operators
``torch.ops.rnnreg.*`` with schemas whose argument names are the Python twins' parameter names;
they are called by keyword and check their inputs. On first use every loop is compared with its
Python twin on tiny inputs (:func:`rnnreg.nn.loops.check.agrees_with_python`); any build, schema
or result mismatch leaves the Python loops, with a warning, rather than failing (or computing
wrong gradients) later in training. oneDNN's private linear ops get the same check
(``rnnreg.nn.products``). Whether these loops run at all is ``rnnreg.nn.loops``' choice.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rnnreg.nn.loops.check import agrees_with_python
from rnnreg.nn.loops.protocol import Loops

__all__ = ["CppLoops", "answered", "compiled"]

_SOURCE = Path(__file__).with_name("_loops.cpp")
# The build is named after its source's hash: checkouts of different versions on one machine
# (a user's two virtual environments, CI beside a working copy) keep one cached build each,
# instead of rebuilding over each other's every time either loads.
_NAME = "rnnreg_loops_" + hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
# -O3 vectorizes the hand-written passes, given -fno-trapping-math (as torch itself is built:
# it lets the compiler evaluate both sides of a select, changing no value) and -fno-math-errno;
# -ffp-contract=off keeps it from fusing a multiply and an add in some of the CPU-specific
# versions of a pass and not in others (see _loops.cpp), so every CPU computes the same numbers.
# No -march: the build must run on any x86-64, not only on CPUs like the one that compiled it.
# -fopenmp turns at::parallel_for (a header) into a parallel region: compiled with it, linked
# without it, so its OpenMP calls bind to the runtime torch itself loaded, whose threads and
# thread count (torch.set_num_threads) are then the ones the loops use.
_FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]


@functools.cache
def compiled() -> Loops | None:
    """The C++ loops, built once per machine (under a minute here) and cached by torch, as an
    engine calling the ops ``torch.ops.rnnreg.*`` by keyword.

    None when the build fails (no C++ compiler, no headers), or when the ops do not match their
    Python twins on a first tiny run (a schema that changed, a oneDNN op the C++ calls that
    changed): then the Python loops run, with the same results, slower.
    """
    native = _build_and_check()
    _answer[:] = [native]
    return native


def answered() -> Loops | None:
    """What :func:`compiled` last returned, without building (None before its first call):
    for torch.compile, which must not trace the build and cannot read the cache's state."""
    return _answer[0] if _answer else None


_answer: list[Loops | None] = []


def _build_and_check() -> Loops | None:
    from torch.utils import cpp_extension

    if not _already_built(cpp_extension):
        print("rnnreg: compiling its C++ recurrence loops (once per machine, under a minute)",
              file=sys.stderr, flush=True)
    try:
        # Loads the library into the process, which registers the ops (once: loading the same
        # file again is a no-op).
        cpp_extension.load(_NAME, [str(_SOURCE)], extra_cflags=_FLAGS, is_python_module=False)
        _register_fakes()
        native = CppLoops()
    except Exception as error:  # any build failure leaves the Python loops, which always work
        warnings.warn(f"rnnreg could not compile its C++ loops, so its own recurrence runs "
                      f"the slower Python loops ({type(error).__name__}: {error}). Set "
                      "RNNREG_ENGINE=python to skip the attempt.", RuntimeWarning, stacklevel=2)
        return None
    try:
        # First use may come inside an autograd Function's forward, under no_grad or
        # inference_mode, or under autocast: the check needs plain float32.
        with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
            agrees_with_python(native, torch.device("cpu"))
    except Exception as error:  # a schema, dispatch or numerical mismatch
        warnings.warn(f"rnnreg's C++ loops failed their first-use check against the Python "
                      f"loops, so its own recurrence runs the Python loops "
                      f"({type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)
        return None
    return native


@functools.cache
def _register_fakes() -> None:
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


class CppLoops:
    """The ops ``torch.ops.rnnreg.*`` as an engine (:class:`~rnnreg.nn.loops.protocol.Loops`).

    Each op's schema names its arguments as the Python twin names its parameters; every call
    passes them by keyword, so a schema that drifted from its twin fails loudly (at the
    first-use check) instead of binding an argument to the wrong parameter. The backward ops
    always return tensors; where ``need_first`` is False the twins return None, and so does
    this engine.
    """

    def lstm_forward(self, projected: Tensor, w_hh: Tensor, packed: Tensor | None,
                     mask: Tensor | None, valid: Tensor | None, zone_h: Tensor | None,
                     zone_c: Tensor | None, acts: Tensor, cs: Tensor, tanh_c: Tensor, hs: Tensor,
                     h_in: Tensor | None) -> None:
        torch.ops.rnnreg.lstm_forward(
            projected=projected, w_hh=w_hh, packed=packed, mask=mask, valid=valid,
            zone_h=zone_h, zone_c=zone_c, acts=acts, cs=cs, tanh_c=tanh_c, hs=hs, h_in=h_in)

    def lstm_backward(self, d_out: Tensor, d_h: Tensor, d_c: Tensor, acts: Tensor, cs: Tensor,
                      tanh_c: Tensor, valid: Tensor | None, w_hh: Tensor, onednn: bool,
                      mask: Tensor | None, passthrough: Tensor | None, zone_h: Tensor | None,
                      zone_c: Tensor | None, need_first: bool, d_gates: Tensor,
                      d_hin: Tensor) -> tuple[Tensor | None, Tensor | None]:
        dh, dc = torch.ops.rnnreg.lstm_backward(
            d_out=d_out, d_h=d_h, d_c=d_c, acts=acts, cs=cs, tanh_c=tanh_c, valid=valid,
            w_hh=w_hh, onednn=onednn, mask=mask, passthrough=passthrough, zone_h=zone_h,
            zone_c=zone_c, need_first=need_first, d_gates=d_gates, d_hin=d_hin)
        return (dh, dc) if need_first else (None, None)

    def gru_forward(self, projected: Tensor, w_hh: Tensor, b_hh: Tensor | None,
                    packed: Tensor | None, mask: Tensor | None, valid: Tensor | None,
                    zone: Tensor | None, rec: Tensor, rz: Tensor, n: Tensor, hs: Tensor,
                    h_in: Tensor | None) -> None:
        torch.ops.rnnreg.gru_forward(
            projected=projected, w_hh=w_hh, b_hh=b_hh, packed=packed, mask=mask, valid=valid,
            zone=zone, rec=rec, rz=rz, n=n, hs=hs, h_in=h_in)

    def gru_backward(self, d_out: Tensor, d_h: Tensor, coef: Tensor, keep_h: Tensor | None,
                     w_hh: Tensor, onednn: bool, mask: Tensor | None, need_first: bool,
                     d_rec: Tensor, d_hs: Tensor, d_hin: Tensor) -> Tensor | None:
        first = torch.ops.rnnreg.gru_backward(
            d_out=d_out, d_h=d_h, coef=coef, keep_h=keep_h, w_hh=w_hh, onednn=onednn, mask=mask,
            need_first=need_first, d_rec=d_rec, d_hs=d_hs, d_hin=d_hin)
        return first if need_first else None

    def elman_forward(self, projected: Tensor, w_hh: Tensor, packed: Tensor | None,
                      mask: Tensor | None, valid: Tensor | None, relu: bool, zone: Tensor | None,
                      candidates: Tensor | None, hs: Tensor, h_in: Tensor | None) -> None:
        torch.ops.rnnreg.elman_forward(
            projected=projected, w_hh=w_hh, packed=packed, mask=mask, valid=valid, relu=relu,
            zone=zone, candidates=candidates, hs=hs, h_in=h_in)

    def elman_backward(self, d_out: Tensor, d_h: Tensor, slope: Tensor, w_hh: Tensor, onednn: bool,
                       mask: Tensor | None, passthrough: Tensor | None, need_first: bool,
                       d_pre: Tensor, d_hin: Tensor) -> Tensor | None:
        first = torch.ops.rnnreg.elman_backward(
            d_out=d_out, d_h=d_h, slope=slope, w_hh=w_hh, onednn=onednn, mask=mask,
            passthrough=passthrough, need_first=need_first, d_pre=d_pre, d_hin=d_hin)
        return first if need_first else None


def _already_built(cpp_extension: ModuleType) -> bool:
    """Whether torch's extension cache holds a build (only decides whether to announce one)."""
    try:
        directory = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
    except Exception:  # a private helper: if it moves, skip the announcement, not the build
        return True
    return any(directory.glob(f"{_NAME}*.so"))
