"""Each AWD-LSTM option (Merity et al. 2018) alone: it changes what it should and nothing else."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_pre_hook

import rnnreg.lm.training.loop as train_module
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.evaluation import Score
from rnnreg.lm.model import LanguageModel, count_parameters
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train
from rnnreg.lm.training.loss import activation_penalties, summed_loss

BASE = Config(hidden_size=12, num_layers=2, bptt=6, batch_size=4, epochs=1, init_range=0.2,
              checkpoint_minutes=0, eval_bptt=50)


def _model(**changes) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(30, BASE.replace(**changes))


def _grads(model: LanguageModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_weight_tying_shares_one_matrix_and_removes_its_parameters():
    untied, tied = _model(), _model(tie_weights=True)
    assert tied.decoder.weight is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == 30 * 12


def test_embedding_dropout_drops_whole_words_only_in_training():
    model = _model(embedding_dropout=0.5)
    ids = torch.tensor([[3, 3, 4], [3, 5, 4]])
    model.train()
    torch.manual_seed(1)
    masks = model.sample_masks(2, 3)
    embedded = F.embedding(ids, model.embedding.weight) * masks.words[ids].unsqueeze(-1)
    for word in (3, 4, 5):
        rows = embedded[ids == word]
        assert torch.all(rows.abs().sum(-1) == 0) or torch.all(rows.abs().sum(-1) > 0)
    model.eval()
    reference = _model()
    reference.eval()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def _penalised_grads(model, alpha: float, beta: float):
    """Gradients of the trainer's loss, and of an independent AR/TAR written from eqs. 3-4."""
    ids = torch.randint(0, 30, (6, 4), generator=torch.Generator().manual_seed(2))
    model.eval()  # deterministic, so both computations see the same activations
    out = model(ids[:-1])
    config = BASE.replace(activation_reg=alpha, temporal_activation_reg=beta)
    loss = summed_loss(out.logits, ids[1:]) + activation_penalties(out, config, 5)
    ours = _grads(model, loss)
    out = model(ids[:-1])
    h = out.hidden
    expected = summed_loss(out.logits, ids[1:])
    expected = expected + alpha * 5 * (out.dropped ** 2).mean()
    expected = expected + beta * 5 * ((h[1:] - h[:-1]) ** 2).mean()
    return ours, _grads(model, expected), _grads(model, summed_loss(model(ids[:-1]).logits,
                                                                       ids[1:]))


@pytest.mark.parametrize("alpha, beta", [(2.0, 0.0), (0.0, 1.0), (2.0, 1.0)])
def test_activation_penalties_match_their_equations_and_touch_only_the_recurrent_path(alpha, beta):
    ours, expected, plain = _penalised_grads(_model(), alpha, beta)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name])
    # The penalties act on the recurrent outputs: the decoder's gradient is unchanged.
    torch.testing.assert_close(ours["decoder.weight"], plain["decoder.weight"])
    assert not torch.allclose(ours["rnn.weight_hh_l1"], plain["rnn.weight_hh_l1"])


@contextlib.contextmanager
def _training_windows() -> Iterator[list[int]]:
    """Lengths of the windows a LanguageModel is trained on (training mode), in order.

    Seen through torch's global forward pre-hook, so nothing inside the trainer is replaced;
    scoring runs in eval mode and is not counted.
    """
    lengths: list[int] = []

    def record(module, args):
        if isinstance(module, LanguageModel) and module.training:
            lengths.append(args[0].size(0))

    handle = register_module_forward_pre_hook(record)
    try:
        yield lengths
    finally:
        handle.remove()


@pytest.mark.slow
def test_variable_bptt_varies_window_lengths_and_covers_the_epoch(tiny_corpus, tmp_path):
    config = BASE.replace(variable_bptt=True, bptt=8)
    steps: list[int] = []
    with _training_windows() as lengths:
        train(config, tmp_path / "run", data_dir=tiny_corpus, progress=False, verbose=False,
              on_step=steps.append)
    assert len(lengths) == len(steps)  # one window per optimizer step
    assert len(set(lengths)) > 3
    rows = sum(lengths)
    with _training_windows() as fixed:
        train(config.replace(variable_bptt=False), tmp_path / "fixed", data_dir=tiny_corpus,
              progress=False, verbose=False)
    assert rows == sum(fixed)  # every training row visited once either way
    assert set(fixed[:-1]) == {8}


@pytest.mark.slow
def test_nt_asgd_starts_averaging_only_after_validation_stalls(tiny_corpus, tmp_path,
                                                              monkeypatch):
    rising = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0])
    valid_ids = Corpus.load(tiny_corpus).valid
    original = train_module.score_stream

    def fake_valid(model, ids, **kwargs):
        """The valid split (told by its tokens, not its size) scores the next fixed perplexity."""
        score = original(model, ids, **kwargs)
        if torch.equal(ids.cpu(), valid_ids):
            return Score(score.tokens * math.log(next(rising)), score.tokens, score.seconds)
        return score

    monkeypatch.setattr(train_module, "score_stream", fake_valid)
    config = BASE.replace(optimizer="asgd", asgd_nonmono=1, epochs=5)
    train(config, tmp_path / "run", data_dir=tiny_corpus, progress=False, verbose=False)
    records = RunDir(tmp_path / "run").read_metrics()
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["valid_ppl"] for r in epochs] == pytest.approx([5.0, 4.0, 4.5, 4.6, 4.7])
    # Epoch 3: 4.5 is not worse than the best before the last epoch (5). Epoch 4: 4.6 is worse
    # than min(5, 4), so averaging starts after epoch 4 and epoch 5 trains with ASGD.
    assert [r["averaging"] for r in epochs] == [False, False, False, False, True]
    last = RunDir(tmp_path / "run").load_checkpoint("last")
    states = last["optimizer"]["state"].values()
    assert states and all("ax" in state for state in states)  # ASGD's running averages
