"""Tests for rnnreg.strategy / STRATEGIES: the table, overrides, errors, and what the layers do."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnreg

KEYWORDS = {"dropout", "input_dropout", "output_dropout", "recurrent_dropout", "weight_dropout",
            "variational", "recurrent_mask"}

# Written from the papers, not from the library's table:
# (input, between, output, recurrent, weight) placements at rate p, and per-sequence masks.
EXPECTED = {
    "none": ((0, 0, 0, 0, 0), False),
    "zaremba": ((1, 1, 1, 0, 0), False),          # Zaremba et al. 2014: non-recurrent only
    "variational": ((1, 1, 1, 1, 0), True),       # Gal & Ghahramani 2016
    "variational_batch": ((1, 1, 1, 1, 0), True),  # the same, one recurrent mask per batch
    "naive": ((1, 1, 1, 1, 0), False),            # recurrent too, fresh masks
    "recurrent_only": ((0, 0, 0, 1, 0), False),
    "awd": ((1, 1, 1, 0, 1), True),               # Merity et al. 2018
}
ORDER = ("input_dropout", "dropout", "output_dropout", "recurrent_dropout", "weight_dropout")
BATCH_MASKS = {"variational_batch"}  # every other strategy keeps Gal's per-sequence masks


def test_strategy_names():
    assert set(rnnreg.STRATEGIES) == set(EXPECTED) | {"zoneout"}
    for name, entry in rnnreg.STRATEGIES.items():
        assert entry.name == name and entry.description


def test_zoneout_strategy_is_krueger_word_level_ptb_at_one_half():
    """Krueger et al. 2017, word-level PTB: zoneout 0.5 on the cells, 0.05 on the hidden
    states, no dropout; other rates keep that 10:1 ratio."""
    settings_ = rnnreg.strategy("zoneout", 0.5)
    assert settings_ == dict(input_dropout=0.0, dropout=0.0, output_dropout=0.0,
                             recurrent_dropout=0.0, weight_dropout=0.0, variational=False,
                             recurrent_mask="sequence", zoneout_cell=0.5, zoneout_hidden=0.05)
    assert rnnreg.strategy("zoneout", 0.2)["zoneout_hidden"] == pytest.approx(0.02)
    module = rnnreg.LSTM(3, 4, **settings_)
    assert (module.zoneout_cell, module.zoneout_hidden) == (0.5, 0.05)


def test_zoneout_overrides_on_any_strategy():
    got = rnnreg.strategy("variational", 0.3, zoneout_hidden=0.1)
    assert got["zoneout_hidden"] == 0.1 and "zoneout_cell" not in got
    with pytest.raises(ValueError, match="zoneout_cell"):
        rnnreg.strategy("zoneout", 1.0)  # a zoneout rate of 1 would never update a unit
    with pytest.raises(ValueError, match="zoneout_hidden"):
        rnnreg.strategy("none", 0.5, zoneout_hidden=1.0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_strategy_settings(name):
    p = 0.35
    settings_ = rnnreg.strategy(name, p)
    assert set(settings_) == KEYWORDS
    on, variational = EXPECTED[name]
    for keyword, flag in zip(ORDER, on):
        assert settings_[keyword] == (p if flag else 0.0), keyword
    assert settings_["variational"] is variational
    assert settings_["recurrent_mask"] == ("batch" if name in BATCH_MASKS else "sequence")


def test_strategy_overrides():
    got = rnnreg.strategy("awd", 0.4, weight_dropout=0.5, input_dropout=0.65, variational=False)
    assert got == dict(input_dropout=0.65, dropout=0.4, output_dropout=0.4, recurrent_dropout=0.0,
                       weight_dropout=0.5, variational=False, recurrent_mask="sequence")
    assert rnnreg.strategy("variational", 0.3, recurrent_mask="batch")["recurrent_mask"] == "batch"
    assert rnnreg.strategy("none", 0.9, recurrent_dropout=0.2)["recurrent_dropout"] == 0.2


def test_a_strategy_gives_a_frozen_record():
    first = rnnreg.strategy("zaremba", 0.5)
    with pytest.raises(TypeError):
        first["dropout"] = 0.9
    with pytest.raises(FrozenInstanceError):
        first.dropout = 0.9
    assert rnnreg.strategy("zaremba", 0.5)["dropout"] == 0.5


@pytest.mark.parametrize("call, word", [
    (lambda: rnnreg.strategy("dropconnect", 0.5), "dropconnect"),
    (lambda: rnnreg.strategy("Zaremba", 0.5), "Zaremba"),
    (lambda: rnnreg.strategy("zaremba", 0.5, hidden_dropout=0.1), "hidden_dropout"),
    (lambda: rnnreg.strategy("zaremba", 1.5), "p"),
    (lambda: rnnreg.strategy("zaremba", float("nan")), "p"),
    (lambda: rnnreg.strategy("zaremba", 0.5, input_dropout=-0.1), "input_dropout"),
    (lambda: rnnreg.strategy("zaremba", 0.5, weight_dropout=True), "weight_dropout"),
    (lambda: rnnreg.strategy("variational", 0.5, recurrent_mask="row"), "recurrent_mask"),
])
def test_strategy_errors(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_strategy_non_bool_variational_is_rejected_somewhere():
    with pytest.raises(ValueError, match="variational"):
        rnnreg.LSTM(3, 4, 2, **rnnreg.strategy("zaremba", 0.5, variational="yes"))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(EXPECTED)), p=st.floats(0.0, 1.0),
       cell=st.sampled_from(["LSTM", "GRU", "RNN"]))
def test_any_strategy_and_rate_builds_a_layer(name, p, cell):
    settings_ = rnnreg.strategy(name, p)
    assert set(settings_) == KEYWORDS
    on, variational = EXPECTED[name]
    assert [settings_[k] for k in ORDER] == [p if flag else 0.0 for flag in on]
    module = getattr(rnnreg, cell)(3, 4, num_layers=2, **settings_)
    for keyword, value in settings_.items():
        assert getattr(module, keyword) == value
    masks = module.sample_masks(3, 2)
    t = 1 if variational else 3
    present = [masks.input, masks.between[0], masks.output, masks.recurrent[0], masks.weight[0]]
    for mask, flag in zip(present, on):
        assert (mask is not None) == bool(flag and p > 0)
    for mask in present[:4]:  # the weight mask has no time dimension
        assert mask is None or mask.shape[0] == t
    with torch.no_grad():
        out, _ = module(torch.randn(3, 2, 3))
    assert out.shape == (3, 2, 4) and bool(torch.isfinite(out).all())


def _torch_layers(ours, cell: str) -> list[nn.Module]:
    """One single-layer torch.nn module per layer of ``ours``, holding the same weights."""
    layers, weights = [], ours.state_dict()
    for k in range(ours.num_layers):
        layer = getattr(nn, cell)(ours.input_size if k == 0 else ours.hidden_size,
                                  ours.hidden_size)
        layer.load_state_dict({name.replace(f"_l{k}", "_l0"): w for name, w in weights.items()
                               if name.endswith(f"_l{k}")})
        layers.append(layer)
    return layers


def _hand_rolled_zaremba(layers, x, masks, lengths=None):
    """The paper's placements written with torch.nn layers and explicit masks, time-major."""
    x = x * masks.input
    finals = []
    for k, layer in enumerate(layers):
        if k:
            x = x * masks.between[k - 1]
        if lengths is None:
            x, state = layer(x)
        else:
            out, state = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
            x, _ = pad_packed_sequence(out, total_length=x.size(0))
        finals.append(state if isinstance(state, tuple) else (state,))
    states = tuple(torch.cat([f[i] for f in finals]) for i in range(len(finals[0])))
    return x * masks.output, states


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_zaremba_training_forward_is_the_hand_rolled_equivalent(cell, num_layers):
    """Zaremba's placements: dropout on the input, between the layers and on the output.

    The masks are the ones the layer draws (``sample_masks`` under the same seed); the oracle
    applies them around plain torch.nn layers holding the same weights.
    """
    p = 0.5
    between = p if num_layers > 1 else 0.0  # torch warns about dropout with one layer
    ours = getattr(rnnreg, cell)(4, 6, num_layers, **rnnreg.strategy("zaremba", p,
                                                                      dropout=between))
    assert (ours.input_dropout, ours.output_dropout) == (p, p)
    x = torch.randn(5, 3, 4)
    torch.manual_seed(11)
    out, state = ours(x)
    torch.manual_seed(11)
    masks = ours.sample_masks(5, 3)
    assert len([m for m in masks.between if m is not None]) == num_layers - 1
    ref_out, ref_state = _hand_rolled_zaremba(_torch_layers(ours, cell), x, masks)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(state if cell == "LSTM" else (state,), ref_state):
        torch.testing.assert_close(a, b)


