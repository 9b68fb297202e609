"""Tests for dynamic evaluation (Krause et al. 2018) against a reference written here from the
paper's update equations, step by step, and for what the commands do with it.

The reference feeds each segment through the model under test (its forward is tested elsewhere)
and forms everything dynamic evaluation adds by hand: the log-softmax of the logits, the
segment's mean loss and its gradient, the mean squared gradients on training windows cut by
hand, and the sgd / rms updates with decay toward the trained weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

import rnnreg.cli as cli
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.dynamic import (
    DynamicSettings,
    GradientStatistics,
    gradient_statistics,
    score_dynamic,
    tune_dynamic,
)
from rnnreg.lm.evaluation import load_model, score_stream
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train
from support import TEST_THREADS

VOCAB = 17


def _model(seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    settings = dict(hidden_size=10, num_layers=2, init_range=0.3)
    settings.update(overrides)
    return LanguageModel(VOCAB, Config(**settings)).eval()


def _stream(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _parameters(model: LanguageModel) -> list[torch.Tensor]:
    return [p for _, p in model.named_parameters()]


def _segment_nll(model: LanguageModel, inputs, targets, state):
    """Summed NLL of a segment from the logits' log-softmax, and the state after it."""
    out = model(inputs.view(-1, 1), state)
    log_probs = torch.log_softmax(out.logits[:, 0].float(), -1)
    nll = -log_probs.gather(1, targets.view(-1, 1)).sum()
    return nll, out.state


def _detach(state):
    return tuple(s.detach() for s in state)


def _reference_statistics(model: LanguageModel, train_ids, segment: int, batch: int,
                          windows: int) -> list[torch.Tensor]:
    """sqrt(MS_g): the mean over training windows of the squared gradient of the mean loss."""
    model = copy.deepcopy(model)
    rows = train_ids.numel() // batch
    streams = train_ids[:rows * batch].view(batch, rows).t()
    squares = [torch.zeros_like(p) for p in _parameters(model)]
    state, used = None, 0
    for start in range(0, rows - 1, segment):
        if used == windows:
            break
        n = min(segment, rows - 1 - start)
        out = model(streams[start:start + n], state)
        # The adaptive softmax's scores are log-probabilities already (renormalising them
        # would add a gradient that the loss does not have).
        log_probs = out.logits if model.adaptive else torch.log_softmax(out.logits.float(), -1)
        targets = streams[start + 1:start + 1 + n]
        loss = -log_probs.gather(2, targets.unsqueeze(-1)).mean()
        grads = torch.autograd.grad(loss, _parameters(model))
        squares = [s + g * g for s, g in zip(squares, grads)]
        state, used = _detach(out.state), used + 1
    rms = [(s / used).sqrt() for s in squares]
    # A weight the sample never reached gets the mean of those of its tensor it did reach; a
    # tensor it never reached, the average over the others of their means.
    rms = [torch.where(r > 0, r, r[r > 0].mean()) if bool((r > 0).any()) else r for r in rms]
    reached = [float(r.mean()) for r in rms if bool((r > 0).any())]
    return [r if bool((r > 0).any()) else torch.full_like(r, sum(reached) / len(reached))
            for r in rms]


