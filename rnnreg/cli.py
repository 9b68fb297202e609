"""The ``rnnreg`` command line: a thin layer over the library's functions.

Every Config field is a flag of ``train`` with the same name (``hidden_size`` -> ``--hidden-size``),
so one concept has one name in code, config.json, flags and docs. Flags override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
import types
import typing
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rnnreg.lm import distributed
from rnnreg.lm.config import (
    CELLS,
    LEVELS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    SOFTMAXES,
    Config,
)
from rnnreg.lm.data import Corpus
from rnnreg.lm.evaluation import score_stream
from rnnreg.lm.generation import sample_text
from rnnreg.lm.presets import PRESETS, budget_config, preset_config
from rnnreg.lm.rundir import RunDir, RunDirError
from rnnreg.lm.runs import load_model, read_config, read_corpus, weights_description
from rnnreg.lm.sources import (
    DataError,
    default_data_dir,
    download_ptb,
    ensure_ptb,
    read_text,
    resolve_data_dir,
)
from rnnreg.lm.training import TrainingDiverged, train
from rnnreg.lm.vocab import UNK, tokenize
from rnnreg.nn.strategies import RECURRENT_MASKS, STRATEGIES

__all__ = ["main"]

# Above this share of <unk> a perplexity says little about the text: `score` warns.
_UNK_WARNING = 0.05


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
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    download.set_defaults(handler=_download)
    return parser


def _add_data_dir(parser: argparse.ArgumentParser, recorded: bool = False) -> None:
    default = ("the corpus the run was trained on" if recorded else
               "$RNNREG_DATA, else the user cache")
    parser.add_argument("--data-dir", metavar="DIR_OR_FILE", help=(
        "corpus: a directory with {ptb.,}{train,valid,test}.txt (test optional), or one text "
        f"file cut by --split-fractions (default: {default})"))


def _add_train(commands) -> None:
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
    _add_data_dir(train)
    _add_config_flags(train)
    train.set_defaults(handler=_train)


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
    "dropout": "the strategy's dropout rate p",
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


def _add_config_flags(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()):
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
        flag = "--" + field.name.replace("_", "-")
        kind, optional = _unwrap_optional(hints[field.name])
        options = {"default": argparse.SUPPRESS, "help": _FIELD_HELP[field.name]}
        if kind is bool:
            fields.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(kind) is tuple:
            fields.add_argument(flag, nargs="+", action=_TupleAction,
                                item=typing.get_args(kind)[0], optional=optional,
                                metavar=typing.get_args(kind)[0].__name__.upper(), **options)
        elif field.name in _FIELD_CHOICES and optional:
            allowed = _FIELD_CHOICES[field.name]
            fields.add_argument(flag, type=_none_or(kind), choices=(*allowed, None),
                                metavar="{" + ",".join((*allowed, "none")) + "}", **options)
        elif field.name in _FIELD_CHOICES:
            fields.add_argument(flag, choices=_FIELD_CHOICES[field.name], **options)
        else:
            fields.add_argument(flag, type=_none_or(kind) if optional else kind,
                                metavar=field.name.upper(), **options)


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
        config = read_config(RunDir(out)).replace(**overrides)
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
    the --max-vocab/--min-count given) picks the model size and softmax."""
    reading = budget_config(minutes, 2).replace(**overrides)  # only the corpus settings count
    corpus = Corpus.load(data_dir, reading.level, split_fractions=reading.split_fractions,
                         max_vocab=reading.max_vocab, min_count=reading.min_count)
    return budget_config(minutes, len(corpus.vocab)).replace(**overrides)


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


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="perplexity of one run, or of an ensemble of runs, on a split")
    evaluate.add_argument("runs", nargs="+", metavar="RUN",
                          help="run directories; several = ensemble (probabilities averaged)")
    evaluate.add_argument("--split", choices=["train", "valid", "test"], default="test",
                          help="split to score (default: test)")
    evaluate.add_argument("--mc-samples", type=int, default=0,
                          help="MC-dropout passes averaged (default: 0 = dropout off)")
    evaluate.add_argument("--weights", choices=["best", "last"], default="best",
                          help="best valid epoch, or the last checkpoint (default: best)")
    evaluate.add_argument("--seed", type=int, default=1,
                          help="seed for MC-dropout masks (default: 1)")
    evaluate.add_argument("--device", default="auto", help="default: auto")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    _add_data_dir(evaluate, recorded=True)
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
    recorded = read_corpus(RunDir(args.runs[0]))
    data_dir = args.data_dir
    if data_dir is None and recorded is not None:
        data_dir = recorded["data_dir"]
    corpus = Corpus.load(data_dir, config.level, vocab, split_fractions=config.split_fractions,
                         recorded=recorded if args.data_dir is None else None)
    ids = corpus.split(args.split)
    torch.manual_seed(args.seed)
    score = score_stream(models, ids, bptt=config.eval_bptt,
                         mc_samples=args.mc_samples, progress=not args.no_progress)
    weights = [weights_description(run, args.weights) for run in args.runs]
    unknown = _unknown(ids, vocab)
    if args.json:
        print(json.dumps({"split": args.split, "runs": args.runs, "mc_samples": args.mc_samples,
                          "perplexity": score.perplexity, "tokens": score.tokens,
                          "seconds": round(score.seconds, 2), "weights": weights,
                          **unknown}))
        return 0
    how = f"; MC dropout, {args.mc_samples} passes" if args.mc_samples else ""
    scored = (f"{weights[0]} of {args.runs[0]}" if len(args.runs) == 1 else
              f"ensemble of {len(args.runs)} runs: " + "; ".join(
                  f"{w} of {r}" for w, r in zip(weights, args.runs)))
    print(f"{_score_line(args.split, score, unknown)}{how}  [{scored}]")
    return 0


