"""Figures of the dropout study: learning curves, rate curves, hidden states, dropout placements.

The tutorial this project started from draws two pictures to argue Zaremba et al. (2014,
section 3; Figure 2): hidden-state heatmaps under per-step and per-sequence masks, and
"wrong vs right" diagrams of where dropout acts. Here both are drawn from a real model: the
heatmaps from a trained network on real text, the diagrams from the dropout settings the layers
actually hold (:func:`placements_of`), so a figure cannot disagree with the code it describes.

Every figure is a ``matplotlib.figure.Figure`` on an Agg canvas, never pyplot: drawing in a
worker process or a test leaves no global figure state behind. Colours are the Okabe & Ito
palette (safe for the common colour-vision deficiencies), and whatever colour distinguishes is
also told by line style, marker or label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.patches import FancyBboxPatch

from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.curves import PALETTE, learning_curves
from rnnreg.lm.rundir.curves import figure as _figure
from rnnreg.lm.rundir.curves import save as _save
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import read_records

__all__ = [
    "Placements",
    "hidden_heatmaps",
    "placement_diagram",
    "placements_of",
    "plot_runs",
    "rate_curve",
    "recall_curve",
]

_DROPPED, _WEIGHT, _PLAIN = "#D55E00", "#0072B2", "#777777"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_HEATMAP = "PuOr"  # diverging, colour-blind safe: hidden units are signed


# --------------------------------------------------------------------------- curves


def rate_curve(series: Mapping[str, Sequence[Mapping]], path: str | Path, *,
               title: str | None = None) -> Path:
    """Valid and test perplexity against the dropout rate, one line per strategy.

    ``series[strategy]`` lists points ``{"rate", "valid", "test"}`` with optional
    ``"valid_std"``/``"test_std"`` (drawn as error bars). A strategy measured at one rate only,
    such as ``none`` (which has no rate), is drawn as a horizontal reference line so every
    other strategy can be compared with it at every rate.
    """
    if not series:
        raise ValueError("rate_curve needs at least one strategy")
    figure = _figure(9.0, 3.6)
    axes = figure.subplots(1, 2)  # own y scales: test and valid perplexities differ in level
    for ax, split in zip(axes, ("valid", "test")):
        for i, (name, points) in enumerate(series.items()):
            points = sorted(points, key=lambda point: point["rate"])
            colour, marker = PALETTE[i % len(PALETTE)], _MARKERS[i % len(_MARKERS)]
            if len(points) == 1:
                ax.axhline(points[0][split], color=colour, linestyle=":", label=name)
                continue
            ax.errorbar([p["rate"] for p in points], [p[split] for p in points],
                        yerr=_error_bars(points, split), color=colour, marker=marker,
                        capsize=3, label=name)
        ax.set_title(f"{split} perplexity")
        ax.set_xlabel("dropout rate p")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("perplexity")
    axes[1].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _error_bars(points: Sequence[Mapping], split: str) -> list[float] | None:
    stds = [p.get(f"{split}_std") for p in points]
    if all(s is None for s in stds):
        return None
    return [0.0 if s is None else s for s in stds]


def plot_runs(run_dirs: Sequence[str | Path], path: str | Path, *, x: str = "epoch") -> Path:
    """Learning curves of any run directories side by side, each panel named by its directory."""
    runs = {}
    for run_dir in run_dirs:
        run = RunDir(run_dir)
        run.read_config()  # fails with a clear message when this is not a run directory
        label = run.path.resolve().name
        runs[label] = read_records(run, "epoch", "final", "step")
    return learning_curves(runs, path, x=x)


# --------------------------------------------------------------------------- heatmaps


def hidden_heatmaps(panels: Mapping[str, np.ndarray], path: str | Path, *,
                    tokens: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Heatmaps of hidden states, time down and units across, one panel per masking scheme.

    The tutorial's comparison: a fresh mask at every step speckles the units at random, while
    one mask per sequence (Gal & Ghahramani 2016, section 4) silences the same units at every
    step, which shows as whole blank columns. All panels share one symmetric colour scale, so
    the 1/(1-p) scaling of kept units is visible as it is, not normalised away.
    """
    if not panels:
        raise ValueError("hidden_heatmaps needs at least one panel")
    arrays = {name: np.asarray(values, dtype=float) for name, values in panels.items()}
    for name, values in arrays.items():
        if values.ndim != 2:
            raise ValueError(f"panel {name!r} must be 2-D (time, units), got {values.shape}")
    limit = max(float(np.abs(values).max()) for values in arrays.values()) or 1.0
    steps = next(iter(arrays.values())).shape[0]
    figure = _figure(4.2 * len(arrays) + 0.8, max(3.5, 0.16 * steps + 1.4))
    axes = figure.subplots(1, len(arrays), sharey=True, squeeze=False)[0]
    for ax, (name, values) in zip(axes, arrays.items()):
        image = ax.imshow(values, cmap=_HEATMAP, vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("hidden unit")
    axes[0].set_ylabel("time step (token)")
    if tokens is not None:
        axes[0].set_yticks(range(len(tokens)), labels=list(tokens), fontsize=6)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label="activation")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


