"""Tests for the options that buy speed without changing what is measured.

- ``lr_schedule="cosine"``: the formula, and that a run cut by its time budget ends annealed;
- ``precision="bfloat16"``: mixed-precision training stays close to float32, keeps float32
  weights and carried states, and leaves evaluation in float32;
- CPU dropout masks drawn from uniforms: rate, scaling and gradient, also for bfloat16;
- the CPU layer-by-layer Zaremba path: it applies exactly the masks ``sample_masks`` draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import rnnreg
from rnnreg import functional as RF
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.evaluation import load_model, score_stream
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train
from rnnreg.lm.training.loss import summed_loss

TINY = Config(hidden_size=16, batch_size=4, bptt=5, epochs=2, init_range=0.3, eval_bptt=50,
              checkpoint_minutes=0.0, seed=3, device="cpu", strategy="zaremba", strategy_p=0.2)


def _epochs(out: Path) -> list[dict]:
    return [r for r in RunDir(out).read_metrics() if r.get("event") == "epoch"]


# --- cosine schedule ------------------------------------------------------------------------


def test_cosine_schedule_formula_and_step_schedule_ignores_progress():
    config = Config(lr=2.0, lr_schedule="cosine")
    assert config.lr_at(1, 0.0) == pytest.approx(2.0)
    assert config.lr_at(1, 0.5) == pytest.approx(1.0)
    assert config.lr_at(9, 0.25) == pytest.approx(1.0 + math.sqrt(0.5))
    assert config.lr_at(9, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert config.lr_at(9, 1.7) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    step = Config(lr=1.0, lr_decay=0.5, decay_after=2)
    assert [step.lr_at(e, 0.9) for e in (1, 2, 3, 4)] == [1.0, 1.0, 0.5, 0.25]


def test_unknown_schedule_and_precision_are_rejected():
    with pytest.raises(ValueError, match="lr_schedule"):
        Config(lr_schedule="linear")
    with pytest.raises(ValueError, match="precision"):
        Config(precision="float16")


@pytest.mark.slow
def test_cosine_run_anneals_over_its_epochs(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    train(TINY.replace(lr_schedule="cosine", epochs=3), out, data_dir=tiny_corpus,
          progress=False, verbose=False)
    rates = [r["lr"] for r in _epochs(out)]
    assert len(rates) == 3 and rates[0] > rates[1] > rates[2]
    assert rates[2] < 0.01 * TINY.lr  # the last step of the last epoch is nearly annealed
    assert rates[1] == pytest.approx(TINY.lr * 0.5 * (1 + math.cos(math.pi * 2 / 3)), rel=0.05)


@pytest.mark.slow
def test_time_budget_drives_the_cosine_when_it_binds_first(tmp_path, tiny_corpus, monkeypatch):
    """Every step 'takes' 3 s: a 1-minute budget is 20 steps, whatever the epoch count says."""
    import time
    from types import SimpleNamespace

    import rnnreg.lm.training.loop as train_module

    clock = iter(range(0, 10_000, 3))  # successive readings 3 s apart
    fake = SimpleNamespace(perf_counter=lambda: float(next(clock)), monotonic=time.monotonic,
                           strftime=time.strftime)
    monkeypatch.setattr(train_module, "time", fake)
    out = tmp_path / "run"
    summary = train(TINY.replace(lr_schedule="cosine", epochs=50, max_train_minutes=1.0), out,
                    data_dir=tiny_corpus, progress=False, verbose=False)
    assert summary["complete"] is False and summary["train_seconds"] == pytest.approx(60.0)
    state = load_tree(out / "checkpoints" / "last.safetensors")["progress"]
    assert state["step"] == 20
    # The 20th step started with 57 of 60 s behind: lr = cos schedule at 0.95.
    assert state["lr"] == pytest.approx(TINY.lr * 0.5 * (1 + math.cos(math.pi * 0.95)))


# --- bfloat16 mixed precision ---------------------------------------------------------------


def test_bfloat16_forward_tracks_float32(tiny_corpus):
    corpus = Corpus.load(tiny_corpus)
    torch.manual_seed(0)
    model = LanguageModel(len(corpus.vocab), TINY.replace(strategy_p=0.0)).eval()
    ids = corpus.train[:44].view(-1, 4)
    exact = model(ids[:-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids[:-1])
    assert mixed.logits.dtype == torch.bfloat16
    loss32 = summed_loss(exact.logits, ids[1:])
    loss16 = summed_loss(mixed.logits.float(), ids[1:])
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zaremba", "variational", "awd"])
def test_bfloat16_training_learns_and_stores_float32(tmp_path, tiny_corpus, strategy):
    out = tmp_path / strategy
    config = TINY.replace(strategy=strategy, precision="bfloat16", epochs=3)
    summary = train(config, out, data_dir=tiny_corpus, progress=False, verbose=False)
    reference = train(config.replace(precision="float32"), tmp_path / "f32", data_dir=tiny_corpus,
                      progress=False, verbose=False)
    assert summary["valid_ppl"] < 0.5 * len(Corpus.load(tiny_corpus).vocab)  # it learned
    assert summary["valid_ppl"] == pytest.approx(reference["valid_ppl"], rel=0.15)
    tree = load_tree(out / "checkpoints" / "last.safetensors")
    assert all(t.dtype == torch.float32 for t in tree["model"].values())
    # Evaluation is float32: rescoring the saved weights outside any autocast agrees exactly.
    model, _, _ = load_model(out, weights="last")
    rescored = score_stream(model, Corpus.load(tiny_corpus).valid, bptt=config.eval_bptt)
    assert rescored.perplexity == pytest.approx(summary["valid_ppl"], rel=1e-6)


# --- CPU masks from uniforms ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_cpu_dropout_rate_scaling_and_gradient(dtype, p):
    torch.manual_seed(0)
    x = torch.ones(400, 250, dtype=dtype, requires_grad=True)
    y = RF.dropout(x, p)
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / x.numel())
    scale = torch.tensor(1 / (1 - p), dtype=dtype)
    assert bool(((y == 0) | (y == scale)).all())
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx is the mask


def test_cpu_dropout_masks_are_fresh_per_call():
    x = torch.ones(1000)
    assert not torch.equal(RF.dropout(x, 0.5), RF.dropout(x, 0.5))


# --- CPU layer-by-layer Zaremba path --------------------------------------------------------


@pytest.mark.parametrize("cls", [rnnreg.LSTM, rnnreg.GRU, rnnreg.RNN])
def test_cpu_between_dropout_applies_the_masks_sample_masks_draws(cls):
    torch.manual_seed(1)
    layer = cls(6, 8, 3, dropout=0.4, input_dropout=0.3, output_dropout=0.2)
    x = torch.randn(7, 5, 6)
    torch.manual_seed(42)
    out, state = layer(x)
    torch.manual_seed(42)
    masks = layer.sample_masks(7, 5)
    expected, expected_state = layer.forward_with_masks(x, None, masks)
    assert all(m is not None for m in masks.between)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    states = state if isinstance(state, tuple) else (state,)
    wanted = expected_state if isinstance(expected_state, tuple) else (expected_state,)
    for got, want in zip(states, wanted):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_bfloat16_carried_state_is_checkpointed_in_float32(tmp_path, tiny_corpus):
    def interrupt(step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TINY.replace(precision="bfloat16", checkpoint_steps=1), out, data_dir=tiny_corpus,
              progress=False, verbose=False, on_step=interrupt)
    hidden = load_tree(out / "checkpoints" / "last.safetensors")["hidden"]
    assert hidden is not None and all(t.dtype == torch.float32 for t in hidden)
