"""Figures: placement diagrams follow the model's own settings; every plot writes a real PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rnnreg import cli
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir import RunDir, RunDirError
from rnnreg.study.plots import (
    hidden_heatmaps,
    learning_curves,
    placement_diagram,
    placements_of,
    plot_runs,
    rate_curve,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _model(**settings) -> LanguageModel:
    return LanguageModel(10, Config(hidden_size=8, **settings))


def _is_png(path: Path) -> bool:
    data = Path(path).read_bytes()
    return data.startswith(PNG) and len(data) > 1000


@pytest.mark.parametrize("strategy, dropped, variational", [
    ("none", set(), False),
    ("zaremba", {"input", "between", "output"}, False),
    ("variational", {"input", "between", "output", "recurrent"}, True),
    ("recurrent_only", {"recurrent"}, False),
    ("awd", {"input", "between", "output", "weight"}, True),
])
def test_placements_are_read_from_the_modules(strategy, dropped, variational):
    model = _model(strategy=strategy, dropout=0.4)
    placements = placements_of(model)
    assert placements.rates == {
        "embedding": model.embedding_dropout, "input": model.rnn.input_dropout,
        "between": model.rnn.dropout, "recurrent": model.rnn.recurrent_dropout,
        "weight": model.rnn.weight_dropout, "output": model.output_dropout}
    assert placements.variational is model.rnn.variational is variational
    assert set(placements.dropped) == dropped
    assert all(placements.rates[name] == 0.4 for name in dropped)


def test_placements_follow_overrides_not_the_strategy_table():
    model = _model(strategy="zaremba", dropout=0.5, recurrent_dropout=0.2,
                   embedding_dropout=0.1)
    placements = placements_of(model)
    assert placements.rates["recurrent"] == 0.2 == model.rnn.recurrent_dropout
    assert placements.rates["embedding"] == 0.1
    assert placements.schedule("input") == "fresh mask each step"
    assert "per window" in placements.schedule("embedding")


@pytest.mark.filterwarnings("ignore:dropout option adds dropout:UserWarning")
def test_one_layer_has_no_between_placement():
    placements = placements_of(_model(strategy="zaremba", dropout=0.5, num_layers=1))
    assert placements.layers == 1 and placements.rates["between"] == 0.0


@pytest.mark.parametrize("strategy", ["none", "naive", "awd"])
def test_placement_diagram_draws_a_png(strategy, tmp_path):
    path = placement_diagram(_model(strategy=strategy, dropout=0.5), tmp_path / "d.png",
                             title=strategy)
    assert _is_png(path)


def test_curves_rates_and_heatmaps_draw_pngs(tmp_path):
    records = [{"epoch": e, "train_ppl": 100 / e, "valid_ppl": 120 / e + e} for e in (1, 2, 3)]
    assert _is_png(learning_curves({"a": records, "b": records[:1], "empty": []},
                                   tmp_path / "c.png", title="curves"))
    series = {"none": [{"rate": 0.0, "valid": 120.0, "test": 115.0}],
              "zaremba": [{"rate": 0.5, "valid": 90.0, "test": 86.0, "valid_std": 1.0,
                           "test_std": 0.5},
                          {"rate": 0.2, "valid": 100.0, "test": 95.0, "valid_std": None,
                           "test_std": None}]}
    assert _is_png(rate_curve(series, tmp_path / "r.png"))
    rng = np.random.default_rng(0)
    panels = {"no dropout": rng.normal(size=(6, 4)), "masked": np.zeros((6, 4))}
    assert _is_png(hidden_heatmaps(panels, tmp_path / "h.png", tokens=list("abcdef")))


def test_plots_reject_empty_or_malformed_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        learning_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        hidden_heatmaps({"flat": np.zeros(5)}, tmp_path / "x.png")


def test_no_pyplot_state_is_left_behind(tmp_path):
    placement_diagram(_model(strategy="zaremba", dropout=0.5), tmp_path / "d.png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []


def _fake_run(path: Path, train_ppls: list[float], final: bool = False) -> Path:
    run = RunDir(path).create(exist_ok=False)
    run.write_config({"config": Config().to_dict()})
    for epoch, ppl in enumerate(train_ppls, 1):
        run.append_metrics({"event": "epoch", "epoch": epoch, "train_ppl": ppl,
                            "valid_ppl": ppl + 10, "tokens_per_s": 1.0,
                            "train_seconds": 60.0 * epoch})
    if final:
        run.append_metrics({"event": "final", "valid_ppl": 120.0, "test_ppl": 115.0,
                            "train_seconds": 60.0 * len(train_ppls) + 30})
    return path


def test_plot_command_draws_runs_side_by_side(tmp_path, capsys):
    runs = [_fake_run(tmp_path / name, [200.0, 150.0, 140.0]) for name in ("a", "b")]
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _is_png(out)


def test_plot_runs_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_plot_against_training_minutes_includes_the_final_point(tmp_path, monkeypatch):
    drawn = {}

    def spy(runs, path, *, title=None, x="epoch"):
        drawn.update(runs=runs, x=x)
        return real(runs, path, title=title, x=x)

    import rnnreg.study.plots as plots_module

    real = plots_module.learning_curves
    monkeypatch.setattr(plots_module, "learning_curves", spy)
    run = _fake_run(tmp_path / "budget", [200.0, 150.0], final=True)
    out = tmp_path / "minutes.png"
    assert cli.main(["plot", str(run), "--out", str(out), "--x", "minutes"]) == 0
    assert _is_png(out) and drawn["x"] == "minutes"
    assert [r["event"] for r in drawn["runs"]["budget"]] == ["epoch", "epoch", "final"]
    with pytest.raises(ValueError, match="x must be one of"):
        learning_curves({"a": drawn["runs"]["budget"]}, tmp_path / "bad.png", x="steps")
