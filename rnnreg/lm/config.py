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

from rnnreg.errors import RnnregError
from rnnreg.nn.functional import (
    check_positive_int,
    check_probability,
    check_zoneout,
    is_positive_int,
)
from rnnreg.nn.layers import LAYERS
from rnnreg.nn.regularization import RECURRENT_MASKS, Regularization, check_recurrent_mask
from rnnreg.nn.strategies import STRATEGIES

__all__ = ["CELLS", "LEVELS", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS", "RATE_STRATEGIES",
           "RESUME_RULES", "SOFTMAXES", "Config", "on_resume"]

CELLS = tuple(LAYERS)  # "lstm", "gru", "rnn"
LEVELS = ("word", "char")
OPTIMIZERS = ("sgd", "asgd")
LR_SCHEDULES = ("step", "cosine")
PRECISIONS = ("float32", "bfloat16")
SOFTMAXES = ("full", "adaptive")
# The strategies that use the rate strategy_p: every one but "none".
RATE_STRATEGIES = tuple(name for name in STRATEGIES if name != "none")


# What a resume may do to a field (:func:`on_resume`): "keep" it (it says what is trained, on
# what data, how: a change would train another model under the run's name), change it freely
# ("change": how the run is saved and logged, which no weight depends on), or only "raise" it
# (the budget: more epochs or minutes extend the same run).
RESUME_RULES = ("keep", "change", "raise")


def _option(default: Any, group: str, help: str, metavar: str | None = None,
            choices: tuple[str, ...] | None = None, on_resume: str = "keep") -> Any:
    """A field's default and its command-line flag: the flag's one line of help, its group in
    ``rnnreg train --help`` (a key of ``rnnreg.cli.flags.GROUPS``), the name its value has in
    that help (``metavar``) and the values it takes; and what a resume may do to it (a value
    of :data:`RESUME_RULES`).

    Held by the field itself, so the flag (:mod:`rnnreg.cli.flags`) cannot drift from the field.
    The help names other fields in backquotes (:mod:`rnnreg.errors`), which the flag's help
    shows as their flags.
    """
    if on_resume not in RESUME_RULES:
        raise ValueError(f"on_resume must be one of {', '.join(RESUME_RULES)}; got {on_resume!r}")
    return dataclasses.field(default=default, metadata={
        "group": group, "help": help, "metavar": metavar, "choices": choices,
        "on_resume": on_resume})


def on_resume(rule: str) -> tuple[str, ...]:
    """The names of the Config fields a resume may treat by ``rule`` (see
    :data:`RESUME_RULES`): the one place that says which settings define a run."""
    return tuple(f.name for f in fields(Config) if f.metadata["on_resume"] == rule)


