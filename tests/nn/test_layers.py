"""Tests for rnnreg.LSTM/GRU/RNN against independent oracles.

Oracles: torch.nn's own layers (with copied weights), a NumPy forward written from the equations
(tests/support/numpy_oracle.py), finite differences (gradcheck), and "probe" networks whose
weights are chosen so that the dropout masks a real forward used can be read back from its output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnreg
from rnnreg.nn.recurrence import recurrence
from support.numpy_oracle import Masks, Params, stacked_forward

CELLS = {"LSTM": (rnnreg.LSTM, nn.LSTM), "GRU": (rnnreg.GRU, nn.GRU), "RNN": (rnnreg.RNN, nn.RNN)}
MODES = {"LSTM": "LSTM", "GRU": "GRU", "RNN": "RNN_TANH", "RNN_RELU": "RNN_RELU"}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "RNN_RELU": 1}
T, B, F_IN, H = 5, 3, 4, 5
LENGTHS = torch.tensor([5, 2, 4])  # unequal and unsorted
ALL_RATES = dict(input_dropout=0.5, output_dropout=0.5, recurrent_dropout=0.5,
                 weight_dropout=0.5)


# --- helpers ---------------------------------------------------------------------------------


def build(cell: str, *, input_size=F_IN, hidden=H, seed=0, **kwargs):
    """An rnnreg module of ``cell`` ('LSTM', 'GRU', 'RNN' or 'RNN_RELU')."""
    torch.manual_seed(seed)
    if cell == "RNN_RELU":
        return rnnreg.RNN(input_size, hidden, nonlinearity="relu", **kwargs)
    return CELLS[cell][0](input_size, hidden, **kwargs)


def reference(cell: str, ours: nn.Module, **kwargs) -> nn.Module:
    """A plain torch.nn module of the same architecture with ``ours``' weights copied in."""
    if cell == "RNN_RELU":
        ref = nn.RNN(ours.input_size, ours.hidden_size, nonlinearity="relu", **kwargs)
    else:
        ref = CELLS[cell][1](ours.input_size, ours.hidden_size, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ref


def arch(num_layers=1, bidirectional=False, batch_first=False, bias=True, dtype=torch.float32):
    return dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                bias=bias, dtype=dtype)


def make_inputs(cell, module, *, packed, with_hx, steps=T, batch=B, lengths=LENGTHS, seed=1):
    """Leaf tensors (x, h0[, c0]) and what to feed the module: (feed, hx, leaves)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(module.parameters()).dtype
    shape = (batch, steps, module.input_size) if module.batch_first else (
        steps, batch, module.input_size)
    x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
    feed = x
    if packed:
        feed = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                    enforce_sorted=False)
    leaves = [x]
    hx = None
    if with_hx:
        lead = module.num_layers * (2 if module.bidirectional else 1)
        count = 2 if cell == "LSTM" else 1
        states = [torch.randn(lead, batch, module.hidden_size, generator=gen,
                              dtype=dtype).requires_grad_() for _ in range(count)]
        leaves += states
        hx = tuple(states) if cell == "LSTM" else states[0]
    return feed, hx, leaves


def run(module, feed, hx, leaves, masks=None, seed=2):
    """Forward (or forward_with_masks), a random linear loss, and its gradients."""
    if masks is None:
        out, state = module(feed, hx)
    else:
        out, state = module.forward_with_masks(feed, hx, masks)
    out_t = out.data if isinstance(out, PackedSequence) else out
    states = state if isinstance(state, tuple) else (state,)
    gen = torch.Generator().manual_seed(seed)
    loss = (out_t * torch.randn(out_t.shape, generator=gen, dtype=out_t.dtype)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    grads = torch.autograd.grad(loss, [*leaves, *module.parameters()], retain_graph=True)
    return out, states, grads


def assert_same_run(ours_run, ref_run, atol=1e-5, rtol=1e-5):
    (out_a, states_a, grads_a), (out_b, states_b, grads_b) = ours_run, ref_run
    assert type(out_a) is type(out_b)
    if isinstance(out_b, PackedSequence):
        assert torch.equal(out_a.batch_sizes, out_b.batch_sizes)
        assert torch.equal(out_a.sorted_indices, out_b.sorted_indices)
        assert torch.equal(out_a.unsorted_indices, out_b.unsorted_indices)
        out_a, out_b = out_a.data, out_b.data
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    assert len(states_a) == len(states_b)
    for a, b in zip(states_a, states_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def no_masks(module) -> rnnreg.DropoutMasks:
    layers = module.num_layers
    return rnnreg.DropoutMasks(None, (None,) * (layers - 1), (None,) * layers, (None,) * layers,
                               None)


def ones_recurrent(module, steps=T, batch=B) -> rnnreg.DropoutMasks:
    """All-ones recurrent masks: forces rnnreg's own loop without changing the maths."""
    d = 2 if module.bidirectional else 1
    dtype = next(module.parameters()).dtype
    rec = tuple(torch.ones(steps, d, batch, module.hidden_size, dtype=dtype)
                for _ in range(module.num_layers))
    return rnnreg.DropoutMasks(None, (None,) * (module.num_layers - 1), rec,
                               (None,) * module.num_layers, None)


