"""The ``rnnreg`` command line: a thin layer over the library's functions.

Every Config field is a flag of ``train`` with the same name (``hidden_size`` -> ``--hidden-size``),
so one concept has one name in code, config.json, flags and docs (the strategy's rate
``strategy_p`` keeps the flag ``--dropout``). Flags override the preset.

A package, one module per idea, so that no command's code has to be read past another's:
``flags`` maps Config onto flags, ``training`` is the train command, ``scoring`` the commands
that use a trained run (evaluate, score, generate), ``study`` the study commands (compare,
plot). This module holds what every command shares: the parser, the dispatch with its
one-line errors, and the two commands (presets, download) too small for a module.

Only bad input gets the one-line error: rnnreg's user errors (:class:`rnnreg.errors.RnnregError`,
whose messages name parameters as Python does, shown here as flags), the operating system's
(a missing file, a full disk) and a failed peer of a distributed job. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import textwrap
import typing
from pathlib import Path

from tqdm.auto import tqdm

from rnnreg.cli import scoring, study, training
from rnnreg.cli.flags import worded
from rnnreg.errors import RnnregError
from rnnreg.lm import distributed
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.sources import default_data_dir, download_ptb, locate_corpus
from rnnreg.lm.presets import PRESETS, Preset

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The command's own parser: its flags are what the library's messages are worded in.
    args.command_parser = parser.commands[args.command]
    try:
        return args.handler(args)
    except (RnnregError, OSError, distributed.PeerFailed) as error:
        # Through tqdm, so a progress bar the error cut short does not share the error's line.
        tqdm.write(f"rnnreg: error: {worded(error, args.command_parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnreg: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message (choices included), not the whole usage.

    A usage listing every flag would push the line that matters out of sight.
    Subcommand parsers inherit the class, so every command behaves the same.
    """

    # The command parsers by name (set on the top-level parser): whose flags to suggest from.
    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"rnnreg: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        """argparse's, with "did you mean --hidden-size?" for a misspelled flag (Python 3.14's
        ``suggest_on_error`` suggests only choices, and 3.11 has none)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(namespace, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(extras)}"
                          f"{_suggestion(extras, command)}")
        return namespace


def _suggestion(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """" (did you mean --x?)" for the unknown flags of ``extras`` close to one of ``parser``'s
    (difflib's similarity, as Python's own suggestions); empty where none is close."""
    known = [name for action in parser._actions for name in action.option_strings
             if name.startswith("--")]
    close = [difflib.get_close_matches(extra.split("=", 1)[0], known, n=1, cutoff=0.75)
             for extra in extras if extra.startswith("--")]
    names = list(dict.fromkeys(match[0] for match in close if match))
    return f" (did you mean {' and '.join(names)}?)" if names else ""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnreg", description="Regularized RNN language models (Zaremba et al. 2014).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = commands.choices
    training.add_commands(commands)
    scoring.add_commands(commands)
    study.add_commands(commands)
    presets = commands.add_parser(
        "presets", help="list the presets and their published numbers, or show one in full")
    presets.add_argument("name", nargs="?", choices=list(PRESETS), metavar="NAME",
                         help=f"show this preset's every setting ({', '.join(PRESETS)})")
    presets.set_defaults(handler=_presets)
    download = commands.add_parser("download", help="download a corpus and verify its MD5 sums")
    download.add_argument("corpus", choices=["ptb"], help="Mikolov's Penn Treebank (10k words)")
    download.add_argument("--data-dir", help=f"target directory (default: $RNNREG_DATA or "
                                             f"{default_data_dir()})")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    download.set_defaults(handler=_download)
    return parser


def _presets(args: argparse.Namespace) -> int:
    """A table that fits a 100-column terminal, or one preset's full recipe.

    The table keeps what tells presets apart (shape, regularizer, the published perplexities);
    the source, the notes and every Config field are in ``rnnreg presets NAME``.
    """
    if args.name is None:
        print(_preset_table())
    else:
        print(_preset_detail(PRESETS[args.name]))
    return 0


def _preset_table() -> str:
    """One row per preset, columns padded to their widest cell, numbers right-aligned."""
    paper_keys = list(dict.fromkeys(key for p in PRESETS.values() for key in p.paper))
    header = ["name", "cell", "layers", "strategy", "p", "bptt", "epochs", *paper_keys]
    rows = [header]
    for preset in PRESETS.values():
        config = preset.config()
        rows.append([preset.name, config.cell, _preset_shape(config), config.strategy,
                     str(config.strategy_p), str(config.bptt), str(config.epochs),
                     *(str(preset.paper.get(key, "-")) for key in paper_keys)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numbers = range(header.index("p"), len(header))
    lines = ["  ".join(cell.rjust(width) if i in numbers else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join([*lines, "", f"{', '.join(paper_keys)}: published PTB perplexities; "
                       "`rnnreg presets NAME` shows one preset in full."])


def _preset_shape(config: Config) -> str:
    """``layers x hidden`` (``2x650``), or each layer's size where they differ."""
    if len(set(config.sizes)) == 1:
        return f"{config.num_layers}x{config.hidden_size}"
    return "-".join(map(str, config.sizes))


def _preset_detail(preset: Preset) -> str:
    """Name, note, source, published numbers, then every Config field as ``field = JSON``."""
    paper = ", ".join(f"{k} {v}" for k, v in preset.paper.items()) or "no published numbers"
    prose = [f"{preset.name}: {preset.note}", f"source: {preset.source}", f"paper: {paper}"]
    fields = [f"  {key} = {json.dumps(value)}"
              for key, value in preset.config().to_dict().items()]
    return "\n".join([*(textwrap.fill(line, 100, subsequent_indent="    ", break_on_hyphens=False)
                        for line in prose), "config:", *fields])


def _download(args: argparse.Namespace) -> int:
    target = download_ptb(locate_corpus(args.data_dir).path, progress=not args.no_progress)
    print(f"Penn Treebank ready in {Path(target)}")
    return 0
