"""The commands that use a trained run: ``evaluate`` and ``score`` (perplexity), ``generate``.

They share loading a run's weights and vocabulary and the way a perplexity is reported (with
the share of <unk> beside it), and none of them trains; the scoring itself is
``rnnreg.lm.evaluation`` and the sampling ``rnnreg.lm.generation``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from rnnreg.cli.flags import add_data_dir
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import DataError, read_text
from rnnreg.lm.corpus.vocab import UNK, tokenize
from rnnreg.lm.evaluation import load_model, loaded_weights, score_stream
from rnnreg.lm.generation import sample_text
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.console import where
from rnnreg.lm.training.resume import Progress

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
    recorded = RunDir(args.runs[0]).read_corpus()
    data_dir = args.data_dir
    if data_dir is None and recorded is not None:
        data_dir = recorded["data_dir"]
    corpus = Corpus.load(data_dir, config.level, vocab, split_fractions=config.split_fractions,
                         recorded=recorded if args.data_dir is None else None)
    ids = corpus.split(args.split)
    torch.manual_seed(args.seed)
    score = score_stream(models, ids, bptt=config.eval_bptt,
                         mc_samples=args.mc_samples, progress=not args.no_progress)
    weights = [_weights_description(run, args.weights) for run in args.runs]
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
    weights = _weights_description(args.run, args.weights)
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


def _weights_description(run_dir: str, weights: str = "best") -> str:
    """Which weights ``load_model(run_dir, weights=...)`` scores, in words: name and epoch."""
    run = RunDir(run_dir)
    name = loaded_weights(run, weights)
    if name == "best":
        epochs = [r for r in run.read_metrics()
                  if r.get("event") == "epoch" and r.get("valid_ppl") is not None]
        best = min(epochs, key=lambda r: r["valid_ppl"]) if epochs else None
        return "best weights" + (f" (epoch {best['epoch']})" if best else "")
    missing = " (no best weights yet: no epoch finished)" if name != weights else ""
    progress = Progress(**run.load_checkpoint("last")["progress"])
    return f"last weights ({where(progress)}){missing}"
