"""Config -> flags: every Config field is a command-line flag of the same name.

``hidden_size`` is ``--hidden-size``, so one concept has one name in code, config.json, flags and
docs; the one exception, the strategy's rate ``strategy_p``, keeps the flag ``--dropout``
(:func:`rnnreg.lm.config.flag` names every field's flag). The flags are built from the
dataclass's resolved type hints rather than listed by hand, so a new Config field is a new flag
(with one line of help here) and nothing else. A module of its own because two commands
(``train``, ``compare``) build on it and neither owns it; the ``--data-dir`` option that every
corpus-reading command shares lives here for the same reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from rnnreg.lm.config import (
    CELLS,
    LEVELS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    SOFTMAXES,
    Config,
    flag,
)
from rnnreg.nn.strategies import RECURRENT_MASKS, STRATEGIES

__all__ = ["add_config_flags", "add_data_dir", "config_overrides"]


def add_data_dir(parser: argparse.ArgumentParser, recorded: bool = False) -> None:
    default = ("the corpus the run was trained on" if recorded else
               "$RNNREG_DATA, else the user cache")
    parser.add_argument("--data-dir", metavar="DIR_OR_FILE", help=(
        "corpus: a directory with {ptb.,}{train,valid,test}.txt (test optional), or one text "
        f"file cut by --split-fractions (default: {default})"))


# One line per Config field: what it does, in the words of config.py's comments.
_FIELD_HELP = {
    "level": "tokens: words, or characters with _ between words",
    "split_fractions": "train,valid,test fractions when the corpus is one text file",
    "max_vocab": "keep the N most frequent training words (<eos>, <unk> included), fold the "
                 "rest into <unk>; none = all",
    "min_count": "fold training words seen fewer than K times into <unk>",
    "cell": "recurrent cell",
    "hidden_size": "hidden units per layer (the top layer's with --layer-sizes)",
    "num_layers": "recurrent layers",
    "embedding_size": "embedding width; none = --hidden-size",
    "layer_sizes": "one size per layer, e.g. 1150 1150 400 or 1150,1150,400 (sets "
                   "--num-layers and --hidden-size unless given); none = uniform",
    "tie_weights": "share the embedding and decoder weights (Press & Wolf 2017)",
    "softmax": "full: one V-way softmax (the paper); adaptive: Grave et al. 2017's exact "
               "clustered softmax, several times faster at 30k+ words",
    "adaptive_cutoffs": "word ids where the adaptive head and each cluster end, e.g. 2000 "
                        "10000; none = 2000 and 10000 below the vocabulary size",
    "adaptive_div_value": "each adaptive cluster projects to hidden_size / div^(i+1) features",
    "init_range": "weights start uniform in (-r, r)",
    "strategy": "dropout strategy (where masks act, whether per step or per sequence)",
    "strategy_p": "the strategy's rate p (each placement it names gets p)",
    "input_dropout": "dropout rate on the embedding output; none = the strategy's",
    "between_dropout": "dropout rate between layers; none = the strategy's",
    "output_dropout": "dropout rate before the decoder; none = the strategy's",
    "recurrent_dropout": "dropout rate on h(t-1); none = the strategy's",
    "weight_dropout": "DropConnect rate on W_hh; none = the strategy's",
    "recurrent_mask": "sequence: one recurrent mask per row (Gal); batch: one per call, on the "
                      "fused kernel (variational strategies only); none = the strategy's",
    "zoneout_hidden": "zoneout rate on h (Krueger et al. 2017), in [0, 1); none = the "
                      "strategy's",
    "zoneout_cell": "zoneout rate on the LSTM's c, in [0, 1); none = the strategy's",
    "embedding_dropout": "whole-word dropout rate (Gal & Ghahramani 2016)",
    "activation_reg": "AR penalty alpha (Merity et al. 2018 eq. 3)",
    "temporal_activation_reg": "TAR penalty beta (Merity et al. 2018 eq. 4)",
    "weight_decay": "L2 penalty through the optimizer",
    "train_tokens": "train on the first N tokens only; 0 = all",
    "batch_size": "parallel streams",
    "bptt": "unrolled steps per window",
    "variable_bptt": "AWD's random window lengths around --bptt",
    "epochs": "passes over the training split (may be raised on --resume)",
    "lr": "learning rate",
    "lr_schedule": "step: decay each epoch after --decay-after; cosine: anneal to 0 over the run",
    "lr_decay": "factor the step schedule multiplies the lr by each epoch",
    "decay_after": "epochs at the full learning rate (step schedule)",
    "clip_norm": "gradient-norm clipping threshold",
    "optimizer": "sgd, or asgd (AWD's non-monotonically triggered averaging)",
    "asgd_nonmono": "epochs without improvement before ASGD starts averaging",
    "seed": "random seed",
    "device": "auto, cpu, cuda or cuda:N",
    "precision": "training forward precision (evaluation is always float32)",
    "eval_bptt": "window length when scoring a split as one stream",
    "valid_batch_size": "streams for the per-epoch valid score; 1 = exact, larger = faster, "
                        "approximate",
    "checkpoint_minutes": "checkpoint mid-epoch this often; 0 = only at epoch ends",
    "checkpoint_steps": "also checkpoint every N steps; 0 = off",
    "max_train_minutes": "stop after this much training time; 0 = no limit (may be raised "
                         "on --resume)",
    "log_every": "write a step record (loss, ppl, tokens/s, lr) every N windows; 0 = about "
                 "every 30 s",
}
_FIELD_CHOICES = {"level": LEVELS, "cell": CELLS, "strategy": tuple(STRATEGIES),
                  "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
                  "precision": PRECISIONS, "recurrent_mask": RECURRENT_MASKS,
                  "softmax": SOFTMAXES}


def add_config_flags(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()):
    """One flag per Config field (``hidden_size`` -> ``--hidden-size``), none by default.

    Flags are built from the fields' resolved types (``typing.get_type_hints``), so any
    annotation works, ``str | None`` included; ``none`` sets an optional field to None.
    """
    fields = parser.add_argument_group(
        "configuration", "defaults come from --preset (see `rnnreg presets`)")
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.name in exclude:
            continue
        name = flag(field.name)
        kind, optional = _unwrap_optional(hints[field.name])
        options = {"default": argparse.SUPPRESS, "help": _FIELD_HELP[field.name],
                   "dest": field.name}
        if kind is bool:
            fields.add_argument(name, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(kind) is tuple:
            fields.add_argument(name, nargs="+", action=_TupleAction,
                                item=typing.get_args(kind)[0], optional=optional,
                                metavar=typing.get_args(kind)[0].__name__.upper(), **options)
        elif field.name in _FIELD_CHOICES and optional:
            allowed = _FIELD_CHOICES[field.name]
            fields.add_argument(name, type=_none_or(kind), choices=(*allowed, None),
                                metavar="{" + ",".join((*allowed, "none")) + "}", **options)
        elif field.name in _FIELD_CHOICES:
            fields.add_argument(name, choices=_FIELD_CHOICES[field.name], **options)
        else:
            fields.add_argument(name, type=_none_or(kind) if optional else kind,
                                metavar=name[2:].replace("-", "_").upper(), **options)


def _unwrap_optional(hint) -> tuple[type, bool]:
    """``X | None`` -> (X, True); any other annotation -> (itself, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _none_or(kind: type):
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


class _TupleAction(argparse.Action):
    """``--layer-sizes 1150 1150 400`` (or ``1150,1150,400``) -> a tuple; ``none`` -> None."""

    def __init__(self, *args, item: type, optional: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.item, self.optional = item, optional

    def __call__(self, parser, namespace, values, option_string=None):
        if self.optional and [v.strip().lower() for v in values] == ["none"]:
            setattr(namespace, self.dest, None)
            return
        items = [item.strip() for value in values for item in value.split(",") if item.strip()]
        try:
            setattr(namespace, self.dest, tuple(self.item(item) for item in items))
        except ValueError:
            none = " or 'none'" if self.optional else ""
            parser.error(f"{option_string} takes {self.item.__name__}s{none}, "
                         f"got {' '.join(values)!r}")


def config_overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(Config)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    sizes = overrides.get("layer_sizes")
    if sizes:  # the depth and the top size follow the per-layer sizes unless given
        overrides.setdefault("num_layers", len(sizes))
        overrides.setdefault("hidden_size", sizes[-1])
    return overrides
