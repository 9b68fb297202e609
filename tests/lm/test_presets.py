"""Tests for the presets: every one builds, and the paper's recipes and numbers are right."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rnnreg import cli
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel, count_parameters
from rnnreg.lm.presets import PRESETS, preset_config
from support import REPO_ROOT

TINY_VOCAB = 50


def _lstm_parameters(vocab: int, config: Config) -> int:
    """Embedding, LSTM layers of the config's sizes, decoder (its matrix unless tied)."""
    sizes = config.layer_sizes or (config.hidden_size,) * config.num_layers
    inputs = (config.embedding_size or config.hidden_size, *sizes[:-1])
    layers = sum(4 * h * (i + h) + 8 * h for i, h in zip(inputs, sizes))
    decoder = vocab + (0 if config.tie_weights else vocab * sizes[-1])
    return vocab * inputs[0] + layers + decoder


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_config_and_a_model(name):
    config = preset_config(name)
    # What a run directory stores: strict JSON (no NaN/Infinity) that rebuilds the same config.
    saved = json.dumps(config.to_dict(), allow_nan=False)
    assert Config.from_dict(json.loads(saved)) == config
    torch.manual_seed(0)
    with torch.no_grad():
        model = LanguageModel(TINY_VOCAB, config)
        assert count_parameters(model) == _lstm_parameters(TINY_VOCAB, config)
        for parameter in model.parameters():
            assert parameter.abs().max() <= config.init_range
        out = model.eval()(torch.zeros(3, 2, dtype=torch.long))
    assert out.logits.shape == (3, 2, TINY_VOCAB)


def test_the_paper_presets_are_present():
    assert {"small", "medium", "large"} <= set(PRESETS)
    assert all(preset.source for preset in PRESETS.values())


WIDTH = 100  # the listing must not wrap in a 100-column terminal


