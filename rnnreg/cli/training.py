"""The ``train`` command: one run from a preset, a time budget or a run to resume.

Held apart from the scoring and study commands because it alone decides where a run's
configuration comes from (``--preset``, ``--budget-minutes``, or the run being resumed), where
the run goes, and what to tell the user when training stops early (the command that continues
it). The training itself is ``rnnreg.lm.training.loop.train``; nothing here runs per step.

The same command continues its run: the default run directory is named after the preset
(``runs/small``) or the budget (``runs/budget-12min``), not the time, and a directory that
already holds a run with the command's settings is resumed (one with other settings is
refused, every difference named), as a rerun of fairseq or Keras' BackupAndRestore picks up
from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from rnnreg.cli.flags import (
    HelpFormatter,
    add_config_flags,
    add_data_dir,
    config_overrides,
    flag_groups,
    worded,
)
from rnnreg.errors import RnnregError
from rnnreg.lm import distributed
from rnnreg.lm.config import RATE_STRATEGIES, Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import ensure_ptb, locate_corpus
from rnnreg.lm.presets import PRESETS, budget_config, preset_config
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train
from rnnreg.lm.training.start import UnreadableLast
from rnnreg.nn.strategies import STRATEGIES

__all__ = ["add_commands"]

_DEFAULT_PRESET = "small"


def add_commands(commands) -> None:
    train = commands.add_parser(
        "train", help="train a language model (or --resume one)", formatter_class=HelpFormatter,
        usage="%(prog)s [--preset NAME | --budget-minutes M] [--out DIR] [FLAG ...]",
        description="Trains into --out, runs/PRESET (or runs/budget-Mmin) when not given. "
                    "Rerunning the same command continues that run where it stopped (a "
                    "finished run is scored again); a run with other settings there is "
                    "refused: choose another --out for a new run.")
    start = train.add_argument_group(
        "starting configuration", "a preset (`rnnreg presets` lists them) or a time budget; "
        "every flag below overrides it")
    # No default here: whether --preset was given decides where a resume's config comes from.
    start.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                       metavar="NAME", help="configuration to start from (default: small)")
    start.add_argument("--budget-minutes", type=float, metavar="M",
                       help="cpu-30min resized for M minutes and the corpus")
    groups = flag_groups(train, {
        "regularization": f"strategies: {', '.join(STRATEGIES)}; a placement's own rate "
                          "overrides the strategy's P there",
        "device": "more processes: torchrun --nproc-per-node N -m rnnreg train ...; each "
                  "trains B/N streams"})
    add_data_dir(groups["data"])
    groups["data"].add_argument("--no-download", action="store_true",
                                help="never download PTB when no corpus is given")
    run = groups["run"]
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/PRESET)")
    run.add_argument("--resume", action="store_true",
                     help="continue DIR's run with its own settings")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(groups)
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    overrides = _none_means_no_rate(config_overrides(args))
    named_preset = "preset" in args
    if args.budget_minutes is not None and named_preset:
        raise RnnregError("--budget-minutes chooses the configuration itself (cpu-30min "
                          "resized); drop --preset, or drop --budget-minutes")
    out = args.out or _default_out(args)
    if args.budget_minutes is not None:
        location = locate_corpus(args.data_dir)
        if not args.no_download:
            ensure_ptb(location, not args.no_progress)  # the vocabulary is needed before training
        config = _budget_config(args.budget_minutes, location, overrides)
    elif args.resume and not named_preset and RunDir(out).exists():
        # Without --preset the command names only its flags: they are what must match.
        config = _configured(RunDir(out).read_config(), overrides)
    else:
        preset = getattr(args, "preset", _DEFAULT_PRESET)
        config = _configured(preset_config(preset), overrides, f"the {preset} preset's")
    try:
        # Always resume: a rerun of the command continues its run, a first one starts it.
        summary = train(config, out, data_dir=args.data_dir, resume=True,
                        download=not args.no_download, progress=not args.no_progress)
    except UnreadableLast as unreadable:
        if unreadable.best is None:
            raise
        raise RunDirError(f"{unreadable.message}: {_from_best_command(unreadable, out)}"
                          ) from unreadable
    except KeyboardInterrupt as stopped:
        if distributed.is_main():
            print(f"rnnreg: {worded(stopped, args.command_parser) or 'interrupted'}",
                  file=sys.stderr)
            if RunDir(out).exists():
                print(_resume_command(out), file=sys.stderr)
        return 130
    if distributed.is_main():  # under torchrun every rank returns it; one copy is enough
        if summary.get("complete") is False and config.max_train_minutes:
            print("to continue, raise the time budget:\n" + _resume_command(
                out, max_train_minutes=2 * config.max_train_minutes), file=sys.stderr)
        print(json.dumps(summary))
    return 0


def _none_means_no_rate(overrides: dict) -> dict:
    """``--strategy none`` without ``--dropout`` means no dropout, whatever rate the preset
    gives its own strategy (``--preset medium --strategy none`` is medium's baseline)."""
    if overrides.get("strategy") == "none" and "strategy_p" not in overrides:
        return {**overrides, "strategy_p": 0.0}
    return overrides


def _configured(base: Config, overrides: dict, whose: str = "the run's") -> Config:
    """``base`` with the flags' ``overrides``; a ``--dropout`` its strategy would ignore is
    refused in flags' terms (Config refuses it too, naming its fields for Python callers)."""
    strategy = overrides.get("strategy", base.strategy)
    rate = overrides.get("strategy_p", base.strategy_p)
    if strategy == "none" and rate > 0:
        origin = "" if "strategy" in overrides else f" ({whose})"
        raise RnnregError(f"--dropout {rate:g} has no effect with strategy none{origin}, which "
                          f"places no dropout: add --strategy NAME with a strategy that uses it "
                          f"({', '.join(RATE_STRATEGIES)})")
    return base.replace(**overrides)


def _default_out(args: argparse.Namespace) -> str:
    """The run directory of a command without --out: named after what it trains, so that the
    same command finds its run again (``runs/small``, ``runs/budget-12min``)."""
    if args.budget_minutes is not None:
        return f"runs/budget-{args.budget_minutes:g}min"
    return f"runs/{getattr(args, 'preset', _DEFAULT_PRESET)}"


def _budget_config(minutes: float, location, overrides: dict):
    """The budget rule for this corpus: its vocabulary size (as the run will build it, so with
    the --max-vocab/--min-count given) picks the model size and softmax.

    A --softmax given goes into the rule rather than on top of it, so the model is sized for
    that decoder (and untied for the adaptive one) instead of refusing to tie or keeping the
    other decoder's width.
    """
    softmax = overrides.get("softmax")
    # Only the corpus settings of this first config count.
    reading = _configured(budget_config(minutes, 2, softmax=softmax), overrides,
                          "the budget rule's")
    corpus = Corpus.load(location, reading.level, split_fractions=reading.split_fractions,
                         max_vocab=reading.max_vocab, min_count=reading.min_count)
    return budget_config(minutes, len(corpus.vocab), softmax=softmax).replace(**overrides)


def _from_best_command(unreadable: UnreadableLast, out: str) -> str:
    """The commands that keep the damaged ``last`` beside it, put a copy of ``best`` in its
    place and continue the run from there."""
    last, best = unreadable.last.resolve(), unreadable.best.resolve()
    damaged = last.with_name(last.name + ".damaged")
    return " && ".join([shlex.join(["mv", str(last), str(damaged)]),
                        shlex.join(["cp", str(best), str(last)]), _resume_command(out)])


def _resume_command(out: str, **raised: float) -> str:
    """A command that continues the run from any directory: its absolute --out and --resume
    (the settings come from the run), with ``raised`` flags (a longer time budget)."""
    flags = [item for name, value in raised.items()
             for item in ("--" + name.replace("_", "-"), f"{value:g}")]
    return "rnnreg " + shlex.join(["train", "--out", str(Path(out).resolve()), *flags,
                                   "--resume"])
