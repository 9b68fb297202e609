"""Figures: placement diagrams follow the model's own settings; every plot draws its data.

Each figure is checked twice, independently: the ``Figure`` being saved (captured through
matplotlib's own ``Figure.savefig``) must hold the plotted numbers in its lines, images and
labels, and the PNG written must decode to an image of that figure's shape that is not blank
and shows the colours the module documents for what it draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from rnnreg import cli
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.curves import PALETTE, learning_curves
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.study.plots import (
    hidden_heatmaps,
    placement_diagram,
    placements_of,
    plot_runs,
    rate_curve,
)

PLACEMENTS = ("embedding", "input", "between", "recurrent", "weight", "output")
# Okabe & Ito, as plots documents: dropout, DropConnect and valid, train, zoneout.
VERMILLION, BLUE, ORANGE, GREEN = "#D55E00", "#0072B2", "#E69F00", "#009E73"
RECORDS = [{"epoch": e, "train_ppl": 100 / e, "valid_ppl": 120 / e + e,
            "train_seconds": 90.0 * e} for e in (1, 2, 3)]


def _model(**settings) -> LanguageModel:
    return LanguageModel(10, Config(hidden_size=8, **settings))


@pytest.fixture
def saved(monkeypatch) -> list[Figure]:
    """Every Figure written while the test runs, in order (the plots return only a path)."""
    figures: list[Figure] = []
    savefig = Figure.savefig

    def recording(self, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def _image(path: Path, figure: Figure | None = None) -> np.ndarray:
    """The decoded RGB pixels of ``path``: a PNG of ``figure``'s shape, with something drawn."""
    pixels = matplotlib.image.imread(Path(path))[..., :3]
    height, width = pixels.shape[:2]
    if figure is not None:
        inches_wide, inches_high = figure.get_size_inches()
        assert width / height == pytest.approx(inches_wide / inches_high, rel=0.02)
    ink = (pixels < 0.9).any(-1).mean()  # share of pixels that are not (near) white
    assert 0.01 < ink < 0.9, f"{path} looks blank or flooded ({ink:.3f} drawn)"
    return pixels


def _pixels_of(pixels: np.ndarray, colour: str, tolerance: float = 0.02) -> int:
    return int((np.abs(pixels - np.array(to_rgb(colour))) <= tolerance).all(-1).sum())


