"""Named dropout strategies as data: where dropout acts and whether masks are per sequence.

The comparison the paper makes (Zaremba et al. 2014, section 3; Figure 2) and the tutorial's
"wrong vs right" panels become rows of one table, so a study can sweep them by name and a plot
can draw each one from the same record the layers are configured from.

Zoneout (Krueger et al. 2017) is not a dropout placement but the same kind of record: its two
rates are set from the one rate p of every strategy by fixed factors (:attr:`Strategy.zoneout`),
so that a study sweeping p sweeps zoneout too, and ``strategy("zoneout", 0.5)`` is exactly the
rates Krueger et al. use for word-level Penn Treebank (0.5 on the LSTM's cells, 0.05 on its
hidden states, in the paper's word-level experiment and the authors' replication scripts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from rnnreg.errors import RnnregError
from rnnreg.nn.functional import check_probability
from rnnreg.nn.regularization import Regularization

__all__ = ["PLACEMENTS", "STRATEGIES", "Strategy", "strategy"]

# Placement name -> the keyword of rnnreg.LSTM/GRU/RNN that controls it.
PLACEMENTS = MappingProxyType({
    "input": "input_dropout",
    "between": "dropout",
    "output": "output_dropout",
    "recurrent": "recurrent_dropout",
    "weight": "weight_dropout",
})

@dataclass(frozen=True)
class Strategy:
    """Which placements get the rate ``p``, whether one mask is kept per sequence, and whether
    the recurrent mask is one per sequence or one for the whole batch
    (:data:`rnnreg.nn.regularization.RECURRENT_MASKS`).

    ``zoneout`` maps a zoneout keyword to the multiple of ``p`` it gets; keywords it does not
    name stay 0.
    """

    name: str
    placements: frozenset[str]
    variational: bool
    description: str
    recurrent_mask: str = "sequence"
    zoneout: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def settings(self, p: float, **overrides: float | bool | str) -> Regularization:
        """This strategy's regularization at rate ``p``, with ``overrides`` replacing single
        settings by keyword name (unknown keywords are refused). The record checks every
        value, those derived from ``p`` included, naming the keyword it sets.
        """
        allowed = [f.name for f in fields(Regularization)]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise RnnregError(f"unknown override(s) {unknown}; allowed: {sorted(allowed)}")
        settings: dict[str, float | bool | str] = {
            keyword: (p if placement in self.placements else 0.0)
            for placement, keyword in PLACEMENTS.items()
        }
        settings["variational"] = self.variational
        settings["recurrent_mask"] = self.recurrent_mask
        for keyword, factor in self.zoneout.items():
            settings[keyword] = p * factor
        return Regularization(**{**settings, **overrides})


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
    # Krueger et al.'s word-level PTB rates at p = 0.5: z_c = p, z_h = p / 10.
    Strategy("zoneout", frozenset(), False,
             "Krueger et al. 2017: units keep their previous value; cell rate p, hidden p/10",
             zoneout=MappingProxyType({"zoneout_cell": 1.0, "zoneout_hidden": 0.1})),
)})


def strategy(name: str, p: float, **overrides: float | bool | str) -> Regularization:
    """The regularization of strategy ``name`` at rate ``p``, for rnnreg.LSTM/GRU/RNN and
    StackedRNN: give it as ``regularization=``, or unpack it into their keywords.

    ``overrides`` replace single settings by their keyword name, e.g.
    ``strategy("awd", 0.4, weight_dropout=0.5, input_dropout=0.65)``; the zoneout rates can be
    added to any strategy this way (``zoneout_hidden=0.05``). Unpacked, the zoneout keywords
    appear only where they are on, so the settings of the other strategies suit every cell.
    """
    if name not in STRATEGIES:
        raise RnnregError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    check_probability("p", p)
    return STRATEGIES[name].settings(p, **overrides)
