"""Tests for the adaptive softmax: exact distribution, every scoring path, training and resume.

Oracles: torch's own ``nn.AdaptiveLogSoftmaxWithLoss`` with copied weights, the whole stream fed
as one window and its log-probabilities gathered by hand, mixtures of probabilities formed by
hand, and uninterrupted runs for resume.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnreg
from rnnreg import cli
from rnnreg.cli import training as cli_training
from rnnreg.lm.adaptive import AdaptiveSoftmax, default_cutoffs
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.evaluation import load_model, score_stream
from rnnreg.lm.generation import sample_text
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.presets import budget_config, preset_config
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train
from rnnreg.lm.training.loss import summed_loss
from support import REPO_ROOT, TEST_THREADS
from support.steps import train_killed

VOCAB = 31
CUTOFFS = (5, 12)


def _model(seed: int = 0, vocab: int = VOCAB, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    settings = dict(hidden_size=12, num_layers=2, init_range=0.3, softmax="adaptive",
                    adaptive_cutoffs=CUTOFFS, adaptive_div_value=2.0)
    settings.update(overrides)
    return LanguageModel(vocab, Config(**settings)).eval()


def _stream(length: int = 200, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _one_window_log_probs(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) from the full distribution, the stream as one window.

    log_softmax normalizes a full softmax's logits and leaves the adaptive log-probabilities
    as they are.
    """
    log_probs = torch.log_softmax(model(ids[:-1].view(-1, 1)).logits[:, 0].double(), -1)
    return log_probs.gather(1, ids[1:].view(-1, 1)).squeeze(1)


# --------------------------------------------------------------------------- the distribution


def test_log_probs_of_every_token_sum_to_one_in_float64():
    model = _model().double()
    ids = _stream(40).view(8, 5)
    with torch.no_grad():
        log_probs = model(ids).logits
    assert log_probs.shape == (8, 5, VOCAB) and log_probs.dtype == torch.float64
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(8, 5, dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("cutoffs,div", [((5, 12), 2.0), ((3,), 4.0), ((2, 9, 20), 1.5)])
def test_matches_torch_adaptive_log_softmax_with_copied_weights(cutoffs, div):
    torch.manual_seed(0)
    ours = AdaptiveSoftmax(16, VOCAB, cutoffs, div).double()
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(16, VOCAB, list(cutoffs), div_value=div,
                                                 head_bias=True).double()
    with torch.no_grad():
        theirs.head.weight.copy_(ours.head.weight)
        theirs.head.bias.copy_(ours.head.bias)
        for mine, torchs in zip(ours.tails, theirs.tail):
            torchs[0].weight.copy_(mine[0].weight)
            torchs[1].weight.copy_(mine[1].weight)
            mine[1].bias.zero_()        # torch's clusters have no word biases
    x = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (50,))
    torch.testing.assert_close(ours.log_probs(x), theirs.log_prob(x))
    torch.testing.assert_close(ours.target_log_probs(x, targets), theirs(x, targets).output)