# --------------------------------------------------------------------------- placements

# Placement name -> how often its mask is redrawn when it is not a per-step placement.
_PER_CALL = {"weight": "one mask per window (DropConnect on W_hh)",
             "embedding": "whole words, one mask per window"}
# The recurrent mask of recurrent_mask="batch": one draw for every row and step of a window.
_BATCH = "one mask per window, shared by the batch"
# Zoneout's colour (bluish green): not dropout, so not vermillion, but drawn where it acts.
_ZONEOUT = PALETTE[2]


@dataclass(frozen=True)
class Placements:
    """Where a model drops, at what rate, and how often each mask is redrawn.

    ``rates`` has the keys embedding, input, between, recurrent, weight, output; a rate of 0
    means no dropout there. ``variational`` applies to input, between, recurrent and output:
    embedding and weight masks are drawn once per forward call whatever it says.
    ``recurrent_mask`` is "sequence" (one recurrent mask per row) or "batch" (one for the whole
    batch). ``zoneout`` maps "hidden" and "cell" to the zoneout rates (Krueger et al. 2017),
    which act on the recurrence without dropping: a zoned-out unit keeps its previous value.
    """

    rates: Mapping[str, float]
    variational: bool
    layers: int
    recurrent_mask: str = "sequence"
    zoneout: Mapping[str, float] = field(default_factory=dict)

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(name for name, rate in self.rates.items() if rate > 0)

    @property
    def zoned(self) -> tuple[str, ...]:
        return tuple(name for name, rate in self.zoneout.items() if rate > 0)

    def schedule(self, name: str) -> str:
        """How often the mask of placement ``name`` changes, in words."""
        if name in _PER_CALL:
            return _PER_CALL[name]
        if name == "recurrent" and self.recurrent_mask == "batch":
            return _BATCH
        return "same mask every step" if self.variational else "fresh mask each step"


def placements_of(model: LanguageModel) -> Placements:
    """Read the dropout settings a LanguageModel actually holds (not what a table says)."""
    rnn = model.rnn
    return Placements(
        rates={
            "embedding": float(model.embedding_dropout),
            "input": float(rnn.input_dropout),
            # One layer has no boundary to drop at (torch ignores ``dropout`` there too).
            "between": float(rnn.dropout) if rnn.num_layers > 1 else 0.0,
            "recurrent": float(rnn.recurrent_dropout),
            "weight": float(rnn.weight_dropout),
            "output": float(rnn.output_dropout),
        },
        variational=bool(rnn.variational),
        layers=int(rnn.num_layers),
        recurrent_mask=str(rnn.recurrent_mask),
        # The GRU and the Elman RNN have no cell state: their zoneout_cell is always 0.
        zoneout={"hidden": float(rnn.zoneout_hidden), "cell": float(rnn.zoneout_cell)},
    )