def _reference_dynamic(model: LanguageModel, ids, method: str, lr: float, decay: float,
                       segment: int, rms=None, epsilon: float = 2e-5):
    """Dynamic evaluation from the paper's equations: per segment, its summed NLL under the
    weights before the step, and the weights after it."""
    model = copy.deepcopy(model)
    params = _parameters(model)
    trained = [p.detach().clone() for p in params]
    if method == "rms":
        average = sum(float(r.mean()) for r in rms) / len(rms)   # avg(sqrt(MS_g))
        norms = [torch.clamp(r / average, max=1 / decay) for r in rms]   # RMS_norm, clipped
    history, state = [], None
    for start in range(0, ids.numel() - 1, segment):
        n = min(segment, ids.numel() - 1 - start)
        nll, state = _segment_nll(model, ids[start:start + n], ids[start + 1:start + 1 + n],
                                  state)
        state = _detach(state)
        grads = torch.autograd.grad(nll / n, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if method == "sgd":    # eq. 4, with the decay to the global prior
                    new = p - lr * g + decay * (trained[i] - p)
                else:                  # RMS with a global decay prior
                    new = (p - lr * g / (rms[i] + epsilon)
                           + decay * norms[i] * (trained[i] - p))
                p.copy_(new)
        history.append((float(nll.detach()), [p.detach().clone() for p in params]))
    return history


def _recorded(settings: DynamicSettings, stats=None, model=None, ids=None):
    seen = []
    score = score_dynamic(model, ids, settings, stats,
                          on_segment=lambda nll, m: seen.append(
                              (float(nll), [p.detach().clone() for p in _parameters(m)])))
    return score, seen


def _assert_same_history(actual, expected, atol: float = 1e-6) -> None:
    """Same per-segment NLL and weights; ``atol`` allows float32 rounding, which the rms form's
    division by small root-mean-square gradients amplifies."""
    assert len(actual) == len(expected)
    for (nll, weights), (want_nll, want_weights) in zip(actual, expected):
        assert nll == pytest.approx(want_nll, rel=1e-5)
        for got, want in zip(weights, want_weights):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------- the updates


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_sgd_form_matches_the_paper_step_by_step(tied, decay):
    model = _model(tie_weights=tied)
    ids = _stream(53)  # 52 targets: ten segments of 5 and a last one of 2
    settings = DynamicSettings("sgd", lr=0.5, decay=decay, segment=5)
    score, seen = _recorded(settings, model=model, ids=ids)
    expected = _reference_dynamic(model, ids, "sgd", 0.5, decay, 5)
    _assert_same_history(seen, expected)
    assert score.tokens == 52
    assert score.nll == pytest.approx(sum(nll for nll, _ in expected), rel=1e-5)
    # The steps moved the weights: the later segments were scored by adapted weights.
    assert not torch.equal(expected[-1][1][0], _parameters(model)[0])


def test_rms_form_with_decay_matches_the_paper_step_by_step():
    model = _model(seed=3)
    train_ids, ids = _stream(2000, seed=5), _stream(41, seed=6)
    stats = gradient_statistics(model, train_ids, segment=4, windows_max=3)
    rms = _reference_statistics(model, train_ids, segment=4, batch=100, windows=3)
    assert (stats.windows, stats.tokens) == (3, 3 * 4 * 100)
    for got, want in zip(stats.rms.values(), rms):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # A decay of 0.4 clips RMS_norm at 2.5 for the weights whose gradients are largest.
    average = sum(float(r.mean()) for r in rms) / len(rms)
    assert any(bool((r / average > 2.5).any()) for r in rms)
    settings = DynamicSettings("rms", lr=3e-3, decay=0.4, segment=4)
    score, seen = _recorded(settings, stats, model=model, ids=ids)
    expected = _reference_dynamic(model, ids, "rms", 3e-3, 0.4, 4, rms)
    _assert_same_history(seen, expected, atol=1e-5)
    # Steps of about lr per weight, ten of them: far above the tolerance.
    assert max(float((a - b).detach().abs().max()) for a, b in zip(expected[-1][1],
                                                        _parameters(model))) > 1e-2
    assert score.tokens == 40


def test_a_weight_the_statistics_never_reached_takes_its_tensors_mean():
    model = _model(seed=4, softmax="adaptive", adaptive_cutoffs=(8,), adaptive_div_value=2.0)
    train_ids = _stream(3000, seed=8) % 6      # words 6.. never occur: neither does the tail
    stats = gradient_statistics(model, train_ids, windows_max=4)
    embedding = stats.rms["embedding.weight"]
    reached = embedding[:6].flatten()
    assert bool((reached > 0).all())
    torch.testing.assert_close(embedding[6:], reached.mean().expand(VOCAB - 6, 10))
    tail = [name for name in stats.rms if name.startswith("decoder.tail")]
    assert tail and all(bool((stats.rms[name] > 0).all()) for name in tail)
    for reference, (name, got) in zip(_reference_statistics(model, train_ids, 5, 100, 4),
                                      stats.rms.items()):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-8, msg=name)
    # Text full of the unreached words: steps of about lr, not lr / epsilon, and no blow-up.
    ids = _stream(200, seed=2)
    static = score_stream(model, ids).perplexity
    dynamic = score_dynamic(model, ids, DynamicSettings("rms", lr=1e-3, decay=0.01), stats)
    assert dynamic.perplexity < 1.5 * static


