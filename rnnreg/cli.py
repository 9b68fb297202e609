"""The ``rnnreg`` command line: a thin layer over the library's functions.

Every Config field is a flag of ``train`` with the same name (``hidden_size`` -> ``--hidden-size``),
so one concept has one name in code, config.json, flags and docs. Flags override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rnnreg.lm import distributed
from rnnreg.lm.config import CELLS, Config
from rnnreg.lm.data import (
    Corpus,
    DataError,
    default_data_dir,
    download_ptb,
    read_text,
    resolve_data_dir,
    tokenize,
)
from rnnreg.lm.evaluation import score_stream
from rnnreg.lm.generation import sample_text
from rnnreg.lm.presets import PRESETS, preset_config
from rnnreg.lm.rundir import RunDirError
from rnnreg.lm.runs import load_model
from rnnreg.lm.training import TrainingDiverged, train
from rnnreg.nn.strategies import STRATEGIES

__all__ = ["main"]

_BOOL_FIELDS = {f.name for f in dataclasses.fields(Config) if f.type == "bool"}
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float,
          "str | None": str}
_SIZE_LIST_TYPES = {"tuple[int, ...] | None"}
_LIST_HELP = {
    "layer_sizes": "one size per layer, e.g. 1150 1150 400 or 1150,1150,400 (sets --num-layers "
                   "and --hidden-size unless given); 'none' = uniform",
    "adaptive_cutoffs": "word ids where the adaptive head and each cluster end, e.g. 2000 10000; "
                        "'none' = 2000 and 10000 below the vocabulary size",
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnreg", description="Regularized RNN language models (Zaremba et al. 2014).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_evaluate(commands)
    _add_score(commands)
    _add_generate(commands)
    _add_compare(commands)
    _add_plot(commands)
    presets = commands.add_parser("presets", help="list the presets and their published numbers")
    presets.set_defaults(handler=_presets)
    download = commands.add_parser("download", help="download a corpus and verify its MD5 sums")
    download.add_argument("corpus", choices=["ptb"], help="Mikolov's Penn Treebank (10k words)")
    download.add_argument("--data-dir", help=f"target directory (default: $RNNREG_DATA or "
                                             f"{default_data_dir()})")
    download.set_defaults(handler=_download)
    return parser


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="corpus directory with {ptb.,}{train,valid,test}.txt "
                                           "(default: $RNNREG_DATA, else the user cache)")


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a language model (or --resume one)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", choices=sorted(PRESETS), default="small",
                       help="starting configuration; every flag below overrides it")
    train.add_argument("--out", help="run directory (default: runs/PRESET-TIMESTAMP)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out exactly where it stopped")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_dir(train)
    _add_config_flags(train)
    train.set_defaults(handler=_train)


def _add_config_flags(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()):
    """One flag per Config field (``hidden_size`` -> ``--hidden-size``), none by default."""
    fields = parser.add_argument_group("configuration (defaults come from the preset)")
    for field in dataclasses.fields(Config):
        if field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name in _BOOL_FIELDS:
            fields.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)
        elif field.type in _SIZE_LIST_TYPES:
            fields.add_argument(flag, nargs="+", action=_SizesAction, default=argparse.SUPPRESS,
                                metavar="SIZE", help=_LIST_HELP[field.name])
        else:
            fields.add_argument(flag, type=_TYPES[field.type], default=argparse.SUPPRESS,
                                metavar=field.name.upper())


class _SizesAction(argparse.Action):
    """``--layer-sizes 1150 1150 400`` (or ``1150,1150,400``) -> a tuple; ``none`` -> None."""

    def __call__(self, parser, namespace, values, option_string=None):
        if [v.strip().lower() for v in values] == ["none"]:
            setattr(namespace, self.dest, None)
            return
        items = [item.strip() for value in values for item in value.split(",")]
        try:
            sizes = tuple(int(item) for item in items)
        except ValueError:
            parser.error(f"{option_string} takes integers (one per layer) or 'none', "
                         f"got {' '.join(values)!r}")
        setattr(namespace, self.dest, sizes)


def _config_overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(Config)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    sizes = overrides.get("layer_sizes")
    if sizes:  # the depth and the top size follow the per-layer sizes unless given
        overrides.setdefault("num_layers", len(sizes))
        overrides.setdefault("hidden_size", sizes[-1])
    return overrides


def _train(args: argparse.Namespace) -> int:
    overrides = _config_overrides(args)
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        if overrides:
            raise ValueError(f"a resumed run keeps its saved config; drop {sorted(overrides)}")
        config = Config()
    else:
        config = preset_config(args.preset).replace(**overrides)
    out = args.out or f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(config, out, data_dir=args.data_dir, resume=args.resume,
                    progress=not args.no_progress)
    if distributed.is_main():  # under torchrun every rank returns it; one copy is enough
        print(json.dumps(summary))
    return 0


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="perplexity of one run, or of an ensemble of runs, on a split")
    evaluate.add_argument("runs", nargs="+", metavar="RUN",
                          help="run directories; several = ensemble (probabilities averaged)")
    evaluate.add_argument("--split", choices=["train", "valid", "test"], default="test")
    evaluate.add_argument("--mc-samples", type=int, default=0,
                          help="MC-dropout passes averaged (0 = deterministic dropout off)")
    evaluate.add_argument("--weights", choices=["best", "last"], default="best")
    evaluate.add_argument("--seed", type=int, default=1, help="seed for MC-dropout masks")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_dir(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _load_members(runs: list[str], weights: str, device: str):
    members = [load_model(run, weights=weights, device=device) for run in runs]
    vocab, config = members[0][1], members[0][2]
    for run, (_, other_vocab, other_config) in zip(runs[1:], members[1:]):
        if other_vocab != vocab or other_config.level != config.level:
            raise ValueError(f"{run} has a different vocabulary from {runs[0]}: "
                             "ensemble members must be trained on the same corpus")
    return [m for m, _, _ in members], vocab, config


def _evaluate(args: argparse.Namespace) -> int:
    if args.mc_samples < 0:
        raise ValueError(f"--mc-samples must be >= 0, got {args.mc_samples}")
    models, vocab, config = _load_members(args.runs, args.weights, args.device)
    corpus = Corpus.load(args.data_dir, config.level, vocab)
    torch.manual_seed(args.seed)
    score = score_stream(models, corpus.split(args.split), bptt=config.eval_bptt,
                         mc_samples=args.mc_samples, progress=not args.no_progress)
    print(json.dumps({"split": args.split, "runs": args.runs, "mc_samples": args.mc_samples,
                      "perplexity": score.perplexity, "tokens": score.tokens,
                      "seconds": round(score.seconds, 2)}))
    return 0


def _add_score(commands) -> None:
    score = commands.add_parser("score", help="perplexity of a text file under a trained model")
    score.add_argument("run", metavar="RUN")
    score.add_argument("file", metavar="FILE")
    score.add_argument("--device", default="auto")
    score.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    model, vocab, config = load_model(args.run, device=args.device)
    ids = vocab.encode(tokenize(read_text(args.file), config.level))
    if ids.numel() < 2:
        raise DataError(f"{args.file} has fewer than two tokens: nothing to score")
    result = score_stream(model, ids, bptt=config.eval_bptt)
    print(json.dumps({"file": args.file, "perplexity": result.perplexity,
                      "tokens": result.tokens}))
    return 0


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="sample text from a trained model")
    generate.add_argument("run", metavar="RUN")
    generate.add_argument("--prompt", default="", help="text to condition on")
    generate.add_argument("--words", type=int, default=50, help="tokens to sample")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=1)
    generate.add_argument("--device", default="auto")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    if args.words < 1:
        raise ValueError(f"--words must be >= 1, got {args.words}")
    if not args.temperature > 0 or math.isinf(args.temperature):
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    model, vocab, config = load_model(args.run, device=args.device)
    torch.manual_seed(args.seed)
    print(sample_text(model, vocab, args.prompt, words=args.words,
                      temperature=args.temperature, level=config.level))
    return 0


def _presets(_: argparse.Namespace) -> int:
    for preset in PRESETS.values():
        config = preset.config()
        paper = ", ".join(f"{k} {v}" for k, v in preset.paper.items()) or "no published numbers"
        shape = (f"{config.num_layers}x{config.hidden_size}" if len(set(config.sizes)) == 1
                 else "-".join(map(str, config.sizes)))
        print(f"{preset.name:14s} {config.cell} {shape} "
              f"{config.strategy} p={config.dropout} bptt={config.bptt} "
              f"epochs={config.epochs}  | paper: {paper}  ({preset.note}; {preset.source})")
    return 0


def _download(args: argparse.Namespace) -> int:
    target = download_ptb(resolve_data_dir(args.data_dir))
    print(f"Penn Treebank ready in {Path(target)}")
    return 0


# The axes of a study: given as lists by compare's own flags, so the single-run flags for the
# same fields would be ambiguous there.
_GRID_FIELDS = frozenset({"strategy", "dropout", "cell", "seed"})
# The default study: every strategy at the tutorial's low and high ends of the useful range.
_DEFAULT_STRATEGIES = tuple(STRATEGIES)
_DEFAULT_RATES = (0.25, 0.5)


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Each grid cell is an ordinary run in OUT/runs; rerunning the same command "
                    "resumes an interrupted study. Writes OUT/report.md and OUT/report.html "
                    "and prints the report's path.")
    compare.add_argument("--out", required=True, help="study directory")
    compare.add_argument("--strategies", type=_comma_list(str, "strategy names"),
                         default=_DEFAULT_STRATEGIES, metavar="NAME,...",
                         help=f"strategies to compare, of: {', '.join(STRATEGIES)}")
    compare.add_argument("--rates", type=_comma_list(float, "numbers in [0, 1]"),
                         default=_DEFAULT_RATES, metavar="P,...", help="dropout rates")
    compare.add_argument("--cells", type=_comma_list(str, "cell names"), metavar="CELL,...",
                         help=f"recurrent cells, of: {', '.join(CELLS)} (default: the preset's)")
    compare.add_argument("--seeds", type=_comma_list(int, "integers"), metavar="SEED,...",
                         help="seeds (default: the preset's)")
    compare.add_argument("--jobs", type=int, default=1,
                         help="runs trained in parallel (local backend)")
    compare.add_argument("--backend", choices=["local", "ray"], default="local",
                         help="where runs train: this machine, or Ray Tune trials (needs "
                              "pip install 'rnnreg[ray]')")
    compare.add_argument("--address", metavar="ADDR",
                         help="Ray cluster to join: 'auto', or ray://HOST:10001 (default: a "
                              "local Ray instance); only with --backend ray")
    compare.add_argument("--preset", choices=sorted(PRESETS), default="study-small",
                         help="base configuration; every configuration flag overrides it")
    compare.add_argument("--report-only", action="store_true",
                         help="only regenerate the report from the runs already in --out")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_dir(compare)
    _add_config_flags(compare, exclude=_GRID_FIELDS)
    compare.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from rnnreg.study.grid import StudyGrid, run_study
    from rnnreg.study.report import write_report

    if args.report_only:
        given = sorted(set(_config_overrides(args)) | {
            name for name in ("cells", "seeds") if getattr(args, name) is not None}
            | ({"rates"} if args.rates != _DEFAULT_RATES else set()))
        if given:
            raise ValueError(f"--report-only reads the runs as they are; drop {given}")
        print(write_report(args.out, data_dir=args.data_dir))
        return 0
    base = preset_config(args.preset).replace(**_config_overrides(args))
    grid = StudyGrid(strategies=args.strategies, rates=args.rates,
                     cells=args.cells or (base.cell,), seeds=args.seeds or (base.seed,))
    out = run_study(base, grid, args.out, data_dir=args.data_dir, jobs=args.jobs,
                    progress=not args.no_progress, backend=_study_backend(args, base))
    print(write_report(out))
    return 0


def _study_backend(args: argparse.Namespace, base: Config):
    """None for the local backend (run_study's default); a Ray backend for --backend ray."""
    from rnnreg.study.grid import ray_backend

    if args.backend == "local":
        if args.address is not None:
            raise ValueError("--address names a Ray cluster: use it with --backend ray")
        return None
    try:
        # A run that asks for CUDA gets a GPU reserved, so Ray places it on a node with one.
        gpus = 1.0 if base.device.startswith("cuda") else 0.0
        return ray_backend(args.address, gpus_per_trial=gpus,
                           storage=Path(args.out).resolve() / "ray",
                           progress=not args.no_progress)
    except ImportError as error:  # the one-line message says which extra to install
        raise ValueError(str(error)) from None


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