def placement_diagram(model: LanguageModel, path: str | Path, *,
                      title: str | None = None) -> Path:
    """Draw where ``model`` applies dropout: the paper's Figure 2, for this model's settings.

    Boxes for x_t, the stacked layers h_t, h_{t-1} and y_t; arrows for the input, between the
    layers, the recurrence and the output. An arrow where dropout acts is thick, vermillion and
    labelled with its rate and how often its mask changes (dashed: fresh mask each step, solid:
    same mask every step); DropConnect on W_hh (dotted) and whole-word embedding dropout are
    labelled where they act, and so is zoneout (dash-dotted, bluish green: it drops nothing,
    a zoned-out unit keeps its value from h_{t-1}).
    """
    placements = placements_of(model)
    layers = placements.layers
    top = 2.0 + 1.6 * layers
    summary = _summary(placements)
    lines = summary.count("\n")
    figure = _figure(7.5, 1.1 * top / 2 + 1.6 + 0.18 * lines)
    ax = figure.add_subplot()
    ax.set_xlim(0, 12)
    bottom = -0.4 - 0.3 * lines  # room for every line of the summary
    ax.set_ylim(bottom, top + 1.2)
    ax.axis("off")
    rates = placements.rates
    _box(ax, 6, 0.5, r"$x_t = E[w_t]$", "#DDEEFF",
         _label(placements, "embedding") if rates["embedding"] else None)
    for layer in range(1, layers + 1):
        y = 0.5 + 1.6 * layer
        _box(ax, 6, y, f"$h_t$  (layer {layer})", "#DDF2E8")
        _box(ax, 1.6, y, f"$h_{{t-1}}$  (layer {layer})", "#FFF6D5")
        _arrow(ax, (2.9, y), (4.7, y), placements, "recurrent", label_at=(3.8, y + 0.32))
        if rates["weight"]:  # DropConnect acts on W_hh itself: dotted over the same arrow
            ax.annotate("", xy=(4.7, y - 0.12), xytext=(2.9, y - 0.12), arrowprops=dict(
                arrowstyle="-|>", color=_WEIGHT, linewidth=2.5, linestyle=":",
                shrinkA=0, shrinkB=0))
            ax.text(3.8, y - 0.42, _label(placements, "weight"), color=_WEIGHT, ha="center",
                    va="top", fontsize=7)
        if placements.zoned:  # zoneout acts on the recurrence: h_{t-1} carried over per unit
            _zoneout(ax, placements, y)
        below = 0.5 + 1.6 * (layer - 1)
        _arrow(ax, (6, below + 0.3), (6, y - 0.3), placements,
               "input" if layer == 1 else "between", label_at=(6.2, (below + y) / 2))
    _box(ax, 6, top + 0.1, r"$y_t$", "#FBE3E8")
    last = 0.5 + 1.6 * layers
    _arrow(ax, (6, last + 0.3), (6, top - 0.2), placements, "output",
           label_at=(6.2, (last + top) / 2))
    ax.text(0.0, bottom + 0.1, summary, fontsize=8, va="bottom")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _box(ax, x: float, y: float, text: str, colour: str, note: str | None = None) -> None:
    edge = _DROPPED if note else "black"
    ax.add_patch(FancyBboxPatch((x - 1.3, y - 0.3), 2.6, 0.6, boxstyle="round,pad=0.02",
                                facecolor=colour, edgecolor=edge, linewidth=2 if note else 1))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)
    if note:
        ax.text(x + 1.45, y, note, color=_DROPPED, ha="left", va="center", fontsize=7)


