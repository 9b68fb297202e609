"""Named dropout strategies as data: where dropout acts and whether masks are per sequence.

The comparison the paper makes (Zaremba et al. 2014, section 3; Figure 2) and the tutorial's
"wrong vs right" panels become rows of one table, so a study can sweep them by name and a plot
can draw each one from the same record the layers are configured from.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from rnnreg.nn.functional import check_probability

__all__ = ["PLACEMENTS", "RECURRENT_MASKS", "STRATEGIES", "Strategy", "check_recurrent_mask",
           "strategy"]

# Placement name -> the keyword of rnnreg.LSTM/GRU/RNN that controls it.
PLACEMENTS = MappingProxyType({
    "input": "input_dropout",
    "between": "dropout",
    "output": "output_dropout",
    "recurrent": "recurrent_dropout",
    "weight": "weight_dropout",
})

# How the recurrent masks are shared (rnnreg.LSTM's ``recurrent_mask``): "sequence" is Gal &
# Ghahramani's one mask per row, "batch" one mask per forward call for every row and step.
RECURRENT_MASKS = ("sequence", "batch")


def check_recurrent_mask(value: str) -> str:
    if value not in RECURRENT_MASKS:
        raise ValueError(f"recurrent_mask must be one of {', '.join(map(repr, RECURRENT_MASKS))}; "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class Strategy:
    """Which placements get the rate ``p``, whether one mask is kept per sequence, and whether
    the recurrent mask is one per sequence or one for the whole batch (``RECURRENT_MASKS``)."""

    name: str
    placements: frozenset[str]
    variational: bool
    description: str
    recurrent_mask: str = "sequence"


STRATEGIES = MappingProxyType({s.name: s for s in (
    Strategy("none", frozenset(), False, "no dropout: the non-regularized baseline"),
    Strategy("zaremba", frozenset({"input", "between", "output"}), False,
             "Zaremba et al. 2014: non-recurrent connections only, fresh mask every step"),
    Strategy("variational", frozenset({"input", "between", "output", "recurrent"}), True,
             "Gal & Ghahramani 2016: also the recurrence, one mask per sequence"),
    Strategy("variational_batch", frozenset({"input", "between", "output", "recurrent"}), True,
             "variational, but one recurrent mask for the whole batch: runs on the fused kernel",
             recurrent_mask="batch"),
    Strategy("naive", frozenset({"input", "between", "output", "recurrent"}), False,
             "everywhere including the recurrence, fresh mask every step"),
    Strategy("recurrent_only", frozenset({"recurrent"}), False,
             "only h(t-1) -> h(t), fresh mask every step: the placement Zaremba et al. avoid"),
    Strategy("awd", frozenset({"input", "between", "output", "weight"}), True,
             "Merity et al. 2018: DropConnect on recurrent weights plus per-sequence masks"),
)})


def strategy(name: str, p: float,
             **overrides: float | bool | str) -> dict[str, float | bool | str]:
    """Keyword settings for rnnreg.LSTM/GRU/RNN implementing strategy ``name`` at rate ``p``.

    ``overrides`` replace single settings by their keyword name, e.g.
    ``strategy("awd", 0.4, weight_dropout=0.5, input_dropout=0.65)``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    check_probability("p", p)
    chosen = STRATEGIES[name]
    settings: dict[str, float | bool | str] = {
        keyword: (p if placement in chosen.placements else 0.0)
        for placement, keyword in PLACEMENTS.items()
    }
    settings["variational"] = chosen.variational
    settings["recurrent_mask"] = chosen.recurrent_mask
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(settings)}")
    for keyword, value in overrides.items():
        if keyword == "variational":
            if not isinstance(value, bool):
                raise ValueError(f"variational must be True or False, got {value!r}")
            settings[keyword] = value
        elif keyword == "recurrent_mask":
            settings[keyword] = check_recurrent_mask(value)
        else:
            settings[keyword] = check_probability(keyword, value)
    return settings
