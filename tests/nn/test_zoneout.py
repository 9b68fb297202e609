"""Zoneout (Krueger et al. 2017) in rnnreg's own recurrence, against independent oracles.

Oracles: the NumPy forward of tests/support/numpy_oracle.py, written from the paper's equations
with explicit zoneout factors; finite differences (float64 gradcheck) of the hand-written
backward; the binomial statistics of how many units repeat their previous value; torch.nn with
copied weights where every factor is 0. Each runs on both loops (compiled C++ and its Python
twin).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnreg
from rnnreg.nn import loops
from rnnreg.nn.recurrence import recurrence
from support.numpy_oracle import Masks, Params, stacked_forward

CELLS = {"LSTM": (rnnreg.LSTM, nn.LSTM), "GRU": (rnnreg.GRU, nn.GRU), "RNN": (rnnreg.RNN, nn.RNN)}
MODES = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN_TANH"}
T, B, F_IN, H = 6, 3, 4, 5
LENGTHS = torch.tensor([6, 2, 4])  # unequal and unsorted


@pytest.fixture(params=["python", "compiled"])
def engine(request, monkeypatch):
    """Run the test on the Python loops and on the compiled ones."""
    if request.param == "python":
        monkeypatch.setenv(loops.VARIABLE, "python")
    elif loops.name("cpu") != loops.CPP_LOOP:
        pytest.skip("the C++ loops are off (RNNREG_ENGINE) or could not be built")
    return request.param


def zoneout_rates(cell, hidden=0.3, cell_rate=0.4):
    rates = {"zoneout_hidden": hidden}
    if cell == "LSTM":
        rates["zoneout_cell"] = cell_rate
    return rates


def build(cell, *, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    return CELLS[cell][0](F_IN, H, dtype=dtype, **kwargs)


def inputs(cell, module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(module.parameters()).dtype
    x = torch.randn(T, B, F_IN, generator=gen, dtype=dtype)
    lead = module.num_layers * (2 if module.bidirectional else 1)
    states = [torch.randn(lead, B, H, generator=gen, dtype=dtype)
              for _ in range(2 if cell == "LSTM" else 1)]
    return x, (tuple(states) if cell == "LSTM" else states[0])


def oracle(cell, module, x, hx, masks, lengths=None):
    """The NumPy forward of ``module`` with ``masks`` (rnnreg.DropoutMasks)."""
    def conv(m):
        return None if m is None else m.numpy()

    params = [Params(*(w.detach().numpy() for w in weights)) for weights in module.all_weights]
    h0, c0 = ((s.numpy() for s in hx) if cell == "LSTM" else (hx.numpy(), None))
    zone = None if masks.zoneout is None else tuple(
        None if pair is None else tuple(conv(z) for z in pair) for pair in masks.zoneout)
    np_masks = Masks(conv(masks.input), tuple(conv(m) for m in masks.between),
                     tuple(conv(m) for m in masks.recurrent),
                     tuple(conv(m) for m in masks.weight), conv(masks.output), zone)
    return stacked_forward(MODES[cell], x.numpy(), h0, c0, params,
                           num_layers=module.num_layers, bidirectional=module.bidirectional,
                           masks=np_masks, lengths=lengths)


def assert_matches(cell, out, state, expected, tol=1e-10):
    exp_out, exp_h, exp_c = expected
    np.testing.assert_allclose(out.numpy(), exp_out, atol=tol, rtol=tol)
    h = state[0] if cell == "LSTM" else state
    np.testing.assert_allclose(h.numpy(), exp_h, atol=tol, rtol=tol)
    if cell == "LSTM":
        np.testing.assert_allclose(state[1].numpy(), exp_c, atol=tol, rtol=tol)


# --- the NumPy oracle -----------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_training_masks_match_numpy_oracle(cell, variational, bidirectional, packed, engine):
    """Sampled zoneout factors with recurrent dropout on h(t-1): two layers, explicit masks."""
    module = build(cell, num_layers=2, bidirectional=bidirectional, variational=variational,
                   recurrent_dropout=0.3, dropout=0.2, **zoneout_rates(cell))
    x, hx = inputs(cell, module)
    masks = module.sample_masks(T, B)
    assert len(masks.zoneout) == 2
    for hidden, cell_factor in masks.zoneout:
        assert hidden.shape == (1 if variational else T, 2 if bidirectional else 1, B, H)
        assert set(hidden.unique().tolist()) <= {0.0, 1.0}
        assert (cell_factor is None) == (cell != "LSTM")
    feed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    with torch.no_grad():
        out, state = module.forward_with_masks(feed, hx, masks)
    if packed:
        out, _ = pad_packed_sequence(out, total_length=T)
    assert_matches(cell, out, state,
                   oracle(cell, module, x, hx, masks, LENGTHS.tolist() if packed else None))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_eval_uses_the_expectation(cell, packed, engine):
    """In eval mode each factor is the rate itself (Krueger et al. 2017), and no
    dropout acts: the oracle gets the rates as constant factors and no other mask."""
    module = build(cell, num_layers=2, bidirectional=True, recurrent_dropout=0.5,
                   input_dropout=0.5, **zoneout_rates(cell)).eval()
    x, hx = inputs(cell, module)
    shape = (1, 2, B, H)
    pair = (torch.full(shape, 0.3, dtype=torch.float64),
            torch.full(shape, 0.4, dtype=torch.float64) if cell == "LSTM" else None)
    expected_masks = rnnreg.DropoutMasks(None, (None,), (None, None), (None, None), None,
                                         (pair, pair))
    feed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    with torch.no_grad():
        out, state = module(feed, hx)
    if packed:
        out, _ = pad_packed_sequence(out, total_length=T)
    assert_matches(cell, out, state, oracle(cell, module, x, hx, expected_masks,
                                            LENGTHS.tolist() if packed else None))
    # The expectation differs from the plain cell: eval did not fall back to torch's kernel.
    plain = CELLS[cell][1](F_IN, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    plain.load_state_dict(module.state_dict())
    with torch.no_grad():
        fused, _ = plain(x, hx)
    if not packed:
        assert not torch.allclose(out, fused)


def test_lstm_hidden_uses_tanh_of_the_candidate_cell(engine):
    """A hand-checked step: with d_c = 1, d_h = 0 the cell keeps c(t-1) but h takes
    o * tanh(f c(t-1) + i g), the new candidate cell, not tanh(c(t-1))."""
    module = build("LSTM", zoneout_hidden=0.5, zoneout_cell=0.5)
    x, (h0, c0) = inputs("LSTM", module)
    ones = torch.ones(1, 1, B, H, dtype=torch.float64)
    masks = rnnreg.DropoutMasks(None, (), (None,), (None,), None, ((ones * 0, ones),))
    with torch.no_grad():
        out, (h, c) = module.forward_with_masks(x[:1], (h0, c0), masks)
        _, (h_plain, c_plain) = nn.LSTM.forward(module, x[:1], (h0, c0))
    torch.testing.assert_close(c, c0)
    torch.testing.assert_close(h, h_plain)
    assert not torch.allclose(c_plain, c0)


# --- finite differences ---------------------------------------------------------------------


def _factors(kind, shape, gen):
    rows = {"fresh": shape[0], "per_sequence": 1}.get(kind, 1)
    if kind == "expectation":
        return torch.full((1, *shape[1:]), 0.35, dtype=torch.float64)
    return (torch.rand(rows, *shape[1:], generator=gen, dtype=torch.float64) < 0.5).double()


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_rec_mask", "rec_mask"])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("kind", ["fresh", "per_sequence", "expectation"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_gradcheck(mode, kind, with_lengths, with_mask, engine):
    """The hand-written backward with zoneout: gradients to x, the initial states, every
    weight and bias, checked against finite differences in float64."""
    steps, batch, features, hidden = 4, 3, 2, 3
    gen = torch.Generator().manual_seed(7)
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1) * hidden

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()

    x = rand(steps, batch, features)
    states = [rand(batch, hidden) for _ in range(2 if mode == "LSTM" else 1)]
    weights = [rand(gates, features), rand(gates, hidden), rand(gates), rand(gates)]
    shape = (steps, batch, hidden)
    zoneout = (_factors(kind, shape, gen), _factors(kind, shape, gen) if mode == "LSTM" else None)
    mask = None
    if with_mask:
        mask = (torch.rand(1, batch, hidden, generator=gen, dtype=torch.float64) > 0.3) / 0.7
    lengths = torch.tensor([4, 2, 1]) if with_lengths else None

    def fn(x, *rest):
        state, params = rest[:len(states)], rest[len(states):]
        out, final = recurrence(mode, x, state, *params, mask, lengths, zoneout)
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (x, *states, *weights))


# --- statistics of the sampled factors --------------------------------------------------------


def binomial_tolerance(p, n, sigmas=5.0):
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_half_the_units_repeat_at_rate_one_half(cell, engine):
    """At rate 0.5 each unit keeps its previous value exactly with probability 0.5 at each
    step (a unit that updates repeats only by a measure-zero accident). 5-sigma binomial."""
    rates = {"zoneout_hidden": 0.5} | ({"zoneout_cell": 0.2} if cell == "LSTM" else {})
    module = build(cell, dtype=torch.float32, **rates).train()
    steps, batch, hidden = 40, 16, H
    x = torch.randn(steps, batch, F_IN)
    with torch.no_grad():
        out, state = module(x)
    h0 = torch.zeros(1, batch, hidden)
    hs = torch.cat([h0, out])
    repeated = (hs[1:] == hs[:-1]).double().mean().item()
    n = steps * batch * hidden
    assert abs(repeated - 0.5) <= binomial_tolerance(0.5, n)
    if cell == "LSTM":  # the cell state, read back through a second run with h zoned out
        module = build(cell, dtype=torch.float32, zoneout_cell=0.2).train()  # h not zoned out
        cells = []
        c = torch.zeros(1, batch, hidden)
        with torch.no_grad():
            for t in range(steps):
                _, (_, c_new) = module(x[t:t + 1], (torch.zeros_like(c), c))
                cells.append((c_new == c).double().mean().item())
                c = c_new
        assert abs(np.mean(cells) - 0.2) <= binomial_tolerance(0.2, n)


def test_variational_keeps_the_same_units_at_every_step(engine):
    """With ``variational=True`` one zoneout mask per sequence: the units that repeat at one
    step repeat at every step, and about the rate of them do."""
    module = build("GRU", dtype=torch.float32, zoneout_hidden=0.5, variational=True).train()
    x = torch.randn(30, 64, F_IN)
    with torch.no_grad():
        out, _ = module(x)
    repeats = out[1:] == out[:-1]  # (T-1, B, H)
    assert torch.equal(repeats, repeats[:1].expand_as(repeats))
    n = 64 * H
    assert abs(repeats[0].double().mean().item() - 0.5) <= binomial_tolerance(0.5, n)


# --- rate 0 is the plain cell -----------------------------------------------------------------


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_zero_factors_equal_torch_nn(cell, engine):
    """All-zero factors force the own loop; outputs and gradients equal torch.nn's."""
    module = build(cell, dtype=torch.float32, num_layers=2, bidirectional=True)
    ref = CELLS[cell][1](F_IN, H, num_layers=2, bidirectional=True)
    ref.load_state_dict(module.state_dict())
    x, hx = inputs(cell, module)
    x.requires_grad_()
    zeros = torch.zeros(T, 2, B, H)
    pair = (zeros, zeros if cell == "LSTM" else None)
    masks = rnnreg.DropoutMasks(None, (None,), (None, None), (None, None), None, (pair, pair))
    out, state = module.forward_with_masks(x, hx, masks)
    ref_out, ref_state = ref(x, hx)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    seed = torch.randn(out.shape)
    ours = torch.autograd.grad((out * seed).sum(), [x, *module.parameters()])
    theirs = torch.autograd.grad((ref_out * seed).sum(), [x, *ref.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_rate_zero_layer_equals_torch_nn(cell):
    module = build(cell, dtype=torch.float32, zoneout_hidden=0.0).train()
    ref = CELLS[cell][1](F_IN, H)
    ref.load_state_dict(module.state_dict())
    x = torch.randn(T, B, F_IN)
    torch.testing.assert_close(module(x)[0], ref(x)[0], rtol=1e-6, atol=1e-6)
    assert module.sample_masks(T, B).zoneout is None


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.0, 1, -0.1, 1.5, float("nan"), True])
@pytest.mark.parametrize("name", ["zoneout_hidden", "zoneout_cell"])
def test_bad_rates_name_the_option(name, value):
    with pytest.raises(ValueError) as info:
        rnnreg.LSTM(F_IN, H, **{name: value})
    assert str(info.value).startswith(f"{name} "), str(info.value)


