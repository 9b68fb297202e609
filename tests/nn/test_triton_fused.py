"""The fused Triton step (rnnreg.nn.loops.triton_fused, ``RNNREG_TRITON_STEP=fused``) in Triton's
interpreter, on CPU tensors.

One kernel per step and direction: the recurrent product (``tl.dot``) with the cell update in its
epilogue, and in the backward the previous step's product with the gate gradients after it. The
same checks as the two-kernel step's (tests/nn/test_triton_loops.py): against the Python twins for
every mode, mask, lengths and zoneout case, odd sizes, torch.nn without masks, autocast against
float32, inputs of any strides; plus the tiles and the precision of the products. Every test
here asserts that the fused step ran, so a selection that silently fell back to the two-kernel
step fails. The
interpreter must be on before Triton compiles the kernels; on a machine with CUDA this module
skips (tests/nn/test_cuda.py runs the engine compiled).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from rnnreg.nn import loops
from rnnreg.nn.recurrence import recurrence
from support import REPO_ROOT, SCRIPT_PATH
from support.triton_cases import (
    CASES,
    assert_tracks_float32,
    interpreted_engine,
    own_loop_vs_torch,
    recurrence_inputs,
    run_recurrence,
)

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a CUDA device is here: tests/nn/test_cuda.py runs the Triton loops compiled",
                allow_module_level=True)


triton_loops = interpreted_engine()
from rnnreg.nn.loops import triton_fused  # noqa: E402  (imported by the line above)

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
TOL = dict(rtol=1e-4, atol=1e-5)
LOOP_NAMES = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "elman_forward",
              "elman_backward")


@pytest.fixture
def fused(monkeypatch):
    """The Triton engine with the fused step chosen; yields the names of the loops whose steps
    the fused step launched, each step function wrapped to record its call."""
    ran = []

    def spied(name):
        launch = getattr(triton_fused.STEP, name)

        def spy(a, t):
            if name not in ran:
                ran.append(name)
            return launch(a, t)

        return spy

    monkeypatch.setattr(triton_fused, "STEP", dataclasses.replace(
        triton_fused.STEP, **{name: spied(name) for name in LOOP_NAMES}))
    monkeypatch.setenv(loops.VARIABLE, "triton")
    monkeypatch.setenv(triton_loops.STEP_VARIABLE, "fused")
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


def test_split_setting_runs_the_two_kernel_step(fused, monkeypatch):
    monkeypatch.setenv(triton_loops.STEP_VARIABLE, "split")
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


def test_loops_agree_with_python_on_their_own_arguments(fused):
    """The engine-level check the C++ loops pass on first use holds for the fused step (every
    buffer the loops fill and every result, with and without masks, lengths, zoneout)."""
    from rnnreg.nn.loops.check import agrees_with_python

    agrees_with_python(triton_loops.LOOPS, torch.device("cpu"))
    assert set(fused) == set(LOOP_NAMES)


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
def test_loops_read_inputs_of_any_strides(case, fused):
    """Every loop, with the fused step, given its read-only inputs batch-major fills the same
    buffers as the Python twin given them contiguous."""
    from rnnreg.nn.loops.check import _arguments

    for name, arguments in _arguments(torch.Generator().manual_seed(0), case, False).items():
        filled = triton_loops._FILLED[name]
        strided = {k: _batch_major(v) if isinstance(v, torch.Tensor) and v.dim() == 3
                   and k not in filled else v for k, v in arguments.items()}
        ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in strided.items()}
        theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v
                  for k, v in arguments.items()}
        result = getattr(triton_loops, name)(*ours.values())
        expected = getattr(loops.PYTHON, name)(*theirs.values())
        for k in filled:
            if theirs[k] is not None:
                torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=f"{name}: {k}")
        results = [result, expected]
        results = [[r for r in (x if isinstance(x, tuple) else (x,)) if r is not None]
                   for x in results]
        assert_all_close(*results)
    assert set(fused) == set(LOOP_NAMES)


def test_graphs_of_the_two_steps_are_kept_apart(fused, monkeypatch):
    """A graph recorded for one step is never replayed for the other (the cache's key holds
    the step kind): with a CPU stand-in for the capture that notes the step chosen when it
    recorded, switching the setting between calls of one shape records the other step's own
    graphs, every replay runs under the step it was recorded for, both steps replay, and
    every result equals the Python twins'."""
    replays = collections.Counter()

    def recorded(run, device):
        kind = triton_loops.step_kind()
        result = run()

        def replay():
            assert triton_loops.step_kind() == kind, "a graph replayed for the other step"
            replays[kind] += 1
            fresh = run()
            pairs = zip(result, fresh) if isinstance(result, tuple) else [(result, fresh)]
            for old, new in pairs:
                if old is not None:
                    old.copy_(new)

        return replay, result

    cache = triton_loops.GraphCache()
    monkeypatch.setattr(triton_loops, "_capturable", lambda device: True)
    monkeypatch.setattr(triton_loops, "GRAPHS", cache)
    monkeypatch.setattr(triton_loops, "_cuda_graph", recorded)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    leaves, constants = recurrence_inputs("GRU", 4, 3, 2, 5, **CASES["fresh+lengths+zoneout"])
    theirs = python_run("GRU", leaves, constants, monkeypatch)
    captures = []
    for step, calls in (("split", 4), ("fused", 4), ("split", 2), ("fused", 2)):
        monkeypatch.setenv(triton_loops.STEP_VARIABLE, step)
        for _ in range(calls):
            assert_all_close(run_recurrence("GRU", leaves, constants), theirs)
        captures.append(cache.captures)
    assert 0 < captures[0] < captures[1] == captures[2] == captures[3]
    assert replays["split"] > 0 and replays["fused"] > 0
    assert "gru_forward" in fused and "gru_backward" in fused


