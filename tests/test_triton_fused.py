"""The fused Triton step (rnnreg.nn.loops.triton_fused, ``RNNREG_TRITON_STEP=fused``) in Triton's
interpreter, on CPU tensors.

One kernel per step and direction: the recurrent product (``tl.dot``) with the cell update in its
epilogue, and in the backward the previous step's product with the gate gradients after it. The
same checks as the two-kernel step's (tests/test_triton_loops.py): against the Python twins for
every mode, mask, lengths and zoneout case, odd sizes, torch.nn without masks, autocast against
float32, inputs of any strides; plus the choice of step itself. Every test here asserts that the
fused loops ran, so a selection that silently fell back to the two-kernel step fails. The
interpreter must be on before Triton compiles the kernels; on a machine with CUDA this module
skips (tests/test_cuda.py runs the engine compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_cases import (
    CASES,
    assert_tracks_float32,
    own_loop_vs_torch,
    recurrence_inputs,
    run_recurrence,
)

from rnnreg.nn import loops
from rnnreg.nn.recurrence import recurrence

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a CUDA device is here: tests/test_cuda.py runs the Triton loops compiled",
                allow_module_level=True)


def _import_interpreted():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from rnnreg.nn.loops import triton as triton_loops
        from rnnreg.nn.loops import triton_fused
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return triton_loops, triton_fused


triton_loops, triton_fused = _import_interpreted()
if not (triton_loops.interpreted() and triton_fused._interpreted()):
    pytest.skip("the Triton loops were imported compiled before this module",
                allow_module_level=True)

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
TOL = dict(rtol=1e-4, atol=1e-5)
LOOP_NAMES = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "elman_forward",
              "elman_backward")


@pytest.fixture
def fused(monkeypatch):
    """The Triton engine with the fused step chosen; yields the names of the fused loops that
    ran, each wrapped to record its call."""
    ran = []

    def spied(name):
        loop = getattr(triton_fused.LOOPS, name)

        def spy(*args):
            ran.append(name)
            return loop(*args)

        spy.__name__ = name  # the graph cache reads a loop's parameters by its name
        return spy

    for name in LOOP_NAMES:
        monkeypatch.setattr(triton_fused.LOOPS, name, spied(name))
    monkeypatch.setenv(loops.VARIABLE, "triton")
    monkeypatch.setenv(triton_fused.VARIABLE, "fused")
    return ran


def _loops_of(mode):
    stem = {"LSTM": "lstm", "GRU": "gru"}.get(mode, "elman")
    return {f"{stem}_forward", f"{stem}_backward"}


def python_run(mode, leaves, constants, monkeypatch):
    monkeypatch.setenv(loops.VARIABLE, "python")
    try:
        return run_recurrence(mode, leaves, constants)
    finally:
        monkeypatch.setenv(loops.VARIABLE, "triton")


def assert_all_close(ours, theirs, **tol):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **(tol or TOL), msg=lambda m, k=k: f"result {k}: {m}")


def test_the_step_setting():
    assert triton_fused.requested({}) == "split"  # the default
    assert triton_fused.requested({triton_fused.VARIABLE: " Fused "}) == "fused"
    assert triton_fused.requested({triton_fused.VARIABLE: "split"}) == "split"
    with pytest.raises(ValueError, match="RNNREG_TRITON_STEP='graph' is not a Triton step; "
                                         "choose one of split, fused"):
        triton_fused.requested({triton_fused.VARIABLE: "graph"})


def test_split_setting_runs_the_two_kernel_step(fused, monkeypatch):
    monkeypatch.setenv(triton_fused.VARIABLE, "split")
    leaves, constants = recurrence_inputs("LSTM", 3, 2, 2, 4, mask="sequence")
    ours = run_recurrence("LSTM", leaves, constants)
    assert fused == []
    assert_all_close(ours, python_run("LSTM", leaves, constants, monkeypatch))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_matches_the_python_twins(mode, case, fused, monkeypatch):
    leaves, constants = recurrence_inputs(mode, 4, 3, 2, 5, **CASES[case])
    ours = run_recurrence(mode, leaves, constants)
    assert set(fused) == _loops_of(mode)
    assert_all_close(ours, python_run(mode, leaves, constants, monkeypatch))


@pytest.mark.parametrize("mode", MODES)
def test_odd_sizes_match_the_python_twins(mode, fused, monkeypatch):
    """37 units (two tiles of hidden units, the second partly empty; two slices of the product's
    inputs) and a batch of one (one row of a 16-row tile)."""
    leaves, constants = recurrence_inputs(mode, 3, 1, 3, 37, mask="fresh", zoneout="train")
    ours = run_recurrence(mode, leaves, constants)
    assert set(fused) == _loops_of(mode)
    assert_all_close(ours, python_run(mode, leaves, constants, monkeypatch))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_more_rows_than_one_tile_match_the_python_twins(mode, fused, monkeypatch):
    """A batch of 17 (two tiles of rows) with lengths and a per-sequence mask."""
    leaves, constants = recurrence_inputs(mode, 3, 17, 2, 6, mask="sequence", lengths=True)
    ours = run_recurrence(mode, leaves, constants)
    assert set(fused) == _loops_of(mode)
    assert_all_close(ours, python_run(mode, leaves, constants, monkeypatch))


def test_gru_without_hidden_bias_matches_the_python_twins(fused, monkeypatch):
    """No b_hh (a GRU built with bias=False): the kernel's bias branch is off."""
    leaves, constants = recurrence_inputs("GRU", 4, 3, 2, 5, mask="sequence", lengths=True)
    w_ih, w_hh = leaves["weights"][:2]

    def run():
        out, (h,) = recurrence("GRU", leaves["x"], leaves["state"], w_ih, w_hh, None, None,
                               leaves["mask"], constants["lengths"])
        loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() + h.square().sum()
        wrt = [leaves["x"], *leaves["state"], w_ih, w_hh, leaves["mask"]]
        return [out, h, *torch.autograd.grad(loss, wrt)]

    ours = run()
    assert set(fused) == _loops_of("GRU")
    monkeypatch.setenv(loops.VARIABLE, "python")
    assert_all_close(ours, run())