@dataclass(frozen=True)
class Config:
    # --- data ---------------------------------------------------------------------------
    # "word" is PTB as in the paper.
    level: str = _option("word", "data", "word tokens, or characters (_ between words)",
                         choices=LEVELS)
    # A corpus given as one text file is cut into contiguous train/valid/test parts by these
    # fractions of its tokens (char-rnn and nanoGPT ship Tiny Shakespeare as one input.txt).
    split_fractions: tuple[float, ...] = _option(
        (0.9, 0.05, 0.05), "data", "F for train, valid, test of a one-file corpus", "F")
    # Raw text has no <unk>: one is added, and training words rarer than min_count, or beyond
    # the max_vocab most frequent, are folded into it (as Mikolov did for PTB's 10k words).
    max_vocab: int | None = _option(None, "data", "keep the N most frequent words; none = all",
                                    "N")
    min_count: int = _option(1, "data", "fold words seen < K times into <unk>", "K")

    # --- model --------------------------------------------------------------------------
    # The paper's cell; "gru" and "rnn" for the comparisons.
    cell: str = _option("lstm", "model", "recurrent cell", choices=CELLS)
    # The paper's small model; the top layer's size when layer_sizes is given.
    hidden_size: int = _option(200, "model", "N units per layer (top one with `layer_sizes`)",
                               "N")
    num_layers: int = _option(2, "model", "N recurrent layers", "N")  # paper: 2 for every size
    # None = hidden_size, as in the paper.
    embedding_size: int | None = _option(None, "model", "embedding width N; none = `hidden_size`",
                                         "N")
    # Hidden size of each recurrent layer, bottom to top; None = num_layers layers of
    # hidden_size. When given it must have num_layers entries and end with hidden_size, so
    # those two fields keep describing the model (depth, and the size the decoder and a tied
    # embedding see): AWD-LSTM is layer_sizes=(1150, 1150, 400), num_layers=3, hidden_size=400.
    # On the command line it sets --num-layers and --hidden-size unless they are given.
    layer_sizes: tuple[int, ...] | None = _option(
        None, "model", "N per layer, bottom to top; none = uniform", "N")
    # Press & Wolf 2017 / AWD; the paper does not tie.
    tie_weights: bool = _option(False, "model", "tie embedding and decoder (Press & Wolf 2017)")
    # Every weight (paper, section 4.1).
    init_range: float = _option(0.1, "model", "weights start uniform in (-R, R)", "R")
    # "full": one V-way softmax (the paper). "adaptive": Grave et al. 2017 (rnnreg.lm.adaptive),
    # exact and normalized, several times cheaper at large vocabularies.
    softmax: str = _option("full", "model", "full (the paper's), or adaptive (Grave et al.)",
                           choices=SOFTMAXES)
    # Ids where the adaptive head and each cluster end, increasing; None = the 2,000th and
    # 10,000th most frequent words when the vocabulary is larger (rnnreg.lm.adaptive).
    adaptive_cutoffs: tuple[int, ...] | None = _option(
        None, "model", "word ID where the head and each cluster end", "ID")
    adaptive_div_value: float = _option(
        4.0, "model", "cluster i gets hidden_size / D^(i+1) features", "D")

    # --- regularization ----------------------------------------------------------------
    strategy: str = _option("none", "regularization",
                            "strategy NAME: where masks act, how often", "NAME",
                            choices=tuple(STRATEGIES))
    # The strategy's rate p (paper: 0 small, 0.5 medium, 0.65 large); its flag is --dropout.
    # Not a layer's ``dropout``, which is torch's between-layer rate (between_dropout here).
    strategy_p: float = _option(0.0, "regularization", "the strategy's dropout rate P", "P")
    # Per-placement overrides of p; None = follow the strategy.
    input_dropout: float | None = _option(
        None, "regularization", "P on the embedding; none = the strategy's", "P")
    between_dropout: float | None = _option(
        None, "regularization", "P between layers; none = the strategy's", "P")
    output_dropout: float | None = _option(
        None, "regularization", "P before the decoder; none = the strategy's", "P")
    recurrent_dropout: float | None = _option(
        None, "regularization", "P on h(t-1); none = the strategy's", "P")
    weight_dropout: float | None = _option(
        None, "regularization", "DropConnect P on W_hh; none = the strategy's", "P")
    # "sequence" (Gal: one recurrent mask per row) or "batch" (one per call, fused kernel);
    # None = the strategy's. Needs a variational strategy when "batch".
    recurrent_mask: str | None = _option(
        None, "regularization", "per sequence (Gal) or batch; none = strategy's",
        choices=RECURRENT_MASKS)
    # Zoneout rates (Krueger et al. 2017), probabilities below 1; None = follow the strategy
    # (``zoneout``: cell p, hidden p/10). zoneout_cell exists only for the LSTM.
    zoneout_hidden: float | None = _option(
        None, "regularization", "zoneout P on h; none = the strategy's", "P")
    zoneout_cell: float | None = _option(
        None, "regularization", "zoneout P on LSTM's c; none = the strategy's", "P")
    # Gal & Ghahramani 2016, section 5.
    embedding_dropout: float = _option(
        0.0, "regularization", "whole-word dropout P (Gal & Ghahramani 2016)", "P")
    # AWD uses alpha 2 and beta 1.
    activation_reg: float = _option(
        0.0, "regularization", "AR penalty ALPHA (Merity et al. 2018, eq. 3)", "ALPHA")
    temporal_activation_reg: float = _option(
        0.0, "regularization", "TAR penalty BETA (Merity et al. 2018, eq. 4)", "BETA")
    # Gal uses it; Zaremba does not.
    weight_decay: float = _option(0.0, "regularization", "L2 weight penalty through the optimizer",
                                  "L2")

    # --- training -----------------------------------------------------------------------
    # For budget studies.
    train_tokens: int = _option(0, "data", "train on the first N tokens only; 0 = all", "N")
    batch_size: int = _option(20, "optimization", "B parallel streams", "B")  # paper: 20
    # Paper: 20 small, 35 medium and large.
    bptt: int = _option(20, "optimization", "T unrolled steps per window", "T")
    # AWD: the window length is drawn around bptt each step.
    variable_bptt: bool = _option(False, "optimization", "random window lengths around T (AWD)")
    epochs: int = _option(13, "schedule", "N passes over the training split", "N",  # paper: small
                          on_resume="raise")
    lr: float = _option(1.0, "optimization", "learning rate LR", "LR")  # the paper's plain SGD
    # "step": the paper's per-epoch decay; "cosine": see lr_at.
    lr_schedule: str = _option("step", "schedule", "step: decay per epoch; cosine: anneal to 0",
                               choices=LR_SCHEDULES)
    lr_decay: float = _option(0.5, "schedule", "step: multiply the lr by F each epoch", "F")
    decay_after: int = _option(4, "schedule", "step: N epochs at the full lr", "N")
    # Global gradient-norm clipping (paper: 5; large: 10).
    clip_norm: float = _option(5.0, "optimization", "clip the gradient norm at MAX", "MAX")
    # "sgd" (the paper) or "asgd" (AWD's non-monotonic trigger).
    optimizer: str = _option("sgd", "optimization", "sgd, or asgd (AWD's triggered averaging)",
                             choices=OPTIMIZERS)
    asgd_nonmono: int = _option(5, "optimization", "asgd averages after N epochs without gain",
                                "N")
    # An exponential moving average of the weights over the tail of the run
    # (rnnreg.lm.training.averaging): once it starts, valid, test and `best` use it. 0 = off.
    ema_decay: float = _option(0.0, "optimization",
                               "EMA of the weights, decay D per step; 0 = off", "D")
    # When the EMA starts: the fraction of the run done, by epochs or by the time budget,
    # whichever binds (the fraction the cosine schedule counts).
    ema_start: float = _option(0.5, "optimization", "start the EMA after fraction F of the run",
                               "F")
    seed: int = _option(1, "optimization", "random seed N", "N")
    # "auto" = cuda when available, else cpu.
    device: str = _option("auto", "device", "DEVICE: auto, cpu, cuda or cuda:N", "DEVICE")
    # "bfloat16" runs the training forward under autocast (mixed precision: float32 weights,
    # optimizer and loss); evaluation always runs in float32, so perplexities stay exact.
    precision: str = _option("float32", "optimization",
                             "training forward precision (evaluation: fp32)", choices=PRECISIONS)

    # --- evaluation and bookkeeping ----------------------------------------------------
    # The window length when a split is scored as one stream.
    eval_bptt: int = _option(100, "evaluation", "T steps per window when scoring one stream",
                             "T")
    # For budget studies: the held-out scores of a small model on a slice of the training
    # split cost more than its training when the whole valid and test splits are scored.
    eval_tokens: int = _option(0, "evaluation",
                               "score the first N valid, test tokens; 0 = all", "N")
    # 1 = the split as one stream; larger is faster, approximate.
    valid_batch_size: int = _option(1, "evaluation",
                                    "valid in B streams: 1 = exact, more = faster", "B")
    checkpoint_minutes: float = _option(5.0, "run", "checkpoint every M minutes; 0 = epoch ends",
                                        "M", on_resume="change")
    # Used by the resume tests.
    checkpoint_steps: int = _option(0, "run", "also checkpoint every N steps; 0 = off", "N",
                                    on_resume="change")
    max_train_minutes: float = _option(
        0.0, "schedule", "stop after M minutes of training; 0 = never", "M", on_resume="raise")
    # A "step" record (train loss, tokens/s, lr) every log_every windows; 0 = about every 30 s
    # of training, so curves exist long before the first epoch ends.
    log_every: int = _option(0, "run", "metrics record every N windows; 0 = ~30 s", "N",
                             on_resume="change")

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
        if self.eval_tokens == 1:
            raise RnnregError("`eval_tokens` must be 0 (all) or at least 2: one token "
                              "predicts nothing")
        if self.max_vocab is not None:
            check_positive_int("max_vocab", self.max_vocab)
        check_positive_int("min_count", self.min_count)
        self._check_recurrent_mask()
        self._check_adaptive()
        check_probability("strategy_p", self.strategy_p)
        if self.strategy == "none" and self.strategy_p > 0:  # else a rate that silently drops
            raise RnnregError(f"`strategy_p={self.strategy_p:g}` has no effect with "
                              f"`strategy='none'`, which places no dropout: choose a `strategy` "
                              f"that uses it ({', '.join(RATE_STRATEGIES)}), or `strategy_p=0`")
        for name in ("embedding_dropout", "input_dropout", "between_dropout",
                     "output_dropout", "recurrent_dropout", "weight_dropout"):
            value = getattr(self, name)
            if value is not None:
                check_probability(name, value)
        for name in ("zoneout_hidden", "zoneout_cell"):
            if getattr(self, name) is not None:
                check_zoneout(name, getattr(self, name))
        if self.cell != "lstm" and self.zoneout_cell:
            raise RnnregError(f"`zoneout_cell` needs a cell state: only the lstm has one, not "
                              f"the {self.cell}; use `zoneout_hidden`")
        for name in ("lr", "clip_norm", "init_range"):
            if not getattr(self, name) > 0:
                raise RnnregError(f"`{name}` must be > 0, got {getattr(self, name)}")
        for name in ("lr_decay", "weight_decay", "activation_reg", "temporal_activation_reg",
                     "checkpoint_minutes", "max_train_minutes", "decay_after", "checkpoint_steps",
                     "train_tokens", "eval_tokens", "log_every"):
            if getattr(self, name) < 0:
                raise RnnregError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        self._check_ema()
        # Made once, from fields checked above (the record checks the zoneout rates derived
        # from p as it is made); every layer built from this config takes it.
        object.__setattr__(self, "_regularization", self._strategy_regularization())
        if self.tie_weights and self.embedding_size not in (None, self.hidden_size):
            last = "" if self.layer_sizes is None else ", the last of `layer_sizes`"
            raise RnnregError(f"`tie_weights` needs `embedding_size` == `hidden_size`{last} "
                              f"({self.hidden_size}), or unset; got {self.embedding_size}")

    def _check_ema(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise RnnregError(f"`ema_decay` must be in [0, 1) (0 = no average), got "
                              f"{self.ema_decay}: 1 would never move from its first copy")
        if not 0 <= self.ema_start < 1:
            raise RnnregError(f"`ema_start` is the fraction of the run after which the EMA "
                              f"starts, in [0, 1); got {self.ema_start}")
        if self.ema_decay and self.optimizer == "asgd":
            raise RnnregError("`ema_decay` averages the weights of a plain SGD run; NT-ASGD "
                              "(`optimizer='asgd'`) averages them itself, and a run evaluates "
                              "one average: use `optimizer='sgd'` with `ema_decay`, or 'asgd' "
                              "without it")

    def _check_recurrent_mask(self) -> None:
        if self.recurrent_mask is None:
            return
        check_recurrent_mask(self.recurrent_mask)
        if self.recurrent_mask == "batch" and not STRATEGIES[self.strategy].variational:
            raise RnnregError(f"`recurrent_mask='batch'` needs a variational `strategy` (one "
                              f"mask per call, shared by every step); {self.strategy!r} draws "
                              "fresh masks every step")

    def _check_adaptive(self) -> None:
        """Cutoffs are checked against the vocabulary when the model is built; here their form."""
        if self.adaptive_cutoffs is not None:
            cutoffs = self.adaptive_cutoffs
            if isinstance(cutoffs, str | bytes) or not isinstance(cutoffs, tuple | list):
                raise RnnregError(f"`adaptive_cutoffs` must be a sequence of increasing positive "
                                  f"integers, got {cutoffs!r}")
            object.__setattr__(self, "adaptive_cutoffs", tuple(cutoffs))  # JSON gives lists
            if (not cutoffs or not all(map(is_positive_int, cutoffs))
                    or list(cutoffs) != sorted(set(cutoffs))):
                raise RnnregError(f"`adaptive_cutoffs` must be strictly increasing positive "
                                  f"integers, got {list(cutoffs)}")
        if not self.adaptive_div_value >= 1:
            raise RnnregError(f"`adaptive_div_value` must be >= 1, got {self.adaptive_div_value}")
        if self.softmax == "adaptive" and self.tie_weights:
            # Baevski & Auli (2019) tie an adaptive softmax to an adaptive *input* embedding,
            # band by band; rnnreg's embedding is one V x E matrix, so there is nothing to tie
            # the clusters' reduced-dimension word vectors and projections to.
            raise RnnregError("`tie_weights` is not available with `softmax='adaptive'`: its "
                              "clusters have reduced-dimension word vectors that a full "
                              "embedding cannot share; use `tie_weights=False` or "
                              "`softmax='full'`")

    def _check_layer_sizes(self) -> None:
        sizes = self.layer_sizes
        if sizes is None:
            return
        if isinstance(sizes, str | bytes) or not isinstance(sizes, tuple | list):
            raise RnnregError(f"`layer_sizes` must be a sequence of positive integers, "
                              f"got {sizes!r}")
        # JSON gives lists back: store a tuple so the frozen config stays hashable and equal.
        object.__setattr__(self, "layer_sizes", tuple(sizes))
        if not all(map(is_positive_int, self.layer_sizes)):
            raise RnnregError(f"`layer_sizes` must be positive integers, got {sizes!r}")
        if len(self.layer_sizes) != self.num_layers:
            raise RnnregError(f"`layer_sizes` {self.layer_sizes} has {len(self.layer_sizes)} "
                              f"entries but `num_layers={self.num_layers}`: give one size per "
                              "layer (or set `num_layers` to match)")
        if self.layer_sizes[-1] != self.hidden_size:
            raise RnnregError(f"`layer_sizes` {self.layer_sizes} ends with "
                              f"{self.layer_sizes[-1]} but `hidden_size={self.hidden_size}`: "
                              "`hidden_size` is the last layer's size (set it to match)")

    def _check_split_fractions(self) -> None:
        fractions = self.split_fractions
        if isinstance(fractions, str | bytes) or not isinstance(fractions, tuple | list):
            raise RnnregError(f"`split_fractions` must be three numbers, got {fractions!r}")
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in fractions))
        fractions = self.split_fractions
        if (len(fractions) != 3 or not all(0 < f < 1 for f in fractions)
                or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)):
            raise RnnregError(f"`split_fractions` must be three fractions in (0, 1) for train, "
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

    @property
    def regularization(self) -> Regularization:
        """The recurrent stack's regularization: the strategy at rate p, then the overrides."""
        return self._regularization

    def _strategy_regularization(self) -> Regularization:
        """The record, from the strategy's (:meth:`rnnreg.Strategy.settings`).

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
        if self.cell != "lstm":
            overrides["zoneout_cell"] = 0.0
        return STRATEGIES[self.strategy].settings(self.strategy_p, **overrides)

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
            raise RnnregError(f"unknown config field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RnnregError(f"config has unknown field(s) {unknown}; written by a newer rnnreg?")
        return cls(**data)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RnnregError(f"`{name}` must be one of {', '.join(allowed)}; got {value!r}")