def masks_for_path(module, path: str, **sizes) -> rnnreg.DropoutMasks | None:
    """Set up one of the two paths the equality tests cover: ``eval`` (no masks, dropout
    off) or ``own_loop`` (all-ones recurrent masks forcing rnnreg's own recurrence)."""
    if path == "eval":
        module.eval()
        return None
    return ones_recurrent(module, **sizes)


def binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# --- 1. equality with torch.nn ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["eval", "own_loop"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbf", "btf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_equals_torch(cell, num_layers, bidirectional, batch_first, with_hx, packed, path):
    shape = arch(num_layers, bidirectional, batch_first)
    between = 0.5 if num_layers > 1 else 0.0
    ours = build(cell, dropout=between, variational=num_layers == 2, **ALL_RATES, **shape)
    ref = reference(cell, ours, **shape)
    feed, hx, leaves = make_inputs(cell, ours, packed=packed, with_hx=with_hx)
    if path == "eval":
        ours.eval()
        ref.eval()
        got = run(ours, feed, hx, leaves)
    else:  # training flag on and nonzero rates: explicit masks must be the only dropout
        ours.train()
        got = run(ours, feed, hx, leaves, masks=ones_recurrent(ours))
    expected = run(ref, feed, hx, leaves)
    assert_same_run(got, expected)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_own_loop_equals_torch_at_a_wide_size(cell, packed):
    """At 512 units the own recurrence runs its default CPU engine end to end: compiled loops,
    oneDNN for the per-step and the whole-window products (rnnreg.nn.products.ONEDNN_MIN_HIDDEN)."""
    shape = arch(2, bidirectional=cell == "GRU")
    ours = build(cell, input_size=40, hidden=512, dropout=0.5, **ALL_RATES, **shape)
    ref = reference(cell, ours, **shape)
    feed, hx, leaves = make_inputs(cell, ours, packed=packed, with_hx=True)
    ours.train()
    got = run(ours, feed, hx, leaves, masks=ones_recurrent(ours))
    assert_same_run(got, run(ref, feed, hx, leaves))


@pytest.mark.parametrize("path", ["eval", "own_loop"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "RNN_RELU"])
def test_equals_torch_without_bias(cell, bidirectional, path):
    shape = arch(2, bidirectional, bias=False)
    ours = build(cell, **ALL_RATES, **shape)
    assert not any(name.startswith("bias") for name, _ in ours.named_parameters())
    ref = reference(cell, ours, **shape)
    feed, hx, leaves = make_inputs(cell, ours, packed=True, with_hx=True)
    masks = masks_for_path(ours, path)
    assert_same_run(run(ours, feed, hx, leaves, masks), run(ref, feed, hx, leaves))


