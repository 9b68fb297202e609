"""The ``train`` command: one run from a preset, a time budget or a run to resume.

Held apart from the scoring and study commands because it alone decides where a run's
configuration comes from (``--preset``, ``--budget-minutes``, or the run being resumed) and what
to tell the user when training stops early (the command that continues it). The training
itself is ``rnnreg.lm.training.loop.train``; nothing here runs per step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from rnnreg.cli.flags import add_config_flags, add_data_dir, config_overrides
from rnnreg.lm import distributed
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import ensure_ptb
from rnnreg.lm.presets import PRESETS, budget_config, preset_config
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train

__all__ = ["add_commands"]


def add_commands(commands) -> None:
    train = commands.add_parser(
        "train", help="train a language model (or --resume one)",
        description="Rerunning the same command with --resume continues the run in --out "
                    "where it stopped, or starts it if there is none yet.")
    train.add_argument("--preset", choices=sorted(PRESETS), default="small",
                       help="starting configuration, every flag below overrides it "
                            "(default: small)")
    train.add_argument("--out", help="run directory (default: runs/PRESET-TIMESTAMP)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out exactly where it stopped (start it if "
                            "--out holds none); flags must match the run's, except --epochs "
                            "and --max-train-minutes, which may be raised")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--no-download", action="store_true",
                       help="never download PTB when no corpus is given")
    train.add_argument("--budget-minutes", type=float, metavar="M",
                       help="train for M minutes with cpu-30min resized for M and this "
                            "corpus's vocabulary (size, softmax, tying: rnnreg.budget_config); "
                            "instead of --preset, and flags below still override it")
    add_data_dir(train)
    add_config_flags(train)
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    name = args.preset if args.budget_minutes is None else f"budget-{args.budget_minutes:g}min"
    out = args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    named_preset = any(arg.split("=", 1)[0] == "--preset" for arg in args.argv)
    if args.budget_minutes is not None:
        if named_preset:
            raise ValueError("--budget-minutes chooses the configuration itself (cpu-30min "
                             "resized); drop --preset, or drop --budget-minutes")
        if args.data_dir is None and not args.no_download:
            ensure_ptb(not args.no_progress)  # the vocabulary is needed before training
        config = _budget_config(args.budget_minutes, args.data_dir, overrides)
    elif args.resume and not named_preset and RunDir(out).exists():
        # Without --preset the command names only its flags: they are what must match.
        config = RunDir(out).read_config().replace(**overrides)
    else:
        config = preset_config(args.preset).replace(**overrides)
    try:
        summary = train(config, out, data_dir=args.data_dir, resume=args.resume,
                        download=not args.no_download, progress=not args.no_progress)
    except KeyboardInterrupt as stopped:
        if distributed.is_main():
            print(f"rnnreg: {stopped or 'interrupted'}", file=sys.stderr)
            if RunDir(out).exists():
                print(_resume_command(args.argv, out), file=sys.stderr)
        return 130
    if distributed.is_main():  # under torchrun every rank returns it; one copy is enough
        if summary.get("complete") is False and config.max_train_minutes:
            print("to continue, raise the time budget:\n" + _resume_command(
                args.argv, out, max_train_minutes=2 * config.max_train_minutes),
                file=sys.stderr)
        print(json.dumps(summary))
    return 0


def _budget_config(minutes: float, data_dir, overrides: dict):
    """The budget rule for this corpus: its vocabulary size (as the run will build it, so with
    the --max-vocab/--min-count given) picks the model size and softmax.

    A --softmax given goes into the rule rather than on top of it, so the model is sized for
    that decoder (and untied for the adaptive one) instead of refusing to tie or keeping the
    other decoder's width.
    """
    softmax = overrides.get("softmax")
    # Only the corpus settings of this first config count.
    reading = budget_config(minutes, 2, softmax=softmax).replace(**overrides)
    corpus = Corpus.load(data_dir, reading.level, split_fractions=reading.split_fractions,
                         max_vocab=reading.max_vocab, min_count=reading.min_count)
    return budget_config(minutes, len(corpus.vocab), softmax=softmax).replace(**overrides)


def _resume_command(argv: list[str], out: str, **raised: float) -> str:
    """The command that continues the run: the one given, with --out (absolute) and --resume.

    ``raised`` replaces flags (a longer time budget). Without --out the original command
    would start a new timestamped run, so the absolute run directory is always spelled out.
    """
    replace = {"--out": str(Path(out).resolve()),
               **{"--" + k.replace("_", "-"): f"{v:g}" for k, v in raised.items()}}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in replace:
            skip = "=" not in arg
            continue
        kept.append(arg)
    extra = [item for flag, value in replace.items() for item in (flag, value)]
    resume = [] if "--resume" in kept else ["--resume"]
    return "rnnreg " + shlex.join([*kept, *extra, *resume])
