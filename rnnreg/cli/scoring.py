"""The commands that use a trained run: ``evaluate`` and ``score`` (perplexity), ``generate``.

They share loading a run's weights and vocabulary and the way a perplexity is reported (with
the share of <unk> beside it), and none of them trains; the scoring itself is
``rnnreg.lm.evaluation`` (dynamic evaluation ``rnnreg.lm.dynamic``) and the sampling
``rnnreg.lm.generation``. ``--dynamic`` reports the static perplexity and the dynamic one
side by side under their own names, and records the dynamic one, with the step size and decay
it chose, in the run's metrics (an ``event: dynamic_eval`` line); the weights on disk are
never changed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

import torch

from rnnreg.cli.flags import add_data_dir
from rnnreg.errors import RnnregError
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import DataError, locate_corpus, read_text
from rnnreg.lm.corpus.vocab import UNK, tokenize
from rnnreg.lm.dynamic import (
    DEFAULT_SEGMENT,
    DEFAULT_STAT_WINDOWS,
    DEFAULT_TUNE_TOKENS,
    GRIDS,
    METHODS,
    DynamicSettings,
    gradient_statistics,
    score_dynamic,
    tune_dynamic,
)
from rnnreg.lm.evaluation import load_model, loaded_weights, score_stream
from rnnreg.lm.generation import sample_text
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import read_records, strict
from rnnreg.lm.training.console import where
from rnnreg.lm.training.state import TrainingState

__all__ = ["add_commands"]

# Above this share of <unk> a perplexity says little about the text: `score` warns.
_UNK_WARNING = 0.05


def add_commands(commands) -> None:
    _add_evaluate(commands)
    _add_score(commands)
    _add_generate(commands)


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
    add_data_dir(evaluate, recorded=True)
    _add_dynamic_flags(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _add_dynamic_flags(parser) -> None:
    grid = "; ".join(f"{method}: lr {' '.join(f'{v:g}' for v in axes['lr'])} x decay "
                     f"{' '.join(f'{v:g}' for v in axes['decay'])}"
                     for method, axes in GRIDS.items())
    group = parser.add_argument_group(
        "dynamic evaluation (Krause et al. 2018)",
        "adapt a copy of the weights to the text as it is scored, segment by segment; the "
        "static perplexity is reported beside it. Without --dynamic-lr/--dynamic-decay both "
        f"are tuned on the valid split over the grid ({grid}; for segments of 5 tokens, "
        "scaled by T/5)")
    group.add_argument("--dynamic", choices=METHODS, metavar="{sgd,rms}",
                       help="also score with dynamic evaluation: sgd, or rms (RMS steps, "
                            "decay to the trained weights)")
    group.add_argument("--dynamic-lr", type=float, metavar="ETA",
                       help="step size (with --dynamic-decay: no tuning)")
    group.add_argument("--dynamic-decay", type=float, metavar="LAMBDA",
                       help="pull toward the trained weights per segment, 0 = none")
    group.add_argument("--dynamic-segment", type=int, default=DEFAULT_SEGMENT, metavar="T",
                       help=f"tokens scored before each step (default: {DEFAULT_SEGMENT})")
    group.add_argument("--dynamic-tune-tokens", type=int, default=DEFAULT_TUNE_TOKENS,
                       metavar="N", help="tune on the first N valid tokens; 0 = all "
                                         f"(default: {DEFAULT_TUNE_TOKENS})")
    group.add_argument("--dynamic-stat-windows", type=int, default=DEFAULT_STAT_WINDOWS,
                       metavar="N", help="rms: mean squared gradients over N training windows "
                                         "of 100x T tokens (default: 0 = all)")


def _check_dynamic_flags(args: argparse.Namespace) -> None:
    given = [name for name in ("dynamic_lr", "dynamic_decay") if getattr(args, name) is not None]
    if args.dynamic is None:
        if given:
            raise RnnregError(f"--{given[0].replace('_', '-')} needs --dynamic sgd or rms")
        return
    if len(given) == 1:
        raise RnnregError("give both --dynamic-lr and --dynamic-decay (no tuning), or neither "
                          "(both tuned on the valid split)")
    if given:
        DynamicSettings(args.dynamic, args.dynamic_lr, args.dynamic_decay,
                        args.dynamic_segment)  # refuses nonsense before any work
    elif args.dynamic_segment < 1:
        raise RnnregError(f"--dynamic-segment must be >= 1, got {args.dynamic_segment}")
    if args.dynamic_tune_tokens < 0:
        raise RnnregError(f"--dynamic-tune-tokens must be >= 0, got {args.dynamic_tune_tokens}")
    if args.dynamic_stat_windows < 0:
        raise RnnregError(f"--dynamic-stat-windows must be >= 0 (0 = the whole training "
                          f"split), got {args.dynamic_stat_windows}")


def _run_corpus(run_dir: str, config, vocab, data_dir) -> Corpus:
    """The corpus ``data_dir`` names, else the one the run recorded (its files checked against
    the record), read with the run's vocabulary."""
    recorded = RunDir(run_dir).read_corpus()
    location = locate_corpus(data_dir, None if recorded is None else recorded["data_dir"])
    # The run's reading settings, so the encoding training cached is the one found.
    return Corpus.load(location, config.level, vocab, split_fractions=config.split_fractions,
                       max_vocab=config.max_vocab, min_count=config.min_count,
                       recorded=recorded if location.origin == "recorded" else None)