def test_a_vanishing_step_is_the_static_score_and_the_model_is_left_as_it_was():
    model = _model(cell="gru")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _stream(120)
    static = score_stream(model, ids)
    still = score_dynamic(model, ids, DynamicSettings("sgd", lr=1e-12))
    assert still.tokens == static.tokens
    assert still.nll == pytest.approx(static.nll, rel=1e-5)
    moved = score_dynamic(model, ids, DynamicSettings("sgd", lr=0.5))
    assert moved.nll != pytest.approx(static.nll, rel=1e-3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not model.training


def test_adapting_to_repeated_text_lowers_its_perplexity():
    model = _model(seed=2)
    phrase = _stream(12, seed=9)
    ids = phrase.repeat(40)
    stats = gradient_statistics(model, _stream(3000, seed=4), windows_max=5)
    static = score_stream(model, ids).perplexity
    for settings, data in ((DynamicSettings("sgd", lr=1.0), None),
                           (DynamicSettings("rms", lr=1e-2, decay=0.001), stats)):
        assert score_dynamic(model, ids, settings, data).perplexity < 0.85 * static


def test_tuning_picks_the_lowest_perplexity_of_the_grid():
    model = _model()
    valid = _stream(80, seed=7)
    grid = {"lr": (0.01, 0.3, 3.0, 1e4), "decay": (0.0, 0.1)}
    tuning = tune_dynamic(model, valid, "sgd", segment=5, grid=grid, tokens=61)
    assert tuning.tokens == 60
    expected = {(lr, decay): score_dynamic(model, valid[:61],
                                           DynamicSettings("sgd", lr, decay)).perplexity
                for decay in grid["decay"] for lr in grid["lr"]}
    assert [(lr, decay) for lr, decay, _ in tuning.grid] == list(expected)
    best = min(expected, key=expected.get)
    assert (tuning.settings.lr, tuning.settings.decay) == best
    assert tuning.perplexity == pytest.approx(expected[best], rel=1e-9)
    # Every point is scored in full, or stopped only where it scores worse than the winner
    # (a step of 1e4 diverges: stopped, whatever came before it).
    stopped = [(lr, decay) for lr, decay, ppl in tuning.grid if ppl is None]
    assert (1e4, 0.0) in stopped and (1e4, 0.1) in stopped
    for lr, decay, ppl in tuning.grid:
        if ppl is None:
            assert not expected[lr, decay] <= expected[best]
        else:
            assert ppl == pytest.approx(expected[lr, decay], rel=1e-9)


def test_a_grid_that_only_diverges_is_refused():
    model, valid = _model(), _stream(80, seed=7)
    with pytest.raises(ValueError, match="every sgd grid point diverged"):
        tune_dynamic(model, valid, "sgd", grid={"lr": (1e38,), "decay": (0.0, 0.01)}, tokens=61)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="adam", lr=0.1), "method"),
    (dict(method="sgd", lr=0.0), "lr"),
    (dict(method="sgd", lr=-1.0), "lr"),
    (dict(method="sgd", lr=math.nan), "lr"),
    (dict(method="rms", lr=1e-4, decay=1.0), "decay"),
    (dict(method="rms", lr=1e-4, decay=-0.1), "decay"),
    (dict(method="sgd", lr=0.1, segment=0), "segment"),
    (dict(method="rms", lr=1e-4, epsilon=0.0), "epsilon"),
])
def test_nonsense_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicSettings(**kwargs)


def test_rms_without_statistics_and_bad_tuning_arguments_are_refused():
    model, ids = _model(), _stream(30)
    with pytest.raises(ValueError, match="gradient statistics"):
        score_dynamic(model, ids, DynamicSettings("rms", lr=1e-4))
    partial = GradientStatistics({"embedding.weight": torch.ones(VOCAB, 10)}, 1, 1)
    with pytest.raises(ValueError, match="lack parameter"):
        score_dynamic(model, ids, DynamicSettings("rms", lr=1e-4), partial)
    with pytest.raises(ValueError, match="tuning tokens"):
        tune_dynamic(model, ids, "sgd", tokens=-1)
    with pytest.raises(ValueError, match="windows_max >= 0"):
        gradient_statistics(model, ids, windows_max=-1)


# --------------------------------------------------------------------------- the commands


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exited:
            code = exited.code
    return code, out.getvalue(), err.getvalue()


