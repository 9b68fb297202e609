"""Tests for rnnreg's own recurrence (the loop used when a mask acts inside the recurrence).

Three independent checks of the hand-written backward through time in ``rnnreg.nn.recurrence``:
finite differences (``gradcheck``, float64), a plain-autograd reference written here from the
equations, and torch's own fused ``nn.LSTM``/``nn.GRU``/``nn.RNN`` when no mask is involved.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnreg.nn import loops, products
from rnnreg.nn.loops import cpp
from rnnreg.nn.loops.protocol import loops_by_name
from rnnreg.nn.loops.python import PYTHON
from rnnreg.nn.recurrence import recurrence

MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
MASKS = ["none", "fresh", "per_sequence"]
ONEDNN = products.onednn_pays(torch.empty(1), 10**6, "rows")


@pytest.fixture(params=["python", "python+onednn", "compiled", "compiled+onednn"])
def engine(request, monkeypatch):
    """Run a float32 CPU test on every engine: the Python or the compiled loops, each with
    torch.mm/addmm products (the default below 256 hidden units) or oneDNN's (the default
    from there on, forced here at any size)."""
    if request.param.startswith("python"):
        monkeypatch.setenv(loops.VARIABLE, "python")
    elif loops.name("cpu") != loops.CPP_LOOP:
        pytest.skip("the C++ loops are off (RNNREG_ENGINE) or could not be built")
    if request.param.endswith("onednn"):
        if not ONEDNN:
            pytest.skip("this torch build has no oneDNN linear")
        monkeypatch.setattr(products, "ONEDNN_MIN_HIDDEN", {"step": 1, "rows": 1})
    return request.param


def make_inputs(mode, steps, batch, features, hidden, *, dtype, mask_kind="none",
                bias=True, seed=0, scale=0.5):
    """Random inputs for ``recurrence``, all leaves requiring grad (except the mask's zeros)."""
    gen = torch.Generator().manual_seed(seed)
    g = GATES[mode] * hidden

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    inputs = {
        "x": rand(steps, batch, features),
        "state": tuple(rand(batch, hidden) for _ in range(2 if mode == "LSTM" else 1)),
        "w_ih": rand(g, features),
        "w_hh": rand(g, hidden),
        "b_ih": rand(g) if bias else None,
        "b_hh": rand(g) if bias else None,
        "mask": None,
    }
    if mask_kind != "none":
        rows = steps if mask_kind == "fresh" else 1
        keep = torch.rand(rows, batch, hidden, generator=gen, dtype=dtype) > 0.3
        # Inverted-dropout scale plus a little noise so a mix-up of rows would show.
        values = 1 / 0.7 + 0.1 * torch.rand(rows, batch, hidden, generator=gen, dtype=dtype)
        inputs["mask"] = (keep * values).requires_grad_()
    return inputs


def leaves(inputs):
    """Every tensor ``recurrence`` should differentiate, in a fixed order."""
    found = [inputs["x"], *inputs["state"], inputs["w_ih"], inputs["w_hh"],
             inputs["b_ih"], inputs["b_hh"], inputs["mask"]]
    return [t for t in found if t is not None]



# --- reference: the equations, one step at a time, plain autograd ------------------------------


def reference(mode, x, state, w_ih, w_hh, b_ih, b_hh, mask, lengths):
    """torch's gate equations with the mask on h(t-1) inside W_hh's product only."""
    hidden = w_hh.size(1)
    outputs, state = [], tuple(state)
    for t in range(x.size(0)):
        h = state[0]
        h_in = h if mask is None else h * mask[t if mask.size(0) > 1 else 0]
        gi = x[t] @ w_ih.t() + (0 if b_ih is None else b_ih)
        gh = h_in @ w_hh.t() + (0 if b_hh is None else b_hh)
        if mode == "LSTM":
            i, f, g, o = (gi + gh).split(hidden, 1)
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
            new = (torch.sigmoid(o) * torch.tanh(c), c)
        elif mode == "GRU":
            ir, iz, in_ = gi.split(hidden, 1)
            hr, hz, hn = gh.split(hidden, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            new = ((1 - z) * n + z * h,)
        else:
            act = torch.tanh if mode == "RNN_TANH" else torch.relu
            new = (act(gi + gh),)
        if lengths is not None:
            alive = (t < lengths).unsqueeze(1)
            new = tuple(torch.where(alive, a, b) for a, b in zip(new, state))
            outputs.append(new[0] * alive)
        else:
            outputs.append(new[0])
        state = new
    return torch.stack(outputs), state


def run_and_grad(fn, mode, inputs, lengths, seed=1):
    """Forward with ``fn`` and the gradient of a loss touching every output."""
    out, final = fn(mode, inputs["x"], inputs["state"], inputs["w_ih"], inputs["w_hh"],
                    inputs["b_ih"], inputs["b_hh"], inputs["mask"], lengths)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (out, *final)]
    loss = sum((w * t).sum() for w, t in zip(weights, (out, *final)))
    return (out, *final), torch.autograd.grad(loss, leaves(inputs))


# --- finite differences ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck(mode, mask_kind, with_lengths, engine):
    inputs = make_inputs(mode, 4, 3, 2, 3, dtype=torch.float64, mask_kind=mask_kind)
    lengths = torch.tensor([4, 2, 1]) if with_lengths else None
    n_state = len(inputs["state"])
    names = ["x", "w_ih", "w_hh", "b_ih", "b_hh"] + (["mask"] if inputs["mask"] is not None else [])

    def fn(*args):
        kw = dict(zip(names, args[n_state:]))
        kw.setdefault("mask", None)
        out, final = recurrence(mode, kw["x"], args[:n_state], kw["w_ih"], kw["w_hh"],
                                kw["b_ih"], kw["b_hh"], kw["mask"], lengths)
        return (out, *final)

    args = (*inputs["state"], *(inputs[k] for k in names))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_dropconnect_no_bias(mode):
    """A non-leaf ``w_hh`` (weight drop multiplies it first) and ``bias=False``."""
    inputs = make_inputs(mode, 3, 2, 2, 3, dtype=torch.float64, bias=False,
                         mask_kind="per_sequence")
    weight_mask = (torch.rand(inputs["w_hh"].shape, dtype=torch.float64) > 0.4) / 0.6

    def fn(x, w_hh, *state):
        out, final = recurrence(mode, x, state, inputs["w_ih"], w_hh * weight_mask, None, None,
                                inputs["mask"], None)
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (inputs["x"], inputs["w_hh"], *inputs["state"]))


