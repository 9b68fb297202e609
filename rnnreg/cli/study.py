"""The study commands: ``compare`` (a grid of runs and its report), ``plot`` (their curves) and
``recall-corpus`` (the memory task's synthetic corpus).

They front ``rnnreg.study``, which is imported only when one of them runs: the other commands
never load the grid's, the report's or matplotlib's modules (nor Ray's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnreg.cli.flags import (
    add_config_flags,
    add_data_dir,
    config_overrides,
    flag,
    flag_groups,
)
from rnnreg.errors import RnnregError
from rnnreg.lm.config import CELLS, Config
from rnnreg.lm.presets import PRESETS, preset_config
from rnnreg.nn.strategies import STRATEGIES

__all__ = ["add_commands"]


def add_commands(commands) -> None:
    _add_compare(commands)
    _add_plot(commands)
    _add_recall_corpus(commands)


# The axes of a study: given as lists by compare's own flags, so the single-run flags for the
# same fields would be ambiguous there.
_GRID_FIELDS = frozenset({"strategy", "strategy_p", "cell", "seed"})
# A custom grid's defaults: every strategy at the low and high ends of the useful range.
_DEFAULT_STRATEGIES = tuple(STRATEGIES)
_DEFAULT_RATES = (0.25, 0.5)
_CUSTOM_FLAGS = ("strategies", "rates", "cells", "seeds", "preset")
_PLANS = ("default", "quick", "gpu")  # rnnreg.study.grid.PLANS, named here to keep it unloaded


def _comma_list(convert, kind: str):
    """An argparse type for ``a,b,c`` lists whose items are ``convert``-ed."""
    def parse(text: str) -> tuple:
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"empty item in the list {text!r}")
        try:
            return tuple(convert(item) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind}, got {text!r}") from None
    return parse


def _add_compare(commands) -> None:
    compare = commands.add_parser(
        "compare", help="train a grid of dropout strategies x rates x cells x seeds and report",
        description="Each grid cell is an ordinary run in OUT/runs; rerunning the same command "
                    "resumes an interrupted study. Writes OUT/report.md and OUT/report.html "
                    "and prints the report's path.")
    compare.add_argument("--out", required=True, help="study directory")
    compare.add_argument("--plan", choices=_PLANS,
                         help="the study that tests the tutorial's claims: default (about an "
                              "hour on 2 CPU cores), quick (a few minutes, a first look), gpu "
                              "(the paper's medium model); the default when no grid flag "
                              "(--strategies, --rates, --cells, --seeds, --preset) is given")
    compare.add_argument("--strategies", type=_comma_list(str, "strategy names"),
                         metavar="NAME,...",
                         help=f"a custom grid: strategies to compare, of: "
                              f"{', '.join(STRATEGIES)} (default: all)")
    compare.add_argument("--rates", type=_comma_list(float, "numbers in [0, 1]"),
                         metavar="P,...",
                         help="dropout rates (default: "
                              f"{','.join(map(str, _DEFAULT_RATES))})")
    compare.add_argument("--cells", type=_comma_list(str, "cell names"), metavar="CELL,...",
                         help=f"recurrent cells, of: {', '.join(CELLS)} (default: the preset's)")
    compare.add_argument("--seeds", type=_comma_list(int, "integers"), metavar="SEED,...",
                         help="seeds (default: the preset's)")
    compare.add_argument("--jobs", type=int, default=1,
                         help="runs trained in parallel (local backend; default: 1)")
    compare.add_argument("--backend", choices=["local", "ray"], default="local",
                         help="where runs train: this machine, or Ray Tune trials (needs "
                              "pip install 'rnnreg[ray]'; default: local)")
    compare.add_argument("--address", metavar="ADDR",
                         help="Ray cluster to join: 'auto', or ray://HOST:10001 (default: a "
                              "local Ray instance); only with --backend ray")
    compare.add_argument("--preset", choices=sorted(PRESETS),
                         help="a custom grid's base configuration; every configuration flag "
                              "overrides it (default: study-small)")
    compare.add_argument("--report-only", action="store_true",
                         help="only regenerate the report from the runs already in --out")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    groups = flag_groups(compare)
    add_data_dir(groups["data"], recorded=True)
    add_config_flags(groups, exclude=_GRID_FIELDS)
    compare.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from rnnreg.study.grid import StudyGrid, run_plan, run_study
    from rnnreg.study.report import write_report

    overrides = config_overrides(args)
    custom = [name for name in _CUSTOM_FLAGS if getattr(args, name) is not None]
    if args.report_only:
        given = sorted(set(overrides) | set(custom) | ({"plan"} if args.plan else set()))
        if given:
            raise RnnregError(f"--report-only reads the runs as they are; drop "
                              f"{', '.join(map(flag, given))}")
        print(write_report(args.out, data_dir=args.data_dir))
        return 0
    if custom and args.plan:
        raise RnnregError(f"--plan runs its own grids; drop {', '.join(map(flag, custom))}, or "
                          "drop --plan for a custom grid")
    backend_base = preset_config(args.preset or "study-small").replace(**overrides)
    backend = _study_backend(args, backend_base)
    if not custom:
        out = run_plan(args.plan or "default", args.out, data_dir=args.data_dir,
                       jobs=args.jobs, progress=not args.no_progress, backend=backend,
                       overrides=overrides)
        print(write_report(out))
        return 0
    base = backend_base
    try:  # the grid checks its axes, as given by the flags, with ValueErrors of its own
        grid = StudyGrid(strategies=args.strategies or _DEFAULT_STRATEGIES,
                         rates=args.rates or _DEFAULT_RATES,
                         cells=args.cells or (base.cell,), seeds=args.seeds or (base.seed,))
    except ValueError as error:
        raise RnnregError(str(error)) from error
    out = run_study(base, grid, args.out, data_dir=args.data_dir, jobs=args.jobs,
                    progress=not args.no_progress, backend=backend)
    print(write_report(out))
    return 0


def _study_backend(args: argparse.Namespace, base: Config):
    """None for the local backend (run_study's default); a Ray backend for --backend ray."""
    from rnnreg.study.grid import ray_backend
    from rnnreg.study.layout import StudyDir

    if args.backend == "local":
        if args.address is not None:
            raise RnnregError("--address names a Ray cluster: use it with --backend ray")
        return None
    try:
        # A run that asks for CUDA gets a GPU reserved, so Ray places it on a node with one.
        gpus = 1.0 if base.device.startswith("cuda") else 0.0
        return ray_backend(args.address, gpus_per_trial=gpus,
                           storage=StudyDir(Path(args.out).resolve()).ray_storage,
                           progress=not args.no_progress)
    except ImportError as error:  # the one-line message says which extra to install
        raise RnnregError(str(error)) from None


def _add_plot(commands) -> None:
    plot = commands.add_parser("plot", help="learning curves of runs side by side")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="figure to write")
    plot.add_argument("--x", choices=("epoch", "minutes"), default="epoch",
                      help="x axis: epochs, or training minutes (time-to-quality)")
    plot.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> int:
    from rnnreg.study.plots import plot_runs

    print(plot_runs(args.runs, args.out, x=args.x))
    return 0