def test_only_the_lstm_has_a_cell_rate_and_proj_size_is_refused():
    for cls in (rnnreg.GRU, rnnreg.RNN):
        with pytest.raises(TypeError, match="zoneout_cell"):
            cls(F_IN, H, zoneout_cell=0.5)
    with pytest.raises(ValueError, match="zoneout"):
        rnnreg.LSTM(F_IN, H, proj_size=2, zoneout_hidden=0.1)
    assert "zoneout_cell=0.5" in repr(rnnreg.LSTM(F_IN, H, zoneout_cell=0.5))


# --- the language model, its config, the CLI and the study ---------------------------------------


def test_config_strategy_reaches_the_model():
    from rnnreg.lm.config import Config
    from rnnreg.lm.model import LanguageModel

    lstm = LanguageModel(10, Config(hidden_size=8, strategy="zoneout", strategy_p=0.5)).rnn
    assert (lstm.zoneout_cell, lstm.zoneout_hidden) == (0.5, 0.05)
    gru = LanguageModel(10, Config(hidden_size=8, cell="gru", strategy="zoneout",
                                   strategy_p=0.5)).rnn
    assert (gru.zoneout_cell, gru.zoneout_hidden) == (0.0, 0.05)
    stack = LanguageModel(10, Config(hidden_size=8, layer_sizes=(12, 8), zoneout_hidden=0.2,
                                     zoneout_cell=0.3)).rnn
    assert all((layer.zoneout_hidden, layer.zoneout_cell) == (0.2, 0.3) for layer in stack.layers)