def _dynamic(model, corpus: Corpus, ids: torch.Tensor, args: argparse.Namespace) -> tuple:
    """Dynamic evaluation of ``ids`` as the flags ask: the rms form's gradient statistics on
    the training split, the step size and decay tuned on the valid split unless given, then
    the score; returns the score and the record of how it was made."""
    progress = not args.no_progress
    stats = None
    if args.dynamic == "rms":
        stats = gradient_statistics(model, corpus.train, segment=args.dynamic_segment,
                                    windows_max=args.dynamic_stat_windows, progress=progress)
    record = {"dynamic_method": args.dynamic, "dynamic_segment": args.dynamic_segment,
              "dynamic_stat_windows": None if stats is None else stats.windows,
              "dynamic_stat_tokens": None if stats is None else stats.tokens}
    if args.dynamic_lr is None:
        tuning = tune_dynamic(model, corpus.valid, args.dynamic, stats,
                              segment=args.dynamic_segment, tokens=args.dynamic_tune_tokens,
                              progress=progress)
        settings = tuning.settings
        record.update(dynamic_tuned_on="valid", dynamic_tune_tokens=tuning.tokens,
                      dynamic_tune_ppl=tuning.perplexity,
                      dynamic_grid=[list(point) for point in tuning.grid])
    else:
        settings = DynamicSettings(args.dynamic, args.dynamic_lr, args.dynamic_decay,
                                   args.dynamic_segment)
        record.update(dynamic_tuned_on=None)
    record.update(dynamic_lr=settings.lr, dynamic_decay=settings.decay,
                  dynamic_epsilon=settings.epsilon if settings.method == "rms" else None)
    score = score_dynamic(model, ids, settings, stats, progress=progress)
    return score, record


def _record_dynamic(run_dir: str, record: dict) -> None:
    """Append the dynamic evaluation's record to the run's metrics, under the run's lock; a run
    being trained (locked) or read-only is not recorded, and a line says so."""
    run = RunDir(run_dir)
    try:
        with run.lock():
            run.append_metrics(strict(record))
    except RunDirError as error:
        print(f"rnnreg: warning: the dynamic evaluation was not recorded in {run.metrics_path} "
              f"({error})", file=sys.stderr)


