"""Tests for stream scoring: bptt invariance, token counting, ensembles and MC dropout.

Every expectation is computed independently of ``score_stream``: the whole stream is fed to the
model as one window and the (mixture) probabilities are formed by hand from a full softmax.
"""

from __future__ import annotations

import math

import pytest
import torch

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.vocab import EOS
from rnnreg.lm.evaluation import score_stream
from rnnreg.lm.model import LanguageModel

VOCAB = 19


def _model(seed: int = 0, vocab: int = VOCAB, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    settings = dict(hidden_size=12, num_layers=2, init_range=0.3)
    settings.update(overrides)
    return LanguageModel(vocab, Config(**settings)).eval()


def _stream(length: int = 240, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _target_log_probs(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t, the whole stream in one forward call."""
    logits = model(ids[:-1].view(-1, 1)).logits[:, 0].double()
    return torch.log_softmax(logits, -1).gather(1, ids[1:].view(-1, 1)).squeeze(1)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- one model


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_stream_score_does_not_depend_on_bptt(cell):
    model = _model(cell=cell)
    ids = _stream()
    expected_nll = -float(_target_log_probs(model, ids).sum())
    scores = [score_stream(model, ids, bptt=bptt) for bptt in (1, 7, 100)]
    for score in scores:
        assert score.tokens == ids.numel() - 1
        assert _relative(score.nll, expected_nll) < 1e-5
        assert _relative(score.perplexity, scores[0].perplexity) < 1e-4
    assert scores[0].perplexity == pytest.approx(math.exp(expected_nll / (ids.numel() - 1)),
                                                 rel=1e-5)
    # Restarting the state every 7 tokens gives a different score, so the check has teeth.
    restarted = -sum(float(_target_log_probs(model, ids[i:i + 8]).sum())
                     for i in range(0, ids.numel() - 1, 7))
    assert _relative(restarted, expected_nll) > 1e-4


def test_loss_and_perplexity_are_per_predicted_token():
    model = _model()
    ids = _stream(50)
    score = score_stream(model, ids)
    assert score.loss == pytest.approx(score.nll / 49)
    assert score.perplexity == pytest.approx(math.exp(score.nll / 49))


def test_every_token_counts_including_eos(tiny_corpus):
    corpus = Corpus.load(tiny_corpus)
    ids = corpus.test
    eos = corpus.vocab.index(EOS)
    assert int((ids[1:] == eos).sum()) == 40  # one per line of the test file
    model = _model(vocab=len(corpus.vocab))
    score = score_stream(model, ids, bptt=13)
    assert score.tokens == ids.numel() - 1
    log_probs = _target_log_probs(model, ids)
    assert score.nll == pytest.approx(-float(log_probs.sum()), rel=1e-5)
    without_eos = -float(log_probs[ids[1:] != eos].sum())
    assert score.nll != pytest.approx(without_eos, rel=1e-3)


def test_batched_scoring_counts_the_tokens_of_every_stream():
    model = _model()
    ids = _stream(203)
    score = score_stream(model, ids, batch_size=4, bptt=9)
    rows = 203 // 4
    assert score.tokens == (rows - 1) * 4
    # Four independent streams, each scored from an empty state.
    columns = ids[: rows * 4].view(4, rows)
    expected = -sum(float(_target_log_probs(model, column).sum()) for column in columns)
    assert score.nll == pytest.approx(expected, rel=1e-5)


def test_scoring_runs_in_eval_mode_and_restores_the_mode():
    model = _model(strategy="zaremba", strategy_p=0.5)
    ids = _stream(60)
    evaluated = score_stream(model, ids)
    model.train()
    again = score_stream(model, ids)
    assert model.training
    assert again.nll == pytest.approx(evaluated.nll, rel=1e-6)


def test_invalid_arguments_are_rejected():
    model = _model()
    ids = _stream(20)
    with pytest.raises(ValueError, match="at least one model"):
        score_stream([], ids)
    with pytest.raises(ValueError, match="mc_samples"):
        score_stream(model, ids, mc_samples=-1)
    with pytest.raises(ValueError, match="batch_size=1"):
        score_stream(model, ids, mc_samples=2, batch_size=2)


# --------------------------------------------------------------------------- ensembles


def test_ensemble_of_one_is_the_model():
    model = _model()
    ids = _stream(120)
    alone = score_stream(model, ids, bptt=11)
    ensemble = score_stream([model], ids, bptt=11)
    assert ensemble.tokens == alone.tokens
    assert ensemble.nll == pytest.approx(alone.nll, rel=1e-9)


def test_ensemble_averages_probabilities_not_log_probabilities():
    first, second = _model(seed=0), _model(seed=1)
    ids = _stream(150)
    logp_a, logp_b = _target_log_probs(first, ids), _target_log_probs(second, ids)
    mean_prob = (logp_a.exp() + logp_b.exp()) / 2
    expected = math.exp(-float(mean_prob.log().sum()) / (ids.numel() - 1))
    score = score_stream([first, second], ids, bptt=17)
    assert score.tokens == ids.numel() - 1
    assert score.perplexity == pytest.approx(expected, rel=1e-5)
    geometric = math.exp(-float(((logp_a + logp_b) / 2).sum()) / (ids.numel() - 1))
    assert score.perplexity != pytest.approx(geometric, rel=1e-3)
    # The mixture is never worse than the worse member (log is concave).
    worst = max(score_stream(m, ids).perplexity for m in (first, second))
    assert score.perplexity <= worst


# --------------------------------------------------------------------------- MC dropout


@torch.no_grad()
def _mc_perplexity(model: LanguageModel, ids: torch.Tensor, samples: int, seed: int) -> float:
    """Mean of ``samples`` explicit passes' probabilities, the whole stream as one window.

    The masks are drawn exactly as the scorer draws them for one window: one
    ``sample_masks(T or 1, samples)`` call right after seeding, one column per sample.
    """
    steps = ids.numel() - 1
    torch.manual_seed(seed)
    masks = model.sample_masks(steps, samples)
    inputs = ids[:-1].view(-1, 1).expand(-1, samples)
    logits = model(inputs, None, masks).logits.double()             # (T, S, V)
    targets = ids[1:].view(-1, 1, 1).expand(-1, samples, 1)
    probs = torch.softmax(logits, -1).gather(2, targets).squeeze(2)  # (T, S)
    return math.exp(-float(probs.mean(1).log().sum()) / steps)


@pytest.mark.parametrize("strategy,bptt", [("variational", 13), ("variational", 1000),
                                           ("awd", 13), ("zaremba", 1000)])
def test_mc_dropout_is_the_mean_of_explicit_passes(strategy, bptt):
    # Variational masks are held over the whole stream, so any bptt agrees with one window;
    # fresh-mask models resample per window, so they are compared with a single window.
    model = _model(strategy=strategy, strategy_p=0.3, embedding_dropout=0.1)
    ids = _stream(90)
    torch.manual_seed(11)
    score = score_stream(model, ids, mc_samples=3, bptt=bptt)
    expected = _mc_perplexity(model, ids, samples=3, seed=11)
    assert score.tokens == ids.numel() - 1
    assert score.perplexity == pytest.approx(expected, rel=1e-5)
    deterministic = score_stream(model, ids).perplexity
    # Dropout was on: the average moved off the deterministic score (by ~0.01% or more here,
    # where float error is ~1e-7).
    assert score.perplexity != pytest.approx(deterministic, rel=1e-5)
    assert not model.training


def test_mc_dropout_depends_on_the_seed_only_through_the_masks():
    model = _model(strategy="variational", strategy_p=0.3)
    ids = _stream(60)
    torch.manual_seed(5)
    first = score_stream(model, ids, mc_samples=2)
    torch.manual_seed(5)
    second = score_stream(model, ids, mc_samples=2)
    torch.manual_seed(6)
    other = score_stream(model, ids, mc_samples=2)
    assert first.nll == second.nll
    assert first.nll != other.nll


@pytest.mark.parametrize("samples", [1, 4])
def test_mc_dropout_without_dropout_is_the_deterministic_score(samples):
    model = _model(strategy="none")
    ids = _stream(80)
    deterministic = score_stream(model, ids, bptt=10)
    mc = score_stream(model, ids, bptt=10, mc_samples=samples)
    assert mc.tokens == deterministic.tokens
    assert mc.perplexity == pytest.approx(deterministic.perplexity, rel=1e-5)