@pytest.mark.parametrize("changes, word", [
    (dict(cell="gru", zoneout_cell=0.3), "zoneout_cell"),
    (dict(zoneout_hidden=1.0), "zoneout_hidden"),
    (dict(strategy="zoneout", strategy_p=1.0), "zoneout_cell"),
])
def test_config_refuses_bad_zoneout(changes, word):
    from rnnreg.lm.config import Config

    with pytest.raises(ValueError, match=word):
        Config(**changes)


def test_old_config_json_loads_and_cli_has_the_flags():
    from rnnreg import cli
    from rnnreg.cli.flags import config_overrides
    from rnnreg.lm.config import Config

    old = {k: v for k, v in Config().to_dict().items() if not k.startswith("zoneout")}
    assert Config.from_dict(old) == Config()
    args = cli._parser().parse_args(["train", "--zoneout-hidden", "0.1", "--zoneout-cell", "0.3"])
    assert config_overrides(args) == {"zoneout_hidden": 0.1, "zoneout_cell": 0.3}
    args = cli._parser().parse_args(["compare", "--out", "x", "--strategies", "zaremba,zoneout"])
    assert "zoneout" in args.strategies


def test_study_grid_runs_zoneout():
    from rnnreg.lm.config import Config
    from rnnreg.study.grid import StudyGrid, grid_runs

    runs = grid_runs(Config(hidden_size=8), StudyGrid(("zoneout",), (0.5,), ("lstm",), (1,)))
    assert [name for name, _ in runs] == ["lstm-zoneout-p0.5-s1"]
    assert runs[0][1].regularization.zoneout_cell == 0.5


