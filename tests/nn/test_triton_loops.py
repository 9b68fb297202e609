"""The Triton loops (rnnreg.nn.loops.triton) in Triton's interpreter, on CPU tensors.

The kernels are the GPU engine's; the interpreter runs them on CPU tensors, so their arithmetic
is tested on every machine: against the Python twins (every mode; masks ``(T, B, H)`` and
``(1, B, H)``, lengths, zoneout in training and its expectation in evaluation; outputs, final
states and the gradients of every input) and, with no mask, against torch.nn with the same
weights (both directions, lengths). The interpreter must be on before Triton compiles the
kernels, so this module imports them with ``TRITON_INTERPRET=1`` and restores the environment;
on a machine with CUDA it skips, since tests/nn/test_cuda.py runs the same cases compiled.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import subprocess
import sys
import threading
import types
import warnings

import pytest
import torch

from rnnreg.nn import loops
from rnnreg.nn.loops.protocol import loops_by_name
from rnnreg.nn.loops.python import PYTHON
from rnnreg.nn.recurrence import recurrence
from support import REPO_ROOT, SCRIPT_PATH
from support.triton_cases import (
    CASES,
    assert_tracks_float32,
    evaluated_twice,
    interpreted_engine,
    own_loop_vs_torch,
    recurrence_inputs,
    relative_error,
    run_recurrence,
)

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a CUDA device is here: tests/nn/test_cuda.py runs the Triton loops compiled",
                allow_module_level=True)


triton_loops = interpreted_engine()

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
_LOOP = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "elman", "RNN_RELU": "elman"}
_KERNELS = ("_lstm_forward_step", "_gru_forward_step", "_elman_forward_step",
            "_lstm_backward_step", "_carry_backward_step")
TOL = dict(rtol=1e-4, atol=1e-5)


def on(engine, monkeypatch):
    monkeypatch.setenv(loops.VARIABLE, engine)


def assert_all_close(ours, theirs, **tol):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **(tol or TOL), msg=lambda m, k=k: f"result {k}: {m}")


@pytest.mark.parametrize("name", sorted(loops_by_name(PYTHON)))
def test_engine_takes_the_python_twins_parameters(name):
    """The engine's loops are called positionally by the recurrence: each takes the twin's
    parameters in the twin's order (a drifted method would bind arguments to wrong names)."""
    ours = inspect.signature(loops_by_name(triton_loops.LOOPS)[name]).parameters
    assert list(ours) == list(inspect.signature(loops_by_name(PYTHON)[name]).parameters)


def test_triton_setting_runs_the_interpreted_loops_on_cpu(monkeypatch):
    on("triton", monkeypatch)
    assert loops.engine(torch.empty(1)) is triton_loops.LOOPS
    assert loops.name("cpu") == loops.TRITON_LOOP  # no graphs in the interpreter
    assert not triton_loops.GRAPHS.usable("cpu")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    on("triton", monkeypatch)
    monkeypatch.setattr(triton_loops, "interpreted", lambda: False)  # as if compiled
    with pytest.raises(RuntimeError, match="run on cpu tensors only in Triton's interpreter: "
                                           "set TRITON_INTERPRET=1"):
        loops.engine(torch.empty(1))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_matches_the_python_twins(mode, case, monkeypatch):
    leaves, constants = recurrence_inputs(mode, 4, 3, 2, 5, **CASES[case])
    on("triton", monkeypatch)
    ours = run_recurrence(mode, leaves, constants)
    on("python", monkeypatch)
    assert_all_close(ours, run_recurrence(mode, leaves, constants))


@pytest.mark.parametrize("mode", MODES)
def test_odd_sizes_match_the_python_twins(mode, monkeypatch):
    """37 units (not a multiple of any block) and a batch of one."""
    leaves, constants = recurrence_inputs(mode, 3, 1, 3, 37, mask="fresh", zoneout="train")
    on("triton", monkeypatch)
    ours = run_recurrence(mode, leaves, constants)
    on("python", monkeypatch)
    assert_all_close(ours, run_recurrence(mode, leaves, constants))