def _unknown(ids: torch.Tensor, vocab) -> dict:
    """How many of the predicted tokens (all but the first) are <unk>, and their share."""
    unk = vocab.unk_id
    count = 0 if unk is None else int((ids[1:] == unk).sum())
    return {"unk_tokens": count, "unk_share": count / max(ids.numel() - 1, 1)}


def _score_line(what: str, score, unknown: dict) -> str:
    return (f"{what} perplexity {score.perplexity:.2f} over {score.tokens:,} tokens "
            f"({unknown['unk_share']:.1%} {UNK}) in {score.seconds:.1f} s")


def _add_score(commands) -> None:
    score = commands.add_parser("score", help="perplexity of a text file under a trained model")
    score.add_argument("run", metavar="RUN")
    score.add_argument("file", metavar="FILE")
    score.add_argument("--weights", choices=["best", "last"], default="best",
                       help="best valid epoch, or the last checkpoint (default: best)")
    score.add_argument("--device", default="auto", help="default: auto")
    score.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    score.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    model, vocab, config = load_model(args.run, weights=args.weights, device=args.device)
    ids = vocab.encode(tokenize(read_text(args.file), config.level))
    if ids.numel() < 2:
        raise DataError(f"{args.file} has fewer than two tokens: nothing to score")
    result = score_stream(model, ids, bptt=config.eval_bptt)
    unknown = _unknown(ids, vocab)
    weights = weights_description(args.run, args.weights)
    if unknown["unk_share"] > _UNK_WARNING:
        print(f"rnnreg: warning: {unknown['unk_tokens']:,} of {result.tokens:,} tokens "
              f"({unknown['unk_share']:.1%}) are not in the run's vocabulary and were scored "
              f"as {UNK}: the perplexity says little about this text", file=sys.stderr)
    if args.json:
        print(json.dumps({"file": args.file, "perplexity": result.perplexity,
                          "tokens": result.tokens, "weights": weights, **unknown}))
    else:
        print(f"{_score_line(args.file, result, unknown)}  [{weights} of {args.run}]")
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
    target = download_ptb(resolve_data_dir(args.data_dir), progress=not args.no_progress)
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
        description="Each grid cell is an ordinary run in OUT/runs; rerunning the same command "
                    "resumes an interrupted study. Writes OUT/report.md and OUT/report.html "
                    "and prints the report's path.")
    compare.add_argument("--out", required=True, help="study directory")
    compare.add_argument("--strategies", type=_comma_list(str, "strategy names"),
                         default=_DEFAULT_STRATEGIES, metavar="NAME,...",
                         help=f"strategies to compare, of: {', '.join(STRATEGIES)} (default: "
                              "all)")
    compare.add_argument("--rates", type=_comma_list(float, "numbers in [0, 1]"),
                         default=_DEFAULT_RATES, metavar="P,...",
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
    compare.add_argument("--preset", choices=sorted(PRESETS), default="study-small",
                         help="base configuration; every configuration flag overrides it "
                              "(default: study-small)")
    compare.add_argument("--report-only", action="store_true",
                         help="only regenerate the report from the runs already in --out")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_dir(compare, recorded=True)
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