def test_target_log_probs_are_the_full_log_probs_at_the_targets_with_gradients_for_all():
    model = _model().train()
    ids, targets = _stream(30).view(6, 5), _stream(30, seed=2).view(6, 5)
    torch.manual_seed(3)
    full = model(ids).logits
    torch.manual_seed(3)
    fast = model(ids, targets=targets)
    assert fast.logits is None
    torch.testing.assert_close(fast.target_log_probs,
                               full.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    # Only head words as targets: every cluster still gets a (zero) gradient, so DDP needs no
    # find_unused_parameters.
    model.zero_grad()
    head_only = torch.randint(0, CUTOFFS[0], (6, 5))
    summed_loss(model(ids, targets=head_only).scores, head_only).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    assert float(model.decoder.tails[1][1].weight.grad.abs().sum()) == 0


def test_default_cutoffs_follow_the_documented_rule():
    assert default_cutoffs(10_000) == (2000,)
    assert default_cutoffs(33_278) == (2000, 10000)
    assert default_cutoffs(100) == (20,)
    assert LanguageModel(40, Config(hidden_size=8, softmax="adaptive")).decoder.cutoffs == (8,)


@pytest.mark.parametrize("cutoffs", [(12, 5), (5, 5), (0, 4), (5, VOCAB), ()])
def test_invalid_cutoffs_are_a_clear_value_error(cutoffs):
    with pytest.raises(ValueError, match="adaptive_cutoffs"):
        LanguageModel(VOCAB, Config(hidden_size=8, softmax="adaptive",
                                    adaptive_cutoffs=cutoffs))


def test_config_refuses_tying_and_bad_div_values_and_old_configs_load_as_full():
    with pytest.raises(ValueError, match="tie_weights.*adaptive"):
        Config(softmax="adaptive", tie_weights=True)
    with pytest.raises(ValueError, match="adaptive_div_value"):
        Config(softmax="adaptive", adaptive_div_value=0.5)
    with pytest.raises(ValueError, match="softmax"):
        Config(softmax="hierarchical")
    with pytest.raises(ValueError, match="adaptive_div_value"):
        LanguageModel(VOCAB, Config(hidden_size=8, softmax="adaptive", adaptive_cutoffs=(5, 12),
                                    adaptive_div_value=4.0))   # 8 // 16 = 0 features
    old = {k: v for k, v in Config().to_dict().items() if not k.startswith(("softmax", "adap"))}
    assert Config.from_dict(old).softmax == "full"
    assert Config.from_dict(json.loads(json.dumps(
        Config(softmax="adaptive", adaptive_cutoffs=(5, 12)).to_dict()))).adaptive_cutoffs == (5,
                                                                                            12)


# --------------------------------------------------------------------------- scoring paths


def test_one_stream_score_is_the_full_distribution_at_any_bptt():
    model = _model()
    ids = _stream()
    expected = -float(_one_window_log_probs(model, ids).sum())
    for bptt in (7, 1000):
        score = score_stream(model, ids, bptt=bptt)
        assert score.tokens == ids.numel() - 1
        assert score.nll == pytest.approx(expected, rel=1e-5)


def test_an_ensemble_of_one_is_the_model_and_mixtures_average_probabilities():
    adaptive, full = _model(seed=0), _model(seed=1, softmax="full")
    ids = _stream()
    alone = score_stream(adaptive, ids)
    assert score_stream([adaptive], ids).nll == alone.nll
    logp = torch.stack([_one_window_log_probs(m, ids) for m in (adaptive, full)])
    mixture = -float((torch.logsumexp(logp, 0) - math.log(2)).sum())
    assert score_stream([adaptive, full], ids).nll == pytest.approx(mixture, rel=1e-5)
    assert mixture != pytest.approx(-float(logp.mean(0).sum()), rel=1e-4)


@pytest.mark.parametrize("samples", [1, 3])
def test_mc_dropout_without_dropout_is_the_deterministic_score(samples):
    model = _model(strategy="variational", strategy_p=0.0)
    ids = _stream(90)
    torch.manual_seed(4)
    mc = score_stream(model, ids, mc_samples=samples)
    assert mc.tokens == ids.numel() - 1
    assert mc.nll == pytest.approx(score_stream(model, ids).nll, rel=1e-6)


def test_mc_dropout_is_the_mean_of_explicit_passes_probabilities():
    model = _model(strategy="variational", strategy_p=0.3, embedding_dropout=0.1)
    ids, samples = _stream(90), 3
    torch.manual_seed(11)
    score = score_stream(model, ids, mc_samples=samples, bptt=13)
    torch.manual_seed(11)
    masks = model.sample_masks(1, samples)   # variational: held over the whole stream
    with torch.no_grad():
        log_probs = model(ids[:-1].view(-1, 1).expand(-1, samples), None, masks).logits.double()
    targets = ids[1:].view(-1, 1, 1).expand(-1, samples, 1)
    probs = log_probs.exp().gather(2, targets).squeeze(2)
    assert score.nll == pytest.approx(-float(probs.mean(1).log().sum()), rel=1e-5)


def test_generation_samples_from_the_exact_distribution(monkeypatch, tmp_path):
    model = _model()
    vocab = rnnreg.Vocabulary(tuple(f"w{i}" for i in range(VOCAB - 1)) + ("<eos>",))
    seen = []
    original = torch.multinomial

    def spy(probs, n):
        seen.append(probs)
        return original(probs, n)

    monkeypatch.setattr(torch, "multinomial", spy)
    torch.manual_seed(0)
    text = sample_text(model, vocab, "w1 w2", words=4)
    assert len(text.split()) >= 2
    with torch.no_grad():
        expected = model(vocab.encode(["w1", "w2"]).view(-1, 1)).logits[-1, 0].exp()
    torch.testing.assert_close(seen[0], expected)
    assert all(float(p.sum()) == pytest.approx(1, abs=1e-5) for p in seen)


# --------------------------------------------------------------------------- training runs

RUN = preset_config("small").replace(
    hidden_size=16, batch_size=4, bptt=5, epochs=2, init_range=0.3, eval_bptt=50,
    checkpoint_minutes=0.0, checkpoint_steps=3, strategy="zaremba", strategy_p=0.1, seed=7,
    device="cpu", softmax="adaptive", adaptive_cutoffs=(4, 10), adaptive_div_value=2.0)


def _quiet_train(config: Config, out: Path, data_dir: Path, **kwargs) -> dict:
    return train(config, out, data_dir=data_dir, progress=False, verbose=False, **kwargs)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tree(Path(out) / "checkpoints" / "last.safetensors")["model"]


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, module_corpus):
    out = tmp_path_factory.mktemp("runs") / "adaptive"
    return out, _quiet_train(RUN, out, module_corpus)


