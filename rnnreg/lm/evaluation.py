"""Perplexity of a split scored as one stream, for one model, an ensemble, or MC dropout.

One scorer serves all three because they differ only in what is averaged: the predicted
*probabilities* of every member (ensembles, Zaremba et al. 2014 Table 1) and of every stochastic
pass (MC dropout, Gal & Ghahramani 2016 section 5) are averaged before taking the log.
:func:`load_model` rebuilds what is scored from a run directory alone: its config, vocabulary
and safetensors weights, no pickled Python objects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import batchify, windows
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.distributed import resolve_device
from rnnreg.lm.model import LanguageModel, ModelMasks, ModelOutput, detach_state
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.averaging import averaged_state
from rnnreg.lm.training.state import TrainingState

__all__ = ["Score", "TokenScores", "load_model", "loaded_weights", "perplexity", "score_stream",
           "target_log_probs", "token_scores"]

# Largest (steps x samples x vocabulary) block of logits materialised at once, in elements.
_LOGIT_BUDGET = 40_000_000


@dataclass(frozen=True)
class Score:
    nll: float          # summed negative log-likelihood, nats
    tokens: int         # predicted tokens (every <eos> included)
    seconds: float

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.tokens)


def perplexity(nll: float, tokens: int) -> float:
    """exp(mean NLL), saturating at inf: a finite but huge loss must not crash the bookkeeping."""
    mean = nll / tokens
    return math.exp(mean) if mean < 709 else math.inf


def load_model(run_dir: str | Path, *, weights: str = "best",
               device: str = "auto") -> tuple[LanguageModel, Vocabulary, Config]:
    """Rebuild a trained model from its run directory: config + vocabulary + safetensors weights.

    The weights a run evaluates: ``best`` holds them as saved; ``last`` holds the iterates, and
    beside them the weights' EMA once a run with ``ema_decay`` started it, which is then what is
    loaded (what the run's final line scored).
    """
    run = RunDir(run_dir)
    config = run.read_config()
    vocab = run.read_vocab()
    state = TrainingState.load(run, loaded_weights(run, weights))
    model = LanguageModel(len(vocab), config)
    model.load_state_dict(state.model)
    if state.ema_weights is not None:
        model.load_state_dict(averaged_state(model, state.ema_weights))
    model.to(resolve_device(device))
    model.eval()
    return model, vocab, config


def loaded_weights(run: RunDir, weights: str) -> str:
    """The checkpoint ``load_model(run, weights=weights)`` loads: the one asked for, except
    that a run stopped before its first epoch ended has no best weights yet, and the last ones
    are all there is (commands that score them say so)."""
    return weights if run.has_checkpoint(weights) or weights != "best" else "last"


@torch.no_grad()
def score_stream(models: Sequence[LanguageModel] | LanguageModel, ids: Tensor, *,
                 bptt: int = 100, batch_size: int = 1, mc_samples: int = 0,
                 progress: bool = False) -> Score:
    """Score ``ids`` (1-D) with the averaged predictive distribution of ``models``.

    ``batch_size=1`` scores the split as one stream, the paper's test protocol: every token but
    the first is predicted once with the full history carried, so the result does not depend on
    ``bptt``. ``mc_samples=N`` runs N dropout passes side by side as a batch of N copies of the
    stream; per-sequence masks (variational models) are sampled once and held over the whole
    stream, fresh-mask models get new masks every window.
    """
    members = [models] if isinstance(models, LanguageModel) else list(models)
    if not members:
        raise RnnregError("score_stream needs at least one model")
    if mc_samples < 0:
        raise RnnregError(f"mc_samples must be >= 0, got {mc_samples}")
    if mc_samples and batch_size != 1:
        raise RnnregError("MC-dropout scoring runs the samples as the batch: use batch_size=1")
    samples = max(mc_samples, 1)
    device = next(members[0].parameters()).device
    streams = batchify(ids.to(device), batch_size)
    if mc_samples:
        streams = streams.expand(-1, samples)
    bptt = max(1, min(bptt, _LOGIT_BUDGET // (samples * members[0].vocab_size)))
    modes = [m.training for m in members]
    for m in members:
        m.eval()
    start = time.perf_counter()
    try:
        nll = _score_windows(members, streams, bptt, mc_samples, progress)
    finally:
        for m, mode in zip(members, modes):
            m.train(mode)
    tokens = (streams.size(0) - 1) * (streams.size(1) // samples)
    return Score(nll, tokens, time.perf_counter() - start)


@dataclass(frozen=True)
class TokenScores:
    """Per predicted token of a stream (``ids[1:]``): log p(token) and whether it was the top
    prediction. Index ``i`` is the token at stream position ``i + 1``."""

    log_probs: Tensor   # (T - 1,) float
    correct: Tensor     # (T - 1,) bool


@torch.no_grad()
def token_scores(model: LanguageModel, ids: Tensor, *, bptt: int = 100) -> TokenScores:
    """Score ``ids`` (1-D) as one stream, token by token, with dropout off.

    :func:`score_stream` sums; this keeps every token's score, for measures over chosen
    positions (the tokens of a recall corpus that need memory, :mod:`rnnreg.lm.corpus.recall`).
    Called without targets, either softmax gives every word's score, which the top choice needs.
    """
    mode = model.training
    model.eval()
    device = next(model.parameters()).device
    state, log_probs, correct = None, [], []
    try:
        for inputs, targets in windows(ids.to(device).unsqueeze(1), bptt):
            out = model(inputs, state)
            state = detach_state(out.state)
            scores = torch.log_softmax(out.logits.float(), -1)
            log_probs.append(scores.gather(-1, targets.unsqueeze(-1))[:, 0, 0].cpu())
            correct.append((scores.argmax(-1) == targets)[:, 0].cpu())
    finally:
        model.train(mode)
    return TokenScores(torch.cat(log_probs), torch.cat(correct))


def _score_windows(members, streams: Tensor, bptt: int, mc_samples: int, progress: bool) -> float:
    states = [None] * len(members)
    held = [_held_masks(m, streams.size(1)) if mc_samples else None for m in members]
    total = torch.zeros((), dtype=torch.float64, device=streams.device)
    bar = tqdm(total=streams.size(0) - 1, disable=not progress, unit="tok", leave=False)
    for inputs, targets in windows(streams, bptt):
        log_probs = []
        for i, model in enumerate(members):
            masks = held[i]
            if mc_samples and masks is None:
                masks = model.sample_masks(inputs.size(0), inputs.size(1))
            out = model(inputs, states[i], masks, targets)
            states[i] = detach_state(out.state)
            log_probs.append(target_log_probs(out, targets))
        total += _mixture_nll(torch.stack(log_probs), mc_samples).double()
        bar.update(inputs.size(0))
    bar.close()
    return float(total)


def _held_masks(model: LanguageModel, samples: int) -> ModelMasks | None:
    """Per-sequence masks drawn once for the whole stream; None means resample every window."""
    return model.sample_masks(1, samples) if model.rnn.variational else None


def target_log_probs(out: ModelOutput, targets: Tensor) -> Tensor:
    """log p(target) per position, ``(T, B)``, without materialising the full log-softmax.

    The adaptive softmax gives them directly (exact: its head and the targets' clusters); the
    full softmax's come from its logits.
    """
    if out.target_log_probs is not None:
        return out.target_log_probs.float()
    logits = out.logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _mixture_nll(picked: Tensor, mc_samples: int) -> Tensor:
    """NLL under the mean of the members' (and samples') probabilities; ``picked (M, T, B)``."""
    if mc_samples:  # the B columns are samples of one stream: average over members and samples
        per_token = picked.permute(1, 0, 2).flatten(1)      # (T, M * S)
        return -(torch.logsumexp(per_token, 1) - math.log(per_token.size(1))).sum()
    return -(torch.logsumexp(picked, 0) - math.log(picked.size(0))).sum()