def _listing(capsys, *name: str) -> list[str]:
    assert cli.main(["presets", *name]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    return lines


def _table(capsys) -> dict[str, dict[str, str]]:
    """The listing's rows by preset name, each a mapping header -> cell (cells hold no spaces)."""
    header, *rows = _listing(capsys)
    columns = header.split()
    table = {}
    for line in rows[:rows.index("")]:  # a blank line separates the rows from the key below
        cells = line.split()
        assert len(cells) == len(columns), line
        assert cells[0] not in table, f"{cells[0]} listed twice"
        table[cells[0]] = dict(zip(columns, cells))
    return table


def test_the_listing_names_each_preset_as_it_is_selected(capsys):
    """``rnnreg presets`` shows every preset under the name ``--preset`` takes, with its recipe."""
    table = _table(capsys)
    with pytest.raises(SystemExit):  # argparse's refusal lists the names --preset takes
        cli.main(["train", "--preset", "nosuch"])
    choices = capsys.readouterr().err.split("choose from ", 1)[1].split(")")[0]
    assert sorted(table) == sorted(PRESETS) == re.findall(r"'([^']+)'", choices)
    for name, row in table.items():
        config = preset_config(name)
        sizes = config.layer_sizes or (config.hidden_size,) * config.num_layers
        layers = (f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1
                  else "-".join(str(size) for size in sizes))
        assert row["cell"] == config.cell and row["layers"] == layers, name
        assert row["strategy"] == config.strategy and float(row["p"]) == config.strategy_p, name
        assert int(row["bptt"]) == config.bptt and int(row["epochs"]) == config.epochs, name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_one_preset_in_full_is_its_config_field_for_field(name, capsys):
    """``rnnreg presets NAME`` carries what the table leaves out: the note, the source and
    every Config field, each value as JSON so that the listing rebuilds the Config."""
    preset = PRESETS[name]
    lines = _listing(capsys, name)
    split = lines.index("config:")
    prose = " ".join(line.strip() for line in lines[:split])
    assert prose.startswith(f"{name}: ")
    assert " ".join(preset.note.split()) in prose and " ".join(preset.source.split()) in prose
    fields = dict(line.strip().split(" = ", 1) for line in lines[split + 1:])
    shown = {key: json.loads(value) for key, value in fields.items()}
    assert shown == json.loads(json.dumps(preset_config(name).to_dict()))  # tuples as lists
    assert Config.from_dict(shown) == preset_config(name)


def test_an_unknown_preset_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["presets", "huge"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "huge" in error and all(name in error for name in PRESETS)


# The published perplexities (valid, test; MC dropout where reported): Zaremba et al. 2014
# Table 1; Gal & Ghahramani 2016 Table 1 (untied, medium and large); Merity et al. 2018
# Table 1 (AWD-LSTM with fine-tuning).
PUBLISHED = {
    "small": {"valid": 120.7, "test": 114.5},
    "medium": {"valid": 86.2, "test": 82.7},
    "large": {"valid": 82.2, "test": 78.4},
    "variational-medium": {"valid": 81.9, "test": 79.7, "test_mc": 78.6},
    "variational-large": {"valid": 77.9, "test": 75.2, "test_mc": 73.4},
    "awd": {"valid": 60.0, "test": 57.3},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_perplexities_are_shown_where_users_read_them(name, capsys):
    assert PRESETS[name].paper == PUBLISHED[name]
    row = _table(capsys)[name]
    for key in ("valid", "test", "test_mc"):
        assert row[key] == str(PUBLISHED[name].get(key, "-")), key
    assert f"paper: {', '.join(f'{k} {v}' for k, v in PUBLISHED[name].items())}" in _listing(
        capsys, name)


# Model sizes on PTB's 10k words as Merity et al. 2018, Table 1 reports them (millions).
PUBLISHED_MILLIONS = {"medium": 20, "variational-medium": 20, "large": 66,
                      "variational-large": 66, "awd": 24}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_presets_have_the_published_model_size(name):
    with torch.device("meta"):  # shapes only: the large models need no memory
        model = LanguageModel(10_000, preset_config(name))
    assert round(count_parameters(model) / 1e6) == PUBLISHED_MILLIONS[name]


# Zaremba et al. 2014, section 4.1, one row per model size.
PAPER_RECIPES = {
    "small": dict(hidden_size=200, num_layers=2, bptt=20, batch_size=20, init_range=0.1,
                  strategy="none", strategy_p=0.0, clip_norm=5.0, epochs=13, lr=1.0),
    "medium": dict(hidden_size=650, num_layers=2, bptt=35, batch_size=20, init_range=0.05,
                   strategy="zaremba", strategy_p=0.5, clip_norm=5.0, epochs=39, lr=1.0),
    "large": dict(hidden_size=1500, num_layers=2, bptt=35, batch_size=20, init_range=0.04,
                  strategy="zaremba", strategy_p=0.65, clip_norm=10.0, epochs=55, lr=1.0),
}


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipes(name):
    config = preset_config(name)
    for field, value in PAPER_RECIPES[name].items():
        assert getattr(config, field) == value, field
    assert config.cell == "lstm" and not config.tie_weights
    assert config.optimizer == "sgd" and config.weight_decay == 0


@pytest.mark.parametrize("name,full_epochs,factor", [
    ("small", 4, 2.0), ("medium", 6, 1.2), ("large", 14, 1.15)])
def test_learning_rate_schedules(name, full_epochs, factor):
    config = preset_config(name)
    schedule = [config.lr_at(epoch) for epoch in range(1, config.epochs + 1)]
    assert schedule[:full_epochs] == [1.0] * full_epochs
    for epoch in range(full_epochs + 1, config.epochs + 1):
        expected = factor ** -(epoch - full_epochs)
        assert schedule[epoch - 1] == pytest.approx(expected, rel=1e-12), epoch


def test_small_lr_halves_after_epoch_four():
    assert [preset_config("small").lr_at(e) for e in range(1, 8)] == [
        1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("name", ["medium", "large"])
def test_regularized_presets_drop_the_non_recurrent_connections(name):
    config = preset_config(name)
    model = LanguageModel(TINY_VOCAB, config.replace(hidden_size=8))
    assert model.rnn.output_dropout == config.strategy_p
    assert model.rnn.input_dropout == config.strategy_p
    assert model.rnn.dropout == config.strategy_p
    assert model.rnn.recurrent_dropout == 0 and model.rnn.weight_dropout == 0
    assert not model.rnn.variational


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="small"):
        preset_config("huge")


def test_no_caller_can_change_a_preset():
    """Presets are data shared by every run in the process: each way to edit one is refused."""
    before = {name: preset_config(name) for name in PRESETS}
    small = PRESETS["small"]
    edits = [
        lambda: PRESETS.__setitem__("tiny", small),
        lambda: PRESETS.pop("small"),
        lambda: setattr(small, "name", "tiny"),
        lambda: small.overrides.__setitem__("hidden_size", 1),
        lambda: small.overrides.pop("hidden_size"),
        lambda: small.paper.__setitem__("test", 1.0),
    ]
    for edit in edits:
        with pytest.raises((TypeError, AttributeError)):
            edit()
    assert {name: preset_config(name) for name in PRESETS} == before
    assert preset_config("small").hidden_size == 200


def test_cpu_30min_preset_is_the_recorded_run():
    """The preset is the configuration of the committed time-to-quality result, field for field."""
    record = REPO_ROOT / "results" / "cpu-30min" / "h400" / "config.json"
    if not record.exists():
        pytest.skip("results/cpu-30min is not in this checkout")
    recorded = Config.from_dict(json.loads(record.read_text())["config"])
    assert preset_config("cpu-30min") == recorded