def _dynamic_line(what: str, score, record: dict) -> str:
    how = (f"{record['dynamic_method']}: lr {record['dynamic_lr']:g}, decay "
           f"{record['dynamic_decay']:g}, segments of {record['dynamic_segment']} tokens")
    if record["dynamic_tuned_on"]:
        stopped = sum(point[2] is None for point in record["dynamic_grid"])
        how += (f"; tuned on {record['dynamic_tune_tokens']:,} valid tokens over "
                f"{len(record['dynamic_grid'])} grid points"
                + (f", {stopped} stopped once beaten" if stopped else ""))
    return (f"{what} perplexity, dynamic evaluation {score.perplexity:.2f} ({how}) in "
            f"{score.seconds:.1f} s")


def _load_members(runs: list[str], weights: str, device: str):
    members = [load_model(run, weights=weights, device=device) for run in runs]
    vocab, config = members[0][1], members[0][2]
    for run, (_, other_vocab, other_config) in zip(runs[1:], members[1:]):
        if other_vocab != vocab or other_config.level != config.level:
            raise RnnregError(f"{run} has a different vocabulary from {runs[0]}: "
                              "ensemble members must be trained on the same corpus")
    return [m for m, _, _ in members], vocab, config


def _evaluate(args: argparse.Namespace) -> int:
    if args.mc_samples < 0:
        raise RnnregError(f"--mc-samples must be >= 0, got {args.mc_samples}")
    _check_dynamic_flags(args)
    if args.dynamic and (len(args.runs) > 1 or args.mc_samples):
        raise RnnregError("--dynamic adapts one model's weights: score one run, without "
                          "--mc-samples")
    models, vocab, config = _load_members(args.runs, args.weights, args.device)
    corpus = _run_corpus(args.runs[0], config, vocab, args.data_dir)
    ids = corpus.split(args.split)
    torch.manual_seed(args.seed)
    score = score_stream(models, ids, bptt=config.eval_bptt,
                         mc_samples=args.mc_samples, progress=not args.no_progress)
    weights = [_weights_description(run, args.weights) for run in args.runs]
    unknown = _unknown(ids, vocab)
    dynamic = record = None
    if args.dynamic:
        dynamic, made = _dynamic(models[0], corpus, ids, args)
        record = {"event": "dynamic_eval", "split": args.split, "weights": weights[0],
                  f"{args.split}_ppl": score.perplexity,
                  f"{args.split}_ppl_dynamic": dynamic.perplexity, "tokens": score.tokens,
                  "dynamic_seconds": dynamic.seconds, **made}
        _record_dynamic(args.runs[0], record)
    if args.json:
        print(json.dumps(strict({
            "split": args.split, "runs": args.runs, "mc_samples": args.mc_samples,
            "perplexity": score.perplexity, "tokens": score.tokens,
            "seconds": round(score.seconds, 2), "weights": weights, **unknown,
            **({} if dynamic is None else _dynamic_json(dynamic, record))})))
        return 0
    how = f"; MC dropout, {args.mc_samples} passes" if args.mc_samples else ""
    scored = (f"{weights[0]} of {args.runs[0]}" if len(args.runs) == 1 else
              f"ensemble of {len(args.runs)} runs: " + "; ".join(
                  f"{w} of {r}" for w, r in zip(weights, args.runs)))
    static = " (static)" if dynamic else ""
    print(f"{_score_line(args.split + static, score, unknown)}{how}  [{scored}]")
    if dynamic:
        print(_dynamic_line(args.split, dynamic, record))
    return 0


def _dynamic_json(dynamic, record: dict) -> dict:
    """The JSON output's dynamic keys: ``perplexity`` stays the static one."""
    settings = {key: value for key, value in record.items() if key.startswith("dynamic_")}
    return {"perplexity_dynamic": dynamic.perplexity, **settings}


def _unknown(ids: torch.Tensor, vocab) -> dict:
    """How many of the predicted tokens (all but the first) are <unk>, and their share."""
    unk = vocab.unk_id
    count = 0 if unk is None else int((ids[1:] == unk).sum())
    return {"unk_tokens": count, "unk_share": count / max(ids.numel() - 1, 1)}