def test_gradcheck_zero_length_keeps_initial_state():
    """A sequence of length 0 outputs zeros and hands its initial state straight through."""
    inputs = make_inputs("LSTM", 3, 2, 2, 3, dtype=torch.float64, mask_kind="fresh")
    lengths = torch.tensor([3, 0])
    out, (h, c) = recurrence("LSTM", inputs["x"], inputs["state"], inputs["w_ih"],
                             inputs["w_hh"], inputs["b_ih"], inputs["b_hh"], inputs["mask"],
                             lengths)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.equal(h[1], inputs["state"][0][1]) and torch.equal(c[1], inputs["state"][1][1])

    def fn(h0, c0, w_hh):
        out, final = recurrence("LSTM", inputs["x"], (h0, c0), inputs["w_ih"], w_hh,
                                inputs["b_ih"], inputs["b_hh"], inputs["mask"], lengths)
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (*inputs["state"], inputs["w_hh"]))


# --- the equations, by plain autograd --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_matches_reference(mode, mask_kind, with_lengths, engine):
    inputs = make_inputs(mode, 7, 5, 4, 6, dtype=torch.float32, mask_kind=mask_kind, seed=3)
    lengths = torch.tensor([7, 3, 1, 7, 5]) if with_lengths else None
    ours, ours_grads = run_and_grad(recurrence, mode, inputs, lengths)
    ref, ref_grads = run_and_grad(reference, mode, inputs, lengths)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_only_for_what_requires_them(mode, engine):
    """Frozen weights, a constant initial state and a sampled mask: only x gets a gradient."""
    inputs = make_inputs(mode, 5, 3, 4, 4, dtype=torch.float32, mask_kind="fresh")
    x = inputs["x"]
    const = {k: (v.detach() if torch.is_tensor(v) else tuple(s.detach() for s in v))
             for k, v in inputs.items() if k != "x"}
    out, final = recurrence(mode, x, const["state"], const["w_ih"], const["w_hh"],
                            const["b_ih"], const["b_hh"], const["mask"], None)
    (dx,) = torch.autograd.grad(out.sum() + final[0].sum(), x)
    ref_out, ref_final = reference(mode, x, const["state"], const["w_ih"], const["w_hh"],
                                   const["b_ih"], const["b_hh"], const["mask"], None)
    (ref_dx,) = torch.autograd.grad(ref_out.sum() + ref_final[0].sum(), x)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_outputs_may_be_modified_in_place(mode):
    """As with the plain autograd loop, the returned tensors are not saved for backward."""
    inputs = make_inputs(mode, 4, 2, 3, 3, dtype=torch.float32, mask_kind="per_sequence")
    out, final = recurrence(mode, inputs["x"], inputs["state"], inputs["w_ih"], inputs["w_hh"],
                            inputs["b_ih"], inputs["b_hh"], inputs["mask"], None)
    out.mul_(2)
    final[0].mul_(2)
    (out.sum() + final[0].sum()).backward()
    assert inputs["w_hh"].grad is not None