def _add_recall_corpus(commands) -> None:
    from rnnreg.lm.corpus.recall import RecallTask

    default = RecallTask()
    recall = commands.add_parser(
        "recall-corpus", help="write a synthetic corpus whose values need a memory of N steps",
        description="Each line is a key, N - 2 random fillers, a cue and the key's value: the "
                    "value is predictable only from the key N tokens back. Writes train.txt, "
                    "valid.txt, test.txt and recall.json into OUT, for rnnreg train --data-dir.")
    recall.add_argument("--out", required=True, help="directory to write (new or empty)")
    recall.add_argument("--distances", type=_comma_list(int, "integers"), metavar="N,...",
                        default=default.distances, help="distances N to mix, each >= 2 "
                        f"(default: {','.join(map(str, default.distances))})")
    recall.add_argument("--symbols", type=int, default=default.symbols,
                        help=f"distinct keys (default: {default.symbols})")
    recall.add_argument("--fillers", type=int, default=default.fillers,
                        help=f"distinct filler words (default: {default.fillers})")
    recall.add_argument("--segments", type=_comma_list(int, "integers"), metavar="T,V,S",
                        default=default.segments, help="lines of train, valid and test "
                        f"(default: {','.join(map(str, default.segments))})")
    recall.add_argument("--seed", type=int, default=default.seed,
                        help=f"random seed (default: {default.seed})")
    recall.set_defaults(handler=_recall_corpus)


def _recall_corpus(args: argparse.Namespace) -> int:
    from rnnreg.lm.corpus.recall import RecallTask

    task = RecallTask(distances=args.distances, symbols=args.symbols, fillers=args.fillers,
                      segments=args.segments, seed=args.seed)
    print(task.write(args.out))
    return 0
