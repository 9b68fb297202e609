"""Tests for rnnreg.nn.Regularization: validation, schedules, sampling, the own-loop predicate."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

import rnnreg
from rnnreg.nn import Regularization, Schedule
from rnnreg.nn.engines import engine_for, needs_own_loop
from rnnreg.nn.regularization import MaskSizes

RATES = ("input_dropout", "dropout", "output_dropout", "recurrent_dropout", "weight_dropout",
         "zoneout_hidden", "zoneout_cell")


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", RATES)
@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, True, "0.5", None])
def test_a_bad_rate_is_refused_naming_its_python_parameter(name, value):
    with pytest.raises(rnnreg.RnnregError) as refused:
        Regularization(**{name: value})
    assert refused.value.parameters == (name,)
    assert str(refused.value).startswith(f"{name} must be") and "--" not in str(refused.value)


@pytest.mark.parametrize("name", ["zoneout_hidden", "zoneout_cell"])
def test_a_zoneout_rate_of_one_is_refused(name):
    """At 1 a unit would keep its initial value forever (Krueger et al. 2017)."""
    with pytest.raises(rnnreg.RnnregError, match=f"^{name} must be a probability in \\[0, 1\\)"):
        Regularization(**{name: 1.0})
    assert getattr(Regularization(**{name: 0.99}), name) == 0.99


def test_switches_and_the_recurrent_mask_are_checked():
    with pytest.raises(rnnreg.RnnregError, match="^variational must be True or False"):
        Regularization(variational=1)
    with pytest.raises(rnnreg.RnnregError, match="^recurrent_mask must be one of"):
        Regularization(variational=True, recurrent_mask="row")
    with pytest.raises(rnnreg.RnnregError, match="needs variational=True"):
        Regularization(recurrent_mask="batch")


def test_layers_and_stack_check_their_keywords_through_the_record():
    for build in (lambda **k: rnnreg.LSTM(3, 4, 2, **k), lambda **k: rnnreg.GRU(3, 4, **k),
                  lambda **k: rnnreg.StackedRNN("lstm", 3, (4, 5), **k)):
        with pytest.raises(rnnreg.RnnregError, match="^recurrent_dropout must be"):
            build(recurrent_dropout=2.0)
    with pytest.raises(rnnreg.RnnregError, match="^dropout must be"):
        rnnreg.RNN(3, 4, 2, dropout=-1.0)


def test_a_record_and_keywords_together_are_refused():
    record = rnnreg.strategy("zaremba", 0.5)
    with pytest.raises(rnnreg.RnnregError, match="either as regularization or as keywords"):
        rnnreg.LSTM(3, 4, 2, dropout=0.3, regularization=record)
    with pytest.raises(rnnreg.RnnregError, match="regularization must be"):
        rnnreg.LSTM(3, 4, regularization=dict(record))


def test_zoneout_cell_needs_an_lstm():
    record = Regularization(zoneout_cell=0.2)
    with pytest.raises(rnnreg.RnnregError, match="zoneout_cell needs a cell state"):
        rnnreg.GRU(3, 4, regularization=record)
    with pytest.raises(rnnreg.RnnregError, match="zoneout_cell needs a cell state"):
        rnnreg.StackedRNN("rnn", 3, (4,), zoneout_cell=0.2)


# --- the record as the layers' keywords ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(rnnreg.STRATEGIES))
def test_keywords_and_record_build_the_same_layer(name):
    record = rnnreg.strategy(name, 0.3)
    by_keywords = rnnreg.GRU(3, 4, 2, **record) if not record.zoneout_cell else None
    by_record = rnnreg.LSTM(3, 4, 2, regularization=record)
    assert rnnreg.LSTM(3, 4, 2, **record).regularization == by_record.regularization == record
    if by_keywords is not None:  # a GRU takes every keyword a strategy sets, zoneout_cell aside
        assert by_keywords.regularization == record
    for field in fields(Regularization):
        assert getattr(by_record, field.name) == getattr(record, field.name)


def test_keywords_omit_zoneout_rates_that_are_off():
    assert "zoneout_cell" not in Regularization(zoneout_hidden=0.1)
    assert dict(Regularization(zoneout_cell=0.1))["zoneout_cell"] == 0.1
    assert set(Regularization()) == {"input_dropout", "dropout", "output_dropout",
                                     "recurrent_dropout", "weight_dropout", "variational",
                                     "recurrent_mask"}


def test_state_dict_keys_are_torchs():
    awd = rnnreg.strategy("awd", 0.3)
    for ours, theirs in ((rnnreg.LSTM(3, 4, 2, **awd), torch.nn.LSTM(3, 4, 2)),
                         (rnnreg.GRU(3, 4, 2, bidirectional=True, recurrent_dropout=0.2),
                          torch.nn.GRU(3, 4, 2, bidirectional=True))):
        assert list(ours.state_dict()) == list(theirs.state_dict())


# --- schedules ------------------------------------------------------------------------------

PLACEMENTS = ("input", "between", "recurrent", "weight", "output", "zoneout")


def _measured(module, field: str) -> set[Schedule]:
    """The schedule of a field's masks read from the shapes of two draws (3 steps x 2 rows,
    4 steps x 5 rows): a dimension following the steps is per step, one following only the
    rows per sequence, none per window."""
    small, large = module.sample_masks(3, 2), module.sample_masks(4, 5)

    def tensors(masks):
        value = getattr(masks, field)
        flat = value if isinstance(value, tuple) else (value,)
        flat = [m for item in flat for m in (item if isinstance(item, tuple) else (item,))]
        return [m for m in flat if m is not None]

    found = set()
    for a, b in zip(tensors(small), tensors(large)):
        if a.shape[0] != b.shape[0]:
            found.add(Schedule.STEP)
        else:
            found.add(Schedule.SEQUENCE if a.shape != b.shape else Schedule.WINDOW)
    return found


@pytest.mark.parametrize("name", sorted(rnnreg.STRATEGIES))
def test_each_schedule_is_the_one_its_masks_have(name):
    record = rnnreg.strategy(name, 0.5, zoneout_hidden=0.1)
    for module in (rnnreg.LSTM(3, 4, 2, regularization=record),
                   rnnreg.StackedRNN("lstm", 3, (4, 6), regularization=record)):
        for field in PLACEMENTS:
            measured = _measured(module, field)
            assert measured in (set(), {record.schedule(field)}), (field, measured)


def test_schedules_as_the_papers_give_them():
    assert Regularization(dropout=0.5).schedule("between") == Schedule.STEP  # Zaremba
    gal = Regularization(recurrent_dropout=0.5, variational=True)
    assert gal.schedule("recurrent") == gal.schedule("input") == Schedule.SEQUENCE
    batch = Regularization(recurrent_dropout=0.5, variational=True, recurrent_mask="batch")
    assert batch.schedule("recurrent") == Schedule.WINDOW
    assert Regularization(weight_dropout=0.5).schedule("weight") == Schedule.WINDOW  # AWD
    assert str(Schedule.SEQUENCE) == "one per sequence"


# --- sampling -------------------------------------------------------------------------------


def _keep(shape, p, generator):
    """An inverted-dropout mask drawn independently: uniforms kept where >= p, scaled."""
    return (torch.rand(shape, generator=generator) >= p).float() / (1 - p)


def _zone(shape, rate, generator):
    return (torch.rand(shape, generator=generator) < rate).float()


def test_a_layers_masks_are_the_draws_in_the_documented_order():
    """input, between, recurrent per layer, weight per layer, zoneout per layer, output."""
    record = Regularization(input_dropout=0.1, dropout=0.2, output_dropout=0.3,
                            recurrent_dropout=0.4, weight_dropout=0.5, zoneout_hidden=0.2,
                            zoneout_cell=0.3)
    T, B, F, H = 5, 3, 2, 4
    lstm = rnnreg.LSTM(F, H, 2, regularization=record)
    torch.manual_seed(7)
    masks = lstm.sample_masks(T, B)
    g = torch.Generator().manual_seed(7)
    expected = [_keep((T, B, F), 0.1, g), _keep((T, B, H), 0.2, g),
                _keep((T, 1, B, H), 0.4, g), _keep((T, 1, B, H), 0.4, g),
                _keep((1, 4 * H, H), 0.5, g), _keep((1, 4 * H, H), 0.5, g),
                _zone((T, 1, B, H), 0.2, g), _zone((T, 1, B, H), 0.3, g),
                _zone((T, 1, B, H), 0.2, g), _zone((T, 1, B, H), 0.3, g),
                _keep((T, B, H), 0.3, g)]
    got = [masks.input, *masks.between, *masks.recurrent, *masks.weight,
           *(z for pair in masks.zoneout for z in pair), masks.output]
    assert len(got) == len(expected)
    for ours, oracle in zip(got, expected):
        torch.testing.assert_close(ours, oracle, rtol=0, atol=0)


def test_a_stacks_masks_are_each_layers_then_its_own():
    """Each layer draws what acts in its recurrence, bottom to top; then the stack its input,
    boundaries and output; one mask per sequence when variational."""
    record = Regularization(input_dropout=0.1, dropout=0.2, output_dropout=0.3,
                            recurrent_dropout=0.4, weight_dropout=0.5, variational=True)
    B, F = 3, 2
    stack = rnnreg.StackedRNN("gru", F, (4, 6), regularization=record)
    torch.manual_seed(11)
    masks = stack.sample_masks(9, B)
    g = torch.Generator().manual_seed(11)
    expected = [_keep((1, 1, B, 4), 0.4, g), _keep((1, 12, 4), 0.5, g),
                _keep((1, 1, B, 6), 0.4, g), _keep((1, 18, 6), 0.5, g),
                _keep((1, B, F), 0.1, g), _keep((1, B, 4), 0.2, g), _keep((1, B, 6), 0.3, g)]
    got = [masks.recurrent[0], masks.weight[0], masks.recurrent[1], masks.weight[1],
           masks.input, masks.between[0], masks.output]
    for ours, oracle in zip(got, expected):
        torch.testing.assert_close(ours, oracle, rtol=0, atol=0)
    assert masks.zoneout is None


def test_evaluation_masks_hold_zoneout_at_its_expectation():
    record = Regularization(dropout=0.5, zoneout_hidden=0.2)
    masks = record.evaluation_masks(MaskSizes(3, (4, 5), 2, 3), 6, device="cpu",
                                    dtype=torch.float64)
    assert masks.input is None and masks.output is None and masks.between == (None,)
    assert [pair[1] for pair in masks.zoneout] == [None, None]
    for (hidden, _), h in zip(masks.zoneout, (4, 5)):
        assert torch.equal(hidden, torch.full((1, 2, 6, h), 0.2, dtype=torch.float64))


# --- the own-loop predicate -----------------------------------------------------------------


def _option_sets():
    for name in rnnreg.STRATEGIES:
        yield rnnreg.strategy(name, 0.5)
    yield Regularization(zoneout_hidden=0.1)
    yield Regularization(recurrent_dropout=0.3, variational=True, recurrent_mask="batch")


def test_the_predicate_never_touches_the_random_state():
    for record in _option_sets():
        for module in (rnnreg.LSTM(3, 4, 2, regularization=record),
                       rnnreg.StackedRNN("lstm", 3, (4, 5), regularization=record)):
            for training in (True, False):
                module.train(training)
                state = torch.random.get_rng_state()
                record.needs_own_loop(training)
                needs_own_loop(module)
                engine_for(module)
                assert torch.equal(torch.random.get_rng_state(), state), record


def test_the_predicate_is_the_rule_of_the_papers():
    """Per-row masks on h(t-1) (Gal & Ghahramani 2016) and zoneout (Krueger et al. 2017)
    need the own loop; weights and batch-shared masks do not; evaluation keeps zoneout."""
    assert Regularization(recurrent_dropout=0.2).needs_own_loop(True)
    assert not Regularization(recurrent_dropout=0.2).needs_own_loop(False)
    assert not Regularization(recurrent_dropout=0.2, variational=True,
                              recurrent_mask="batch").needs_own_loop(True)
    assert not Regularization(weight_dropout=0.5, dropout=0.5, input_dropout=0.5,
                              output_dropout=0.5, variational=True).needs_own_loop(True)
    assert Regularization(zoneout_cell=0.1).needs_own_loop(False)


# --- output dropout with the stack ----------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: rnnreg.LSTM(3, 4, 2, **rnnreg.strategy("zaremba", 0.5)),
    lambda: rnnreg.GRU(3, 4, 2, **rnnreg.strategy("variational", 0.5)),
    lambda: rnnreg.StackedRNN("lstm", 3, (5, 4), regularization=rnnreg.strategy("awd", 0.5)),
])
def test_the_stack_gives_its_output_before_and_after_output_dropout(build):
    torch.manual_seed(0)
    module = build()
    x = torch.randn(6, 2, 3)
    masks = module.sample_masks(6, 2)
    output, hidden, _ = module.forward_with_hidden(x, None, masks)
    torch.testing.assert_close(output, hidden * masks.output, rtol=0, atol=0)
    assert torch.equal(module.forward_with_masks(x, None, masks)[0], output)
    module.eval()
    output, hidden, _ = module.forward_with_hidden(x)
    assert torch.equal(output, hidden)