@pytest.mark.parametrize("path", ["eval", "own_loop"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_equals_torch_relu(bidirectional, packed, path):
    shape = arch(2, bidirectional)
    ours = build("RNN_RELU", **ALL_RATES, **shape)
    assert ours.nonlinearity == "relu"
    ref = reference("RNN_RELU", ours, **shape)
    feed, hx, leaves = make_inputs("RNN", ours, packed=packed, with_hx=True)
    masks = masks_for_path(ours, path)
    assert_same_run(run(ours, feed, hx, leaves, masks), run(ref, feed, hx, leaves))


@pytest.mark.parametrize("path", ["eval", "own_loop"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tbf", "btf"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_equals_torch_unbatched(cell, batch_first, with_hx, path):
    shape = arch(2, True, batch_first)
    ours = build(cell, **ALL_RATES, **shape)
    ref = reference(cell, ours, **shape)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, F_IN, generator=gen).requires_grad_()
    leaves, hx = [x], None
    if with_hx:
        states = [torch.randn(4, H, generator=gen).requires_grad_()
                  for _ in range(2 if cell == "LSTM" else 1)]
        leaves += states
        hx = tuple(states) if cell == "LSTM" else states[0]
    masks = masks_for_path(ours, path, batch=1)
    got = run(ours, x, hx, leaves, masks)
    expected = run(ref, x, hx, leaves)
    assert got[0].shape == (T, 2 * H)
    assert all(s.shape == (4, H) for s in got[1])
    assert_same_run(got, expected)


@pytest.mark.parametrize("path", ["eval", "own_loop"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_equals_torch_packed_sorted(cell, path):
    """pack_padded_sequence(enforce_sorted=True): a PackedSequence without sorted_indices."""
    shape = arch(2, True)
    ours = build(cell, **ALL_RATES, **shape)
    ref = reference(cell, ours, **shape)
    x = torch.randn(T, B, F_IN, requires_grad=True)
    feed = pack_padded_sequence(x, torch.tensor([5, 4, 2]))
    assert feed.sorted_indices is None
    masks = masks_for_path(ours, path)
    got = run(ours, feed, None, [x], masks)
    expected = run(ref, feed, None, [x])
    assert got[0].sorted_indices is None
    assert torch.equal(got[0].batch_sizes, expected[0].batch_sizes)
    assert_same_run((got[0].data, *got[1:]), (expected[0].data, *expected[1:]))


def test_own_loop_really_applies_recurrent_masks():
    """Guards the own-loop equality tests: a non-trivial recurrent mask must change the output."""
    ours = build("LSTM", **arch(2, True))
    ref = reference("LSTM", ours, **arch(2, True))
    feed, hx, _ = make_inputs("LSTM", ours, packed=False, with_hx=True)
    masks = ones_recurrent(ours)
    scaled = masks.recurrent[1].clone()
    scaled[2, 1, 0, 0] = 0.0  # one unit, one step, backward direction, last layer
    changed = rnnreg.DropoutMasks(None, (None,), (masks.recurrent[0], scaled), (None, None), None)
    with torch.no_grad():
        out_ones, _ = ours.forward_with_masks(feed, hx, masks)
        out_changed, _ = ours.forward_with_masks(feed, hx, changed)
        out_ref, _ = ref(feed, hx)
    torch.testing.assert_close(out_ones, out_ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_changed, out_ref, atol=1e-4)
    # the first layer and the forward direction of the last one are untouched
    torch.testing.assert_close(out_changed[..., :H], out_ref[..., :H], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "RNN_RELU"])
def test_state_dict_loads_both_ways(cell, bidirectional, bias):
    shape = dict(num_layers=2, bidirectional=bidirectional, bias=bias)
    ours = build(cell, seed=0, **ALL_RATES, variational=True, **shape)
    torch.manual_seed(1)
    if cell == "RNN_RELU":
        ref = nn.RNN(F_IN, H, nonlinearity="relu", **shape)
    else:
        ref = CELLS[cell][1](F_IN, H, **shape)
    assert list(ours.state_dict()) == list(ref.state_dict())
    # torch -> rnnreg
    ours.load_state_dict(ref.state_dict(), strict=True)
    for (name_a, a), (name_b, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b)
    # rnnreg -> torch (after changing ours so the copy is observable)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(2.0)
    fresh = reference(cell, ours, **shape)
    for (name_a, a), (name_b, b) in zip(ours.state_dict().items(), fresh.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b)
    ours.eval()
    x = torch.randn(T, B, F_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], fresh(x)[0], atol=1e-5, rtol=1e-5)


def test_is_a_torch_module():
    assert isinstance(rnnreg.LSTM(2, 3), nn.LSTM)
    assert isinstance(rnnreg.GRU(2, 3), nn.GRU)
    rnn = rnnreg.RNN(2, 3, 1, "relu")  # nonlinearity is the 4th positional argument, as in torch
    assert isinstance(rnn, nn.RNN) and rnn.nonlinearity == "relu"
    text = repr(rnnreg.GRU(2, 3, input_dropout=0.25, weight_dropout=0.5, variational=True))
    assert "input_dropout=0.25" in text and "weight_dropout=0.5" in text
    assert "variational=True" in text and "output_dropout" not in text


# --- 2. NumPy oracle ------------------------------------------------------------------------


def oracle_params(module) -> list[Params]:
    params = []
    for weights in module.all_weights:
        arrays = [w.detach().numpy() for w in weights]
        if module.bias:
            params.append(Params(*arrays))
        else:
            params.append(Params(arrays[0], arrays[1], None, None))
    return params


def oracle_masks(masks: rnnreg.DropoutMasks) -> Masks:
    def conv(m):
        return None if m is None else m.numpy()

    return Masks(conv(masks.input), tuple(conv(m) for m in masks.between),
                 tuple(conv(m) for m in masks.recurrent), tuple(conv(m) for m in masks.weight),
                 conv(masks.output))


def oracle_run(cell, module, x, hx, masks, lengths=None):
    """NumPy forward of ``module`` on time-major ``x``: (output, h_n, c_n)."""
    if cell == "LSTM":
        h0, c0 = (s.detach().numpy() for s in hx)
    else:
        h0, c0 = hx.detach().numpy(), None
    return stacked_forward(MODES[cell], x.detach().numpy(), h0, c0, oracle_params(module),
                           num_layers=module.num_layers, bidirectional=module.bidirectional,
                           masks=oracle_masks(masks), lengths=lengths)


ORACLE_RATES = dict(input_dropout=0.2, dropout=0.3, output_dropout=0.25, recurrent_dropout=0.4,
                    weight_dropout=0.35)


def _oracle_case(cell, bidirectional, variational, seed=0, num_layers=2):
    module = build(cell, num_layers=num_layers, bidirectional=bidirectional,
                   variational=variational, dtype=torch.float64, seed=seed, **ORACLE_RATES)
    gen = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(T, B, F_IN, generator=gen, dtype=torch.float64)
    lead = num_layers * (2 if bidirectional else 1)
    states = [torch.randn(lead, B, H, generator=gen, dtype=torch.float64)
              for _ in range(2 if cell == "LSTM" else 1)]
    hx = tuple(states) if cell == "LSTM" else states[0]
    return module, x, hx


def _compare_to_oracle(cell, out, state, expected):
    exp_out, exp_h, exp_c = expected
    np.testing.assert_allclose(out.detach().numpy(), exp_out, atol=1e-10, rtol=1e-10)
    h = state[0] if cell == "LSTM" else state
    np.testing.assert_allclose(h.detach().numpy(), exp_h, atol=1e-10, rtol=1e-10)
    if cell == "LSTM":
        np.testing.assert_allclose(state[1].detach().numpy(), exp_c, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "RNN_RELU"])
def test_forward_with_masks_matches_numpy_oracle(cell, variational, bidirectional, packed):
    module, x, hx = _oracle_case(cell, bidirectional, variational)
    masks = module.sample_masks(T, B)
    assert masks.input is not None and masks.output is not None
    assert all(m is not None for m in (*masks.between, *masks.recurrent, *masks.weight))
    feed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    with torch.no_grad():
        out, state = module.forward_with_masks(feed, hx, masks)
    if packed:
        out, _ = pad_packed_sequence(out, total_length=T)
    expected = oracle_run(cell, module, x, hx, masks, LENGTHS.tolist() if packed else None)
    _compare_to_oracle(cell, out, state, expected)


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_three_layers_match_numpy_oracle(cell, variational):
    """Each layer boundary and each layer gets its own mask."""
    module, x, hx = _oracle_case(cell, True, variational, seed=6, num_layers=3)
    masks = module.sample_masks(T, B)
    assert not torch.equal(masks.between[0], masks.between[1])
    feed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    with torch.no_grad():
        out, state = module.forward_with_masks(feed, hx, masks)
    out, _ = pad_packed_sequence(out, total_length=T)
    _compare_to_oracle(cell, out, state, oracle_run(cell, module, x, hx, masks, LENGTHS.tolist()))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_forward_with_masks_applies_masks_in_eval_mode(cell):
    module, x, hx = _oracle_case(cell, True, False, seed=4)
    masks = module.sample_masks(T, B)
    module.eval()
    with torch.no_grad():
        out, state = module.forward_with_masks(x, hx, masks)
    _compare_to_oracle(cell, out, state, oracle_run(cell, module, x, hx, masks))


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_training_forward_uses_sample_masks(cell, variational):
    """A real training forward equals the oracle fed the masks sampled under the same seed."""
    module, x, hx = _oracle_case(cell, True, variational, seed=5)
    torch.manual_seed(123)
    masks = module.sample_masks(T, B)
    torch.manual_seed(123)
    with torch.no_grad():
        out, state = module(x, hx)
    _compare_to_oracle(cell, out, state, oracle_run(cell, module, x, hx, masks))


@pytest.mark.parametrize("name", ["variational", "naive", "recurrent_only", "awd"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_forward_equals_forward_with_masks_same_seed(cell, name):
    module = build(cell, **arch(2, True, batch_first=True), **rnnreg.strategy(name, 0.4))
    feed, hx, _ = make_inputs(cell, module, packed=True, with_hx=True)
    torch.manual_seed(7)
    masks = module.sample_masks(T, B)
    expected, expected_state = module.forward_with_masks(feed, hx, masks)
    torch.manual_seed(7)
    got, got_state = module(feed, hx)
    assert torch.equal(got.data, expected.data)
    for a, b in zip(got_state if cell == "LSTM" else (got_state,),
                    expected_state if cell == "LSTM" else (expected_state,)):
        assert torch.equal(a, b)
    torch.manual_seed(8)
    assert not torch.equal(module(feed, hx)[0].data, got.data)  # the forward is stochastic


# --- 3. mask semantics ------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_sample_masks_shapes_and_values(cell, variational, bidirectional):
    rates = dict(input_dropout=0.1, dropout=0.2, output_dropout=0.3, recurrent_dropout=0.4,
                 weight_dropout=0.5)
    module = build(cell, num_layers=3, bidirectional=bidirectional, variational=variational,
                   dtype=torch.float64, **rates)
    steps, batch, d = 7, 4, 2 if bidirectional else 1
    t = 1 if variational else steps
    torch.manual_seed(0)
    masks = module.sample_masks(steps, batch)
    assert isinstance(masks, rnnreg.DropoutMasks)
    assert masks.input.shape == (t, batch, F_IN)
    assert len(masks.between) == 2 and all(m.shape == (t, batch, d * H) for m in masks.between)
    assert len(masks.recurrent) == 3
    assert all(m.shape == (t, d, batch, H) for m in masks.recurrent)
    assert len(masks.weight) == 3
    assert all(m.shape == (d, GATES[cell] * H, H) for m in masks.weight)
    assert masks.output.shape == (t, batch, d * H)
    placed = [(masks.input, 0.1), *((m, 0.2) for m in masks.between), (masks.output, 0.3),
              *((m, 0.4) for m in masks.recurrent), *((m, 0.5) for m in masks.weight)]
    for mask, p in placed:
        assert mask.dtype == torch.float64
        scale = 1.0 / (1.0 - p)
        is_zero, is_kept = mask == 0, torch.isclose(mask, torch.tensor(scale, dtype=mask.dtype))
        assert bool((is_zero | is_kept).all()), f"mask for p={p} has values {mask.unique()}"


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_sample_masks_none_where_rate_is_zero(cell):
    module = build(cell, num_layers=2, bidirectional=True, variational=True)
    masks = module.sample_masks(T, B)
    assert masks.input is None and masks.output is None
    assert masks.between == (None,) and masks.recurrent == (None, None)
    assert masks.weight == (None, None)


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
def test_mask_scaling_on_large_samples(variational):
    rates = dict(input_dropout=0.1, dropout=0.3, output_dropout=0.5, recurrent_dropout=0.7,
                 weight_dropout=0.6)
    module = rnnreg.LSTM(30, 30, num_layers=2, bidirectional=True, variational=variational,
                         **rates)
    torch.manual_seed(0)
    masks = module.sample_masks(40, 50)
    placed = [(masks.input, 0.1), (masks.between[0], 0.3), (masks.output, 0.5),
              *((m, 0.7) for m in masks.recurrent), *((m, 0.6) for m in masks.weight)]
    for mask, p in placed:
        n = mask.numel()
        kept = (mask != 0).double().mean().item()
        assert abs(kept - (1 - p)) <= binomial_tolerance(p, n), (p, kept)
        assert abs(mask.double().mean().item() - 1.0) <= binomial_tolerance(p, n) / (1 - p)


def test_bidirectional_recurrent_masks_differ_between_directions():
    for variational in (False, True):
        module = build("LSTM", hidden=16, bidirectional=True, variational=variational,
                       recurrent_dropout=0.5)
        torch.manual_seed(0)
        (rec,) = module.sample_masks(4, 8).recurrent
        assert not torch.equal(rec[:, 0], rec[:, 1])


def probe_rnn(hidden, *, w_hh: float, num_layers=1, bidirectional=False, **reg):
    """relu RNN with W_ih = I, W_hh = w_hh * I and no bias, in float64."""
    module = rnnreg.RNN(hidden, hidden, num_layers, "relu", bidirectional=bidirectional,
                        dtype=torch.float64, **reg)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("weight_ih"):
                p.copy_(torch.eye(*p.shape))
            elif name.startswith("weight_hh"):
                p.copy_(w_hh * torch.eye(*p.shape))
            else:
                p.zero_()
    return module


def recover_recurrent_masks(out_dir, h0_dir, reverse):
    """For h_t = 1 + m_t * h_{t-1} (all > 0): m_t = (h_t - 1) / h_{t-1}, in processing order."""
    seq = out_dir.flip(0) if reverse else out_dir
    prev = torch.cat([h0_dir.unsqueeze(0), seq[:-1]])
    return (seq - 1.0) / prev


def assert_is_mask(values, p):
    scale = 1.0 / (1.0 - p)
    ok = torch.isclose(values, torch.zeros_like(values), atol=1e-9) | torch.isclose(
        values, torch.full_like(values, scale), atol=1e-9)
    assert bool(ok.all()), values.unique()
    assert bool((values.abs() < 1e-9).any()) and bool((values > 0.5).any())


def all_steps_equal(mask_by_step, atol=1e-9):
    return all(torch.allclose(mask_by_step[t], mask_by_step[0], atol=atol)
               for t in range(1, mask_by_step.shape[0]))


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
def test_real_forward_recurrent_masks_read_back(variational):
    p, hidden, steps, batch = 0.5, 16, 5, 6
    module = probe_rnn(hidden, w_hh=1.0, bidirectional=True, recurrent_dropout=p,
                       variational=variational)
    x = torch.ones(steps, batch, hidden, dtype=torch.float64)
    h0 = torch.ones(2, batch, hidden, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        out, _ = module(x, h0)
    fwd = recover_recurrent_masks(out[..., :hidden], h0[0], reverse=False)
    bwd = recover_recurrent_masks(out[..., hidden:], h0[1], reverse=True)
    for masks in (fwd, bwd):
        assert_is_mask(masks, p)
        assert all_steps_equal(masks) == variational
    assert not torch.allclose(fwd, bwd)


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("placement", ["input_dropout", "dropout", "output_dropout"])
def test_real_forward_feedforward_masks_read_back(placement, variational):
    """With W_hh = 0 and W_ih = I on ones, the output of the probe is the mask itself."""
    p, hidden, steps, batch = 0.5, 16, 4, 6
    module = probe_rnn(hidden, w_hh=0.0, num_layers=2, variational=variational,
                       **{placement: p})
    x = torch.ones(steps, batch, hidden, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        out, _ = module(x)
    assert_is_mask(out, p)
    assert all_steps_equal(out) == variational
    assert not torch.allclose(out[:, 0], out[:, 1])  # independent across the batch


def test_locked_dropout_on_ones_gives_one_pattern_per_sequence():
    torch.manual_seed(0)
    out = rnnreg.nn.functional.locked_dropout(torch.ones(6, 4, 32), 0.5)
    assert all_steps_equal(out, atol=0)
    fresh = rnnreg.nn.functional.dropout(torch.ones(6, 4, 32), 0.5)
    assert not all_steps_equal(fresh, atol=0)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_zaremba_never_touches_the_recurrence(cell):
    settings = rnnreg.strategy("zaremba", 0.5)
    module = build(cell, **arch(2, True), **settings)
    masks = module.sample_masks(T, B)
    assert masks.recurrent == (None, None) and masks.weight == (None, None)
    assert masks.input is not None and masks.output is not None and masks.between[0] is not None
    ones = rnnreg.DropoutMasks(torch.ones_like(masks.input), (torch.ones_like(masks.between[0]),),
                               (None, None), (None, None), torch.ones_like(masks.output))
    ref = reference(cell, module, **arch(2, True))
    feed, hx, leaves = make_inputs(cell, module, packed=True, with_hx=True)
    assert_same_run(run(module, feed, hx, leaves, ones), run(ref, feed, hx, leaves))


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_eval_turns_every_dropout_off(cell, variational):
    shape = arch(2, True)
    module = build(cell, dropout=0.9, input_dropout=0.9, output_dropout=0.9,
                   recurrent_dropout=0.9, weight_dropout=0.9, variational=variational, **shape)
    ref = reference(cell, module, **shape)
    feed, hx, leaves = make_inputs(cell, module, packed=False, with_hx=True)
    torch.manual_seed(0)
    training_out = module(feed, hx)[0]
    module.eval()
    ref.eval()
    assert not torch.allclose(training_out, ref(feed, hx)[0], atol=1e-3)
    assert_same_run(run(module, feed, hx, leaves), run(ref, feed, hx, leaves))


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_rate_zero_is_identity_in_training(cell, variational):
    shape = arch(2, True)
    module = build(cell, variational=variational, **shape)  # every rate 0
    ref = reference(cell, module, **shape)
    feed, hx, leaves = make_inputs(cell, module, packed=True, with_hx=True)
    assert_same_run(run(module, feed, hx, leaves), run(ref, feed, hx, leaves))


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_output_dropout_one_zeroes_output_but_not_final_state(cell, variational):
    shape = arch(2, True)
    module = build(cell, output_dropout=1.0, variational=variational, **shape)
    ref = reference(cell, module, **shape)
    feed, hx, _ = make_inputs(cell, module, packed=False, with_hx=True)
    with torch.no_grad():
        out, state = module(feed, hx)
        _, ref_state = ref(feed, hx)
    assert torch.equal(out, torch.zeros_like(out))
    for a, b in zip(state if cell == "LSTM" else (state,),
                    ref_state if cell == "LSTM" else (ref_state,)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_input_dropout_one_is_a_zero_input(cell, variational):
    shape = arch(2, True)
    module = build(cell, input_dropout=1.0, variational=variational, **shape)
    ref = reference(cell, module, **shape)
    feed, hx, leaves = make_inputs(cell, module, packed=False, with_hx=True)
    got = run(module, feed, hx, leaves)
    expected = run(ref, torch.zeros_like(feed), hx, leaves[1:])
    assert torch.equal(got[2][0], torch.zeros_like(feed))  # no gradient reaches the input
    assert_same_run((got[0], got[1], got[2][1:]), expected)


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_between_dropout_one_cuts_the_stack(cell, variational):
    shape = arch(2, True)
    module = build(cell, dropout=1.0, variational=variational, **shape)
    ref = reference(cell, module, **shape)
    with torch.no_grad():  # layer 1 seeing a zero input == layer 1 having zero input weights
        ref.weight_ih_l1.zero_()
        ref.weight_ih_l1_reverse.zero_()
    feed, hx, _ = make_inputs(cell, module, packed=False, with_hx=True)
    with torch.no_grad():
        torch.testing.assert_close(module(feed, hx)[0], ref(feed, hx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variational", [False, True], ids=["fresh", "variational"])
@pytest.mark.parametrize("rate", ["recurrent_dropout", "weight_dropout"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_recurrent_or_weight_dropout_one_is_a_zero_weight_hh(cell, rate, variational):
    """The mask acts only on the W_hh product: LSTM cell path and GRU's z*h are untouched."""
    shape = arch(2, True)
    module = build(cell, variational=variational, **{rate: 1.0}, **shape)
    ref = reference(cell, module, **shape)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("weight_hh"):
                p.zero_()
    feed, hx, leaves = make_inputs(cell, module, packed=True, with_hx=True)
    out, states, grads = run(module, feed, hx, leaves)
    ref_out, ref_states, ref_grads = run(ref, feed, hx, leaves)
    n = len(leaves)
    names = [name for name, _ in module.named_parameters()]
    hh = [n + i for i, name in enumerate(names) if name.startswith("weight_hh")]
    for i in hh:
        assert torch.equal(grads[i], torch.zeros_like(grads[i]))
    # compare all but the weight_hh gradients (ref's are w.r.t. the zeroed matrices)
    keep = [i for i in range(len(grads)) if i not in hh]
    assert_same_run((out, states, [grads[i] for i in keep]),
                    (ref_out, ref_states, [ref_grads[i] for i in keep]))


def test_weight_dropout_real_forward_read_back():
    """W_ih = 0, W_hh = ones, h0 = identity rows: h_1 = (W_hh * M)^T, h_2 = h_1 @ (W_hh * M)^T."""
    p, hidden = 0.3, 40
    module = rnnreg.RNN(1, hidden, 1, "relu", weight_dropout=p, dtype=torch.float64)
    with torch.no_grad():
        module.weight_ih_l0.zero_()
        module.weight_hh_l0.fill_(1.0)
        module.bias_ih_l0.zero_()
        module.bias_hh_l0.zero_()
    before = {name: q.detach().clone() for name, q in module.named_parameters()}
    x = torch.zeros(2, hidden, 1, dtype=torch.float64)
    h0 = torch.eye(hidden, dtype=torch.float64).unsqueeze(0)
    torch.manual_seed(0)
    out, _ = module(x, h0)
    mask = out[0].detach().t()  # (G*H, H) mask on weight_hh
    assert_is_mask(mask, p)
    zeros = (mask == 0).double().mean().item()
    assert abs(zeros - p) <= binomial_tolerance(p, mask.numel())
    # one mask per call: step 2 uses the same dropped matrix
    torch.testing.assert_close(out[1].detach(), out[0].detach() @ mask.t())
    out[0].sum().backward()
    # d/dW[i, j] sum_b relu((W*M) e_b)_i = M[i, j]: no gradient through dropped entries
    torch.testing.assert_close(module.weight_hh_l0.grad, mask)
    for name, q in module.named_parameters():
        assert torch.equal(q.detach(), before[name]), f"{name} changed by the forward"


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_weight_mask_gradient_matches_dropped_torch_module(cell, bidirectional):
    """grad wrt W_hh under mask M is M * (grad wrt the dropped matrix W_hh * M)."""
    shape = arch(2, bidirectional)
    module = build(cell, weight_dropout=0.5, **shape)
    masks = module.sample_masks(T, B)
    ref = reference(cell, module, **shape)
    d = 2 if bidirectional else 1
    mask_of = {}
    with torch.no_grad():
        for layer, weight_mask in enumerate(masks.weight):
            for direction in range(d):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                mask_of["weight_hh" + suffix] = weight_mask[direction]
                getattr(ref, "weight_hh" + suffix).mul_(weight_mask[direction])
    feed, hx, leaves = make_inputs(cell, module, packed=True, with_hx=True)
    got = run(module, feed, hx, leaves, masks)
    ref_out, ref_states, ref_grads = run(ref, feed, hx, leaves)
    names = [name for name, _ in module.named_parameters()]
    expected = list(ref_grads)
    for i, name in enumerate(names):
        if name in mask_of:
            expected[len(leaves) + i] = expected[len(leaves) + i] * mask_of[name]
    assert_same_run(got, (ref_out, ref_states, expected))


# --- 4. gradcheck of the recurrence ---------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_steps", ["fresh", "variational"])
@pytest.mark.parametrize("variable_length", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_recurrence_gradcheck_and_values(mode, variable_length, mask_steps, bias):
    steps, batch, feats, hidden = 3, 2, 2, 2
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.requires_grad_()

    x = rand(steps, batch, feats)
    h0, c0 = rand(batch, hidden), rand(batch, hidden)
    w_ih, w_hh = rand(gates * hidden, feats, scale=0.7), rand(gates * hidden, hidden, scale=0.7)
    b_ih = rand(gates * hidden, scale=0.3) if bias else None
    b_hh = rand(gates * hidden, scale=0.3) if bias else None
    mask_t = steps if mask_steps == "fresh" else 1
    mask = torch.tensor([0.0, 2.0], dtype=torch.float64)[
        torch.randint(0, 2, (mask_t, batch, hidden), generator=gen)]
    mask[0, 0, 0] = 2.0  # keep at least one unit so the recurrent path is exercised
    lengths = torch.tensor([1, 3]) if variable_length else None
    is_lstm = mode == "LSTM"

    def fn(x, h0, c0, w_ih, w_hh, *biases):
        b = biases if bias else (None, None)
        state = (h0, c0) if is_lstm else (h0,)
        out, final = recurrence(mode, x, state, w_ih, w_hh, *b, mask, lengths)
        return (out, *final)

    inputs = (x, h0, c0, w_ih, w_hh, *((b_ih, b_hh) if bias else ()))
    if not is_lstm:
        c0.requires_grad_(False)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)

    # values against the NumPy oracle (one layer, one direction)
    with torch.no_grad():
        out, *final = fn(*inputs)
    params = [Params(w_ih.detach().numpy(), w_hh.detach().numpy(),
                     None if b_ih is None else b_ih.detach().numpy(),
                     None if b_hh is None else b_hh.detach().numpy())]
    exp_out, exp_h, exp_c = stacked_forward(
        mode, x.detach().numpy(), h0.detach().numpy()[None],
        c0.detach().numpy()[None] if is_lstm else None, params, num_layers=1,
        bidirectional=False, masks=Masks(recurrent=(mask.numpy()[:, None],)),
        lengths=None if lengths is None else lengths.tolist())
    np.testing.assert_allclose(out.numpy(), exp_out, atol=1e-12)
    np.testing.assert_allclose(final[0].numpy(), exp_h[0], atol=1e-12)
    if is_lstm:
        np.testing.assert_allclose(final[1].numpy(), exp_c[0], atol=1e-12)


@pytest.mark.parametrize("steps, batch, state_grad",
                         [(1, 1, True), (1, 2, False), (4, 1, False), (2, 3, True)])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_recurrence_gradcheck_edge_cases(mode, steps, batch, state_grad):
    """Single steps, single rows, a state that needs no gradient, and the mask's gradient."""
    feats, hidden = 2, 3
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    gen = torch.Generator().manual_seed(1)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    x, h0, c0 = rand(steps, batch, feats), rand(batch, hidden, grad=state_grad), rand(
        batch, hidden, grad=state_grad and mode == "LSTM")
    w_ih, w_hh = rand(gates * hidden, feats), rand(gates * hidden, hidden)
    b_ih, b_hh = rand(gates * hidden), rand(gates * hidden)
    mask = (torch.rand(steps, batch, hidden, generator=gen, dtype=torch.float64) + 0.5)
    mask.requires_grad_()
    lengths = torch.arange(batch, 0, -1).clamp(max=steps) if batch > 1 else None

    def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask):
        state = (h0, c0) if mode == "LSTM" else (h0,)
        out, final = recurrence(mode, x, state, w_ih, w_hh, b_ih, b_hh, mask, lengths)
        return (out, *final)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask), eps=1e-6,
                                    atol=1e-6)


# --- 5. errors ------------------------------------------------------------------------------


RATE_NAMES = ["dropout", "input_dropout", "output_dropout", "recurrent_dropout",
              "weight_dropout"]


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5", None])
@pytest.mark.parametrize("name", RATE_NAMES)
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_bad_probability_names_the_argument(cell, name, value):
    with pytest.raises(ValueError) as info:
        CELLS[cell][0](F_IN, H, num_layers=2, **{name: value})
    assert str(info.value).startswith(f"{name} "), str(info.value)


@pytest.mark.parametrize("value", [0.0, 1.0, 0, 1, 0.5])
def test_boundary_probabilities_accepted(value):
    for name in RATE_NAMES:
        module = rnnreg.LSTM(F_IN, H, num_layers=2, **{name: value})
        assert getattr(module, name) == value


def test_variational_must_be_bool():
    with pytest.raises(ValueError, match="variational"):
        rnnreg.LSTM(F_IN, H, variational=1)


@pytest.mark.parametrize("value", [0, -1, 2.0, True])
@pytest.mark.parametrize("name", ["input_size", "hidden_size", "num_layers"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_bad_sizes_name_the_argument(cell, name, value):
    sizes = dict(input_size=F_IN, hidden_size=H, num_layers=1)
    sizes[name] = value
    with pytest.raises(ValueError, match=name):
        CELLS[cell][0](**sizes)


def test_bad_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity"):
        rnnreg.RNN(F_IN, H, nonlinearity="sigmoid")


@pytest.mark.parametrize("method", ["forward", "forward_with_masks"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_input_errors(cell, method):
    module = build(cell, num_layers=2, bidirectional=True)

    def call(x, hx=None):
        if method == "forward":
            return module(x, hx)
        return module.forward_with_masks(x, hx, no_masks(module))

    for bad_rank in (torch.randn(F_IN), torch.randn(1, T, B, F_IN)):
        with pytest.raises(ValueError, match="input"):
            call(bad_rank)
    with pytest.raises(ValueError, match="input_size"):
        call(torch.randn(T, B, F_IN + 1))
    with pytest.raises(ValueError, match="input_size"):
        call(pack_padded_sequence(torch.randn(T, B, F_IN + 1), LENGTHS, enforce_sorted=False))
    with pytest.raises(ValueError, match="input"):
        call([[0.0] * F_IN] * T)
    good = torch.randn(T, B, F_IN)
    states = [torch.randn(4, B, H), torch.randn(4, B, H)]
    wrong = [torch.randn(4, B + 1, H), torch.randn(2, B, H), torch.randn(4, B, H + 1),
             torch.randn(4, H)]
    for bad in wrong:
        hx = (bad, states[1]) if cell == "LSTM" else bad
        with pytest.raises(ValueError, match="h_0"):
            call(good, hx)
    if cell == "LSTM":
        with pytest.raises(ValueError, match="c_0"):
            call(good, (states[0], torch.randn(4, B + 1, H)))
        with pytest.raises(ValueError, match="tuple"):
            call(good, states[0])
        with pytest.raises(ValueError, match="tuple"):
            call(good, (states[0],))
    else:
        with pytest.raises(ValueError, match="h_0"):
            call(good, (states[0],))
    with pytest.raises(ValueError, match="h_0"):  # unbatched input needs a 2-D state
        call(torch.randn(T, F_IN), (states[0], states[1]) if cell == "LSTM" else states[0])


def test_proj_size_keeps_torch_semantics_on_the_fused_path():
    torch.manual_seed(0)
    ours = rnnreg.LSTM(3, 4, 2, proj_size=2)
    ref = nn.LSTM(3, 4, 2, proj_size=2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3)
    h0, c0 = torch.randn(2, 2, 2), torch.randn(2, 2, 4)
    out, (h, c) = ours(x, (h0, c0))
    out_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(c, c_ref)
    with pytest.raises(ValueError, match="proj_size"):
        rnnreg.LSTM(3, 4, proj_size=2, recurrent_dropout=0.1)