@pytest.mark.parametrize("bidirectional, lengths", [(False, False), (True, True)],
                         ids=["forward", "bidirectional+lengths"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_nn_without_masks(mode, bidirectional, lengths, fused):
    ours, theirs = own_loop_vs_torch(mode, 4, 3, 2, 5, bidirectional=bidirectional,
                                     lengths=lengths)
    assert set(fused) == _loops_of(mode)
    assert_all_close(ours, theirs)


def test_loops_agree_with_python_on_their_own_arguments():
    """The engine-level check the C++ loops pass on first use holds for the fused loops (every
    buffer they fill and every result, with and without masks, lengths, zoneout)."""
    from rnnreg.nn.loops.check import agrees_with_python

    agrees_with_python(triton_fused.LOOPS, torch.device("cpu"))


@pytest.mark.parametrize("mode", MODES)
def test_initial_state_gradient_can_be_skipped(mode, fused, monkeypatch):
    """Without a gradient for the initial state (or mask) the backward loop skips the product
    for h(0); the other gradients are unchanged."""
    leaves, constants = recurrence_inputs(mode, 3, 2, 2, 4, lengths=True)
    for s in leaves["state"]:
        s.requires_grad_(False)
    ours = run_recurrence(mode, leaves, constants)
    assert set(fused) == _loops_of(mode)
    assert_all_close(ours, python_run(mode, leaves, constants, monkeypatch))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_under_autocast_track_float32(mode, dtype, fused):
    """Buffers in the autocast dtype, tl.dot on low-precision operands with float32
    accumulation, float32 elsewhere: within that dtype's accuracy of the float32 run."""
    leaves, constants = recurrence_inputs(mode, 6, 4, 16, 32, scale=0.2,
                                          **CASES["fresh+lengths"])
    full = run_recurrence(mode, leaves, constants)
    with torch.autocast("cpu", dtype=dtype):
        low = run_recurrence(mode, leaves, constants)
    assert low[0].dtype == dtype
    assert set(fused) == _loops_of(mode)
    assert_tracks_float32(mode, low, full, dtype)


def _batch_major(tensor):
    """The same values stored batch-major: a ``(T, B, ...)`` view of a ``(B, T, ...)`` tensor."""
    return tensor.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("case", ["plain", "masked, lengths", "masked, zoneout"])
def test_loops_read_inputs_of_any_strides(case):
    """Every fused loop given its read-only inputs batch-major fills the same buffers as the
    Python twin given them contiguous."""
    from rnnreg.nn.loops.check import _arguments

    for name, arguments in _arguments(torch.Generator().manual_seed(0), case, False).items():
        filled = triton_loops._FILLED[name]
        strided = {k: _batch_major(v) if isinstance(v, torch.Tensor) and v.dim() == 3
                   and k not in filled else v for k, v in arguments.items()}
        ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in strided.items()}
        theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v
                  for k, v in arguments.items()}
        result = getattr(triton_fused.LOOPS, name)(*ours.values())
        expected = getattr(loops.PYTHON, name)(*theirs.values())
        for k in filled:
            if theirs[k] is not None:
                torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=f"{name}: {k}")
        results = [result, expected]
        results = [[r for r in (x if isinstance(x, tuple) else (x,)) if r is not None]
                   for x in results]
        assert_all_close(*results)


