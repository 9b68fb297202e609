"""Config -> flags: every Config field is a command-line flag of the same name.

``hidden_size`` is ``--hidden-size``, so one concept has one name in code, config.json, flags and
docs; the one exception, the strategy's rate ``strategy_p``, keeps the flag ``--dropout``
(:func:`flag` names every field's flag, and :func:`worded` puts flags in the library's messages,
which name parameters as Python does). The flags are built from the
dataclass itself: each field's resolved type hint gives the flag's kind, and the field's
metadata (``rnnreg.lm.config``) its one line of help, its group and the name of its value, so a
new Config field is a new flag and its help is written once. A module of its own because two
commands (``train``, ``compare``) build on it and neither owns it; the ``--data-dir`` option
that every corpus-reading command shares lives here for the same reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from rnnreg.errors import RnnregError, python_name, reword
from rnnreg.lm.config import Config

__all__ = ["GROUPS", "HelpFormatter", "add_config_flags", "add_data_dir", "config_overrides",
           "flag", "flag_groups", "worded"]

# Fields whose command-line flag is not their own name: the strategy's rate p keeps the flag
# --dropout, the name users give it on the command line.
_FLAG_NAMES = {"strategy_p": "dropout"}


def flag(name: str) -> str:
    """The command-line flag of Config field ``name``: ``hidden_size`` -> ``--hidden-size``."""
    return "--" + _FLAG_NAMES.get(name, name).replace("_", "-")


def worded(message: str | BaseException, parser: argparse.ArgumentParser) -> str:
    """A library message for the command line: each parameter it names
    (:mod:`rnnreg.errors`) written as ``parser``'s flag for it (``strategy_p=0.5`` ->
    ``--dropout 0.5``, ``resume=True`` -> ``--resume``, ``download=False`` -> ``--no-download``);
    one the command has no flag for stays as Python names it."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}

    def setting(name: str, value: str | None) -> str:
        if value == "False" and f"no_{name}" in actions:  # --no-download sets no_download
            return actions[f"no_{name}"].option_strings[0]
        action = actions.get(name)
        if action is None:
            return python_name(name, value)
        options = action.option_strings
        if value == "False" and isinstance(action, argparse.BooleanOptionalAction):
            return options[-1]  # --no-tie-weights
        if value is None or value == "True":
            return options[0]
        return f"{options[0]} {value.strip(chr(39))}"

    if isinstance(message, RnnregError):
        return message.worded(setting)
    return reword(str(message), setting)

# The groups of a command's --help, in the order a user meets them: what to train on, the
# model, how it is regularized, how it is optimized and for how long, how it is scored, where
# the run goes, and on what hardware. Config fields name their group by its key.
GROUPS = {
    "data": "data",
    "model": "model",
    "regularization": "regularization",
    "optimization": "optimization",
    "schedule": "schedule",
    "evaluation": "evaluation",
    "run": "run and checkpoints",
    "device": "device and distributed training",
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's layout with help from column 32: most flags and their value name fit before
    it, so at 80 columns each flag's help stays one line beside it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def flag_groups(parser: argparse.ArgumentParser,
                notes: typing.Mapping[str, str] | None = None) -> dict[str, typing.Any]:
    """The parser's argument groups of :data:`GROUPS`, keyed alike; ``notes`` gives a group
    the line printed under its title. A group left empty is not printed."""
    notes = notes or {}
    return {key: parser.add_argument_group(title, notes.get(key))
            for key, title in GROUPS.items()}


def add_data_dir(parser, recorded: bool = False) -> None:
    default = ("the corpus the run was trained on" if recorded else
               "$RNNREG_DATA, else the user cache")
    parser.add_argument("--data-dir", metavar="DIR_OR_FILE", help=(
        "corpus: a directory with {ptb.,}{train,valid,test}.txt (test optional), or one text "
        f"file cut by --split-fractions (default: {default})"))


def add_config_flags(groups: dict[str, typing.Any],
                     exclude: frozenset[str] = frozenset()) -> None:
    """One flag per Config field (``hidden_size`` -> ``--hidden-size``) in the group its
    metadata names, none by default: a flag not given leaves the preset's value.

    Flags are built from the fields' resolved types (``typing.get_type_hints``), so any
    annotation works, ``str | None`` included; ``none`` sets an optional field to None.
    """
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        if field.name not in exclude:
            _add_flag(groups[field.metadata["group"]], field, hints[field.name])


def _add_flag(group, field: dataclasses.Field, hint) -> None:
    name = flag(field.name)
    kind, optional = _unwrap_optional(hint)
    meta = field.metadata
    options = {"default": argparse.SUPPRESS, "help": reword(meta["help"], _flag_of),
               "dest": field.name}
    if kind is bool:
        group.add_argument(name, action=argparse.BooleanOptionalAction, **options)
    elif typing.get_origin(kind) is tuple:
        group.add_argument(name, nargs="+", action=_TupleAction, item=typing.get_args(kind)[0],
                           optional=optional, metavar=meta["metavar"], **options)
    elif meta["choices"] and optional:
        allowed = meta["choices"]
        group.add_argument(name, type=_none_or(kind), choices=(*allowed, None),
                           metavar="{" + ",".join((*allowed, "none")) + "}", **options)
    elif meta["choices"]:  # argparse lists the choices unless the field names its value
        group.add_argument(name, choices=meta["choices"], metavar=meta["metavar"], **options)
    else:
        group.add_argument(name, type=_none_or(kind) if optional else kind,
                           metavar=meta["metavar"], **options)


def _flag_of(name: str, value: str | None) -> str:
    return flag(name) if value is None else f"{flag(name)} {value}"


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