def test_training_loss_evaluation_and_score_agree_on_the_same_text(adaptive_run,
                                                                    module_corpus, capsys):
    out, summary = adaptive_run
    assert "decoder.tails.1.1.weight" in _weights(out)
    model, vocab, config = load_model(out, weights="last", device="cpu")
    assert config.softmax == "adaptive" and model.adaptive
    text = module_corpus / "test.txt"
    ids = Corpus.load(module_corpus, config.level, vocab).test
    by_hand = -float(_one_window_log_probs(model, ids).sum())
    with torch.no_grad():   # the training objective on the text as one window of one stream
        window = ids.view(-1, 1)
        loss = float(summed_loss(model(window[:-1], targets=window[1:]).scores, window[1:]))
    assert loss == pytest.approx(by_hand, rel=1e-5)
    evaluated = score_stream(model, ids, bptt=config.eval_bptt)
    assert evaluated.nll == pytest.approx(by_hand, rel=1e-5)
    assert summary["test_ppl"] == pytest.approx(evaluated.perplexity, rel=1e-9)
    assert cli.main(["score", str(out), str(text), "--device", "cpu", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["tokens"] == ids.numel() - 1
    assert scored["perplexity"] == pytest.approx(math.exp(by_hand / (ids.numel() - 1)),
                                                 rel=1e-5)


def test_adaptive_training_learns_the_corpus(adaptive_run):
    out, summary = adaptive_run
    epochs = [r for r in RunDir(out).read_metrics() if r.get("event") == "epoch"]
    assert epochs[-1]["valid_ppl"] < epochs[0]["train_ppl"]
    assert summary["test_ppl"] < 8   # unigram perplexity of the tiny corpus is about 17


def test_a_run_written_before_the_softmax_fields_loads_as_full_softmax(module_corpus, tmp_path):
    out = tmp_path / "old"
    full = RUN.replace(softmax="full", adaptive_cutoffs=None, adaptive_div_value=4.0, epochs=1,
                       checkpoint_steps=0)
    summary = _quiet_train(full, out, module_corpus)
    saved = json.loads((out / "config.json").read_text())
    for key in ("softmax", "adaptive_cutoffs", "adaptive_div_value"):
        del saved["config"][key]
    (out / "config.json").write_text(json.dumps(saved))
    model, vocab, config = load_model(out, weights="last", device="cpu")
    assert config == full and not model.adaptive
    ids = Corpus.load(module_corpus, config.level, vocab).test
    assert score_stream(model, ids, bptt=config.eval_bptt).perplexity == pytest.approx(
        summary["test_ppl"], rel=1e-9)


def test_evaluate_and_generate_commands_read_an_adaptive_run(adaptive_run, module_corpus,
                                                             capsys):
    out, summary = adaptive_run
    assert cli.main(["evaluate", str(out), "--data-dir", str(module_corpus), "--weights", "last",
                     "--device", "cpu", "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-9)
    assert cli.main(["evaluate", str(out), str(out), "--data-dir", str(module_corpus),
                     "--mc-samples", "2", "--device", "cpu", "--no-progress", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out.strip())["perplexity"])
    assert cli.main(["generate", str(out), "--words", "6", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) >= 6


def test_bfloat16_autocast_trains_through_float32_log_probabilities():
    model = _model().train()
    ids, targets = _stream(30).view(6, 5), _stream(30, seed=2).view(6, 5)
    torch.manual_seed(3)
    exact = model(ids, targets=targets).target_log_probs
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids, targets=targets).target_log_probs
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.05)
    summed_loss(mixed, targets).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())




@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(adaptive_run, module_corpus,
                                                           tmp_path):
    reference, _ = adaptive_run
    killed = tmp_path / "killed"
    train_killed(RUN, killed, module_corpus, at=8, threads=TEST_THREADS)
    checkpoint = load_tree(killed / "checkpoints" / "last.safetensors")
    assert checkpoint["progress"]["step"] == 6 and checkpoint["progress"]["position"] > 0
    _quiet_train(RUN, killed, module_corpus, resume=True)
    expected = _weights(reference)
    resumed = _weights(killed)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


@pytest.mark.slow
def test_two_processes_train_like_one(module_corpus, tmp_path):
    """Through torchrun, dropout off: a DDP model whose clusters miss targets still trains."""
    flags = ["--preset", "small", "--hidden-size", "16", "--batch-size", "4", "--bptt", "5",
             "--epochs", "1", "--train-tokens", "400", "--init-range", "0.3",
             "--checkpoint-minutes", "0", "--seed", "3", "--device", "cpu", "--no-progress",
             "--softmax", "adaptive", "--adaptive-cutoffs", "4", "10",
             "--adaptive-div-value", "2"]
    single, double = tmp_path / "single", tmp_path / "double"
    assert cli.main(["train", "--data-dir", str(module_corpus), "--out", str(single),
                     *flags]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "rnnreg", "train", "--data-dir", str(module_corpus), "--out", str(double),
         *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    expected = _weights(single)
    for name, tensor in _weights(double).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5)


def test_cutoffs_beyond_the_vocabulary_are_a_one_line_cli_error(module_corpus, tmp_path,
                                                                capsys):
    code = cli.main(["train", "--data-dir", str(module_corpus), "--out", str(tmp_path / "r"),
                     "--softmax", "adaptive", "--adaptive-cutoffs", "5", "500",
                     "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "adaptive_cutoffs" in err[0]


# --------------------------------------------------------------------------- time budgets


def test_budget_minutes_sizes_the_recipe_for_the_corpus(module_corpus, tmp_path, monkeypatch,
                                                        capsys):
    """``rnnreg train --budget-minutes M`` hands rnnreg.train the budget rule's config for this
    corpus's vocabulary (as it will be built), with the flags given on top; a --softmax given
    sizes the model for that softmax."""
    handed = []
    monkeypatch.setattr(cli_training, "train", lambda config, out, **_: handed.append(config) or {})
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(module_corpus),
                     "--budget-minutes", "3", "--seed", "7"]) == 0
    (config,) = handed
    vocab = len(Corpus.load(module_corpus).vocab)
    assert config == budget_config(3, vocab).replace(seed=7)
    assert config.max_train_minutes == 3
    assert cli.main(["train", "--preset", "small", "--budget-minutes", "3",
                     "--data-dir", str(module_corpus)]) == 2
    assert "drop --preset" in capsys.readouterr().err

    # A --softmax given goes into the rule: the adaptive config (its width, untied) on this
    # small vocabulary, not the full softmax's tied config with the decoder swapped, which
    # Config refuses (an adaptive softmax cannot be tied).
    handed.clear()
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(module_corpus),
                     "--budget-minutes", "12", "--softmax", "adaptive"]) == 0
    (config,) = handed
    assert config == budget_config(12, vocab, softmax="adaptive")
    assert config.softmax == "adaptive" and not config.tie_weights
