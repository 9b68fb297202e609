"""Presets as data: each is a set of Config overrides with the published numbers beside it.

A preset never selects a code path; it only fills fields of :class:`rnnreg.lm.config.Config`, so
every preset runs through the same model and trainer, and a test builds every one of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config

__all__ = ["BUDGET_RULE", "BUDGET_RULE_PATH", "PRESETS", "Preset", "budget_config", "preset_config"]


@dataclass(frozen=True)
class Preset:
    name: str
    overrides: Mapping[str, Any]
    source: str                                   # where the recipe and numbers come from
    paper: Mapping[str, float] = field(default_factory=dict)  # published perplexities
    note: str = ""

    def __post_init__(self) -> None:
        # Frozen fields alone would leave the dicts inside writable: one caller's edit of a
        # recipe would silently change every later run of that preset in the process.
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "paper", MappingProxyType(dict(self.paper)))

    def config(self) -> Config:
        return Config().replace(**self.overrides)


_ZAREMBA = "Zaremba, Sutskever & Vinyals 2014, Table 1 and section 4.1"
_GAL = "Gal & Ghahramani 2016, Table 1 and section 5.2 (rates from their grid search)"
_STUDY = "rnnreg: a regime of the dropout-strategy study (no published numbers)"
_AWD = ("Merity, Keskar & Socher 2018, Table 1 and section 5; the PTB command of the "
        "salesforce/awd-lstm-lm README")

PRESETS = MappingProxyType({p.name: p for p in (
    Preset("small", dict(
        hidden_size=200, num_layers=2, bptt=20, batch_size=20, init_range=0.1,
        strategy="none", strategy_p=0.0,                  # the non-regularized LSTM
        lr=1.0, lr_decay=0.5, decay_after=4, clip_norm=5.0, epochs=13,
    ), _ZAREMBA, {"valid": 120.7, "test": 114.5}, "non-regularized LSTM"),
    Preset("medium", dict(
        hidden_size=650, num_layers=2, bptt=35, batch_size=20, init_range=0.05,
        strategy="zaremba", strategy_p=0.5,
        lr=1.0, lr_decay=1 / 1.2, decay_after=6, clip_norm=5.0, epochs=39,
    ), _ZAREMBA, {"valid": 86.2, "test": 82.7}, "regularized LSTM"),
    Preset("large", dict(
        hidden_size=1500, num_layers=2, bptt=35, batch_size=20, init_range=0.04,
        strategy="zaremba", strategy_p=0.65,
        lr=1.0, lr_decay=1 / 1.15, decay_after=14, clip_norm=10.0, epochs=55,
    ), _ZAREMBA, {"valid": 82.2, "test": 78.4}, "regularized LSTM"),
    # Gal & Ghahramani tie embedding with recurrent and input with output rates (section 5.2);
    # weight decay 1e-7; everything else is Zaremba's recipe. Their masks are per gate, rnnreg's
    # recurrent mask is shared by the gates (the layers' documented choice).
    Preset("variational-medium", dict(
        hidden_size=650, num_layers=2, bptt=35, batch_size=20, init_range=0.05,
        strategy="variational", strategy_p=0.35, recurrent_dropout=0.2, embedding_dropout=0.2,
        weight_decay=1e-7, lr=1.0, lr_decay=1 / 1.2, decay_after=6, clip_norm=5.0, epochs=39,
    ), _GAL, {"valid": 81.9, "test": 79.7, "test_mc": 78.6}, "variational LSTM, untied"),
    Preset("variational-large", dict(
        hidden_size=1500, num_layers=2, bptt=35, batch_size=20, init_range=0.04,
        strategy="variational", strategy_p=0.5, recurrent_dropout=0.3, embedding_dropout=0.3,
        weight_decay=1e-7, lr=1.0, lr_decay=1 / 1.15, decay_after=10, clip_norm=10.0, epochs=55,
    ), _GAL, {"valid": 77.9, "test": 75.2, "test_mc": 73.4}, "variational LSTM, untied"),
    # AWD-LSTM on PTB (Merity et al. 2018; the salesforce/awd-lstm-lm README's PTB command:
    # --batch_size 20 --dropouti 0.4 --dropouth 0.25 --seed 141 --epoch 500, with main.py's
    # defaults emsize 400, nhid 1150, nlayers 3, lr 30, clip 0.25, bptt 70, dropout 0.4,
    # dropoute 0.1, wdrop 0.5, alpha 2, beta 1, wdecay 1.2e-6, tied, NT-ASGD with nonmono 5).
    # AWD's loss is the mean over steps and batch, rnnreg's the sum over the L steps of the
    # window (mean over the batch), so its gradient is L times AWD's. At the nominal L = 70 the
    # same SGD step needs lr 30/70, clip 0.25*70 and weight decay 1.2e-6*70 (decay is added to
    # the gradient, so it scales with the loss); AR/TAR are already scaled by L in the trainer,
    # so alpha and beta stay. With variable windows both codes scale the step by L/70; rnnreg's
    # summed loss adds one more factor L/70 (about 1 +- 0.07; 0.5 on the 5% half-length
    # windows). AWD initialises the embedding uniform(-0.1, 0.1), the decoder bias at 0 and the
    # LSTM with torch's default; rnnreg has one uniform range for every weight: 0.1.
    Preset("awd", dict(
        cell="lstm", hidden_size=400, num_layers=3, layer_sizes=(1150, 1150, 400),
        embedding_size=None, tie_weights=True, init_range=0.1,
        strategy="awd", strategy_p=0.4, input_dropout=0.4, between_dropout=0.25,
        weight_dropout=0.5, embedding_dropout=0.1, activation_reg=2.0,
        temporal_activation_reg=1.0, weight_decay=1.2e-6 * 70,
        batch_size=20, bptt=70, variable_bptt=True, epochs=500, seed=141,
        lr=30 / 70, lr_decay=1.0, clip_norm=0.25 * 70, optimizer="asgd", asgd_nonmono=5,
        valid_batch_size=10,                           # AWD validates with batch 10
    ), _AWD, {"valid": 60.0, "test": 57.3},
        "AWD-LSTM 400-1150-1150-400, tied, 24M parameters; the paper's numbers include AWD's "
        "fine-tuning stage, which rnnreg does not implement (without it: 60.7 / 58.8 in the "
        "paper, about 61.2 / 58.8 for this README recipe, batch 20 where the paper used 40); "
        "lr 30/70, clip 0.25*70 and weight decay 1.2e-6*70 because rnnreg sums the loss over "
        "the 70 steps where AWD averages; init uniform 0.1 for every weight"),
    # The lowest PTB test perplexity found for 30 minutes of training on this project's 2-core
    # CPU (results/cpu-30min). The budget binds, not the epochs: the cosine schedule anneals
    # over whichever runs out first, so the run ends annealed at 30 minutes on any machine.
    # Tying (Press & Wolf 2017) and bfloat16 autocast buy a 400-unit model about 9 epochs here.
    Preset("cpu-30min", dict(
        hidden_size=400, num_layers=2, tie_weights=True, bptt=35, batch_size=20,
        init_range=0.05, strategy="zaremba", strategy_p=0.35,
        lr=1.0, lr_schedule="cosine", clip_norm=5.0, epochs=40, max_train_minutes=30.0,
        precision="bfloat16",
    ), "rnnreg: time-to-quality on 2 CPU cores (no published numbers; reference points: the "
       "paper's small recipe reaches about 113 test in 30 minutes here, a plain 2x300 tied "
       "LSTM with dropout 0.3 and a halving schedule 94.3 in 27 minutes)",
        {}, "2x400 tied, zaremba 0.35, bfloat16, cosine over a 30-minute budget"),
    # The paper's small model on the first 100k training tokens: it overfits within a few
    # epochs without dropout (the regime where placement matters), and the default study
    # (6 strategies x 2 rates) fits in about an hour on 2 CPU cores.
    Preset("study-small", dict(
        hidden_size=200, num_layers=2, bptt=20, batch_size=20, init_range=0.1,
        strategy="zaremba", strategy_p=0.25, train_tokens=100_000,
        lr=1.0, lr_decay=0.5, decay_after=3, clip_norm=5.0, epochs=6,
        valid_batch_size=10,
    ), "rnnreg: a 2-core-CPU budget for the dropout-strategy study (no published numbers)",
        {}, "2x200 on 100k training tokens, 6 epochs"),
    # The study's regimes (rnnreg.study.grid.PLANS). "text": a model wide for its data, so
    # that without dropout it overfits (its valid perplexity turns up) within the budget; the
    # 3,000 most frequent words (the rest are <unk>) make the softmax 3x cheaper, and scoring
    # the first 10k valid and test tokens keeps evaluation well below training's cost.
    Preset("study-text", dict(
        hidden_size=256, num_layers=2, bptt=20, batch_size=20, init_range=0.1,
        strategy="zaremba", strategy_p=0.5, train_tokens=20_000, max_vocab=3000,
        lr=1.0, lr_decay=0.5, decay_after=8, clip_norm=5.0, epochs=12,
        valid_batch_size=10, eval_tokens=10_000,
    ), _STUDY, {}, "2x256 on 20k training tokens, 3k words, 12 epochs"),
    # "memory": the recall corpus (rnnreg.lm.corpus.recall); windows longer than its longest
    # distance, so truncated backpropagation can learn every dependency the test asks for.
    Preset("study-recall", dict(
        hidden_size=128, num_layers=1, bptt=50, batch_size=20, init_range=0.1,
        strategy="zaremba", strategy_p=0.5,
        lr=1.0, lr_decay=0.5, decay_after=7, clip_norm=5.0, epochs=10,
    ), _STUDY, {}, "1x128 on the recall corpus, 10 epochs"),
)})


def preset_config(name: str) -> Config:
    if name not in PRESETS:
        raise RnnregError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].config()


# --- time budgets -------------------------------------------------------------------------
# The budget rule is data measured on this project's 2-core CPU: benchmarks/budget_sweep.py
# trains variants of cpu-30min (size, dropout rate, softmax, weight average) for budgets of
# training minutes on corpora of different sizes, and writes, per corpus, budget and softmax,
# the variant with the lowest final validation perplexity to budget_rule.json (the runs and
# their logs: results/budget-sweep). budget_config reads it; nothing in it is typed by hand.
BUDGET_RULE_PATH = Path(__file__).with_name("budget_rule.json")
BUDGET_RULE = MappingProxyType(json.loads(BUDGET_RULE_PATH.read_text(encoding="utf-8")))


def budget_config(minutes: float, vocab_size: int, *, softmax: str | None = None) -> Config:
    """The measured recipe for ``minutes`` of training on a corpus of ``vocab_size`` words.

    The rule's rows come from the corpus measured with the nearest vocabulary size (by ratio);
    among them the longest measured budget not above ``minutes`` (the shortest measured one for
    a budget below them all), so that a longer budget never gets a model chosen for less time
    than it was measured with. ``softmax`` restricts the rows to that decoder (to compare
    decoders at one budget); by default the best of either. The run's own budget is
    ``minutes``: the cosine schedule anneals over it.
    """
    if not 0 < minutes < math.inf:
        raise RnnregError(f"a time budget must be a finite number of minutes > 0, got {minutes}")
    if vocab_size < 2:
        raise RnnregError(f"vocab_size must be at least 2, got {vocab_size}")
    rows = [row for row in BUDGET_RULE["rows"]
            if softmax is None or _row_softmax(row) == softmax]
    if not rows:
        raise RnnregError(f"the budget rule has no measured recipe with softmax={softmax!r}")
    if softmax is None:
        rows = [row for row in rows if row["best"]]
    nearest = min(abs(math.log(row["vocab"] / vocab_size)) for row in rows)
    rows = [row for row in rows if abs(math.log(row["vocab"] / vocab_size)) == nearest]
    within = [row for row in rows if row["minutes"] <= minutes]
    row = (max(within, key=lambda r: r["minutes"]) if within
           else min(rows, key=lambda r: r["minutes"]))
    return preset_config(BUDGET_RULE["base"]).replace(**row["config"],
                                                       max_train_minutes=float(minutes))


def _row_softmax(row: Mapping[str, Any]) -> str:
    return row["config"].get("softmax", preset_config(BUDGET_RULE["base"]).softmax)
