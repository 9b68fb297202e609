"""A run's learning curve: train and valid perplexity per epoch, and the steps in between.

It lives in :mod:`rnnreg.lm` because training itself draws it into the run's ``plots/`` folder
(and lm never imports the study); :mod:`rnnreg.study.plots` reuses it for side-by-side runs.
Every figure is a ``matplotlib.figure.Figure`` on an Agg canvas, never pyplot: drawing in a
worker process or a test leaves no global figure state behind. Colours are the Okabe & Ito
palette (safe for the common colour-vision deficiencies), and whatever colour distinguishes is
also told by line style, marker or label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rnnreg.errors import RnnregError
from rnnreg.lm.rundir.files import replacing, writing
from rnnreg.lm.rundir.metrics import of_events

__all__ = ["PALETTE", "figure", "grid", "learning_curves", "save"]

# Okabe & Ito (2008), "Color Universal Design": distinguishable under protanopia,
# deuteranopia and tritanopia. Black is left out of the cycle; it draws structure.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
_TRAIN, _VALID, _PLAIN = "#E69F00", "#0072B2", "#777777"
_X_AXES = {"epoch": "epoch", "minutes": "training minutes (evaluation excluded)"}


def figure(width: float, height: float) -> Figure:
    drawn = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(drawn)  # Agg without matplotlib.use(): the global backend stays untouched
    return drawn


def save(drawn: Figure, path: str | Path) -> Path:
    """Write the figure atomically: a full disk leaves the previous figure, not half a PNG."""
    path = Path(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        # The format from the real name: the temporary one ends in .tmp.
        drawn.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    return path


def grid(drawn: Figure, panels: int, *, sharey: bool = True):
    """Axes for ``panels`` small multiples, at most four a row; spare axes are hidden."""
    columns = min(panels, 4)
    rows = math.ceil(panels / columns)
    axes = drawn.subplots(rows, columns, sharey=sharey, squeeze=False).ravel()
    for spare in axes[panels:]:
        spare.set_visible(False)
    return axes[:panels]


def learning_curves(runs: Mapping[str, Sequence[Mapping]], path: str | Path, *,
                    title: str | None = None, x: str = "epoch") -> Path:
    """Train and valid perplexity per epoch, one panel per run, side by side on a shared axis.

    Overfitting is the valid curve turning up while the train curve keeps falling, which is what
    dropout is meant to stop (Zaremba et al. 2014, section 4.1). ``runs`` maps a label to its
    records as in metrics.jsonl: epoch records (``epoch``, ``train_ppl``, ``valid_ppl``,
    ``train_seconds``), optionally step records (drawn as a thin line, at their fraction of an
    epoch, so a run shows progress before its first epoch ends) and the final one. The train
    perplexity is the trainer's running average with dropout active. ``x="minutes"`` puts
    training time on the x axis (evaluation excluded), the axis of a time-to-quality comparison,
    and adds the final valid and test perplexities where a budget stopped the run mid-epoch.
    """
    if not runs:
        raise RnnregError("learning_curves needs at least one run")
    if x not in _X_AXES:
        raise RnnregError(f"x must be one of {', '.join(_X_AXES)}; got {x!r}")
    drawn = figure(3.2 * min(len(runs), 4), 2.8 * math.ceil(len(runs) / 4) + 0.4)
    # Shared y: the gap between panels is part of the comparison.
    for ax, (label, records) in zip(grid(drawn, len(runs)), runs.items()):
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(_X_AXES[x])
        _panel(ax, records, x)
    drawn.axes[0].set_ylabel("perplexity")
    if title:
        drawn.suptitle(title)
    return save(drawn, path)


def _panel(ax, records: Sequence[Mapping], x: str) -> None:
    epochs = [r for r in records if r.get("event", "epoch") == "epoch"]
    steps = [r for r in of_events(records, "step") if r.get("train_ppl") is not None]
    final = next(iter(of_events(records, "final")), None)
    if not epochs and not steps and final is None:
        ax.text(0.5, 0.5, "no finished epoch", ha="center", va="center",
                transform=ax.transAxes, color=_PLAIN)
        return
    if steps:
        ax.plot([_x_value(r, x) for r in steps], [r["train_ppl"] for r in steps],
                color=_TRAIN, linewidth=0.8, alpha=0.6, label="train, between epochs")
    xs = [_x_value(r, x) for r in epochs]
    ax.plot(xs, [r["train_ppl"] for r in epochs], color=_TRAIN, linestyle="--",
            marker="o", markersize=3, label="train (dropout on)")
    valid = [r["valid_ppl"] for r in epochs]
    if x == "minutes" and final is not None and final.get("valid_ppl") is not None:
        xs, valid = [*xs, _x_value(final, x)], [*valid, final["valid_ppl"]]
        if final.get("test_ppl") is not None:
            ax.plot(xs[-1], final["test_ppl"], color=_PLAIN, marker="*", markersize=8,
                    linestyle="none", label=f"test {final['test_ppl']:.1f}")
    ax.plot(xs, valid, color=_VALID, linestyle="-", marker="s", markersize=3, label="valid")
    if x == "epoch":
        ax.xaxis.get_major_locator().set_params(integer=True)
        # From the start of training: one epoch alone would get a range of 0.96-1.04.
        ax.set_xlim(left=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _x_value(record: Mapping, x: str) -> float:
    if x == "minutes":
        return record["train_seconds"] / 60
    # A step record sits at its fraction of the epoch: epoch 1, half done = 0.5.
    return record.get("epochs_done", record["epoch"])