@pytest.mark.parametrize("mode", MODES)
def test_runs_under_autocast(mode, engine):
    """Under autocast the recurrence runs in the low-precision dtype, as torch's kernels do."""
    inputs = make_inputs(mode, 4, 2, 3, 5, dtype=torch.float32, mask_kind="per_sequence")
    args = (inputs["x"], inputs["state"], inputs["w_ih"], inputs["w_hh"], inputs["b_ih"],
            inputs["b_hh"], inputs["mask"], torch.tensor([4, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, final = recurrence(mode, *args)
    assert out.dtype == final[0].dtype == torch.bfloat16
    (out.float().sum() + final[0].float().sum()).backward()
    assert inputs["w_hh"].grad.dtype == torch.float32
    ref, _ = reference(mode, *args)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def engine_ops(mode, hidden):
    """The oneDNN ops a forward and backward of one layer of ``hidden`` units ran."""
    inputs = make_inputs(mode, 3, 2, 5, hidden, dtype=torch.float32, mask_kind="per_sequence")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, grads = run_and_grad(recurrence, mode, inputs, None)
    assert all(torch.isfinite(g).all() for g in grads)
    return {e.name for e in prof.events() if e.name.startswith("mkldnn::")}


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # mkldnn.flags() sets TF32 as well
@pytest.mark.parametrize("mode", MODES)
def test_engine_follows_the_hidden_size_and_the_flag(mode):
    """oneDNN from 256 units on (packing the weight pays), torch.mm below, and never when
    the user turns oneDNN off."""
    wide = products.ONEDNN_MIN_HIDDEN["step"]
    assert engine_ops(mode, wide) == {"mkldnn::_linear_pointwise",
                                      "mkldnn::_reorder_linear_weight"}
    assert engine_ops(mode, wide - 1) == set()
    with torch.backends.mkldnn.flags(enabled=False):
        assert engine_ops(mode, wide) == set()


def test_onednn_thresholds_per_kind_of_product():
    """Per-step products switch to oneDNN at 256 units, whole-window products at 512."""
    x = torch.empty(1)
    assert [products.onednn_pays(x, h, "step") for h in (255, 256)] == [False, ONEDNN]
    assert [products.onednn_pays(x, h, "rows") for h in (511, 512)] == [False, ONEDNN]
    assert not products.onednn_pays(x.double(), 10**6, "step")
    assert not products.onednn_pays(x.bfloat16(), 10**6, "rows")


def test_unknown_mode_and_empty_input():
    inputs = make_inputs("RNN_TANH", 2, 1, 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown mode"):
        recurrence("LSTMX", inputs["x"], inputs["state"], inputs["w_ih"], inputs["w_hh"],
                   None, None, None, None)
    with pytest.raises(ValueError, match="at least one time step"):
        recurrence("RNN_TANH", inputs["x"][:0], inputs["state"], inputs["w_ih"],
                   inputs["w_hh"], None, None, None, None)


# --- torch's fused kernels -------------------------------------------------------------------


def torch_layer(mode, features, hidden):
    if mode == "LSTM":
        return torch.nn.LSTM(features, hidden)
    if mode == "GRU":
        return torch.nn.GRU(features, hidden)
    return torch.nn.RNN(features, hidden, nonlinearity="tanh" if mode == "RNN_TANH" else "relu")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_matches_torch_nn(mode, with_lengths, engine):
    torch.manual_seed(5)
    steps, batch, features, hidden = 6, 4, 5, 7
    layer = torch_layer(mode, features, hidden)
    x = torch.randn(steps, batch, features, requires_grad=True)
    state = tuple(torch.randn(batch, hidden, requires_grad=True)
                  for _ in range(2 if mode == "LSTM" else 1))
    lengths = torch.tensor([6, 2, 5, 1]) if with_lengths else None
    params = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]

    out, final = recurrence(mode, x, state, *params, None, lengths)

    hx = tuple(s.unsqueeze(0) for s in state)
    hx = hx if mode == "LSTM" else hx[0]
    if with_lengths:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        ref_packed, ref_final = layer(packed, hx)
        ref_out, _ = pad_packed_sequence(ref_packed, total_length=steps)
    else:
        ref_out, ref_final = layer(x, hx)
    ref_final = ref_final if mode == "LSTM" else (ref_final,)
    ref_final = tuple(s.squeeze(0) for s in ref_final)

    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(final, ref_final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(9)
    seeds = [torch.randn(t.shape, generator=gen) for t in (out, *final)]
    wrt = [x, *state, *params]
    ours = torch.autograd.grad(sum((s * t).sum() for s, t in zip(seeds, (out, *final))), wrt)
    ref = torch.autograd.grad(sum((s * t).sum() for s, t in zip(seeds, (ref_out, *ref_final))),
                              wrt)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    inputs = make_inputs(mode, 5, 3, 4, 6, dtype=torch.float64, mask_kind="per_sequence")
    lengths = torch.tensor([5, 2, 4])
    cpu_out, cpu_grads = run_and_grad(recurrence, mode, inputs, lengths)
    moved = {k: (v.detach().cuda().requires_grad_() if torch.is_tensor(v)
                 else tuple(s.detach().cuda().requires_grad_() for s in v))
             for k, v in inputs.items() if v is not None}
    moved.update({k: None for k, v in inputs.items() if v is None})
    gpu_out, gpu_grads = run_and_grad(recurrence, mode, moved, lengths)
    for a, b in zip((*cpu_out, *cpu_grads), (*gpu_out, *gpu_grads)):
        torch.testing.assert_close(b.cpu(), a)


# --- the compiled loops ----------------------------------------------------------------------


@pytest.mark.skipif(loops.requested() != "auto", reason="RNNREG_ENGINE chooses the loops")
def test_compiled_loops_build_and_run_on_cpu():
    """The C++ loops build here (CI has a compiler) and are what CPU tensors get."""
    assert cpp.compiled() is not None, "the C++ loops failed to build; see the warning"
    assert loops.engine(torch.empty(1)) is cpp.compiled()
    assert loops.name("cpu") == loops.CPP_LOOP


def test_failed_build_falls_back_to_python_with_a_warning(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.delenv(loops.VARIABLE, raising=False)
    cpp.compiled.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
            assert cpp.compiled() is None
        assert loops.engine(torch.empty(1)) is PYTHON
        assert loops.name("cpu") == loops.PYTHON_LOOP
        inputs = make_inputs("LSTM", 3, 2, 2, 3, dtype=torch.float32, mask_kind="fresh")
        ours, _ = run_and_grad(recurrence, "LSTM", inputs, None)
        ref, _ = run_and_grad(reference, "LSTM", inputs, None)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    finally:
        cpp.compiled.cache_clear()


def test_python_loops_by_environment(monkeypatch):
    monkeypatch.setenv(loops.VARIABLE, "python")
    assert loops.engine(torch.empty(1)) is PYTHON
    assert loops.name("cpu") == loops.PYTHON_LOOP
    assert loops.choose("cuda", "python") == (loops.PYTHON_LOOP, PYTHON)


@pytest.mark.parametrize("value", ["native", "0", "cuda"])
def test_unknown_engine_setting_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(loops.VARIABLE, value)
    with pytest.raises(ValueError, match=f"RNNREG_ENGINE='{value}' is not a loop engine; "
                                         "choose one of auto, python, triton"):
        loops.engine(torch.empty(1))
    with pytest.raises(ValueError, match="unknown loop engine setting"):
        loops.choose("cpu", value)


def test_cuda_without_triton_runs_the_python_loops_with_one_warning(monkeypatch):
    """``auto`` on CUDA falls back to the Python loops, saying why; ``triton`` asked for
    explicitly is an error instead."""
    monkeypatch.setitem(sys.modules, "triton", None)  # as if Triton were not installed
    monkeypatch.delitem(sys.modules, "rnnreg.nn.loops.triton", raising=False)
    monkeypatch.delattr(loops, "triton", raising=False)  # imported by an earlier test module
    loops._warn_no_triton.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="Python loops on CUDA tensors: Triton is not "
                                                "importable"):
            assert loops.choose("cuda", "auto") == (loops.PYTHON_LOOP, PYTHON)
        with pytest.raises(ImportError, match="Triton loops need Triton"):
            loops.choose("cuda", "triton")
    finally:
        loops._warn_no_triton.cache_clear()


@pytest.mark.slow
def test_import_rnnreg_does_not_import_triton():
    """Triton is the CUDA engine's dependency only: importing rnnreg (layers, loops) leaves it
    alone, so rnnreg imports without it and stays light."""
    code = ("import sys, rnnreg, rnnreg.nn.layers, rnnreg.nn.loops; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'rnnreg.nn.loops.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ,
                                                                   loops.VARIABLE: "auto"})


def test_engine_setting_is_read_from_the_environment_given():
    assert loops.requested({}) == "auto"
    assert loops.requested({loops.VARIABLE: " Python "}) == "python"
    assert loops.requested({loops.VARIABLE: "triton"}) == "triton"


# --- the compiled loops as registered ops ------------------------------------------------------


def _native():
    native = cpp.compiled()
    if native is None:
        pytest.skip("the C++ loops could not be built")
    return native


@pytest.mark.parametrize("name", sorted(loops_by_name(PYTHON)))
def test_ops_have_schemas_named_like_the_python_twins(name):
    """Each loop is torch.ops.rnnreg.NAME, whose schema names its arguments exactly as the
    Python twin does: the engine calls it by keyword."""
    import inspect

    _native()
    schema = getattr(torch.ops.rnnreg, name).default._schema
    assert [a.name for a in schema.arguments] == list(
        inspect.signature(getattr(PYTHON, name)).parameters)


@pytest.mark.parametrize("name", sorted(loops_by_name(PYTHON)))
def test_cpp_engine_takes_the_python_twins_parameters(name):
    """The C++ engine names every argument it passes to an op by keyword: its parameters are
    the twin's, in the twin's order, so a positional call binds each where the twin would."""
    import inspect

    ours = inspect.signature(loops_by_name(cpp.CppLoops())[name]).parameters
    assert list(ours) == list(inspect.signature(loops_by_name(PYTHON)[name]).parameters)


def _lstm_forward_args(**changes):
    steps, batch, hidden = 3, 2, 4
    args = dict(projected=torch.randn(steps, batch, 4 * hidden), w_hh=torch.randn(4 * hidden,
                                                                                   hidden),
                packed=None, mask=None, valid=None, zone_h=None, zone_c=None,
                acts=torch.empty(steps, batch, 4 * hidden), cs=torch.zeros(steps + 1, batch,
                                                                           hidden),
                tanh_c=torch.empty(steps, batch, hidden),
                hs=torch.zeros(steps + 1, batch, hidden), h_in=None)
    return args | changes


@pytest.mark.parametrize("changes, message", [
    (dict(w_hh=torch.randn(16, 4, dtype=torch.float64)), "w_hh must have dtype Float"),
    (dict(acts=torch.empty(3, 16, 2).transpose(1, 2)), "acts must be contiguous"),
    (dict(mask=torch.ones(2, 2, 4), h_in=torch.empty(3, 2, 4)), "mask has shape"),
    (dict(mask=torch.ones(1, 2, 4)), "h_in is needed exactly when there is a mask"),
    (dict(valid=torch.ones(3, 2, 1)), "valid must have dtype Bool"),
    (dict(hs=torch.zeros(3, 2, 4)), "hs has shape"),
])
def test_ops_check_their_inputs(changes, message):
    _native()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnreg.lstm_forward(**_lstm_forward_args(**changes))
    torch.ops.rnnreg.lstm_forward(**_lstm_forward_args())  # the unchanged call runs


def _first_use(monkeypatch, engine_factory):
    """compiled() from scratch with ``engine_factory`` in place of the real ops' engine."""
    monkeypatch.delenv(loops.VARIABLE, raising=False)
    monkeypatch.setattr(cpp, "CppLoops", engine_factory)
    cpp.compiled.cache_clear()


@pytest.mark.parametrize("fault", ["wrong_result", "schema"])
def test_first_use_check_falls_back_to_python(monkeypatch, fault):
    """Ops that disagree with their twins, or whose schema changed under the caller, leave
    the Python loops with a warning instead of wrong gradients or a failure in training."""
    _native()
    real = cpp.CppLoops

    def faulty():
        native = real()
        if fault == "wrong_result":
            forward = native.gru_forward

            def gru_forward(*args):
                forward(*args)
                args[-2].add_(1e-3)  # hs, slightly off

            native.gru_forward = gru_forward
        else:
            def lstm_forward(*args):
                torch.ops.rnnreg.lstm_forward(*args[:-1], hidden_in=args[-1])

            native.lstm_forward = lstm_forward
        return native

    _first_use(monkeypatch, faulty)
    try:
        with pytest.warns(RuntimeWarning, match="first-use check"):
            assert cpp.compiled() is None
        assert loops.engine(torch.empty(1)) is PYTHON
    finally:
        cpp.compiled.cache_clear()


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
def test_changed_onednn_op_turns_onednn_off(monkeypatch):
    """A torch release that changes oneDNN's private linear op: the products go back to
    torch.mm, with a warning, and the results stay right."""
    def changed(*args, **kwargs):
        raise RuntimeError("_linear_pointwise() expected at most 5 arguments")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", changed)
    products.onednn_works.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="oneDNN"):
            assert not products.onednn_pays(torch.empty(1), 10**6, "step")
        inputs = make_inputs("LSTM", 3, 2, 2, 300, dtype=torch.float32, mask_kind="fresh")
        ours, _ = run_and_grad(recurrence, "LSTM", inputs, None)
        ref, _ = run_and_grad(reference, "LSTM", inputs, None)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    finally:
        products.onednn_works.cache_clear()


def test_first_use_inside_inference_mode_keeps_the_compiled_loops(monkeypatch):
    """The first call may come from an evaluation under inference_mode (or from inside an
    autograd Function's forward): the check still runs, and passes."""
    _native()
    monkeypatch.delenv(loops.VARIABLE, raising=False)
    cpp.compiled.cache_clear()
    try:
        with torch.inference_mode():
            assert cpp.compiled() is not None
    finally:
        cpp.compiled.cache_clear()


@pytest.mark.parametrize("name", sorted(loops_by_name(PYTHON)))
def test_every_op_refuses_non_float_input(name):
    """Integer tensors in every tensor argument: one clear error, before any memory is read."""
    _native()
    op = getattr(torch.ops.rnnreg, name)
    arguments = {}
    for argument in op.default._schema.arguments:
        kind = str(argument.type)
        if kind == "bool":
            arguments[argument.name] = False
        elif kind == "Tensor":
            arguments[argument.name] = torch.zeros(2, 2, 2, dtype=torch.int64)
        else:  # Tensor?
            arguments[argument.name] = None
    with pytest.raises(RuntimeError, match=f"rnnreg.{name}: expects floating-point tensors"):
        op(**arguments)