def _arrow(ax, start, end, placements: Placements, name: str, *, label_at) -> None:
    rate = placements.rates[name]
    dropped = rate > 0
    # Dashed where the mask changes every step, solid where one mask holds for the sequence,
    # so the schedule reads without colour or text too.
    style = "--" if dropped and not placements.variational else "-"
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(
        arrowstyle="-|>", color=_DROPPED if dropped else _PLAIN, linewidth=3 if dropped else 1,
        linestyle=style, shrinkA=0, shrinkB=0))
    if dropped:
        ha = "center" if start[1] == end[1] else "left"
        ax.text(*label_at, _label(placements, name), color=_DROPPED, ha=ha, va="bottom",
                fontsize=7)


def _zoneout(ax, placements: Placements, y: float) -> None:
    ax.annotate("", xy=(4.7, y + 0.12), xytext=(2.9, y + 0.12), arrowprops=dict(
        arrowstyle="-|>", color=_ZONEOUT, linewidth=2.5, linestyle="-.", shrinkA=0, shrinkB=0))
    # Above the arrow, unless a recurrent dropout label is there already.
    above = not placements.rates["recurrent"]
    ax.text(3.8, y + 0.32 if above else y - 0.42, _zoneout_label(placements), color=_ZONEOUT,
            ha="center", va="bottom" if above else "top", fontsize=7)


def _zoneout_label(placements: Placements) -> str:
    rates = ", ".join(f"{name} p={placements.zoneout[name]:g}" for name in placements.zoned)
    return f"zoneout {rates}\nfresh mask each step, units keep h_(t-1)"


def _label(placements: Placements, name: str) -> str:
    return f"{name} dropout p={placements.rates[name]:g}\n{placements.schedule(name)}"


def _summary(placements: Placements) -> str:
    dropped, zoned = placements.dropped, placements.zoned
    if not dropped and not zoned:
        return "no dropout anywhere"
    parts = []
    if dropped:
        by_schedule: dict[str, list[str]] = {}
        for name in dropped:
            if name not in _PER_CALL:
                by_schedule.setdefault(placements.schedule(name), []).append(name)
        parts.append(f"dropout on: {', '.join(dropped)}")
        parts.extend(f"    {schedule}: {', '.join(names)}"
                     for schedule, names in by_schedule.items())
    else:
        parts.append("no dropout")
    if zoned:
        parts.append(f"zoneout on: {', '.join(zoned)}; fresh mask each step")
    return "\n".join(parts)


# --------------------------------------------------------------------------- memory


def recall_curve(series: Mapping[str, Sequence[Mapping]], path: str | Path, *,
                 chance: float | None = None, title: str | None = None) -> Path:
    """Recall accuracy against the distance N to remember, one line per strategy.

    ``series[label]`` lists points ``{"distance", "accuracy", "accuracy_std"}`` (the std may
    be None: one seed). ``chance`` draws the accuracy of guessing as a dotted line. The x axis
    is logarithmic: distances are usually chosen to double.
    """
    if not series:
        raise ValueError("recall_curve needs at least one strategy")
    figure = _figure(6.0, 3.8)
    ax = figure.subplots()
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points, key=lambda point: point["distance"])
        stds = [p.get("accuracy_std") for p in points]
        ax.errorbar([p["distance"] for p in points], [p["accuracy"] for p in points],
                    yerr=None if all(s is None for s in stds) else [s or 0.0 for s in stds],
                    color=PALETTE[i % len(PALETTE)], marker=_MARKERS[i % len(_MARKERS)],
                    linestyle=("-", "--", "-.", ":")[i % 4], capsize=3, label=name)
    if chance is not None:
        ax.axhline(chance, color=_PLAIN, linestyle=":", label="chance")
    distances = sorted({p["distance"] for points in series.values() for p in points})
    ax.set_xscale("log")
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.set_xticks([], minor=True)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("distance N to the key (tokens)")
    ax.set_ylabel("accuracy on the recalled token")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(figure, path)
