"""One frozen configuration for a language-modeling run: data, model, regularization, training.

Every default lives here, once, with its reason. Presets (``rnnreg.lm.presets``) are sets of
overrides of these fields; CLI flags override presets; the resolved config is what a run
directory stores in ``config.json`` and what ``--resume`` rebuilds from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from rnnreg.nn.functional import (
    check_positive_int,
    check_probability,
    check_zoneout,
    is_positive_int,
)
from rnnreg.nn.layers import LAYERS
from rnnreg.nn.strategies import STRATEGIES, check_recurrent_mask

__all__ = ["CELLS", "LEVELS", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS", "SOFTMAXES", "Config",
           "flag"]

CELLS = tuple(LAYERS)  # "lstm", "gru", "rnn"
LEVELS = ("word", "char")
OPTIMIZERS = ("sgd", "asgd")
LR_SCHEDULES = ("step", "cosine")
PRECISIONS = ("float32", "bfloat16")
SOFTMAXES = ("full", "adaptive")


@dataclass(frozen=True)
class Config:
    # --- data ---------------------------------------------------------------------------
    level: str = "word"             # "word" (PTB as in the paper) or "char"
    # A corpus given as one text file is cut into contiguous train/valid/test parts by these
    # fractions of its tokens (char-rnn and nanoGPT ship Tiny Shakespeare as one input.txt).
    split_fractions: tuple[float, ...] = (0.9, 0.05, 0.05)
    # Raw text has no <unk>: one is added, and training words rarer than min_count, or beyond
    # the max_vocab most frequent, are folded into it (as Mikolov did for PTB's 10k words).
    max_vocab: int | None = None
    min_count: int = 1

    # --- model --------------------------------------------------------------------------
    cell: str = "lstm"              # the paper's cell; "gru" and "rnn" for the comparisons
    hidden_size: int = 200          # paper's small model (the top layer's size with layer_sizes)
    num_layers: int = 2             # paper: 2 layers for every size
    embedding_size: int | None = None  # None = hidden_size, as in the paper
    # Hidden size of each recurrent layer, bottom to top; None = num_layers layers of
    # hidden_size. When given it must have num_layers entries and end with hidden_size, so
    # those two fields keep describing the model (depth, and the size the decoder and a tied
    # embedding see): AWD-LSTM is layer_sizes=(1150, 1150, 400), num_layers=3, hidden_size=400.
    layer_sizes: tuple[int, ...] | None = None
    tie_weights: bool = False       # Press & Wolf 2017 / AWD; the paper does not tie
    init_range: float = 0.1         # uniform(-r, r) for every weight (paper, section 4.1)
    # "full": one V-way softmax (the paper). "adaptive": Grave et al. 2017 (rnnreg.lm.adaptive),
    # exact and normalized, several times cheaper at large vocabularies.
    softmax: str = "full"
    # Ids where the adaptive head and each cluster end, increasing; None = the 2,000th and
    # 10,000th most frequent words when the vocabulary is larger (rnnreg.lm.adaptive).
    adaptive_cutoffs: tuple[int, ...] | None = None
    adaptive_div_value: float = 4.0  # cluster i projects to hidden_size / div^(i+1) features

    # --- regularization ----------------------------------------------------------------
    strategy: str = "none"          # a name in rnnreg.STRATEGIES
    # The strategy's rate p (paper: 0 small, 0.5 medium, 0.65 large); the flag is --dropout.
    # Not a layer's ``dropout``, which is torch's between-layer rate (between_dropout here).
    strategy_p: float = 0.0
    # Per-placement overrides of p; None = follow the strategy.
    input_dropout: float | None = None
    between_dropout: float | None = None
    output_dropout: float | None = None
    recurrent_dropout: float | None = None
    weight_dropout: float | None = None
    # "sequence" (Gal: one recurrent mask per row) or "batch" (one per call, fused kernel);
    # None = the strategy's. Needs a variational strategy when "batch".
    recurrent_mask: str | None = None
    # Zoneout rates (Krueger et al. 2017), probabilities below 1; None = follow the strategy
    # (``zoneout``: cell p, hidden p/10). zoneout_cell exists only for the LSTM.
    zoneout_hidden: float | None = None
    zoneout_cell: float | None = None
    embedding_dropout: float = 0.0  # whole-word dropout (Gal & Ghahramani 2016, section 5)
    activation_reg: float = 0.0     # AR, alpha in Merity et al. 2018 eq. 3 (AWD uses 2)
    temporal_activation_reg: float = 0.0  # TAR, beta in Merity et al. 2018 eq. 4 (AWD uses 1)
    weight_decay: float = 0.0       # L2 through the optimizer (Gal uses it; Zaremba does not)

    # --- training -----------------------------------------------------------------------
    train_tokens: int = 0           # train on the first N tokens only (0 = all): budget studies
    batch_size: int = 20            # parallel streams (paper: 20)
    bptt: int = 20                  # unrolled steps (paper: 20 small, 35 medium and large)
    variable_bptt: bool = False     # AWD: window length drawn around bptt each step
    epochs: int = 13                # paper's small model
    lr: float = 1.0                 # plain SGD, paper's learning rate
    lr_schedule: str = "step"       # "step": the paper's per-epoch decay; "cosine": see lr_at
    lr_decay: float = 0.5           # multiply lr by this each epoch after decay_after
    decay_after: int = 4            # epochs at the full learning rate
    clip_norm: float = 5.0          # global gradient-norm clipping (paper: 5; large: 10)
    optimizer: str = "sgd"          # "sgd" (paper) or "asgd" (AWD's non-monotonic trigger)
    asgd_nonmono: int = 5           # AWD: epochs without improvement before averaging starts
    seed: int = 1
    device: str = "auto"            # "auto" = cuda when available, else cpu
    # "bfloat16" runs the training forward under autocast (mixed precision: float32 weights,
    # optimizer and loss); evaluation always runs in float32, so perplexities stay exact.
    precision: str = "float32"

    # --- evaluation and bookkeeping ----------------------------------------------------
    eval_bptt: int = 100            # window length when scoring a split as one stream
    valid_batch_size: int = 1       # 1 = the split as one stream; larger is faster, approximate
    checkpoint_minutes: float = 5.0  # also checkpoint mid-epoch this often
    checkpoint_steps: int = 0       # and/or every N steps (0 = off); used by the resume tests
    max_train_minutes: float = 0.0  # stop training after this much wall time (0 = no limit)
    # A "step" record (train loss, tokens/s, lr) every log_every windows; 0 = about every 30 s,
    # so curves exist long before the first epoch ends.
    log_every: int = 0

    def __post_init__(self) -> None:
        _check_choice("cell", self.cell, CELLS)
        _check_choice("strategy", self.strategy, tuple(STRATEGIES))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("level", self.level, LEVELS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("softmax", self.softmax, SOFTMAXES)
        for name in ("hidden_size", "num_layers", "batch_size", "bptt", "epochs", "eval_bptt",
                     "valid_batch_size", "asgd_nonmono"):
            check_positive_int(name, getattr(self, name))
        if self.embedding_size is not None:
            check_positive_int("embedding_size", self.embedding_size)
        self._check_layer_sizes()
        self._check_split_fractions()
        if self.max_vocab is not None:
            check_positive_int("max_vocab", self.max_vocab)
        check_positive_int("min_count", self.min_count)
        self._check_recurrent_mask()
        self._check_adaptive()
        check_probability(f"strategy_p ({flag('strategy_p')})", self.strategy_p)
        for name in ("embedding_dropout", "input_dropout", "between_dropout",
                     "output_dropout", "recurrent_dropout", "weight_dropout"):
            value = getattr(self, name)
            if value is not None:
                check_probability(name, value)
        for name in ("zoneout_hidden", "zoneout_cell"):
            if getattr(self, name) is not None:
                check_zoneout(name, getattr(self, name))
        if self.cell != "lstm" and self.zoneout_cell:
            raise ValueError(f"zoneout_cell needs a cell state: only the lstm has one, not "
                             f"the {self.cell}; use zoneout_hidden")
        for name in ("lr", "clip_norm", "init_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_decay", "weight_decay", "activation_reg", "temporal_activation_reg",
                     "checkpoint_minutes", "max_train_minutes", "decay_after", "checkpoint_steps",
                     "train_tokens", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # Computed once, from fields checked above (the zoneout rates derived from p are
        # checked as they are made); every layer built from this config takes these.
        object.__setattr__(self, "_layer_options", self._strategy_settings())
        if self.tie_weights and self.embedding_size not in (None, self.hidden_size):
            last = "" if self.layer_sizes is None else ", the last of layer_sizes"
            raise ValueError(f"tie_weights needs embedding_size == hidden_size{last} "
                             f"({self.hidden_size}), or unset; got {self.embedding_size}")

    def _check_recurrent_mask(self) -> None:
        if self.recurrent_mask is None:
            return
        check_recurrent_mask(self.recurrent_mask)
        if self.recurrent_mask == "batch" and not STRATEGIES[self.strategy].variational:
            raise ValueError(f"recurrent_mask='batch' needs a variational strategy (one mask per "
                             f"call, shared by every step); {self.strategy!r} draws fresh masks "
                             "every step")

    def _check_adaptive(self) -> None:
        """Cutoffs are checked against the vocabulary when the model is built; here their form."""
        if self.adaptive_cutoffs is not None:
            cutoffs = self.adaptive_cutoffs
            if isinstance(cutoffs, str | bytes) or not isinstance(cutoffs, tuple | list):
                raise ValueError(f"adaptive_cutoffs must be a sequence of increasing positive "
                                 f"integers, got {cutoffs!r}")
            object.__setattr__(self, "adaptive_cutoffs", tuple(cutoffs))  # JSON gives lists
            if (not cutoffs or not all(map(is_positive_int, cutoffs))
                    or list(cutoffs) != sorted(set(cutoffs))):
                raise ValueError(f"adaptive_cutoffs must be strictly increasing positive "
                                 f"integers, got {list(cutoffs)}")
        if not self.adaptive_div_value >= 1:
            raise ValueError(f"adaptive_div_value must be >= 1, got {self.adaptive_div_value}")
        if self.softmax == "adaptive" and self.tie_weights:
            # Baevski & Auli (2019) tie an adaptive softmax to an adaptive *input* embedding,
            # band by band; rnnreg's embedding is one V x E matrix, so there is nothing to tie
            # the clusters' reduced-dimension word vectors and projections to.
            raise ValueError("tie_weights is not available with softmax='adaptive': its "
                             "clusters have reduced-dimension word vectors that a full "
                             "embedding cannot share; use --no-tie-weights or --softmax full")

    def _check_layer_sizes(self) -> None:
        sizes = self.layer_sizes
        if sizes is None:
            return
        if isinstance(sizes, str | bytes) or not isinstance(sizes, tuple | list):
            raise ValueError(f"layer_sizes must be a sequence of positive integers, "
                             f"got {sizes!r}")
        # JSON gives lists back: store a tuple so the frozen config stays hashable and equal.
        object.__setattr__(self, "layer_sizes", tuple(sizes))
        if not all(map(is_positive_int, self.layer_sizes)):
            raise ValueError(f"layer_sizes must be positive integers, got {sizes!r}")
        if len(self.layer_sizes) != self.num_layers:
            raise ValueError(f"layer_sizes {self.layer_sizes} has {len(self.layer_sizes)} "
                             f"entries but num_layers={self.num_layers}: give one size per "
                             "layer (or set num_layers to match)")
        if self.layer_sizes[-1] != self.hidden_size:
            raise ValueError(f"layer_sizes {self.layer_sizes} ends with "
                             f"{self.layer_sizes[-1]} but hidden_size={self.hidden_size}: "
                             "hidden_size is the last layer's size (set it to match)")

    def _check_split_fractions(self) -> None:
        fractions = self.split_fractions
        if isinstance(fractions, str | bytes) or not isinstance(fractions, tuple | list):
            raise ValueError(f"split_fractions must be three numbers, got {fractions!r}")
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in fractions))
        fractions = self.split_fractions
        if (len(fractions) != 3 or not all(0 < f < 1 for f in fractions)
                or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)):
            raise ValueError(f"split_fractions must be three fractions in (0, 1) for train, "
                             f"valid and test that sum to 1, got {fractions!r}")

    @property
    def sizes(self) -> tuple[int, ...]:
        """Hidden size of every recurrent layer, bottom to top, whichever way it was given."""
        if self.layer_sizes is None:
            return (self.hidden_size,) * self.num_layers
        return self.layer_sizes

    @property
    def embedding_dim(self) -> int:
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    def layer_options(self) -> dict[str, float | bool | str]:
        """The recurrent layer's keyword options: the strategy at rate p, then the overrides.

        Every regularization keyword the layer takes (rates, ``variational``, the mask
        sharing), not only dropout rates: hence options. A fresh dict each call, so a caller
        may take entries out of it.
        """
        return dict(self._layer_options)

    def _strategy_settings(self) -> dict[str, float | bool | str]:
        """The options, from the strategy's record (:meth:`rnnreg.Strategy.settings`).

        A GRU or Elman RNN has no cell state, so the strategy's cell zoneout rate is left out
        for them (an explicit ``zoneout_cell`` is refused when the config is built).
        """
        overrides = {
            keyword: value
            for keyword, value in (("input_dropout", self.input_dropout),
                                   ("dropout", self.between_dropout),
                                   ("output_dropout", self.output_dropout),
                                   ("recurrent_dropout", self.recurrent_dropout),
                                   ("weight_dropout", self.weight_dropout),
                                   ("recurrent_mask", self.recurrent_mask),
                                   ("zoneout_hidden", self.zoneout_hidden),
                                   ("zoneout_cell", self.zoneout_cell))
            if value is not None
        }
        settings = STRATEGIES[self.strategy].settings(self.strategy_p, **overrides)
        if self.cell != "lstm":
            settings.pop("zoneout_cell", None)
        return settings

    def lr_at(self, epoch: int, done: float = 0.0) -> float:
        """Learning rate of a step in 1-based ``epoch`` when the fraction ``done`` is behind.

        ``step`` is the paper's schedule (sec. 4.1): constant for ``decay_after`` epochs, then
        decayed geometrically; it ignores ``done``. ``cosine`` anneals from ``lr`` to 0 over the
        whole run (Loshchilov & Hutter 2017, one cycle, no restarts): a run cut by
        ``max_train_minutes`` still ends annealed when ``done`` counts the time budget.
        """
        if self.lr_schedule == "step":
            return self.lr * self.lr_decay ** max(epoch - self.decay_after, 0)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))

    def replace(self, **changes: Any) -> Config:
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config has unknown field(s) {unknown}; written by a newer rnnreg?")
        return cls(**data)


# Fields whose command-line flag is not their own name: the strategy's rate p keeps the flag
# --dropout, the name users give it on the command line.
_FLAG_NAMES = {"strategy_p": "dropout"}


def flag(name: str) -> str:
    """The command-line flag of Config field ``name``: ``hidden_size`` -> ``--hidden-size``."""
    return "--" + _FLAG_NAMES.get(name, name).replace("_", "-")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