def test_a_step_beyond_32_bit_offsets_is_a_clear_error():
    """The fused kernels address one step's (B, G*H) rows and W_hh's G*H*H elements with 32-bit
    offsets (steps with 64-bit ones): a step or a W_hh too large for them is refused before any
    launch, one element less is not; the number of steps does not count."""
    like = torch.empty(0)
    with pytest.raises(ValueError, match="32-bit offsets"):
        triton_fused.geometry(2**19, 2**10, 4, like)  # B * G * H = 2**31
    grid, tiles = triton_fused.geometry(2**19, 2**10 - 1, 4, like)
    assert grid == (2**19 // 64, 2**5) and tiles["BLOCK_B"] == tiles["BLOCK_J"] * 2 == 64
    with pytest.raises(ValueError, match="32-bit offsets"):
        triton_fused.geometry(1, 23171, 4, like)  # G * H * H just over 2**31
    assert triton_fused.geometry(1, 23170, 4, like)[0] == (1, 725)


def test_tiles_leave_no_multiprocessor_idle_where_narrower_ones_fill_more(monkeypatch):
    """32 units a program, unless that gives fewer programs than the GPU has multiprocessors
    (then 16); rows up to 64 a program, at least 16."""
    like = torch.empty(0)
    monkeypatch.setattr(triton_fused, "_processors", lambda device: 132)  # an H100 SXM
    medium, tiles = triton_fused.geometry(20, 650, 4, like)  # 32 rows
    assert (medium, tiles["BLOCK_B"], tiles["BLOCK_J"]) == ((1, 41), 32, 16)
    wide, tiles = triton_fused.geometry(512, 1500, 4, like)  # 8 x 47 >= 132
    assert (wide, tiles["BLOCK_B"], tiles["BLOCK_J"]) == ((8, 47), 64, 32)
    single, tiles = triton_fused.geometry(1, 37, 1, like)
    assert (single, tiles["BLOCK_B"], tiles["BLOCK_J"]) == ((1, 3), 16, 16)


@pytest.fixture
def rnn_precision():
    """Restores cuDNN's RNN precision setting (through the legacy API, after which both of
    torch's APIs read it)."""
    saved = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_products_follow_cudnn_rnn_precision(setting, fused, rnn_precision, monkeypatch):
    """Every fused kernel's ``tl.dot`` multiplies float32 operands at the precision of cuDNN's
    RNN (``torch.backends.cudnn.rnn.fp32_precision``), as the two-kernel step's cuBLAS products
    do: the input_precision each launch passes is the setting's; the results still match the
    Python twins (the interpreter multiplies in IEEE float32 either way)."""
    torch.backends.cudnn.rnn.fp32_precision = setting
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                seen.append((self.kernel.fn.__name__, constexprs["PRECISION"]))
                return self.kernel[grid](*args, **constexprs)
            return launch

    for name in ("_lstm_forward_step", "_lstm_backward_step", "_gru_forward_step",
                 "_elman_forward_step", "_carry_backward_step"):
        monkeypatch.setattr(triton_fused, name, Spy(getattr(triton_fused, name)))
    for mode in ("LSTM", "GRU", "RNN_TANH"):
        leaves, constants = recurrence_inputs(mode, 3, 2, 2, 5, mask="sequence")
        ours = run_recurrence(mode, leaves, constants)
        assert_all_close(ours, python_run(mode, leaves, constants, monkeypatch))
    assert {kernel for kernel, _ in seen} == {"_lstm_forward_step", "_lstm_backward_step",
                                              "_gru_forward_step", "_elman_forward_step",
                                              "_carry_backward_step"}
    assert {p for _, p in seen} == {setting}


KERNELS = ("_lstm_forward_step", "_gru_forward_step", "_elman_forward_step",
           "_lstm_backward_step", "_carry_backward_step")


def _compile_keys(monkeypatch):
    """Replaces each fused kernel by a recorder of the key Triton's JIT would compile it under
    for an H100 (its specialization of every argument: pointer alignment, integers equal to 1
    or divisible by 16, the constexprs, PRECISION among them), computed by Triton's own binder;
    nothing is launched. Returns the set the loops fill."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    keys = set()

    class Recorder:
        def __init__(self, kernel):
            jit = JITFunction(kernel.fn, **kernel.kwargs)
            self.name = kernel.fn.__name__
            self.bind = create_function_from_signature(jit.signature, jit.params, backend)

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                keys.add((self.name, repr(self.bind(*args, **constexprs)[1]),
                          constexprs["PRECISION"]))
            return launch

    for name in KERNELS:
        monkeypatch.setattr(triton_fused, name, Recorder(getattr(triton_fused, name)))
    return keys


def test_compiled_variants_are_bounded_and_follow_the_precision(fused, rnn_precision,
                                                                monkeypatch):
    """Every fused launch of a sweep over steps (1 to 13), sizes whose rows are not multiples of
    16 bytes, all four modes and masks/lengths/zoneout: Triton's compile keys are the same set
    for 13 steps as for 3 (the step index and the 64-bit step offsets are not specialized on);
    and cuDNN's RNN precision setting is part of every key, so TF32 and IEEE float32 products
    compile to variants of their own (as many), never one reused for the other."""
    keys = _compile_keys(monkeypatch)

    def sweep(steps, setting):
        torch.backends.cudnn.rnn.fp32_precision = setting
        keys.clear()
        for mode in MODES:
            for case in ("plain", "fresh+lengths+zoneout", "sequence+zoneout"):
                for batch, hidden in ((3, 5), (1, 37)):
                    for t in steps:
                        leaves, constants = recurrence_inputs(mode, t, batch, 2, hidden,
                                                              **CASES[case])
                        run_recurrence(mode, leaves, constants)
        return set(keys)

    few = sweep(range(1, 4), "ieee")
    assert sweep(range(1, 14), "ieee") == few
    assert {key[0] for key in few} == set(KERNELS) and len(few) <= 96
    tf32 = sweep(range(1, 4), "tf32")
    assert {key[2] for key in few} == {"ieee"} and {key[2] for key in tf32} == {"tf32"}
    assert len(tf32) == len(few) and not {key[1] for key in tf32} & {key[1] for key in few}


@pytest.mark.slow
def test_every_fused_launch_compiles_for_an_h100_or_h200(tmp_path):
    """What the interpreter lets pass, the compiler does not (tl.dot's shapes and operand
    dtypes, tiles that are not powers of two, constexpr misuse): every specialization the fused
    step launches, compiled for compute capability 9.0 with Triton's own ptxas, in a process
    without the interpreter and with an empty kernel cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([SCRIPT_PATH, env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "from support import fused_launches; "
                           "print(fused_launches.compile_every_fused_launch())"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 5 * len(MODES)  # every kernel, several variants