def _panels(figure: Figure) -> list:
    return [ax for ax in figure.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _line(ax, label: str):
    (line,) = [line for line in ax.lines if line.get_label() == label]
    return line


@pytest.mark.parametrize("strategy, dropped, variational", [
    ("none", set(), False),
    ("zaremba", {"input", "between", "output"}, False),
    ("variational", {"input", "between", "output", "recurrent"}, True),
    ("recurrent_only", {"recurrent"}, False),
    ("awd", {"input", "between", "output", "weight"}, True),
])
def test_placements_are_read_from_the_modules(strategy, dropped, variational):
    model = _model(strategy=strategy, strategy_p=0.0 if strategy == "none" else 0.4)
    placements = placements_of(model)
    # Expected from the papers' placements (the parametrization), not from the modules.
    assert placements.rates == {name: 0.4 if name in dropped else 0.0 for name in PLACEMENTS}
    assert placements.variational is model.rnn.variational is variational
    assert set(placements.dropped) == dropped


def test_placements_follow_overrides_not_the_strategy_table():
    model = _model(strategy="zaremba", strategy_p=0.5, recurrent_dropout=0.2,
                   embedding_dropout=0.1)
    placements = placements_of(model)
    assert placements.rates["recurrent"] == 0.2 == model.rnn.recurrent_dropout
    assert placements.rates["embedding"] == 0.1
    assert placements.schedule("input") == "fresh mask each step"
    assert "per window" in placements.schedule("embedding")


@pytest.mark.filterwarnings("ignore:dropout option adds dropout:UserWarning")
def test_one_layer_has_no_between_placement():
    placements = placements_of(_model(strategy="zaremba", strategy_p=0.5, num_layers=1))
    assert placements.layers == 1 and placements.rates["between"] == 0.0


# What the diagram must say for each strategy at p=0.5: the labelled placements, and whether
# the dotted DropConnect arrow (blue) is drawn. Written from the papers, as in test_strategies.
DIAGRAMS = {
    "none": (set(), False),
    "naive": ({"input", "between", "recurrent", "output"}, False),
    "zaremba": ({"input", "between", "output"}, False),
    "awd": ({"input", "between", "weight", "output"}, True),
}


@pytest.mark.parametrize("strategy", sorted(DIAGRAMS))
def test_placement_diagram_labels_and_colours_exactly_the_dropped_placements(strategy, tmp_path,
                                                                             saved):
    rate = 0.0 if strategy == "none" else 0.5
    path = placement_diagram(_model(strategy=strategy, strategy_p=rate), tmp_path / "d.png",
                             title=strategy)
    (figure,) = saved
    assert figure.get_suptitle() == strategy
    texts = [text.get_text() for ax in figure.axes for text in ax.texts]
    labelled = {name for name in PLACEMENTS
                for text in texts if text.startswith(f"{name} dropout p=0.5\n")}
    dropped, dropconnect = DIAGRAMS[strategy]
    assert labelled == dropped
    summary = (f"dropout on: {', '.join(n for n in PLACEMENTS if n in dropped)}" if dropped
               else "no dropout anywhere")
    assert any(text.startswith(summary) for text in texts)
    pixels = _image(path, figure)
    # Vermillion marks every arrow and label where dropout acts, and nothing else.
    assert (_pixels_of(pixels, VERMILLION) > 200) == bool(dropped)
    assert (_pixels_of(pixels, BLUE) > 200) == dropconnect


def test_placement_diagram_tells_the_mask_schedule(saved, tmp_path):
    placement_diagram(_model(strategy="variational", strategy_p=0.5), tmp_path / "v.png")
    placement_diagram(_model(strategy="naive", strategy_p=0.5), tmp_path / "n.png")
    held, fresh = ([text.get_text() for ax in figure.axes for text in ax.texts]
                   for figure in saved)
    assert "recurrent dropout p=0.5\nsame mask every step" in held
    assert "recurrent dropout p=0.5\nfresh mask each step" in fresh


def test_zoneout_diagram_draws_zoneout_on_the_recurrence_not_no_dropout(saved, tmp_path):
    # Krueger et al.'s word-level PTB rates at p=0.5: cell 0.5, hidden 0.05.
    model = _model(strategy="zoneout", strategy_p=0.5)
    placements = placements_of(model)
    assert placements.zoneout == {"hidden": 0.05, "cell": 0.5} and placements.dropped == ()
    path = placement_diagram(model, tmp_path / "z.png")
    (figure,) = saved
    texts = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert "zoneout hidden p=0.05, cell p=0.5\nfresh mask each step, units keep h_(t-1)" in texts
    assert not any("no dropout anywhere" in text for text in texts)
    assert any(text.endswith("zoneout on: hidden, cell; fresh mask each step") for text in texts)
    pixels = _image(path, figure)
    assert _pixels_of(pixels, GREEN) > 200 and _pixels_of(pixels, VERMILLION) == 0


def test_a_gru_zones_out_only_its_hidden_state(saved, tmp_path):
    placement_diagram(_model(strategy="zoneout", strategy_p=0.5, cell="gru"), tmp_path / "g.png")
    texts = [text.get_text() for ax in saved[0].axes for text in ax.texts]
    assert "zoneout hidden p=0.05\nfresh mask each step, units keep h_(t-1)" in texts


def test_batch_shared_recurrent_mask_is_drawn_apart_from_per_sequence_masks(saved, tmp_path):
    per_row = placement_diagram(_model(strategy="variational", strategy_p=0.5),
                                tmp_path / "v.png")
    shared = placement_diagram(_model(strategy="variational_batch", strategy_p=0.5),
                               tmp_path / "b.png")
    row_texts, batch_texts = ([text.get_text() for ax in figure.axes for text in ax.texts]
                              for figure in saved)
    assert "recurrent dropout p=0.5\nsame mask every step" in row_texts
    assert "recurrent dropout p=0.5\none mask per window, shared by the batch" in batch_texts
    assert "recurrent dropout p=0.5\nsame mask every step" not in batch_texts
    # Input, between and output stay one mask per sequence in both.
    assert "input dropout p=0.5\nsame mask every step" in batch_texts
    assert "    one mask per window, shared by the batch: recurrent" in "\n".join(batch_texts)
    assert not np.array_equal(_image(per_row), _image(shared))


def test_a_one_epoch_curve_starts_its_axis_at_zero(tmp_path, saved):
    learning_curves({"a": RECORDS[:1]}, tmp_path / "one.png")
    (ax,) = _panels(saved[-1])
    left, right = ax.get_xlim()
    assert left == 0 and 1 <= right < 1.5
    ticks = [t for t in ax.get_xticks() if left <= t <= right]
    assert ticks == [0, 1]  # whole epochs, not 0.96 to 1.04


def test_learning_curves_draw_each_runs_records_in_its_own_panel(tmp_path, saved):
    runs = {"a": RECORDS, "b": RECORDS[:1], "empty": []}
    path = learning_curves(runs, tmp_path / "c.png", title="curves")
    wide = saved[-1]
    assert wide.get_suptitle() == "curves"
    panels = _panels(wide)
    assert [ax.get_title() for ax in panels] == list(runs)
    for ax, records in zip(panels, runs.values()):
        if not records:
            assert not ax.lines and [t.get_text() for t in ax.texts] == ["no finished epoch"]
            continue
        epochs = [r["epoch"] for r in records]
        for label, key in (("train (dropout on)", "train_ppl"), ("valid", "valid_ppl")):
            line = _line(ax, label)
            assert list(line.get_xdata()) == epochs
            assert list(line.get_ydata()) == [r[key] for r in records]
    # One shared y axis: the level of each panel is part of the comparison.
    assert all(panels[0].get_shared_y_axes().joined(panels[0], ax) for ax in panels)
    pixels = _image(path, wide)
    assert _pixels_of(pixels, ORANGE) > 100 and _pixels_of(pixels, BLUE) > 100  # train, valid

    narrow = learning_curves({"a": RECORDS}, tmp_path / "one.png")
    one = _image(narrow, saved[-1])
    assert one.shape[0] == pixels.shape[0] and one.shape[1] < pixels.shape[1] / 2
    other = learning_curves({"a": [dict(r, valid_ppl=2 * r["valid_ppl"]) for r in RECORDS]},
                            tmp_path / "other.png")
    assert not np.array_equal(_image(other), one)  # other numbers, another picture


def test_rate_curve_draws_every_strategy_with_its_error_bars(tmp_path, saved):
    series = {"none": [{"rate": 0.0, "valid": 120.0, "test": 115.0}],
              "zaremba": [{"rate": 0.5, "valid": 90.0, "test": 86.0, "valid_std": 1.0,
                           "test_std": 0.5},
                          {"rate": 0.2, "valid": 100.0, "test": 95.0, "valid_std": None,
                           "test_std": None}]}
    path = rate_curve(series, tmp_path / "r.png")
    (figure,) = saved
    panels = _panels(figure)
    assert [ax.get_title() for ax in panels] == ["valid perplexity", "test perplexity"]
    for ax, split in zip(panels, ("valid", "test")):
        # A strategy with a single point is a horizontal reference line at its value.
        assert set(_line(ax, "none").get_ydata()) == {series["none"][0][split]}
        (curve,) = ax.containers
        rates, values = curve.lines[0].get_data()
        assert list(rates) == [0.2, 0.5]  # sorted by rate
        assert list(values) == [series["zaremba"][1][split], series["zaremba"][0][split]]
        std = series["zaremba"][0][f"{split}_std"]
        bars = [segment[:, 1].tolist() for column in curve.lines[2]
                for segment in column.get_segments()]
        assert bars == [[values[0], values[0]], [values[1] - std, values[1] + std]]
    pixels = _image(path, figure)
    assert all(_pixels_of(pixels, colour) > 100 for colour in PALETTE[:2])  # one per strategy


def test_hidden_heatmaps_show_the_values_on_one_symmetric_scale(tmp_path, saved):
    signed = np.array([[1.0, -2.0, 0.0, 0.5]] * 6)
    panels = {"no dropout": signed, "masked": np.zeros((6, 4))}
    path = hidden_heatmaps(panels, tmp_path / "h.png", tokens=list("abcdef"))
    (figure,) = saved
    axes = _panels(figure)
    assert [ax.get_title() for ax in axes] == list(panels)
    for ax, values in zip(axes, panels.values()):
        (image,) = ax.images
        assert np.array_equal(np.asarray(image.get_array()), values)
        assert image.get_clim() == (-2.0, 2.0)  # the largest |value| of all panels, both signs
    assert [t.get_text() for t in axes[0].get_yticklabels()] == list("abcdef")
    pixels = _image(path, figure)
    low, middle, high = figure.axes[0].images[0].cmap([0.0, 0.5, 1.0])[:, :3]  # -2, 0, +2
    # A column of -2 is a block of the scale's end colour; +2 shows only in the colour bar.
    assert _pixels_of(pixels, low) > 10 * max(_pixels_of(pixels, high), 1)
    assert _pixels_of(pixels, middle) > 100  # zeros: a whole panel in the scale's middle


def test_plots_reject_empty_or_malformed_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        learning_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        hidden_heatmaps({"flat": np.zeros(5)}, tmp_path / "x.png")


def test_no_pyplot_state_is_left_behind(tmp_path):
    placement_diagram(_model(strategy="zaremba", strategy_p=0.5), tmp_path / "d.png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []


def _fake_run(path: Path, train_ppls: list[float], final: bool = False) -> Path:
    run = RunDir(path).create(exist_ok=False)
    run.write_config(Config())
    for epoch, ppl in enumerate(train_ppls, 1):
        run.append_metrics({"event": "epoch", "epoch": epoch, "train_ppl": ppl,
                            "valid_ppl": ppl + 10, "tokens_per_s": 1.0,
                            "train_seconds": 60.0 * epoch})
    if final:
        run.append_metrics({"event": "final", "valid_ppl": 120.0, "test_ppl": 115.0,
                            "train_seconds": 60.0 * len(train_ppls) + 30})
    return path


def test_plot_command_draws_runs_side_by_side(tmp_path, capsys, saved):
    runs = [_fake_run(tmp_path / name, [200.0, 150.0, 140.0]) for name in ("a", "b")]
    out = tmp_path / "figs" / "curves.png"
    assert cli.main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    (figure,) = saved
    panels = _panels(figure)
    assert [ax.get_title() for ax in panels] == ["a", "b"]  # each panel named by its directory
    for ax in panels:
        assert list(_line(ax, "train (dropout on)").get_ydata()) == [200.0, 150.0, 140.0]
        assert list(_line(ax, "valid").get_ydata()) == [210.0, 160.0, 150.0]
    _image(out, figure)


def test_plot_runs_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_plot_against_training_minutes_includes_the_final_point(tmp_path, saved):
    run = _fake_run(tmp_path / "budget", [200.0, 150.0], final=True)
    out = tmp_path / "minutes.png"
    assert cli.main(["plot", str(run), "--out", str(out), "--x", "minutes"]) == 0
    (figure,) = saved
    (ax,) = _panels(figure)
    assert ax.get_xlabel().startswith("training minutes")
    assert list(_line(ax, "train (dropout on)").get_xdata()) == [1.0, 2.0]
    valid = _line(ax, "valid")
    # The budget stopped the run at 2.5 minutes: its final valid score ends the curve...
    assert list(valid.get_xdata()) == [1.0, 2.0, 2.5]
    assert list(valid.get_ydata()) == [210.0, 160.0, 120.0]
    # ...and the test score is marked there.
    test = _line(ax, "test 115.0")
    assert (list(test.get_xdata()), list(test.get_ydata())) == ([2.5], [115.0])
    _image(out, figure)
    with pytest.raises(ValueError, match="x must be one of"):
        learning_curves({"a": RECORDS}, tmp_path / "bad.png", x="steps")
