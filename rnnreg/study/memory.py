"""How well a run trained on a recall corpus remembers: accuracy and perplexity against N.

The corpus (:mod:`rnnreg.lm.corpus.recall`) marks the tokens that only a memory of N steps
predicts; here every such token of the test split is scored by the run's final weights, with
dropout off, and grouped by N. Scored at report time from the run directory and the corpus
alone, so any run on a recall corpus can be measured, however it was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.recall import recall_positions
from rnnreg.lm.evaluation import load_model, token_scores

__all__ = ["RecallScore", "recall_scores"]


@dataclass(frozen=True)
class RecallScore:
    """The value tokens at one distance N: how many, the share predicted exactly (the top
    choice), and the perplexity on them."""

    distance: int
    tokens: int
    accuracy: float
    perplexity: float


def recall_scores(run_dir: str | Path, data_dir: str | Path) -> dict[int, RecallScore]:
    """Score a run's final weights on the test split's value tokens, by distance N."""
    model, vocab, config = load_model(run_dir, weights="last", device="cpu")
    corpus = Corpus.load(data_dir, config.level, vocab)
    ids = corpus.split("test")
    scores = token_scores(model, ids, bptt=config.eval_bptt)
    by_distance: dict[int, list[int]] = {}
    for recall in recall_positions(vocab.decode(ids)):
        by_distance.setdefault(recall.distance, []).append(recall.position - 1)
    found = {}
    for distance, indices in sorted(by_distance.items()):
        correct = scores.correct[indices].float().mean().item()
        nll = -scores.log_probs[indices].double().mean().item()
        found[distance] = RecallScore(distance, len(indices), correct,
                                      math.exp(nll) if nll < 709 else math.inf)
    return found