@pytest.mark.parametrize("bidirectional, lengths", [(False, False), (True, True)],
                         ids=["forward", "bidirectional+lengths"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_nn_without_masks(mode, bidirectional, lengths, monkeypatch):
    on("triton", monkeypatch)
    ours, theirs = own_loop_vs_torch(mode, 4, 3, 2, 5, bidirectional=bidirectional,
                                     lengths=lengths)
    assert_all_close(ours, theirs)


def test_loops_agree_with_python_on_their_own_arguments():
    """The engine-level check the C++ loops pass on first use holds for the Triton loops."""
    from rnnreg.nn.loops.check import agrees_with_python

    agrees_with_python(triton_loops.LOOPS, torch.device("cpu"))


def test_initial_state_gradient_can_be_skipped(monkeypatch):
    """Without a gradient for the initial state (or mask) the backward loop stops before the
    first step's product, as the twins do; the other gradients are unchanged."""
    leaves, constants = recurrence_inputs("LSTM", 3, 2, 2, 4, mask=None)
    for s in leaves["state"]:
        s.requires_grad_(False)
    on("triton", monkeypatch)
    ours = run_recurrence("LSTM", leaves, constants)
    on("python", monkeypatch)
    assert_all_close(ours, run_recurrence("LSTM", leaves, constants))


def test_float64_runs_the_python_loop_where_triton_would(monkeypatch):
    """The kernels compute in float32: float64 keeps its precision on the Python twins."""
    on("triton", monkeypatch)
    assert loops.engine(torch.empty(1, dtype=torch.float64)) is PYTHON
    assert loops.name("cpu", torch.float64) == loops.PYTHON_LOOP
    assert loops.choose("cuda", "auto", torch.float64) == (loops.PYTHON_LOOP, PYTHON)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_under_autocast_track_float32(mode, dtype, monkeypatch):
    """The kernels' low-precision path (buffers in the autocast dtype, float32 inside): within
    that dtype's accuracy of the float32 run."""
    on("triton", monkeypatch)
    leaves, constants = recurrence_inputs(mode, 8, 4, 16, 32, scale=0.2, **CASES["fresh+lengths"])
    full = run_recurrence(mode, leaves, constants)
    with torch.autocast("cpu", dtype=dtype):
        low = run_recurrence(mode, leaves, constants)
    assert low[0].dtype == dtype
    assert_tracks_float32(mode, low, full, dtype)


def _rerun(run, device):
    """A CPU stand-in for a CUDA graph: a replay runs the loop again on the same static
    arguments and refreshes the recorded result's tensors in place, as a graph replay does."""
    result = run()

    def replay():
        fresh = run()
        pairs = zip(result, fresh) if isinstance(result, tuple) else [(result, fresh)]
        for old, new in pairs:
            if old is not None:
                old.copy_(new)

    return replay, result


def _stand_in_graphs(monkeypatch):
    """A fresh graph cache that records with :func:`_rerun`, on CPU tensors."""
    cache = triton_loops.GraphCache()
    monkeypatch.setattr(triton_loops, "_capturable", lambda device: True)
    monkeypatch.setattr(triton_loops, "GRAPHS", cache)
    monkeypatch.setattr(triton_loops, "_cuda_graph", _rerun)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return cache


@pytest.mark.parametrize("case", ["plain", "fresh+lengths+zoneout", "zoneout-eval+lengths"])
@pytest.mark.parametrize("mode", MODES)
def test_replays_copy_inputs_in_and_results_out(mode, case, monkeypatch):
    """The graph cache's bookkeeping, with a stand-in for the capture: the first call at a
    shape launches plainly; the second records the forward (and the backward, unless it reads
    the forward's buffers where they are: then it is a new key, recorded on the third call); a
    fourth replays both; with other values each time, all equal the Python twins (every
    changing input copied in, every filled buffer and result reaching the caller)."""
    cache = _stand_in_graphs(monkeypatch)
    captures = []
    for seed in range(4):
        leaves, constants = recurrence_inputs(mode, 4, 3, 2, 5, seed=seed, **CASES[case])
        on("triton", monkeypatch)
        ours = run_recurrence(mode, leaves, constants)
        captures.append(cache.captures)
        on("python", monkeypatch)
        assert_all_close(ours, run_recurrence(mode, leaves, constants))
    assert captures[0] == 0 and captures[1] >= 1 and captures[2:] == [2, 2]
    assert sorted(key[0] for key in cache.entries) == sorted(
        name for name in triton_loops._FILLED if name.startswith(_LOOP[mode]))


def test_a_loop_recorded_under_inference_mode_replays_in_training(monkeypatch):
    """Evaluation under inference_mode may record a shape first; training then replays it."""
    cache = _stand_in_graphs(monkeypatch)
    on("triton", monkeypatch)
    leaves, constants = recurrence_inputs("LSTM", 4, 3, 2, 5, mask="sequence")
    evaluated = evaluated_twice("LSTM", leaves)
    assert cache.captures == 1
    ours = run_recurrence("LSTM", leaves, constants)  # the forward replays
    assert cache.captures == 1
    on("python", monkeypatch)
    theirs = run_recurrence("LSTM", leaves, constants)
    assert_all_close(ours, theirs)
    assert_all_close([evaluated], [theirs[0]])


@pytest.mark.slow
def test_every_launch_compiles_for_an_h100_or_h200(tmp_path):
    """What the interpreter lets pass, the compiler does not (a block that is not a power of
    two, constexpr misuse, dtype casts): every kernel specialization the loops launch, compiled
    for compute capability 9.0 with Triton's own ptxas, in a process without the interpreter
    and with an empty kernel cache (so nothing compiled earlier is reused)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([SCRIPT_PATH, env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", "from support import triton_cases; "
                           "print(triton_cases.compile_every_launch())"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 5 * len(MODES)  # every kernel, several variants


def test_a_failed_capture_launches_its_key_plainly_and_keeps_graphs_for_others(monkeypatch):
    """A capture that raises (an out-of-memory here) warns once and turns graphs off for its
    key only: that call and every later one at the key launch plainly and give the Python
    twins' results, while another shape still records and replays."""
    cache = _stand_in_graphs(monkeypatch)

    def short_of_memory(run, device):
        if cache.captures == 0 and not cache.failed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return _rerun(run, device)

    monkeypatch.setattr(triton_loops, "_cuda_graph", short_of_memory)
    on("triton", monkeypatch)
    leaves, constants = recurrence_inputs("RNN_TANH", 4, 3, 2, 5, **CASES["sequence+zoneout"])
    run_recurrence("RNN_TANH", leaves, constants)  # first calls: plain, keys noted
    with pytest.warns(RuntimeWarning, match=r"could not capture a Triton loop \(elman_forward\)"
                                            r".*\(OutOfMemoryError: CUDA out of memory"):
        failed = run_recurrence("RNN_TANH", leaves, constants)
    assert len(cache.failed) == 1 and cache.captures == 1  # the backward recorded
    assert cache.usable("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = [run_recurrence("RNN_TANH", leaves, constants) for _ in range(2)]
        other = recurrence_inputs("RNN_TANH", 4, 2, 2, 5, **CASES["sequence+zoneout"])
        others = [run_recurrence("RNN_TANH", *other) for _ in range(3)]
    assert cache.captures == 3 and len(cache.failed) == 1  # the other shape's forward
    assert not cache.failed & set(cache.entries)
    on("python", monkeypatch)
    theirs = run_recurrence("RNN_TANH", leaves, constants)
    for results in (failed, *later):
        assert_all_close(results, theirs)
    assert_all_close(others[-1], run_recurrence("RNN_TANH", *other))


@pytest.mark.parametrize("mode", MODES)
def test_replayed_forwards_keep_their_own_saved_tensors(mode, monkeypatch):
    """Several forwards at one key before any backward (a bidirectional layer's two
    directions, a stacked model's equal layers): no replay overwrites buffers an earlier
    forward saved, so each backward sees its own forward's activations."""
    cache = _stand_in_graphs(monkeypatch)
    on("triton", monkeypatch)
    inputs = [recurrence_inputs(mode, 4, 3, 2, 5, seed=seed, **CASES["fresh+lengths"])
              for seed in range(3)]
    run_recurrence(mode, *inputs[0])  # first calls: plain
    outs = [recurrence(mode, leaves["x"], leaves["state"], *leaves["weights"], leaves["mask"],
                       constants["lengths"], None) for leaves, constants in inputs]
    # The key's second call recorded a graph; the two after it found every graph's buffers
    # still held by an earlier forward's saved activations, and recorded one each.
    assert cache.captures == 3 and cache.graphs() == 3
    grads = [torch.autograd.grad(out.sum() + sum(s.sum() for s in final), leaves["x"])[0]
             for (out, final), (leaves, _) in reversed(list(zip(outs, inputs)))]
    on("python", monkeypatch)
    for (leaves, constants), (out, final), grad in zip(inputs, outs, reversed(grads)):
        theirs, theirs_final = recurrence(mode, leaves["x"], leaves["state"], *leaves["weights"],
                                          leaves["mask"], constants["lengths"], None)
        their_grad = torch.autograd.grad(theirs.sum() + sum(s.sum() for s in theirs_final),
                                         leaves["x"])[0]
        assert_all_close([out, *final, grad], [theirs, *theirs_final, their_grad])


def _batch_major(tensor):
    """The same values stored batch-major: a ``(T, B, ...)`` view of a ``(B, T, ...)`` tensor,
    as a batch-first caller would hand it over (not contiguous)."""
    return tensor.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("case", ["plain", "masked, lengths", "masked, zoneout"])
def test_loops_read_inputs_of_any_strides(case):
    """Every loop given its read-only inputs batch-major (the kernels index rows densely)
    fills the same buffers as the Python twin given them contiguous."""
    from rnnreg.nn.loops.check import _arguments

    for name, arguments in _arguments(torch.Generator().manual_seed(0), case, False).items():
        strided = {k: _batch_major(v) if isinstance(v, torch.Tensor) and v.dim() == 3
                   and k not in triton_loops._FILLED[name] else v
                   for k, v in arguments.items()}
        assert any(isinstance(v, torch.Tensor) and not v.is_contiguous()
                   for v in strided.values())
        ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in strided.items()}
        theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v
                  for k, v in arguments.items()}
        result = getattr(triton_loops.LOOPS, name)(*ours.values())
        expected = getattr(loops.PYTHON, name)(*theirs.values())
        for k in triton_loops._FILLED[name]:
            if theirs[k] is not None:
                torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=f"{name}: {k}")
        assert_all_close([r for r in _tuple(result) if r is not None],
                         [r for r in _tuple(expected) if r is not None])


