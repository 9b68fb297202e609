"""Per-layer hidden sizes: rnnreg.StackedRNN, Config.layer_sizes and the ``awd`` preset."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnreg import cli
from rnnreg.cli import training as cli_training
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.vocab import EOS, Vocabulary
from rnnreg.lm.distributed import World
from rnnreg.lm.evaluation import load_model, score_stream
from rnnreg.lm.generation import sample_text
from rnnreg.lm.model import LanguageModel, count_parameters, detach_state, map_state
from rnnreg.lm.presets import PRESETS, preset_config
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.training.loop import train
from rnnreg.nn import LSTM, DropoutMasks
from rnnreg.nn.stack import StackedRNN

SIZES = (7, 9, 4)
INPUT = 5
_TORCH = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# Every placement on, so eval mode has something to turn off.
REGULARIZED = dict(dropout=0.5, input_dropout=0.3, output_dropout=0.4, recurrent_dropout=0.2,
                   weight_dropout=0.3)


def _stack(cell: str = "lstm", **settings) -> StackedRNN:
    torch.manual_seed(0)
    return StackedRNN(cell, INPUT, SIZES, **settings)


def _states(cell: str, batch: int, generator: torch.Generator):
    def one(size):
        return torch.randn(1, batch, size, generator=generator)

    if cell == "lstm":
        return tuple((one(size), one(size)) for size in SIZES)
    return tuple(one(size) for size in SIZES)


def _ones_masks(cell: str, steps: int, batch: int) -> DropoutMasks:
    return DropoutMasks(
        input=torch.ones(steps, batch, INPUT),
        between=tuple(torch.ones(steps, batch, size) for size in SIZES[:-1]),
        recurrent=tuple(torch.ones(steps, 1, batch, size) for size in SIZES),
        weight=tuple(torch.ones(1, _GATES[cell] * size, size) for size in SIZES),
        output=torch.ones(steps, batch, SIZES[-1]))


# --------------------------------------------------------------------------- the stack


def test_parameters_are_those_of_one_torch_lstm_per_layer():
    expected = sum(p.numel() for n_in, n_out in zip((INPUT, *SIZES[:-1]), SIZES)
                   for p in nn.LSTM(n_in, n_out).parameters())
    stack = _stack()
    assert sum(p.numel() for p in stack.parameters()) == expected
    assert stack.hidden_size == 4 and stack.num_layers == 3 and stack.layer_sizes == SIZES


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_eval_equals_chained_torch_layers_with_the_same_weights(cell):
    stack = _stack(cell, variational=True, **REGULARIZED).eval()
    oracle = []
    for n_in, n_out, layer in zip((INPUT, *SIZES[:-1]), SIZES, stack.layers):
        reference = _TORCH[cell](n_in, n_out)
        with torch.no_grad():
            for name, parameter in reference.named_parameters():
                parameter.copy_(getattr(layer, name))
        oracle.append(reference)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, INPUT, generator=generator)
    states = _states(cell, 3, generator)
    with torch.no_grad():
        out, finals = stack(x, states)
        expected, expected_finals = x, []
        for reference, state in zip(oracle, states):
            expected, final = reference(expected, state)
            expected_finals.append(final)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(finals) == len(SIZES)
    for final, reference, size in zip(finals, expected_finals, SIZES):
        ours, theirs = (final, reference) if cell == "lstm" else ((final,), (reference,))
        assert [tuple(t.shape) for t in ours] == [(1, 3, size)] * len(theirs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("variational", [False, True])
def test_all_ones_masks_give_the_eval_output(cell, variational):
    stack = _stack(cell, variational=variational, **REGULARIZED)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, INPUT, generator=generator)
    states = _states(cell, 2, generator)
    with torch.no_grad():
        expected, expected_state = stack.eval()(x, states)
        out, state = stack.train().forward_with_masks(x, states, _ones_masks(cell, 5, 2))
        dropped, _ = stack(x, states)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dropped, expected, atol=1e-4)  # training does drop something


def test_forward_in_training_is_sampled_masks_then_forward_with_masks():
    stack = _stack(variational=True, **REGULARIZED).train()
    x = torch.randn(6, 3, INPUT, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(9)
    masks = stack.sample_masks(6, 3)
    with torch.no_grad():
        expected, _ = stack.forward_with_masks(x, None, masks)
        torch.manual_seed(9)
        out, _ = stack(x)
    torch.testing.assert_close(out, expected)


def test_per_sequence_masks_are_one_per_sequence_and_reused_at_every_step():
    stack = _stack(variational=True, **REGULARIZED)
    masks = stack.sample_masks(8, 3)
    assert masks.input.shape == (1, 3, INPUT) and masks.output.shape == (1, 3, 4)
    assert [m.shape for m in masks.between] == [(1, 3, 7), (1, 3, 9)]
    assert [m.shape for m in masks.recurrent] == [(1, 1, 3, s) for s in SIZES]
    assert [m.shape for m in masks.weight] == [(1, 4 * s, s) for s in SIZES]
    # Applied at every step: masking the input with the one mask up front is the same thing.
    input_only = _stack(variational=True, input_dropout=0.5)
    masks = input_only.sample_masks(8, 3)
    assert bool((masks.input == 0).any())
    x = torch.randn(8, 3, INPUT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, _ = input_only.forward_with_masks(x, None, masks)
        expected, _ = input_only.eval()(x * masks.input)
    torch.testing.assert_close(out, expected)


def test_fresh_masks_change_every_step():
    masks = _stack(**REGULARIZED).sample_masks(8, 3)
    assert masks.input.shape == (8, 3, INPUT)
    assert [m.shape for m in masks.between] == [(8, 3, 7), (8, 3, 9)]
    assert not torch.equal(masks.between[1][0], masks.between[1][1])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="layer_sizes"):
        StackedRNN("lstm", 4, (8, 0))
    with pytest.raises(ValueError, match="layer_sizes"):
        StackedRNN("lstm", 4, ())
    with pytest.raises(ValueError, match="cell"):
        StackedRNN("transformer", 4, (8, 4))
    with pytest.raises(ValueError, match="per-layer states"):
        _stack()(torch.randn(2, 1, INPUT), (torch.zeros(1, 1, 7),))
    with pytest.raises(ValueError, match="time-major"):
        _stack()(torch.randn(2, INPUT))


@pytest.mark.parametrize("keyword, value", [
    ("dropout", 1.5), ("input_dropout", -0.1), ("output_dropout", float("nan")),
    ("recurrent_dropout", 2.0), ("weight_dropout", -1.0), ("zoneout_hidden", 1.0),
    ("recurrent_mask", "row"),
])
def test_every_rate_is_refused_by_name_once_checked_where_it_acts(keyword, value):
    """The stack checks the rates it applies; the ones inside the recurrence are checked by its
    layers as they are built, with the same message a layer built directly gives."""
    with pytest.raises(ValueError, match=keyword) as from_stack:
        StackedRNN("lstm", 4, (8, 4), **{keyword: value})
    if keyword not in ("input_dropout", "output_dropout"):  # a layer's own keywords too
        with pytest.raises(ValueError) as from_layer:
            LSTM(4, 8, 2, **{keyword: value})
        assert str(from_stack.value) == str(from_layer.value)


def test_the_stack_reports_the_rates_its_layers_apply():
    stack = StackedRNN("lstm", 4, (8, 4), recurrent_dropout=0.2, weight_dropout=0.3,
                       variational=True, recurrent_mask="batch", zoneout_hidden=0.1)
    assert (stack.recurrent_dropout, stack.weight_dropout, stack.recurrent_mask,
            stack.zoneout_hidden, stack.zoneout_cell) == (0.2, 0.3, "batch", 0.1, 0.0)
    assert all((layer.recurrent_dropout, layer.weight_dropout) == (0.2, 0.3)
               for layer in stack.layers)


# --------------------------------------------------------------------------- config and model


def test_layer_sizes_are_validated_by_name():
    Config(hidden_size=8, num_layers=2, layer_sizes=(16, 8))
    for bad in [dict(layer_sizes=(16, 8, 8)),                  # length != num_layers
                dict(layer_sizes=(0, 8)), dict(layer_sizes=(-3, 8)),
                dict(layer_sizes=(16, 8.0)), dict(layer_sizes="16,8"),
                dict(layer_sizes=(16, 12))]:                   # last != hidden_size
        with pytest.raises(ValueError, match="layer_sizes"):
            Config(hidden_size=8, num_layers=2, **bad)
    with pytest.raises(ValueError, match="tie_weights.*layer_sizes"):
        Config(hidden_size=8, num_layers=2, layer_sizes=(16, 8), embedding_size=16,
               tie_weights=True)


def test_layer_sizes_round_trip_through_json():
    config = Config(hidden_size=8, num_layers=3, layer_sizes=[16, 12, 8])
    assert config.layer_sizes == (16, 12, 8)
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.layer_sizes == (16, 12, 8)
    assert hash(again) == hash(config)


def test_uniform_sizes_keep_the_single_torch_layer_and_its_keys():
    plain = LanguageModel(20, Config(hidden_size=8, num_layers=2))
    uniform = LanguageModel(20, Config(hidden_size=8, num_layers=2, layer_sizes=(8, 8)))
    assert type(uniform.rnn) is LSTM
    assert list(uniform.state_dict()) == list(plain.state_dict())


def test_stacked_model_ties_its_last_layer_to_the_embedding():
    model = LanguageModel(20, Config(hidden_size=8, num_layers=2, layer_sizes=(16, 8),
                                     tie_weights=True, strategy="awd", strategy_p=0.3))
    assert isinstance(model.rnn, StackedRNN) and model.tied
    assert model.decoder.in_features == 8 and model.embedding.embedding_dim == 8
    ids = torch.randint(0, 20, (5, 2))
    out = model(ids)
    assert out.logits.shape == (5, 2, 20)
    assert [tuple(s.shape) for s, _ in out.state] == [(1, 2, 16), (1, 2, 8)]
    again = model(ids, detach_state(out.state))  # the carried state feeds the next window
    assert again.logits.shape == (5, 2, 20)


def test_nested_state_helpers_keep_the_nesting():
    state = ((torch.ones(1, 4, 3), torch.ones(1, 4, 3)), (torch.ones(1, 4, 2),) * 2)
    halved = map_state(state, lambda s: s.to(torch.bfloat16))
    assert halved[1][0].dtype == torch.bfloat16 and len(halved) == 2 and len(halved[0]) == 2
    shard = World(rank=1, size=2, distributed=True).shard_columns(state)
    assert [tuple(s.shape) for pair in shard for s in pair] == [(1, 2, 3)] * 2 + [(1, 2, 2)] * 2
    assert World().gather_columns(state) is state


def test_mc_dropout_and_generation_run_on_a_stacked_model():
    torch.manual_seed(0)
    config = Config(hidden_size=6, num_layers=3, layer_sizes=(10, 12, 6), strategy="awd",
                    strategy_p=0.3, embedding_dropout=0.1)
    model = LanguageModel(15, config)
    ids = torch.randint(0, 15, (60,), generator=torch.Generator().manual_seed(5))
    mc = score_stream(model, ids, bptt=7, mc_samples=3)
    assert math.isfinite(mc.perplexity) and mc.tokens == 59
    # Without dropout the MC average of identical passes is the deterministic score.
    quiet = LanguageModel(15, config.replace(strategy="none", strategy_p=0.0,
                                             embedding_dropout=0.0))
    assert score_stream(quiet, ids, bptt=7, mc_samples=3).perplexity == pytest.approx(
        score_stream(quiet, ids, bptt=7).perplexity, rel=1e-5)
    vocab = Vocabulary((EOS, *(f"w{i}" for i in range(12))))
    text = sample_text(LanguageModel(len(vocab), config), vocab, "w1 w2", words=4)
    assert text.startswith("w1 w2")


# --------------------------------------------------------------------------- training


def _quiet_train(config: Config, out: Path, data_dir: Path, **kwargs) -> dict:
    return train(config, out, data_dir=data_dir, progress=False, verbose=False, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_stacked_model_trains_and_resumes_exactly(cell, tmp_path, tiny_corpus):
    config = Config(cell=cell, hidden_size=8, num_layers=2, layer_sizes=(16, 8),
                    tie_weights=True, strategy="awd", strategy_p=0.2, weight_dropout=0.3,
                    batch_size=4, bptt=5, epochs=1, train_tokens=400, init_range=0.2,
                    eval_bptt=50, checkpoint_minutes=0.0, device="cpu", seed=5)
    reference = tmp_path / "reference"
    summary = _quiet_train(config, reference, tiny_corpus)
    assert math.isfinite(summary["test_ppl"]) and summary["parameters"] > 0

    def interrupt(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="resume=True"):
        _quiet_train(config, run, tiny_corpus, on_step=interrupt)
    saved = load_tree(run / "checkpoints" / "last.safetensors")
    assert saved["progress"]["step"] == 5
    hidden = saved["hidden"]
    per_layer = [tuple(s.shape) for s in (hidden if cell == "gru" else
                                          [t for pair in hidden for t in pair])]
    expected = [(1, 4, 16), (1, 4, 8)] if cell == "gru" else [(1, 4, 16)] * 2 + [(1, 4, 8)] * 2
    assert per_layer == expected
    resumed = _quiet_train(config, run, tiny_corpus, resume=True)
    weights = load_tree(run / "checkpoints" / "last.safetensors")["model"]
    for name, tensor in load_tree(reference / "checkpoints" / "last.safetensors")[
            "model"].items():
        assert torch.equal(weights[name], tensor), name
    assert resumed["test_ppl"] == summary["test_ppl"]
    model, _, loaded = load_model(run, device="cpu")
    assert loaded.layer_sizes == (16, 8) and isinstance(model.rnn, StackedRNN)


# --------------------------------------------------------------------------- preset and CLI


def test_awd_preset_is_the_published_recipe_with_24m_parameters():
    preset = PRESETS["awd"]
    config = preset.config()
    assert preset.paper == {"valid": 60.0, "test": 57.3}
    assert "24M" in preset.note and "fine-tuning" in preset.note
    assert (config.layer_sizes, config.num_layers, config.hidden_size) == ((1150, 1150, 400),
                                                                          3, 400)
    assert config.embedding_dim == 400 and config.tie_weights
    settings = config.regularization
    assert (settings["input_dropout"], settings["dropout"], settings["output_dropout"],
            settings["weight_dropout"], settings["variational"]) == (0.4, 0.25, 0.4, 0.5, True)
    assert config.embedding_dropout == 0.1
    assert (config.activation_reg, config.temporal_activation_reg) == (2.0, 1.0)
    # AWD's mean-over-steps numbers, moved onto rnnreg's loss summed over the 70 steps.
    assert config.bptt == 70 and config.variable_bptt
    assert config.lr == pytest.approx(30 / 70) and config.clip_norm == pytest.approx(0.25 * 70)
    assert config.weight_decay == pytest.approx(1.2e-6 * 70)
    assert config.optimizer == "asgd" and config.asgd_nonmono == 5
    assert config.lr_at(config.epochs) == config.lr  # no decay: NT-ASGD only
    assert (config.batch_size, config.epochs, config.seed) == (20, 500, 141)
    with torch.device("meta"):
        model = LanguageModel(10_000, config)
    assert isinstance(model.rnn, StackedRNN) and model.tied
    lstm = (4 * 1150 * (400 + 1150) + 8 * 1150 + 4 * 1150 * (1150 + 1150) + 8 * 1150
            + 4 * 400 * (1150 + 400) + 8 * 400)
    assert count_parameters(model) == 10_000 * 400 + lstm + 10_000 == 24_221_600
    assert abs(count_parameters(model) - 24e6) < 1e6


@pytest.mark.parametrize("flags, sizes, layers, hidden", [
    (["--layer-sizes", "16", "8"], (16, 8), 2, 8),
    (["--layer-sizes", "12,10,6"], (12, 10, 6), 3, 6),
    (["--preset", "awd", "--layer-sizes", "none"], None, 3, 400),
])
def test_layer_sizes_flag(flags, sizes, layers, hidden, tmp_path, monkeypatch):
    """The config ``rnnreg train FLAGS`` hands to ``rnnreg.train`` (replaced: nothing trains)."""
    handed = []
    monkeypatch.setattr(cli_training, "train", lambda config, out, **_: handed.append(config) or {})
    assert cli.main(["train", "--out", str(tmp_path / "run"), *flags]) == 0
    (config,) = handed
    assert (config.layer_sizes, config.num_layers, config.hidden_size) == (sizes, layers, hidden)
    preset = "awd" if "awd" in flags else "small"
    assert config.replace(layer_sizes=None, num_layers=layers, hidden_size=hidden) == (
        preset_config(preset).replace(layer_sizes=None, num_layers=layers, hidden_size=hidden))


def test_layer_sizes_flag_rejects_non_integers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--layer-sizes", "16", "big"])
    assert "--layer-sizes" in capsys.readouterr().err