def _rerun(run):
    """A CPU stand-in for a CUDA graph capture: a replay runs the loop again on the same static
    arguments and refreshes the recorded results in place."""
    result = run()

    def replay():
        fresh = run()
        pairs = zip(result, fresh) if isinstance(result, tuple) else [(result, fresh)]
        for old, new in pairs:
            if old is not None:
                old.copy_(new)

    return replay, result


def test_graphs_of_the_two_steps_are_kept_apart(fused, monkeypatch):
    """A graph recorded for one step is never replayed for the other: switching the setting
    between calls of one shape starts the other step's own count (first call plain, second
    recorded), and each replay gives the Python twins' results."""
    cache = triton_loops.GraphCache()
    monkeypatch.setattr(triton_loops, "_capturable", lambda device: True)
    monkeypatch.setattr(triton_loops, "GRAPHS", cache)
    monkeypatch.setattr(triton_loops, "_cuda_graph", _rerun)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    leaves, constants = recurrence_inputs("GRU", 4, 3, 2, 5, **CASES["fresh+lengths+zoneout"])
    theirs = python_run("GRU", leaves, constants, monkeypatch)
    for step, captures in (("split", 0), ("split", 2), ("fused", 2), ("fused", 4),
                           ("split", 4), ("fused", 4)):
        monkeypatch.setenv(triton_fused.VARIABLE, step)
        assert_all_close(run_recurrence("GRU", leaves, constants), theirs)
        assert cache.captures == captures, step
    assert "gru_forward" in fused and "gru_backward" in fused


def test_a_loop_beyond_32_bit_offsets_is_a_clear_error():
    """The fused kernels address a loop's (T + 1, B, G*H) buffers with 32-bit offsets: a loop
    too large for them is refused before any launch, one element less is not."""
    like = torch.empty(0)
    with pytest.raises(ValueError, match="32-bit offsets"):
        triton_fused._launch(2**5 - 1, 2**10, 4, 2**14, like)
    grid, tiles = triton_fused._launch(2**5 - 1, 2**10, 4, 2**14 - 1, like)
    assert grid == (2**10 // 64, 2**9) and tiles["BLOCK_B"] == tiles["BLOCK_J"] * 2 == 64


def test_tiles_leave_no_multiprocessor_idle_where_narrower_ones_fill_more(monkeypatch):
    """32 units a program, unless that gives fewer programs than the GPU has multiprocessors
    (then 16); rows up to 64 a program, at least 16."""
    like = torch.empty(0)
    monkeypatch.setattr(triton_fused, "_processors", lambda device: 132)  # an H100 SXM
    medium, tiles = triton_fused._launch(35, 20, 4, 650, like)  # 32 rows
    assert (medium, tiles["BLOCK_B"], tiles["BLOCK_J"]) == ((1, 41), 32, 16)
    wide, tiles = triton_fused._launch(35, 512, 4, 1500, like)  # 8 x 47 >= 132
    assert (wide, tiles["BLOCK_B"], tiles["BLOCK_J"]) == ((8, 47), 64, 32)
    single, tiles = triton_fused._launch(3, 1, 1, 37, like)
    assert (single, tiles["BLOCK_B"], tiles["BLOCK_J"]) == ((1, 3), 16, 16)


@pytest.mark.slow
def test_every_fused_launch_compiles_for_an_h100_or_h200(tmp_path):
    """What the interpreter lets pass, the compiler does not (tl.dot's shapes and operand
    dtypes, tiles that are not powers of two, constexpr misuse): every specialization the fused
    step launches, compiled for compute capability 9.0 with Triton's own ptxas, in a process
    without the interpreter and with an empty kernel cache."""
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests),
                                           env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "import fused_launches; "
                           "print(fused_launches.compile_every_fused_launch())"],
                          cwd=tests, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 5 * len(MODES)  # every kernel, several variants
