"""Which per-step loops rnnreg's own recurrence runs: the compiled C++ ones, or their Python twins.

``rnnreg.nn.recurrence`` prepares everything that does not depend on the previous step (the input
projection, the gate-derivative coefficients, the buffers); what is left is a loop over time of
one recurrent matrix product and a few elementwise kernels. At the paper's shapes each kernel
takes microseconds, so on CPU the Python interpreter between them cost as much as the kernels.
The loops therefore exist twice with one signature: in C++ (``_loops.cpp``: the same ATen
calls, plus one fused pass for the LSTM's plain gate arithmetic; compiled with torch's
extension builder on first use and cached) and in Python (``rnnreg.nn.python_loops``), which
runs on GPUs, where the C++ build is unavailable (no compiler), or when the environment sets
``RNNREG_NATIVE=0``. The tests run both and compare each with independent references. This
module builds the C++ loops and chooses between the two (:func:`engine`).

The C++ loops are operators ``torch.ops.rnnreg.*`` with schemas whose argument names are the
Python twins' parameter names; they are called by keyword and check their inputs. On first
use they are compared with the Python twins on tiny inputs (:func:`compiled`, running the check
that ``rnnreg.nn.recurrence`` registers); any build, schema or result mismatch leaves the
Python loops, with a warning, rather than failing (or computing wrong gradients) later in
training. oneDNN's private linear ops get the same check (``rnnreg.nn.products``).
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

from rnnreg.nn import products

# Re-exported: these were this module's before the loops and the products had modules of their
# own. ONEDNN_MIN_HIDDEN is not: set it on rnnreg.nn.products, which reads it.
from rnnreg.nn.products import onednn_mm, onednn_pays, packed_weight
from rnnreg.nn.loops.python import PYTHON, stop_at_lengths

__all__ = ["engine", "compiled", "check_on_first_use", "running", "onednn_pays", "onednn_mm",
           "packed_weight", "stop_at_lengths", "PYTHON"]

_SOURCE = Path(__file__).with_name("_loops.cpp")
# The build is named after its source's hash: checkouts of different versions on one machine
# (a user's two virtual environments, CI beside a working copy) keep one cached build each,
# instead of rebuilding over each other's every time either loads.
_NAME = "rnnreg_loops_" + hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]


# The engine a self-test is checking, whatever the device (see running); None otherwise.
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


# The check compiled() runs once on the built ops (check_on_first_use). It runs the recurrence
# on both loops, so rnnreg.nn.recurrence registers it: this module does not import the module
# that imports it.
_first_use_check = None


def check_on_first_use(check):
    """Register ``check(native)``, which raises unless the engine ``native`` computes what the
    Python twins do; :func:`compiled` runs it before handing the C++ loops out."""
    global _first_use_check
    _first_use_check = check


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
            if _first_use_check is None:
                raise RuntimeError("no first-use check is registered (rnnreg.nn.recurrence "
                                   "registers it)")
            _first_use_check(native)
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
def running(native, onednn):
    """Make every recurrence run ``native``, and oneDNN at any width if ``onednn``: how the
    first-use check compares the two engines, whatever the device."""
    global _forced
    saved = _forced, products.ONEDNN_MIN_HIDDEN
    _forced = native
    if onednn:
        products.ONEDNN_MIN_HIDDEN = {"step": 1, "rows": 1}
    try:
        yield
    finally:
        _forced, products.ONEDNN_MIN_HIDDEN = saved


def _already_built(cpp_extension):
    """Whether torch's extension cache holds a build (only decides whether to announce one)."""
    try:
        directory = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
    except Exception:  # a private helper: if it moves, skip the announcement, not the build
        return True
    return any(directory.glob(f"{_NAME}*.so"))
