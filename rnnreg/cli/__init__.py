"""The ``rnnreg`` command line: a thin layer over the library's functions.

Every Config field is a flag of ``train`` with the same name (``hidden_size`` -> ``--hidden-size``),
so one concept has one name in code, config.json, flags and docs (the strategy's rate
``strategy_p`` keeps the flag ``--dropout``). Flags override the preset.

A package, one module per idea, so that no command's code has to be read past another's:
``flags`` maps Config onto flags, ``training`` is the train command, ``scoring`` the commands
that use a trained run (evaluate, score, generate), ``study`` the study commands (compare,
plot). This module holds what every command shares: the parser, the dispatch with its
one-line errors, and the two commands (presets, download) too small for a module.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from tqdm.auto import tqdm

from rnnreg.cli import scoring, study, training
from rnnreg.lm import distributed
from rnnreg.lm.corpus.sources import DataError, default_data_dir, download_ptb, resolve_data_dir
from rnnreg.lm.presets import PRESETS
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.training.loop import TrainingDiverged

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.handler(args)
    except (ValueError, DataError, RunDirError, TrainingDiverged, OSError,
            distributed.PeerFailed) as error:
        # Through tqdm, so a progress bar the error cut short does not share the error's line.
        tqdm.write(f"rnnreg: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnnreg: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message (choices included), not the whole usage.

    The usage of ``train`` runs to forty lines; the line that matters would scroll away.
    Subcommand parsers inherit the class, so every command behaves the same.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"rnnreg: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnreg", description="Regularized RNN language models (Zaremba et al. 2014).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training.add_commands(commands)
    scoring.add_commands(commands)
    study.add_commands(commands)
    presets = commands.add_parser("presets", help="list the presets and their published numbers")
    presets.set_defaults(handler=_presets)
    download = commands.add_parser("download", help="download a corpus and verify its MD5 sums")
    download.add_argument("corpus", choices=["ptb"], help="Mikolov's Penn Treebank (10k words)")
    download.add_argument("--data-dir", help=f"target directory (default: $RNNREG_DATA or "
                                             f"{default_data_dir()})")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    download.set_defaults(handler=_download)
    return parser


def _presets(_: argparse.Namespace) -> int:
    for preset in PRESETS.values():
        config = preset.config()
        paper = ", ".join(f"{k} {v}" for k, v in preset.paper.items()) or "no published numbers"
        shape = (f"{config.num_layers}x{config.hidden_size}" if len(set(config.sizes)) == 1
                 else "-".join(map(str, config.sizes)))
        print(f"{preset.name:14s} {config.cell} {shape} "
              f"{config.strategy} p={config.strategy_p} bptt={config.bptt} "
              f"epochs={config.epochs}  | paper: {paper}  ({preset.note}; {preset.source})")
    return 0


def _download(args: argparse.Namespace) -> int:
    target = download_ptb(resolve_data_dir(args.data_dir), progress=not args.no_progress)
    print(f"Penn Treebank ready in {Path(target)}")
    return 0
