"""CUDA tests of the fused Triton step (``RNNREG_TRITON_STEP=fused``), compiled on the GPU.

tests/nn/test_triton_fused.py runs the same kernels in Triton's interpreter on CPU tensors; here
they run compiled, against the Python twins on the device (every mode and case, 37 units), against
cuDNN without masks, under bfloat16/float16 autocast against float32, and replayed from CUDA
graphs against plain launches. Marked ``cuda``; skipped without a CUDA device (the CPU
rehearsal of the GPU check included: Triton runs on CPU tensors only in its interpreter).
"""

from __future__ import annotations

import os

import pytest
import torch

from rnnreg.nn import loops
from support.triton_cases import (
    CASES,
    assert_tracks_float32,
    own_loop_vs_torch,
    recurrence_inputs,
    relative_error,
    run_recurrence,
)

DEVICE = torch.device(os.environ.get("RNNREG_CHECK_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type != "cuda" or not torch.cuda.is_available(),
                       reason="the fused Triton step runs compiled on CUDA tensors only"),
]

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in cuDNN or cuBLAS, so none in the fused step's ``tl.dot`` either (it follows
    cuDNN's RNN setting): the comparisons are of float32 arithmetic."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield
    torch.backends.cuda.matmul.allow_tf32 = matmul


@pytest.fixture
def fused(monkeypatch):
    """The Triton engine's module with the fused step chosen, graphs on."""
    pytest.importorskip("triton")
    from rnnreg.nn.loops import triton as module

    monkeypatch.setenv(loops.VARIABLE, "triton")
    monkeypatch.setenv(module.STEP_VARIABLE, "fused")
    monkeypatch.setattr(module.GRAPHS, "enabled", True)
    return module


def assert_same(got, expected, **tol):
    for a, b in zip(got, expected, strict=True):
        assert a.device == b.device
        torch.testing.assert_close(a, b, **(tol or TOL))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_fused_step_matches_the_python_twins_on_device(mode, case, fused, monkeypatch):
    leaves, constants = recurrence_inputs(mode, 5, 3, 4, 37, device=DEVICE, **CASES[case])
    ours = run_recurrence(mode, leaves, constants)
    monkeypatch.setenv(loops.VARIABLE, "python")
    theirs = run_recurrence(mode, leaves, constants)
    # Relative to each result's norm: with 37 units the relu cell's state grows over the steps,
    # and entries that cancel to near zero carry float32 rounding of the large ones.
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.device == b.device
        assert relative_error(a, b) < 1e-5, (k, relative_error(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_fused_step_matches_cudnn_without_masks(mode, fused):
    ours, theirs = own_loop_vs_torch(mode, 6, 3, 4, 8, bidirectional=True, lengths=True,
                                     device=DEVICE)
    assert_same(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_fused_step_under_autocast_tracks_float32(mode, dtype, fused):
    leaves, constants = recurrence_inputs(mode, 8, 4, 16, 32, device=DEVICE, scale=0.2,
                                          **CASES["fresh+lengths"])
    full = run_recurrence(mode, leaves, constants)
    with torch.autocast("cuda", dtype=dtype):
        low = run_recurrence(mode, leaves, constants)
    assert low[0].dtype == dtype
    assert_tracks_float32(mode, low, full, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_fused_graph_replay_equals_plain_launches(mode, fused, monkeypatch):
    cache = fused.GraphCache()
    monkeypatch.setattr(fused, "GRAPHS", cache)
    leaves, constants = recurrence_inputs(mode, 5, 3, 4, 16, device=DEVICE,
                                          **CASES["fresh+lengths+zoneout"])
    first = run_recurrence(mode, leaves, constants)  # launched plainly, the key noted
    captured = run_recurrence(mode, leaves, constants)  # captured, then replayed
    replayed = run_recurrence(mode, leaves, constants)
    assert cache.captures == 2
    monkeypatch.setattr(cache, "enabled", False)
    plain = run_recurrence(mode, leaves, constants)
    assert_same(first, plain, rtol=0, atol=0)
    assert_same(captured, plain, rtol=1e-6, atol=1e-6)
    assert_same(replayed, captured, rtol=0, atol=0)


def test_fused_step_in_tf32_tracks_ieee_float32(fused, monkeypatch):
    """With cuDNN's RNN set to TF32 (torch's default), the fused step's ``tl.dot`` multiplies
    TF32 inputs, as cuDNN and the two-kernel step's cuBLAS products then do: its results
    differ from the IEEE float32 run (the setting reaches the compiled kernel) by no more than
    TF32's rounding."""
    leaves, constants = recurrence_inputs("LSTM", 5, 3, 4, 64, device=DEVICE,
                                          **CASES["fresh+lengths"])
    ieee = run_recurrence("LSTM", leaves, constants)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert fused.precision() == "tf32"
    tf32 = run_recurrence("LSTM", leaves, constants)
    errors = [relative_error(a, b) for a, b in zip(tf32, ieee, strict=True)]
    assert 1e-6 < max(errors) < 2e-2, errors