def test_zaremba_training_forward_on_packed_input():
    p = 0.5
    ours = rnnreg.LSTM(4, 6, 2, batch_first=True, **rnnreg.strategy("zaremba", p))
    x, lengths = torch.randn(3, 5, 4), torch.tensor([2, 5, 3])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    torch.manual_seed(5)
    out, (h, c) = ours(packed)
    torch.manual_seed(5)
    masks = ours.sample_masks(5, 3)
    ref_out, (ref_h, ref_c) = _hand_rolled_zaremba(_torch_layers(ours, "LSTM"),
                                                   x.transpose(0, 1), masks, lengths)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
    padded, out_lengths = pad_packed_sequence(out)
    assert torch.equal(out_lengths, lengths)
    torch.testing.assert_close(padded, ref_out)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_none_strategy_equals_torch_in_training(cell):
    ours = getattr(rnnreg, cell)(4, 6, 2, bidirectional=True, **rnnreg.strategy("none", 0.5))
    ref = getattr(nn, cell)(4, 6, 2, bidirectional=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])


@pytest.mark.parametrize("name", ["naive", "recurrent_only"])
def test_fresh_recurrent_strategies_use_a_new_recurrent_mask_each_step(name):
    module = rnnreg.LSTM(3, 32, 2, **rnnreg.strategy(name, 0.5))
    torch.manual_seed(0)
    masks = module.sample_masks(4, 5)
    for rec in masks.recurrent:
        assert rec.shape == (4, 1, 5, 32)
        assert not torch.equal(rec[0], rec[1])


@pytest.mark.parametrize("name", ["variational", "awd"])
def test_variational_strategies_keep_one_mask_per_sequence(name):
    module = rnnreg.GRU(3, 8, 2, **rnnreg.strategy(name, 0.5))
    masks = module.sample_masks(6, 5)
    for mask in (masks.input, *masks.between, *masks.recurrent, masks.output):
        assert mask is None or mask.shape[0] == 1
    assert (masks.weight[0] is not None) == (name == "awd")
    assert (masks.recurrent[0] is not None) == (name == "variational")