def test_stack_evaluates_at_the_expectation_like_the_uniform_layer():
    """StackedRNN (per-layer sizes) in eval mode equals the uniform rnnreg.LSTM holding the
    same weights: both use the zoneout expectation, not torch's plain kernel."""
    rates = dict(zoneout_hidden=0.2, zoneout_cell=0.3)
    torch.manual_seed(0)
    uniform = rnnreg.LSTM(F_IN, H, 2, **rates).eval()
    stack = rnnreg.StackedRNN("lstm", F_IN, (H, H), **rates).eval()
    for k, layer in enumerate(stack.layers):
        layer.load_state_dict({name.replace(f"_l{k}", "_l0"): w
                               for name, w in uniform.state_dict().items()
                               if name.endswith(f"_l{k}")})
    x = torch.randn(T, B, F_IN)
    with torch.no_grad():
        out, _ = uniform(x)
        stacked, _ = stack(x)
        plain, _ = nn.LSTM.forward(uniform, x)
    torch.testing.assert_close(stacked, out)
    assert not torch.allclose(out, plain)
    masks = stack.sample_masks(T, B)
    assert len(masks.zoneout) == 2 and masks.zoneout[0][1].shape == (T, 1, B, H)


# --- torch.compile ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_torch_compile_traces_the_loops_in_one_graph(cell):
    """With the ops' fake kernels torch.compile traces the own recurrence, forward and the
    hand-written backward, without a graph break (fullgraph=True raises on one), and computes
    what eager mode does. Dynamo refuses torch.nn.LSTM subclasses unless allow_rnn is set.
    Explicit masks and eval-mode zoneout keep both runs deterministic."""
    if loops.name("cpu") != loops.CPP_LOOP:
        pytest.skip("the C++ loops are off (RNNREG_ENGINE) or could not be built")
    module = build(cell, dtype=torch.float32, recurrent_dropout=0.3, **zoneout_rates(cell))
    x = torch.randn(T, B, F_IN, requires_grad=True)
    masks = module.sample_masks(T, B)

    def run(fn):
        results = []
        for train in (True, False):
            module.train(train)
            out, state = fn(x)
            loss = out.sum() + (state[0] if cell == "LSTM" else state).pow(2).sum()
            results += [out, *torch.autograd.grad(loss, [x, *module.parameters()])]
        return results

    def forward(x):
        if module.training:
            return module.forward_with_masks(x, None, masks)
        return module(x)

    with torch._dynamo.config.patch(allow_rnn=True):
        torch.compiler.reset()
        compiled = run(torch.compile(forward, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, run(forward)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_runs_the_own_loop_in_training_and_evaluation(training):
    """The routing function names the engine zoneout needs: its expectation in evaluation is
    not torch's kernel either (``z * previous + (1 - z) * new``)."""
    from rnnreg.nn import FUSED, engine_for

    layer = rnnreg.LSTM(3, 4, zoneout_hidden=0.1).train(training)
    assert engine_for(layer) == loops.name("cpu")
    assert engine_for(rnnreg.LSTM(3, 4).train(training)) == FUSED