def _most_frequent_unknown(tokens: list[str], vocab, shown: int = 5) -> str:
    """The ``shown`` most frequent words of ``tokens`` not in ``vocab``, with their counts:
    what to add to the training text, or what the text does not share with it."""
    counts = Counter(token for token in tokens if token not in vocab)
    words = ", ".join(f"{word!r} x{count:,}" for word, count in counts.most_common(shown))
    more = f" and {len(counts) - shown:,} more words" if len(counts) > shown else ""
    return f"most frequent: {words}{more}" if counts else f"{UNK} itself in the text"


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
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_data_dir(score, recorded=True)
    _add_dynamic_flags(score)
    score.set_defaults(handler=_score)


def _score(args: argparse.Namespace) -> int:
    _check_dynamic_flags(args)
    model, vocab, config = load_model(args.run, weights=args.weights, device=args.device)
    tokens = tokenize(read_text(args.file), config.level)
    ids = vocab.encode(tokens)
    if ids.numel() < 2:
        raise DataError(f"{args.file} has fewer than two tokens: nothing to score")
    result = score_stream(model, ids, bptt=config.eval_bptt)
    unknown = _unknown(ids, vocab)
    weights = _weights_description(args.run, args.weights)
    if unknown["unk_share"] > _UNK_WARNING:
        print(f"rnnreg: warning: {unknown['unk_tokens']:,} of {result.tokens:,} tokens "
              f"({unknown['unk_share']:.1%}) are not in the run's vocabulary and were scored "
              f"as {UNK} ({_most_frequent_unknown(tokens[1:], vocab)}): the perplexity says "
              "little about this text", file=sys.stderr)
    dynamic = record = None
    if args.dynamic:
        # The training split (rms statistics) and the valid split (tuning) of the run's corpus.
        corpus = _run_corpus(args.run, config, vocab, args.data_dir)
        dynamic, made = _dynamic(model, corpus, ids, args)
        record = {"event": "dynamic_eval", "file": args.file, "weights": weights,
                  "file_ppl": result.perplexity, "file_ppl_dynamic": dynamic.perplexity,
                  "tokens": result.tokens, "dynamic_seconds": dynamic.seconds, **made}
        _record_dynamic(args.run, record)
    if args.json:
        print(json.dumps(strict({
            "file": args.file, "perplexity": result.perplexity, "tokens": result.tokens,
            "weights": weights, **unknown,
            **({} if dynamic is None else _dynamic_json(dynamic, record))})))
    else:
        static = " (static)" if dynamic else ""
        print(f"{_score_line(args.file + static, result, unknown)}  [{weights} of {args.run}]")
        if dynamic:
            print(_dynamic_line(args.file, dynamic, record))
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
        raise RnnregError(f"--words must be >= 1, got {args.words}")
    if not args.temperature > 0 or math.isinf(args.temperature):
        raise RnnregError(f"--temperature must be > 0, got {args.temperature}")
    model, vocab, config = load_model(args.run, device=args.device)
    torch.manual_seed(args.seed)
    print(sample_text(model, vocab, args.prompt, words=args.words,
                      temperature=args.temperature, level=config.level))
    return 0


def _weights_description(run_dir: str, weights: str = "best") -> str:
    """Which weights ``load_model(run_dir, weights=...)`` scores, in words: name and epoch."""
    run = RunDir(run_dir)
    name = loaded_weights(run, weights)
    if name == "best":
        epochs = [r for r in read_records(run, "epoch") if r.get("valid_ppl") is not None]
        best = min(epochs, key=lambda r: r["valid_ppl"]) if epochs else None
        return "best weights" + (f" (epoch {best['epoch']})" if best else "")
    missing = " (no best weights yet: no epoch finished)" if name != weights else ""
    last = TrainingState.load(run, "last")
    averaged = "" if last.ema is None else f", their EMA over {last.ema_updates} steps"
    return f"last weights ({where(last.progress)}{averaged}){missing}"
