"""Presets as data: each is a set of Config overrides with the published numbers beside it.

A preset never selects a code path; it only fills fields of :class:`rnnreg.lm.config.Config`, so
every preset runs through the same model and trainer, and a test builds every one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from rnnreg.errors import RnnregError
from rnnreg.lm.adaptive import default_cutoffs
from rnnreg.lm.config import Config

__all__ = ["BUDGET_RULE", "PRESETS", "Preset", "budget_config", "preset_config"]


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


# --- time budgets beyond PTB ---------------------------------------------------------------
# cpu-30min is tuned for one point: 30 minutes, PTB's 10k words, a 2x400 model. budget_config
# moves that point along the two axes a new corpus changes. It keeps the number of training
# tokens the budget buys equal to the reference run's (so the cosine schedule anneals over about
# as many updates as it was tuned for) by choosing the largest hidden size whose cost per token
# fits ``minutes / reference_minutes`` times the reference cost, where the cost per token is the
# multiply-adds of the LSTM (8 H^2 per layer: four gates, input and recurrent products) plus
# the softmax's (H x its width: V for the full softmax; for the adaptive one the head's entries
# plus each cluster's words divided by its reduction, as if every token paid every cluster, an
# upper bound). Vocabularies above ``adaptive_above`` words get the adaptive softmax, untied
# (rnnreg refuses tying there); smaller ones keep the tuned, tied full softmax. The rule is a
# design, not a measurement: benchmarks/budget_study.py measures it.
BUDGET_RULE = MappingProxyType(dict(
    base="cpu-30min", reference_minutes=30.0, reference_vocab=10_000, reference_hidden=400,
    adaptive_above=20_000, hidden_step=50, min_hidden=100, max_hidden=1500,
))


def budget_config(minutes: float, vocab_size: int, *, softmax: str | None = None) -> Config:
    """The cpu-30min recipe resized for a ``minutes`` budget and ``vocab_size`` words.

    ``softmax`` forces the decoder (e.g. to compare full and adaptive at one budget); by
    default the rule picks it. See :data:`BUDGET_RULE` for the rule and its reasons.
    """
    rule = BUDGET_RULE
    if not minutes > 0:
        raise RnnregError(f"a time budget must be > 0 minutes, got {minutes}")
    if vocab_size < 2:
        raise RnnregError(f"vocab_size must be at least 2, got {vocab_size}")
    base = preset_config(rule["base"])
    if softmax is None:
        softmax = "adaptive" if vocab_size > rule["adaptive_above"] else "full"
    width = _softmax_width(softmax, vocab_size, base.adaptive_div_value)
    budget = (_cost(rule["reference_hidden"], rule["reference_vocab"], base.num_layers)
              * minutes / rule["reference_minutes"])
    hidden = rule["min_hidden"]
    for size in range(rule["min_hidden"], rule["max_hidden"] + 1, rule["hidden_step"]):
        if _cost(size, width, base.num_layers) <= budget:
            hidden = size
    return base.replace(softmax=softmax, tie_weights=softmax == "full", hidden_size=hidden,
                        max_train_minutes=float(minutes))


def _cost(hidden: int, softmax_width: float, layers: int) -> float:
    """Multiply-adds per token: the LSTM layers and the softmax (see BUDGET_RULE)."""
    return 8 * layers * hidden ** 2 + hidden * softmax_width


def _softmax_width(softmax: str, vocab_size: int, div_value: float) -> float:
    if softmax == "full":
        return float(vocab_size)
    cutoffs = default_cutoffs(vocab_size)
    bounds = (*cutoffs, vocab_size)
    clusters = sum((high - low) / div_value ** (i + 1)
                   for i, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])))
    return cutoffs[0] + len(cutoffs) + clusters
