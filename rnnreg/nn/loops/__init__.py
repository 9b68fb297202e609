"""The per-step loops of rnnreg's own recurrence, and which of their three engines runs.

``rnnreg.nn.recurrence`` prepares everything that does not depend on the previous step (the input
projection, the gate-derivative coefficients, the buffers); what is left is a loop over time of
one recurrent matrix product and a few elementwise kernels. At the paper's shapes each kernel
takes microseconds, so the cost between kernels (the Python interpreter on CPU, kernel launches on
GPU) is as large as the kernels'. The loops therefore exist three times, with one signature:

* :data:`CPP_LOOP`: compiled C++ (``_loops.cpp``, built by :mod:`rnnreg.nn.loops.cpp`), on CPU;
* :data:`TRITON_GRAPHS` / :data:`TRITON_LOOP`: one cuBLAS product and one fused Triton kernel
  per step (:mod:`rnnreg.nn.loops.triton`), or with ``RNNREG_TRITON_STEP=fused`` one Triton
  kernel per step (:mod:`rnnreg.nn.loops.triton_fused`), on CUDA, replayed as CUDA graphs where
  capture works;
* :data:`PYTHON_LOOP`: the Python twins (:mod:`rnnreg.nn.loops.python`), the reference the
  others are tested against, and what runs where neither of the others can.

:func:`choose` is the one place that decides, from a tensor's device and the environment
variable ``RNNREG_ENGINE`` (:func:`requested`):

==========  =====================================  ======================================
setting     CPU tensors                            CUDA tensors
==========  =====================================  ======================================
``auto``    C++ loop if it builds, else Python     Triton if importable, else Python (warns)
``python``  Python loop                            Python loop
``triton``  Triton loop, in Triton's interpreter   Triton loop (error if not importable)
==========  =====================================  ======================================

``RNNREG_ENGINE=triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` in the environment before
Triton is imported: it is for checking the kernels without a GPU, not for speed.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping

import torch

from rnnreg.errors import RnnregError
from rnnreg.nn.loops.protocol import Loops
from rnnreg.nn.loops.python import PYTHON

__all__ = ["CPP_LOOP", "PYTHON_LOOP", "SETTINGS", "TRITON_GRAPHS", "TRITON_LOOP", "VARIABLE",
           "choose", "engine", "name", "requested"]

# The environment variable that picks the loops, and its values.
VARIABLE = "RNNREG_ENGINE"
SETTINGS = ("auto", "python", "triton")

# The engines' names, as rnnreg.nn.engines.engine_for and the benchmarks report them.
CPP_LOOP = "C++ loop"
TRITON_GRAPHS = "Triton loop with CUDA graphs"
TRITON_LOOP = "Triton loop"
PYTHON_LOOP = "Python loop"


def requested(environ: Mapping[str, str] | None = None) -> str:
    """The setting of ``RNNREG_ENGINE`` in ``environ`` (default ``os.environ``): one of
    :data:`SETTINGS`, ``auto`` when unset; anything else is an error."""
    value = (os.environ if environ is None else environ).get(VARIABLE, "auto").strip().lower()
    if value not in SETTINGS:
        raise RnnregError(f"{VARIABLE}={value!r} is not a loop engine; choose one of "
                          f"{', '.join(SETTINGS)}")
    return value


def choose(device: torch.device | str, setting: str = "auto",
           dtype: torch.dtype = torch.float32) -> tuple[str, Loops]:
    """``(name, loops)``: the engine that runs the own recurrence for ``dtype`` tensors on
    ``device`` under ``setting`` (a value of :data:`SETTINGS`), and its loops (a
    :class:`~rnnreg.nn.loops.protocol.Loops`). See the module's table; the Triton kernels
    compute in float32, so float64 runs the Python loop wherever Triton would."""
    device = torch.device(device)
    if setting not in SETTINGS:
        raise ValueError(f"unknown loop engine setting {setting!r}; choose one of "
                         f"{', '.join(SETTINGS)}")
    if setting == "python":
        return PYTHON_LOOP, PYTHON
    if dtype == torch.float64 and (setting == "triton" or device.type == "cuda"):
        return PYTHON_LOOP, PYTHON
    if setting == "triton":
        return _triton(device)
    if device.type == "cpu":
        native = _cpp()
        return (PYTHON_LOOP, PYTHON) if native is None else (CPP_LOOP, native)
    if device.type == "cuda":
        try:
            return _triton(device)
        except ImportError as error:
            _warn_no_triton(str(error.__cause__ or error))
    return PYTHON_LOOP, PYTHON


def engine(tensor: torch.Tensor) -> Loops:
    """The loops the own recurrence runs for ``tensor`` (:func:`choose` for its device and the
    environment's setting)."""
    return choose(tensor.device, requested(), tensor.dtype)[1]


def name(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The name of the engine that runs the own recurrence for ``dtype`` tensors on ``device``
    under the environment's setting: :data:`CPP_LOOP`, :data:`TRITON_GRAPHS`,
    :data:`TRITON_LOOP` or :data:`PYTHON_LOOP`."""
    return choose(device, requested(), dtype)[0]


def _cpp() -> Loops | None:
    """The C++ loops, or None where they do not build or fail their first-use check. While
    torch.compile traces, the answer already known (the build must not be traced)."""
    from rnnreg.nn.loops import cpp

    if torch.compiler.is_compiling():
        return cpp.answered()
    return cpp.compiled()


def _triton(device: torch.device) -> tuple[str, Loops]:
    """The Triton loops, named for whether they replay CUDA graphs on ``device``."""
    try:
        from rnnreg.nn.loops import triton as triton_loops  # imports Triton
    except ImportError as error:
        raise ImportError(f"rnnreg's Triton loops need Triton, which is not importable "
                          f"({error}); torch's CUDA wheels ship it") from error

    if device.type != "cuda" and not triton_loops.interpreted():
        raise RuntimeError(f"the Triton loops run on {device.type} tensors only in Triton's "
                           f"interpreter: set TRITON_INTERPRET=1 before Python imports Triton, "
                           f"or {VARIABLE}=auto")
    graphs = triton_loops.GRAPHS.usable(device)
    return (TRITON_GRAPHS if graphs else TRITON_LOOP), triton_loops.LOOPS


@functools.cache
def _warn_no_triton(reason: str) -> None:
    warnings.warn(f"rnnreg's own recurrence runs its Python loops on CUDA tensors: Triton "
                  f"is not importable ({reason}); install it (torch's CUDA wheels ship it) or "
                  f"set {VARIABLE}=python to choose the Python loops", RuntimeWarning,
                  stacklevel=4)