def _hashes(run: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((run / "checkpoints").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, module_corpus) -> Path:
    out = tmp_path_factory.mktemp("dynamic") / "run"
    torch.set_num_threads(TEST_THREADS)
    config = Config(hidden_size=12, batch_size=4, bptt=5, epochs=1, init_range=0.3,
                    eval_bptt=50, checkpoint_minutes=0.0, seed=3, device="cpu")
    train(config, out, data_dir=module_corpus, progress=False, verbose=False)
    return out


def test_evaluate_dynamic_reports_both_records_the_choice_and_leaves_the_weights(tiny_run):
    before = _hashes(tiny_run)
    assert set(before) == {"best.safetensors", "last.safetensors"}
    code, stdout, stderr = _cli("evaluate", str(tiny_run), "--dynamic", "rms",
                                "--dynamic-tune-tokens", "150", "--dynamic-stat-windows", "4",
                                "--no-progress", "--json")
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert _hashes(tiny_run) == before
    code, plain, _ = _cli("evaluate", str(tiny_run), "--no-progress", "--json")
    assert result["perplexity"] == json.loads(plain)["perplexity"]  # the static score
    records = [r for r in RunDir(tiny_run).read_metrics() if r.get("event") == "dynamic_eval"]
    assert len(records) == 1
    record = records[0]
    assert record["test_ppl"] == result["perplexity"]
    assert record["test_ppl_dynamic"] == result["perplexity_dynamic"]
    assert record["dynamic_tuned_on"] == "valid" and record["dynamic_tune_tokens"] == 149
    assert len(record["dynamic_grid"]) == 12
    complete = [point for point in record["dynamic_grid"] if point[2] is not None]
    assert [record["dynamic_lr"], record["dynamic_decay"]] == min(
        complete, key=lambda point: point[2])[:2]
    # The recorded choice reproduces the dynamic score through the Python API.
    model, vocab, config = load_model(tiny_run, device="cpu")
    corpus = Corpus.load(RunDir(tiny_run).read_corpus()["data_dir"], config.level, vocab)
    stats = gradient_statistics(model, corpus.train, windows_max=4)
    again = score_dynamic(model, corpus.test, DynamicSettings(
        "rms", record["dynamic_lr"], record["dynamic_decay"]), stats)
    assert again.perplexity == pytest.approx(record["test_ppl_dynamic"], rel=1e-6)


def test_score_dynamic_with_given_settings_skips_tuning(tiny_run, module_corpus):
    before = _hashes(tiny_run)
    code, stdout, stderr = _cli("score", str(tiny_run), str(module_corpus / "valid.txt"),
                                "--dynamic", "sgd", "--dynamic-lr", "0.2", "--dynamic-decay",
                                "0", "--no-progress")
    assert code == 0, stderr
    static, dynamic = stdout.strip().splitlines()
    assert "(static)" in static and "dynamic evaluation" in dynamic and "tuned" not in dynamic
    assert "lr 0.2, decay 0," in dynamic
    assert _hashes(tiny_run) == before
    record = [r for r in RunDir(tiny_run).read_metrics() if r.get("event") == "dynamic_eval"][-1]
    assert record["file_ppl_dynamic"] < record["file_ppl"]  # the phrases repeat: it adapts
    assert record["dynamic_tuned_on"] is None


@pytest.mark.parametrize("args,message", [
    (("--dynamic-lr", "0.1"), "needs --dynamic"),
    (("--dynamic", "sgd", "--dynamic-lr", "0.1"), "both --dynamic-lr and --dynamic-decay"),
    (("--dynamic", "rms", "--dynamic-lr", "0.1", "--dynamic-decay", "1"), "decay"),
    (("--dynamic", "sgd", "--dynamic-lr", "-1", "--dynamic-decay", "0"), "lr"),
    (("--dynamic", "sgd", "--dynamic-segment", "0"), "segment"),
    (("--dynamic", "rms", "--dynamic-stat-windows", "-1"), "stat-windows"),
    (("--dynamic", "sgd", "--dynamic-tune-tokens", "-5"), "tune-tokens"),
    (("--dynamic", "sgd", "--mc-samples", "2"), "one run"),
])
def test_nonsense_dynamic_flags_are_one_line_errors(tiny_run, args, message):
    code, _, err = _cli("evaluate", str(tiny_run), *args)
    assert code == 2
    assert err.startswith("rnnreg: error: ") and len(err.strip().splitlines()) == 1
    assert message in err


def test_dynamic_is_in_the_help():
    for command in ("evaluate", "score"):
        code, stdout, _ = _cli(command, "--help")
        assert code == 0
        assert "--dynamic {sgd,rms}" in stdout and "Krause et al. 2018" in stdout
