"""Tests for the weight average over the tail of a run (EMA) and for averaged tied weights.

The reference EMA is computed here from the iterates the optimizer produced, recorded after
every step, and the equation average <- decay * average + (1 - decay) * weights from the first
step at which the configured fraction of the run is done.
"""

from __future__ import annotations

import math

import pytest
import torch

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.evaluation import load_model, score_stream
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.asgd import NTASGD
from rnnreg.lm.training.loop import train
from rnnreg.lm.training.resume import resumed_config
from support import TEST_THREADS
from support.steps import train_killed

BASE = Config(hidden_size=12, batch_size=4, bptt=5, epochs=2, init_range=0.3, eval_bptt=50,
              checkpoint_minutes=0.0, seed=3, device="cpu", strategy="zaremba", strategy_p=0.2,
              tie_weights=True, ema_decay=0.9, ema_start=0.5)


def _quiet_train(config: Config, out, data_dir, **kwargs) -> dict:
    return train(config, out, data_dir=data_dir, progress=False, verbose=False, **kwargs)


def _epochs(out) -> list[dict]:
    return [r for r in RunDir(out).read_metrics() if r.get("event") == "epoch"]


@pytest.fixture
def iterates(monkeypatch):
    """The parameters after every optimizer step, in ``named_parameters`` order."""
    seen: list[list[torch.Tensor]] = []
    original = torch.optim.SGD.step

    def step(optimizer, *args, **kwargs):
        result = original(optimizer, *args, **kwargs)
        seen.append([p.detach().clone() for p in optimizer.param_groups[0]["params"]])
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return seen


def _reference_ema(weights: list[list[torch.Tensor]], start: int, decay: float):
    """The EMA of the iterates from 0-based step ``start`` on, by its equation."""
    average = [w.clone() for w in weights[start]]
    for later in weights[start + 1:]:
        average = [decay * a + (1 - decay) * w for a, w in zip(average, later)]
    return average


@pytest.mark.slow
def test_the_ema_follows_its_equation_and_is_what_the_run_evaluates(tmp_path, tiny_corpus,
                                                                    iterates):
    summary = _quiet_train(BASE, tmp_path / "run", tiny_corpus)
    epochs = _epochs(tmp_path / "run")
    per_epoch = epochs[0]["step"]
    assert len(iterates) == 2 * per_epoch
    # Half the run is done at the first step of epoch 2: the average starts there.
    assert [r["ema_updates"] for r in epochs] == [0, per_epoch]
    assert summary["ema_updates"] == per_epoch
    expected = _reference_ema(iterates, per_epoch, 0.9)

    model, vocab, config = load_model(tmp_path / "run", weights="last", device="cpu")
    names = [name for name, _ in model.named_parameters()]
    last = load_tree(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert last["ema"]["updates"] == per_epoch
    for name, want, iterate in zip(names, expected, iterates[-1]):
        torch.testing.assert_close(last["ema"]["weights"][name], want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), want,
                                   rtol=1e-5, atol=1e-7)
        assert torch.equal(last["model"][name], iterate)   # `last` trains on from the iterates
        assert not torch.allclose(want, iterate, atol=1e-4)  # and they differ from the average
    assert model.tied  # the tied decoder holds the average too
    # The final scores and epoch 2's valid score are the average's.
    corpus = Corpus.load(tiny_corpus, config.level, vocab)
    assert summary["test_ppl"] == pytest.approx(score_stream(model, corpus.test).perplexity,
                                                rel=1e-5)
    assert epochs[1]["valid_ppl"] == pytest.approx(
        score_stream(model, corpus.valid).perplexity, rel=1e-5)
    assert epochs[1]["valid_ppl"] < epochs[0]["valid_ppl"]  # so `best` holds the average
    best = load_tree(tmp_path / "run" / "checkpoints" / "best.safetensors")["model"]
    for name, want in zip(names, expected):
        torch.testing.assert_close(best[name], want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(best["decoder.weight"], best["embedding.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("at", [4, 14], ids=["before-the-average", "while-averaging"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_corpus, at):
    config = BASE.replace(batch_size=10, bptt=10, checkpoint_steps=3, ema_decay=0.8,
                          ema_start=0.25, seed=7)
    reference = tmp_path / "reference"
    reference_summary = _quiet_train(config, reference, tiny_corpus)
    per_epoch = _epochs(reference)[0]["step"]
    assert per_epoch >= 15 and 0.25 * 2 * per_epoch < 12  # step 12 is inside the average

    killed = tmp_path / "killed"
    train_killed(config, killed, tiny_corpus, at=at, threads=TEST_THREADS)
    saved = load_tree(killed / "checkpoints" / "last.safetensors")
    assert (saved["ema"] is None) == (at == 4)
    summary = _quiet_train(config, killed, tiny_corpus, resume=True)

    for name in ("last", "best"):
        got = load_tree(killed / "checkpoints" / f"{name}.safetensors")
        want = load_tree(reference / "checkpoints" / f"{name}.safetensors")
        for key in want["model"]:
            assert torch.equal(got["model"][key], want["model"][key]), (name, key)
    got, want = saved_ema(killed), saved_ema(reference)
    assert got["updates"] == want["updates"] > 0
    for key in want["weights"]:
        assert torch.equal(got["weights"][key], want["weights"][key]), key
    for key in ("valid_ppl", "train_ppl", "ema_updates"):
        assert [r[key] for r in _epochs(killed)] == [r[key] for r in _epochs(reference)], key
    assert summary["test_ppl"] == reference_summary["test_ppl"]


def saved_ema(run) -> dict:
    return load_tree(run / "checkpoints" / "last.safetensors")["ema"]


def test_nt_asgd_evaluates_the_average_of_tied_weights_under_both_names():
    torch.manual_seed(0)
    config = Config(hidden_size=8, tie_weights=True, optimizer="asgd")
    model = LanguageModel(11, config)
    optim = NTASGD(model, config, averaging=True)
    for _ in range(3):
        optim.optimizer.zero_grad()
        model(torch.randint(0, 11, (4, 2))).logits.sum().backward()
        optim.optimizer.step()
    average = optim.optimizer.state[model.embedding.weight]["ax"]
    assert not torch.equal(average, model.embedding.weight)
    state = optim.evaluated_state()
    assert torch.equal(state["embedding.weight"], average)
    assert torch.equal(state["decoder.weight"], average)
    evaluated = LanguageModel(11, config)
    evaluated.load_state_dict(state)
    assert torch.equal(evaluated.embedding.weight, average)


@pytest.mark.parametrize("changes,message", [
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(ema_decay=-0.1), "ema_decay"),
    (dict(ema_decay=math.nan), "ema_decay"),
    (dict(ema_decay=0.99, ema_start=1.0), "ema_start"),
    (dict(ema_decay=0.99, ema_start=-0.5), "ema_start"),
    (dict(ema_decay=0.99, optimizer="asgd"), "NT-ASGD"),
])
def test_nonsense_averaging_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes)


def test_a_resume_with_another_average_is_refused_naming_it():
    with pytest.raises(ValueError, match="ema_decay: run has 0.9, command says 0.99"):
        resumed_config(BASE, BASE.replace(ema_decay=0.99))