def _tuple(result):
    return result if isinstance(result, tuple) else (result,)


def test_a_step_beyond_32_bit_offsets_is_a_clear_error():
    """The kernels address a step's (B, G*H) rows with 32-bit offsets: a step too large for
    them is refused before any launch (B * G * H = 2**31 here), one element less is not."""
    with pytest.raises(ValueError, match="32-bit offsets"):
        triton_loops.launch_geometry(2**15, 2**14, 4)
    grid, block, _ = triton_loops.launch_geometry(2**15, 2**14 - 1, 4)
    assert grid == (-(-2**15 * (2**14 - 1) // block),)


@pytest.mark.parametrize("batch, hidden", [(1, 5), (3, 37), (20, 650), (20, 1500), (64, 4096)])
def test_launch_geometry_covers_the_state_with_power_of_two_blocks(batch, hidden):
    """Every element of the (B, H) state has exactly one program, blocks are powers of two
    between 128 and 1024 with one warp per 128 elements, and the paper's medium and large
    shapes get at least one program per SM of a 132-SM H100 (blocks of 128)."""
    (programs,), block, warps = triton_loops.launch_geometry(batch, hidden, 4)
    n = batch * hidden
    assert 128 <= block <= 1024 and block & (block - 1) == 0 and warps == block // 128
    assert (programs - 1) * block < n <= programs * block
    if 13_000 <= n <= 30_000:
        assert block == 128 and programs >= 100


# --- precision: cuDNN's RNN setting, read under either of torch's APIs ------------------------


@pytest.fixture
def precision_settings():
    """Restores torch's float32 precision settings through the legacy API, after which both
    APIs' getters read them again without raising (the other tests use the legacy one)."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) is not None


def test_settings_are_read_with_tf32_set_through_the_new_api(precision_settings, monkeypatch):
    """With TF32 set as torch's docs now advise, the legacy getters raise (a mix of APIs);
    the loops read their settings without them and run."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018
    assert triton_loops._settings()[0] in ("tf32", "ieee")
    _stand_in_graphs(monkeypatch)
    leaves, constants = recurrence_inputs("LSTM", 4, 3, 2, 5, **CASES["fresh+lengths"])
    on("triton", monkeypatch)
    ours = [run_recurrence("LSTM", leaves, constants) for _ in range(3)]  # plain, then graphs
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the caller's, restored
    on("python", monkeypatch)
    for results in ours:
        assert_all_close(results, run_recurrence("LSTM", leaves, constants))


@pytest.mark.parametrize("setting, expected", [
    (lambda: setattr(torch.backends.cudnn.rnn, "fp32_precision", "tf32"), "tf32"),
    (lambda: setattr(torch.backends.cudnn.rnn, "fp32_precision", "ieee"), "ieee"),
    (lambda: setattr(torch.backends.cudnn, "allow_tf32", False), "ieee"),
    (lambda: setattr(torch.backends.cudnn, "allow_tf32", True), "tf32"),
], ids=["rnn=tf32", "rnn=ieee", "legacy-off", "legacy-on"])
def test_recurrent_products_follow_cudnn_rnn_precision(setting, expected, precision_settings,
                                                       monkeypatch):
    """Every recurrent product of the loops runs with cuBLAS's float32 precision set to what
    cuDNN's RNN uses (the new setting, or the legacy flag that sets it), whatever the matmul
    setting is; the caller's matmul setting is back afterwards, and is part of the key."""
    setting()
    torch.backends.cuda.matmul.fp32_precision = "ieee" if expected == "tf32" else "tf32"
    caller = torch.backends.cuda.matmul.fp32_precision
    assert triton_loops.precision() == expected
    assert triton_loops._settings()[0] == expected
    seen = []
    for name in ("mm", "addmm"):
        product = getattr(torch, name)

        def recording(*args, product=product, **kwargs):
            seen.append(torch.backends.cuda.matmul.fp32_precision)
            return product(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    leaves, constants = recurrence_inputs("GRU", 3, 2, 2, 5, mask="sequence")
    on("triton", monkeypatch)
    run_recurrence("GRU", leaves, constants)
    monkeypatch.undo()  # the products, before the fixture's restore
    assert 2 * 3 <= len(seen) and set(seen) <= {expected, caller}
    assert seen.count(expected) >= 2 * 3 - 1  # every step forward and back (step 0's may skip)
    assert torch.backends.cuda.matmul.fp32_precision == caller


def test_gru_backward_carries_its_gradient_in_float32():
    """The GRU's backward loop on bfloat16 buffers against the Python twin in float64 on the
    same (rounded) inputs, 128 steps: the state gradients stay within 3 bfloat16 rounding
    errors (eps), as the LSTM's do. Kept in bfloat16 from step to step (as before) they drift
    to 5-6 eps here."""
    steps, batch, hidden = 128, 4, 32
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    args = [rand(steps, batch, hidden, scale=0.1), rand(batch, hidden),
            rand(steps, batch, 3, hidden, scale=0.3),
            (torch.rand(steps, batch, hidden, generator=gen) * 0.5 + 0.5).bfloat16(),
            rand(3 * hidden, hidden, scale=hidden ** -0.5), False, None, True]

    def run(engine, args, dtype):
        filled = [torch.empty(steps, batch, g * hidden, dtype=dtype) for g in (3, 1, 1)]
        return engine.gru_backward(*args, *filled), filled

    first, (d_rec, d_hs, _) = run(triton_loops.LOOPS, args, torch.bfloat16)
    wide = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    their_first, (their_rec, their_hs, _) = run(PYTHON, wide, torch.float64)
    eps = torch.finfo(torch.bfloat16).eps
    for ours, theirs in ((first, their_first), (d_hs, their_hs), (d_rec, their_rec)):
        assert relative_error(ours, theirs) < 3 * eps, relative_error(ours, theirs) / eps


# --- the graph cache: capture streams, threads, what is read where it is -----------------------


class _FakeStream:
    def __init__(self, device=None):
        self.device = device
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other)


def test_each_device_captures_on_a_stream_made_on_it(monkeypatch):
    """torch.cuda.graph without ``stream=`` captures on one stream made on the device current
    at the process's first capture; the loops pass a stream made on the tensors' device (one
    per device, reused), and warm up on it too. Checked with stand-ins for torch.cuda."""
    made, captured, warmed = [], [], []
    current = {}

    def stream(device=None):
        made.append(_FakeStream(device))
        return made[-1]

    @contextlib.contextmanager
    def use(s):
        warmed.append(s)
        yield

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        assert stream is not None, "a capture on torch's class-wide default stream"
        captured.append(stream)
        yield

    monkeypatch.setattr(triton_loops, "_CAPTURE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: current.setdefault(device, _FakeStream(device)))
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=None))
    devices = [torch.device("cuda", k) for k in (1, 0, 1)]
    for device in devices:
        triton_loops._cuda_graph(lambda: None, device)
    assert [s.device for s in made] == devices[:2]
    assert [s.device for s in captured] == devices and captured[0] is captured[2]
    assert warmed == captured
    assert all(current[d] in s.waited for d, s in zip(devices, captured))


def test_the_cache_is_locked_while_it_replays_and_threads_get_their_own_results(monkeypatch):
    """Several threads running the same shape (DataParallel's replicas on one device): every
    recording and replay happens under the cache's lock, and each thread gets the Python
    twins' results for its own inputs (an entry whose buffers one thread still holds is not
    replayed for another)."""
    cache = _stand_in_graphs(monkeypatch)

    def locked(run, device):
        assert cache._lock.locked()
        replay, result = _rerun(run, device)

        def checked():
            assert cache._lock.locked()
            replay()

        return checked, result

    monkeypatch.setattr(triton_loops, "_cuda_graph", locked)
    _one_interpreted_launch_at_a_time(monkeypatch)
    on("triton", monkeypatch)
    inputs = [recurrence_inputs("LSTM", 4, 3, 2, 5, seed=seed, **CASES["fresh+lengths"])
              for seed in range(4)]
    results = [None] * len(inputs)

    def work(k):
        for _ in range(3):
            results[k] = run_recurrence("LSTM", *inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.captures >= 2
    on("python", monkeypatch)
    for ours, (leaves, constants) in zip(results, inputs):
        assert_all_close(ours, run_recurrence("LSTM", leaves, constants))


def _one_interpreted_launch_at_a_time(monkeypatch):
    """Triton's interpreter is not thread-safe (a GPU is): each kernel launch under a lock,
    so that threads' plain launches, which run outside the cache's lock, can interleave."""
    interpreter = threading.Lock()

    class Serialized:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                with interpreter:
                    return self.kernel[grid](*args, **kwargs)
            return launch

    for name in _KERNELS:
        monkeypatch.setattr(triton_loops, name, Serialized(getattr(triton_loops, name)))


def _lstm_loop_arguments(w_hh, seed=0, steps=4, batch=3, hidden=5):
    """Arguments for ``lstm_forward`` (the Python twin's signature), fresh buffers."""
    gen = torch.Generator().manual_seed(seed)
    projected = torch.randn(steps, batch, 4 * hidden, generator=gen)
    hs = torch.empty(steps + 1, batch, hidden)
    cs = torch.empty(steps + 1, batch, hidden)
    hs[0], cs[0] = torch.randn(2, batch, hidden, generator=gen)
    return [projected, w_hh, None, None, None, None, None,
            torch.empty(steps, batch, 4 * hidden), cs, torch.empty(steps, batch, hidden), hs,
            None]


def test_replays_read_parameters_in_place_and_hand_over_their_own_buffers(monkeypatch):
    """A parameter is read where it is (no static copy; an optimizer's in-place step between
    replays is seen, with no new recording), another parameter is another key, and after a
    replay the caller's filled buffers are the graph's static ones (nothing copied out)."""
    cache = _stand_in_graphs(monkeypatch)
    w_hh = torch.nn.Parameter(torch.randn(20, 5) * 0.3)
    filled = triton_loops._FILLED["lstm_forward"]
    names = triton_loops._LOOP_PARAMETERS["lstm_forward"]

    def both(weight, seed):
        ours = _lstm_loop_arguments(weight, seed)
        theirs = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in ours]
        with torch.no_grad():  # as inside the autograd Function
            triton_loops.LOOPS.lstm_forward(*ours)
            PYTHON.lstm_forward(*theirs)
        for name, a, b in zip(names, ours, theirs):
            if name in filled and a is not None:
                torch.testing.assert_close(a, b, **TOL, msg=name)
        return ours

    for seed in range(2):
        both(w_hh, seed)
    (entry,) = next(iter(cache.entries.values()))
    assert entry.static[names.index("w_hh")] is None  # no copy of the parameter
    with torch.no_grad():
        w_hh.mul_(-0.5)  # an optimizer's step
    ours = both(w_hh, 2)
    assert cache.captures == 1
    for name in ("acts", "cs", "tanh_c", "hs"):
        static = entry.static[names.index(name)]
        assert ours[names.index(name)].data_ptr() == static.data_ptr(), name
    del ours
    other = torch.nn.Parameter(torch.randn(20, 5) * 0.3)
    for seed in range(2):
        both(other, seed)
    assert cache.captures == 2 and len(cache.entries) == 2


# --- compiled variants: bounded, whatever the number of steps ---------------------------------


def _count_specializations(monkeypatch):
    """Replaces each kernel by a recorder of the key Triton's JIT would compile it under for
    an H100 (its specialization of every argument: pointer alignment, integers equal to 1 or
    divisible by 16, the constexprs, the warps), computed by Triton's own binder; nothing is
    launched. Returns the set the loops fill."""
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
            def launch(*args, num_warps, **constexprs):
                specialization = self.bind(*args, **constexprs)[1]
                keys.add((self.name, repr(specialization), num_warps))
            return launch

    for name in _KERNELS:
        monkeypatch.setattr(triton_loops, name, Recorder(getattr(triton_loops, name)))
    return keys


def test_compiled_variants_do_not_grow_with_the_number_of_steps(monkeypatch):
    """Every launch of a sweep over steps (1 to 13), shapes whose rows are not multiples of 16
    bytes, all four modes and masks/lengths/zoneout: Triton's compile keys are the same set
    for 13 steps as for 3 (65 here; with views of each step's rows as arguments the keys
    depended on each row's alignment: 97 for 3 steps, 127 for 13), and few in all."""
    keys = _count_specializations(monkeypatch)
    on("triton", monkeypatch)

    def sweep(steps):
        keys.clear()
        for mode in MODES:
            for case in ("plain", "fresh+lengths+zoneout", "sequence+zoneout"):
                for batch, hidden in ((3, 5), (1, 37), (4, 16)):
                    for t in steps:
                        leaves, constants = recurrence_inputs(mode, t, batch, 2, hidden,
                                                              **CASES[case])
                        run_recurrence(mode, leaves, constants)
        return set(keys)

    few = sweep(range(1, 4))
    many = sweep(range(1, 14))
    assert many == few
    per_kernel = collections.Counter(key[0] for key in many)
    assert set(per_kernel) == set(_KERNELS)
    assert max(per_kernel.values()) <= 32 and len(many) <= 96, per_kernel


# --- torch.compile: the loops as custom operators -------------------------------------------


@pytest.mark.parametrize("case", ["plain", "masked, lengths", "masked, zoneout"])
def test_every_loop_is_a_custom_operator_that_passes_torch_opcheck(case):
    """``torch.ops.rnnreg_triton.<loop>`` for every loop: schema (the buffers it fills
    declared mutated, nothing else), fake kernel and tracing checked by
    ``torch.library.opcheck``, and the operator fills the Python twin's buffers."""
    from rnnreg.nn.loops.check import _arguments

    arguments = _arguments(torch.Generator().manual_seed(0), case, False)
    for name, args in arguments.items():
        op = getattr(torch.ops.rnnreg_triton, name)
        torch.library.opcheck(op, tuple(args.values()),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
        ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        op(*ours.values())
        getattr(PYTHON, name)(*theirs.values())
        for k in triton_loops._FILLED[name]:
            if theirs[k] is not None:
                torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_traces_the_triton_loops_as_operators(mode, monkeypatch):
    """torch.compile traces the own recurrence on the Triton engine in one graph
    (fullgraph=True raises on a break), the loops as the custom operators, and computes what
    eager mode does."""
    leaves, constants = recurrence_inputs(mode, 4, 3, 2, 5, **CASES["fresh+lengths+zoneout"])
    on("triton", monkeypatch)

    def forward(x, state, weights, mask):
        return recurrence(mode, x, state, *weights, mask, constants["lengths"],
                          constants["zoneout"])

    def run(fn):
        out, final = fn(leaves["x"], leaves["state"], leaves["weights"], leaves["mask"])
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + sum(
            (s ** 2).sum() for s in final)
        wrt = [leaves["x"], *leaves["state"], *leaves["weights"], leaves["mask"]]
        return [out, *final, *torch.autograd.grad(loss, wrt)]

    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    torch.compiler.reset()
    compiled = run(torch.compile(forward, backend=backend, fullgraph=True))
    torch.compiler.reset()
    loop = _LOOP[mode]
    for graphs, name in ((backend.fw_graphs, f"{loop}_forward"),
                         (backend.bw_graphs, f"{loop}_backward")):
        (graph,) = graphs
        assert f"torch.ops.rnnreg_triton.{name}" in graph.code
    assert_all_close(compiled, run(forward))


def test_the_step_kind_is_read_from_the_environment(monkeypatch):
    """``RNNREG_TRITON_STEP``: ``split`` (the default) and ``fused`` (tests/nn/test_triton_fused.py
    checks that its kernels are the ones that ran) both give the Python twin's results;
    anything else is not a step kind, refused when a loop runs."""
    assert triton_loops.step_kind({}) == "split"
    assert triton_loops.step_kind({triton_loops.STEP_VARIABLE: " Fused "}) == "fused"
    with pytest.raises(ValueError, match="RNNREG_TRITON_STEP='fast' is not a step kind"):
        triton_loops.step_kind({triton_loops.STEP_VARIABLE: "fast"})
    leaves, constants = recurrence_inputs("RNN_TANH", 3, 2, 2, 5, mask="fresh")
    on("triton", monkeypatch)
    monkeypatch.setenv(triton_loops.STEP_VARIABLE, "split")
    ours = run_recurrence("RNN_TANH", leaves, constants)
    monkeypatch.setenv(triton_loops.STEP_VARIABLE, "fused")
    fused = run_recurrence("RNN_TANH", leaves, constants)
    monkeypatch.setenv(triton_loops.STEP_VARIABLE, "fast")
    with pytest.raises(ValueError, match="is not a step kind"):
        run_recurrence("RNN_TANH", leaves, constants)
    monkeypatch.delenv(triton_loops.STEP_VARIABLE)
    on("python", monkeypatch)
    theirs = run_recurrence("RNN_TANH", leaves, constants)
    assert_all_close(ours, theirs)
    assert_all_close(fused, theirs)


def test_a_replay_on_another_stream_first_waits_for_the_graphs_last_one(monkeypatch):
    """The stream ordering of replays, with stand-ins for CUDA streams and a fake CUDA
    tensor: a replay on the stream the graph last ran on adds no wait; one on another stream
    waits for that one, and becomes the one the next replay orders itself after."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = [torch.empty(2, device="cuda:1")]
    streams = {name: _FakeStream(torch.device("cuda", 1)) for name in ("main", "side")}
    current = ["main"]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams[current[0]])
    entry = object.__new__(triton_loops._Captured)
    entry.stream = None
    for name in ("main", "main", "side", "side", "main"):
        current[0] = name
        entry._follow_stream(args)
    assert streams["main"].waited == [streams["side"]]
    assert streams["side"].waited == [streams["main"]]
