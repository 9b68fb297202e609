"""Tests for the language model: initialisation, tying, loss scaling, shapes and dropout."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, replace

import pytest
import torch
import torch.nn.functional as F

import rnnreg
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel, ModelMasks, count_parameters
from rnnreg.lm.training.loss import summed_loss
from rnnreg.nn import DropoutMasks

VOCAB = 23


def _model(vocab: int = VOCAB, **overrides) -> LanguageModel:
    settings = dict(hidden_size=12, num_layers=2, init_range=0.1)
    settings.update(overrides)
    return LanguageModel(vocab, Config(**settings))


def _ids(steps: int, batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (steps, batch), generator=torch.Generator().manual_seed(seed))


def _lstm_parameter_count(vocab: int, emb: int, hidden: int, layers: int, tied: bool) -> int:
    rnn = sum(4 * hidden * ((emb if layer == 0 else hidden) + hidden) + 8 * hidden
              for layer in range(layers))
    decoder = (0 if tied else vocab * hidden) + vocab
    return vocab * emb + rnn + decoder


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("init_range", [0.04, 0.1])
def test_every_weight_is_uniform_in_init_range(cell, init_range):
    torch.manual_seed(0)
    model = _model(cell=cell, init_range=init_range, embedding_size=10)
    names = dict(model.named_parameters())
    # Biases and the embedding are included (Zaremba et al. 2014, section 4.1: every weight).
    assert {"embedding.weight", "decoder.weight", "decoder.bias",
            "rnn.bias_ih_l0", "rnn.bias_hh_l1"} <= set(names)
    for name, parameter in names.items():
        values = parameter.detach()
        assert values.abs().max() <= init_range, name
        assert values.std() > 0, f"{name} is constant"
        # Spread over the whole interval, not a narrower default initialisation.
        assert values.max() > 0.5 * init_range and values.min() < -0.5 * init_range, name
    everything = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert abs(float(everything.mean())) < 0.1 * init_range
    # Variance of U(-r, r) is r^2 / 3.
    assert float(everything.var()) == pytest.approx(init_range ** 2 / 3, rel=0.1)


def test_init_range_overrides_torch_defaults_on_large_layers():
    # torch's own LSTM init is U(-1/sqrt(H), 1/sqrt(H)) = +-0.25 for H=16: bigger than 0.01.
    torch.manual_seed(0)
    model = _model(hidden_size=16, init_range=0.01)
    for name, parameter in model.named_parameters():
        assert parameter.detach().abs().max() <= 0.01, name


def test_tie_weights_shares_one_tensor():
    model = _model(tie_weights=True)
    assert model.tied
    assert model.decoder.weight is model.embedding.weight
    with torch.no_grad():
        model.embedding.weight[3, 2] = 7.5
    assert float(model.decoder.weight.detach()[3, 2]) == 7.5
    assert count_parameters(model) == _lstm_parameter_count(VOCAB, 12, 12, 2, tied=True)
    untied = _model()
    assert not untied.tied
    assert count_parameters(untied) == _lstm_parameter_count(VOCAB, 12, 12, 2, tied=False)


def test_tie_weights_gradient_reaches_the_shared_matrix_from_both_ends():
    torch.manual_seed(0)
    model = _model(tie_weights=True)
    out = model(_ids(4, 2))
    summed_loss(out.logits, _ids(4, 2, seed=1)).backward()
    grad = model.embedding.weight.grad
    assert grad is not None
    # Rows of words never fed in still get gradient, through the decoder.
    fed = set(_ids(4, 2).flatten().tolist())
    unfed = [w for w in range(VOCAB) if w not in fed]
    assert unfed and bool(grad[unfed].abs().sum() > 0)


def test_tie_weights_rejects_mismatched_embedding_size():
    with pytest.raises(ValueError, match="tie_weights"):
        Config(hidden_size=12, embedding_size=8, tie_weights=True)


# --------------------------------------------------------------------------- loss


def test_summed_loss_is_the_sum_over_steps_of_the_batch_mean_cross_entropy():
    generator = torch.Generator().manual_seed(1)
    steps, batch, vocab = 6, 3, 11
    logits = torch.randn(steps, batch, vocab, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, vocab, (steps, batch), generator=generator)
    expected = sum(F.cross_entropy(logits[t], targets[t]) for t in range(steps))
    # And once more from first principles: -log softmax, mean over batch, sum over time.
    by_hand = 0.0
    for t in range(steps):
        for b in range(batch):
            row = logits[t, b]
            by_hand += float(torch.logsumexp(row, 0) - row[targets[t, b]]) / batch
    loss = summed_loss(logits, targets)
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    assert float(loss) == pytest.approx(by_hand, rel=1e-12)


def test_summed_loss_scales_with_steps_not_batch():
    logits = torch.zeros(4, 5, 8)          # uniform prediction: log(8) nats per token
    targets = torch.zeros(4, 5, dtype=torch.long)
    assert float(summed_loss(logits, targets)) == pytest.approx(4 * math.log(8.0))


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("strategy", ["none", "zaremba", "variational", "awd"])
def test_forward_shapes(cell, strategy):
    model = _model(cell=cell, strategy=strategy, strategy_p=0.0 if strategy == "none" else 0.2,
                   num_layers=3, embedding_size=7)
    steps, batch = 5, 3
    out = model(_ids(steps, batch))
    assert out.logits.shape == (steps, batch, VOCAB)
    assert out.hidden.shape == (steps, batch, 12)
    assert out.dropped.shape == (steps, batch, 12)
    states = out.state if cell == "lstm" else (out.state,)
    assert len(states) == (2 if cell == "lstm" else 1)
    for state in states:
        assert state.shape == (3, batch, 12)
    # The state carries over into the next window.
    follow = model(_ids(2, batch, seed=5), out.state)
    assert follow.logits.shape == (2, batch, VOCAB)


def test_forward_rejects_non_2d_ids():
    with pytest.raises(ValueError, match=r"\(T, B\)"):
        _model()(torch.zeros(5, dtype=torch.long))


def test_carried_state_matches_one_long_window():
    torch.manual_seed(0)
    model = _model().eval()
    ids = _ids(9, 2)
    whole = model(ids).logits
    first = model(ids[:4])
    second = model(ids[4:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits]), whole)


def test_vocab_size_must_be_at_least_two():
    with pytest.raises(ValueError, match="vocab_size"):
        LanguageModel(1, Config(hidden_size=4))


# --------------------------------------------------------------------------- dropout


def _ones_masks(model: LanguageModel, steps: int, batch: int, layers: int) -> ModelMasks:
    emb, hidden = model.embedding.weight.size(1), model.rnn.hidden_size
    return ModelMasks(
        words=torch.ones(VOCAB),
        rnn=DropoutMasks(input=torch.ones(steps, batch, emb),
                         between=tuple(torch.ones(steps, batch, hidden)
                                       for _ in range(layers - 1)),
                         recurrent=(None,) * layers, weight=(None,) * layers,
                         output=torch.ones(steps, batch, hidden)))


@pytest.mark.parametrize("strategy", ["zaremba", "variational"])
def test_all_ones_masks_give_the_eval_output(strategy):
    torch.manual_seed(0)
    model = _model(strategy=strategy, strategy_p=0.5, embedding_dropout=0.2, num_layers=3)
    ids = _ids(6, 3)
    model.eval()
    expected = model(ids).logits
    model.train()
    masked = model(ids, None, _ones_masks(model, 6, 3, 3)).logits
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    # And training mode without explicit masks really does drop something.
    assert not torch.allclose(model(ids).logits, expected, atol=1e-4)


def test_zero_output_mask_leaves_only_the_decoder_bias():
    torch.manual_seed(0)
    model = _model(strategy="zaremba", strategy_p=0.5, num_layers=2)
    masks = _ones_masks(model, 4, 2, 2)
    masks = ModelMasks(masks.words,
                       replace(masks.rnn, output=torch.zeros_like(masks.rnn.output)))
    logits = model.eval()(_ids(4, 2), None, masks).logits
    torch.testing.assert_close(logits, model.decoder.bias.detach().expand(4, 2, VOCAB))


# A 1-layer stack has no between-layer connection; torch warns about its dropout argument.
@pytest.mark.filterwarnings("ignore:dropout option adds dropout:UserWarning")
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_zaremba_drops_the_l_plus_1_non_recurrent_connections_only(layers):
    p = 0.4
    model = _model(strategy="zaremba", strategy_p=p, num_layers=layers, embedding_size=9)
    steps, batch = 7, 3
    masks = model.sample_masks(steps, batch)
    assert masks.rnn.input is not None and masks.rnn.input.shape == (steps, batch, 9)
    assert len(masks.rnn.between) == layers - 1
    for between in masks.rnn.between:
        assert between is not None and between.shape == (steps, batch, 12)
    # The output is dropped once, by the recurrent stack (the model does not drop it again).
    assert masks.rnn.output is not None and masks.rnn.output.shape == (steps, batch, 12)
    # Never on the recurrence, neither on h(t-1) nor on the recurrent weights.
    assert len(masks.rnn.recurrent) == layers and all(m is None for m in masks.rnn.recurrent)
    assert len(masks.rnn.weight) == layers and all(m is None for m in masks.rnn.weight)
    assert masks.words is None
    applied = [masks.rnn.input, *masks.rnn.between, masks.rnn.output]
    assert len(applied) == layers + 1
    scale = 1 / (1 - p)
    for mask in applied:
        dropped = mask == 0
        assert bool(dropped.any()) and not bool(dropped.all())  # both values occur
        torch.testing.assert_close(mask[~dropped], torch.full_like(mask[~dropped], scale))


def test_variational_masks_are_per_sequence_and_include_the_recurrence():
    model = _model(strategy="variational", strategy_p=0.3, num_layers=2)
    masks = model.sample_masks(8, 3)
    assert masks.rnn.input.shape[0] == 1 and masks.rnn.output.shape[0] == 1
    assert all(m is not None and m.shape[0] == 1 for m in masks.rnn.recurrent)
    assert all(m is None for m in masks.rnn.weight)


def test_no_dropout_strategy_samples_no_masks():
    masks = _model(strategy="none").sample_masks(4, 2)
    assert masks.words is None and masks.rnn.output is None and masks.rnn.input is None
    assert all(m is None for m in (*masks.rnn.between, *masks.rnn.recurrent,
                                   *masks.rnn.weight))


@pytest.mark.parametrize("strategy", ["zaremba", "variational", "naive", "awd"])
def test_eval_turns_every_dropout_off_and_train_turns_it_on(strategy):
    torch.manual_seed(0)
    model = _model(strategy=strategy, strategy_p=0.5, embedding_dropout=0.1)
    ids = _ids(6, 2)
    model.eval()
    first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)
    model.train()
    third, fourth = model(ids).logits, model(ids).logits
    assert not torch.allclose(third, fourth)
    assert not torch.allclose(third, first)


def test_none_strategy_is_deterministic_in_training_mode():
    torch.manual_seed(0)
    model = _model(strategy="none").train()
    ids = _ids(6, 2)
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_regularization_is_made_once_per_config(monkeypatch):
    """A config makes its regularization record when it is built; the model (and the trainer)
    take it from it, and the record is frozen: no caller can change the config's."""
    from rnnreg.nn.strategies import Strategy

    calls = []
    original = Strategy.settings
    monkeypatch.setattr(Strategy, "settings",
                        lambda self, *a, **k: calls.append(self.name) or original(self, *a, **k))
    config = Config(hidden_size=8, strategy="variational", strategy_p=0.3,
                    recurrent_dropout=0.2)
    assert calls == ["variational"]
    model = LanguageModel(10, config)
    with pytest.raises(FrozenInstanceError):
        config.regularization.recurrent_dropout = 0.9
    assert calls == ["variational"]
    assert config.regularization.recurrent_dropout == 0.2 == model.rnn.recurrent_dropout
    assert model.rnn.regularization is config.regularization
    assert config.regularization == rnnreg.strategy("variational", 0.3, recurrent_dropout=0.2)


@pytest.mark.parametrize("changes, word", [
    (dict(strategy_p=1.5), "^strategy_p must be"),
    (dict(between_dropout=-0.2), "between_dropout"),
    (dict(recurrent_dropout=2.0), "recurrent_dropout"),
    (dict(zoneout_hidden=1.0), "zoneout_hidden"),
    (dict(strategy="zoneout", strategy_p=1.0), "zoneout_cell"),  # derived: p * 1
])
def test_a_config_names_the_field_of_a_bad_rate(changes, word):
    with pytest.raises(ValueError, match=word):
        Config(**changes)


def test_a_rate_no_placement_uses_is_refused_naming_the_python_parameters():
    """strategy 'none' places no dropout, so its rate would train without any, silently."""
    with pytest.raises(ValueError) as refused:
        Config(strategy_p=0.5)
    message = str(refused.value)
    assert "strategy_p=0.5" in message and "strategy='none'" in message
    assert "zaremba" in message and "--" not in message  # Python's names, not flags
    assert Config(strategy="none", strategy_p=0.0).regularization.dropout == 0.0
