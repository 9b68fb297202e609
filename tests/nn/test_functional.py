"""Tests for rnnreg.nn.functional and the modules LockedDropout, EmbeddingDropout, WeightDrop.

Expectations are computed here from the definitions (inverted dropout: entries 0 or 1/(1-p)),
with probes whose output exposes the mask that was used.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rnnreg
from rnnreg import functional as RF


def tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    """``sigmas`` binomial standard deviations of a kept fraction over ``n`` draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def assert_scaled_mask(values: torch.Tensor, p: float) -> None:
    scale = torch.tensor(1.0 / (1.0 - p), dtype=values.dtype)
    ok = (values == 0) | torch.isclose(values, scale)
    assert bool(ok.all()), values.unique()


# --- check_probability ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1e-9, 1.0000001, -1, 2, float("nan"), float("inf"), True,
                                   False, "0.1", None, [0.1]])
def test_check_probability_rejects(value):
    with pytest.raises(ValueError, match="^my_rate "):
        RF.check_probability("my_rate", value)


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, 0.25])
def test_check_probability_accepts_and_returns_float(value):
    got = RF.check_probability("x", value)
    assert isinstance(got, float) and got == value


# --- check_positive_int / check_bool: the one definition behind layers, StackedRNN and Config ---


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, "4", None])
def test_check_positive_int_rejects_naming_the_option(value):
    assert not RF.is_positive_int(value)
    with pytest.raises(ValueError, match=f"^my_size must be a positive integer, got {value!r}$"):
        RF.check_positive_int("my_size", value)


def test_check_positive_int_returns_the_size():
    assert RF.is_positive_int(1) and RF.check_positive_int("n", 7) == 7


@pytest.mark.parametrize("value", [0, 1, "True", None])
def test_check_bool_rejects_all_but_true_and_false(value):
    with pytest.raises(ValueError, match=f"^my_switch must be True or False, got {value!r}$"):
        RF.check_bool("my_switch", value)
    assert RF.check_bool("my_switch", True) is True and RF.check_bool("s", False) is False


# --- dropout_mask / dropout -------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_mask_scaling(p):
    torch.manual_seed(0)
    mask = RF.dropout_mask((200, 150), p, dtype=torch.float64)
    assert mask.shape == (200, 150) and mask.dtype == torch.float64
    assert_scaled_mask(mask, p)
    n = mask.numel()
    kept = (mask != 0).double().mean().item()
    assert abs(kept - (1 - p)) <= tolerance(p, n)
    assert abs(mask.mean().item() - 1.0) <= tolerance(p, n) / (1 - p)


def test_dropout_mask_extremes():
    assert torch.equal(RF.dropout_mask((3, 4), 0.0), torch.ones(3, 4))
    assert torch.equal(RF.dropout_mask((3, 4), 1.0), torch.zeros(3, 4))
    assert RF.dropout_mask((2,), 1.0, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="^p "):
        RF.dropout_mask((2,), 1.5)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(0.0, 1.0), rows=st.integers(1, 8), cols=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_dropout_mask_values_property(p, rows, cols, seed):
    torch.manual_seed(seed)
    mask = RF.dropout_mask((rows, cols), p, dtype=torch.float64)
    assert mask.shape == (rows, cols)
    if p == 1.0:
        assert bool((mask == 0).all())
    else:
        assert_scaled_mask(mask, p)


def test_dropout_identity_and_extremes():
    x = torch.randn(4, 3, 5)
    assert torch.equal(RF.dropout(x, 0.0), x)
    assert torch.equal(RF.dropout(x, 0.7, training=False), x)
    assert torch.equal(RF.dropout(x, 1.0), torch.zeros_like(x))
    torch.manual_seed(0)
    y = RF.dropout(torch.ones(50, 40), 0.4)
    assert_scaled_mask(y, 0.4)
    assert abs((y == 0).double().mean().item() - 0.4) <= tolerance(0.4, y.numel())
    with pytest.raises(ValueError, match="^p "):
        RF.dropout(x, -0.5)


# --- locked dropout ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_one_mask_per_sequence(batch_first):
    p, steps, batch, feats = 0.5, 7, 5, 24
    shape = (batch, steps, feats) if batch_first else (steps, batch, feats)
    x = torch.rand(shape, dtype=torch.float64) + 0.5
    torch.manual_seed(0)
    y = RF.locked_dropout(x, p, batch_first=batch_first)
    mask = y / x
    assert_scaled_mask(mask, p)
    time_dim = 1 if batch_first else 0
    first = mask.select(time_dim, 0)
    for t in range(steps):
        assert torch.equal(mask.select(time_dim, t), first)
    batch_dim = 0 if batch_first else 1
    assert not torch.equal(mask.select(batch_dim, 0), mask.select(batch_dim, 1))


def test_locked_dropout_gradient_is_the_mask():
    x = torch.ones(6, 3, 10, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = RF.locked_dropout(x, 0.3)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_locked_dropout_off_and_errors():
    x = torch.randn(3, 2, 4)
    assert torch.equal(RF.locked_dropout(x, 0.0), x)
    assert torch.equal(RF.locked_dropout(x, 0.9, training=False), x)
    assert torch.equal(RF.locked_dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="3-D"):
        RF.locked_dropout(torch.randn(3, 4), 0.5)
    with pytest.raises(ValueError, match="^p "):
        RF.locked_dropout(x, 2.0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_module(batch_first):
    module = rnnreg.LockedDropout(0.4, batch_first=batch_first)
    assert "p=0.4" in repr(module) and f"batch_first={batch_first}" in repr(module)
    x = torch.ones(4, 9, 16) if batch_first else torch.ones(9, 4, 16)
    torch.manual_seed(0)
    y = module(x)
    assert_scaled_mask(y, 0.4)
    time_dim = 1 if batch_first else 0
    assert all(torch.equal(y.select(time_dim, t), y.select(time_dim, 0)) for t in range(9))
    module.eval()
    assert torch.equal(module(x), x)
    with pytest.raises(ValueError, match="^p "):
        rnnreg.LockedDropout(-0.1)


# --- embedding dropout ------------------------------------------------------------------------


def test_embedding_dropout_drops_whole_words():
    p, vocab, dim = 0.5, 6, 4
    torch.manual_seed(0)
    weight = (torch.rand(vocab, dim, dtype=torch.float64) + 0.5).requires_grad_()
    ids = torch.randint(0, vocab, (8, 10))
    out = RF.embedding_dropout(ids, weight, p)
    assert out.shape == (8, 10, dim)
    ratio = out / weight.detach()[ids]  # per position, per feature: 0 or 1/(1-p)
    assert_scaled_mask(ratio, p)
    # whole rows are dropped or kept, and one decision per word id in the call
    assert bool((ratio == ratio[..., :1]).all())
    decision = {}
    for word, kept in zip(ids.flatten().tolist(), ratio[..., 0].flatten().tolist()):
        assert decision.setdefault(word, kept) == kept
    assert set(decision.values()) == {0.0, 2.0}  # this seed drops some words and keeps others
    # gradient: count(word) / (1 - p) per kept word row, 0 for dropped rows
    out.sum().backward()
    counts = torch.bincount(ids.flatten(), minlength=vocab).double()
    kept_scale = torch.tensor([decision.get(v, 0.0) for v in range(vocab)], dtype=torch.float64)
    expected = (counts * kept_scale).unsqueeze(1).expand(vocab, dim)
    torch.testing.assert_close(weight.grad, expected)


def test_embedding_dropout_rate_over_a_large_vocabulary():
    p, vocab = 0.3, 4000
    weight = torch.ones(vocab, 2)
    torch.manual_seed(0)
    out = RF.embedding_dropout(torch.arange(vocab), weight, p)
    dropped = (out[:, 0] == 0).double().mean().item()
    assert abs(dropped - p) <= tolerance(p, vocab)


def test_embedding_dropout_fresh_words_each_call():
    weight = torch.ones(64, 2)
    ids = torch.arange(64)
    torch.manual_seed(0)
    first = RF.embedding_dropout(ids, weight, 0.5)
    second = RF.embedding_dropout(ids, weight, 0.5)
    assert not torch.equal(first, second)


def test_embedding_dropout_off_and_extremes():
    weight = torch.randn(7, 3)
    ids = torch.tensor([[1, 2, 1], [6, 0, 0]])
    plain = F.embedding(ids, weight)
    assert torch.equal(RF.embedding_dropout(ids, weight, 0.0), plain)
    assert torch.equal(RF.embedding_dropout(ids, weight, 0.9, training=False), plain)
    assert torch.equal(RF.embedding_dropout(ids, weight, 1.0), torch.zeros_like(plain))
    with pytest.raises(ValueError, match="^p "):
        RF.embedding_dropout(ids, weight, 1.1)


def test_embedding_dropout_padding_idx_gets_no_gradient():
    weight = torch.ones(5, 3, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 3, 4] * 3)
    torch.manual_seed(0)
    RF.embedding_dropout(ids, weight, 0.0001, padding_idx=0).sum().backward()
    assert torch.equal(weight.grad[0], torch.zeros(3))
    assert bool((weight.grad[1:] > 0).all())


def test_embedding_dropout_module_is_an_embedding():
    torch.manual_seed(0)
    ours = rnnreg.EmbeddingDropout(11, 4, padding_idx=2, p=0.5)
    assert isinstance(ours, nn.Embedding) and ours.p == 0.5
    assert "p=0.5" in repr(ours)
    ref = nn.Embedding(11, 4, padding_idx=2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ref.weight, ours.weight)
    with torch.no_grad():
        ref.weight.mul_(3.0)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(ref.weight, ours.weight)
    ids = torch.randint(0, 11, (5, 6))
    ours.eval()
    assert torch.equal(ours(ids), ref(ids))
    ours.train()
    torch.manual_seed(3)
    words = torch.tensor([0, 1, 3, 4, 5, 6, 7, 8, 9, 10])  # not the padding row (all zeros)
    ratio = ours(words).detach() / ref(words).detach()
    assert bool(((ratio == 0) | (ratio == 2)).all()) and bool((ratio == 0).any())


def test_embedding_dropout_module_rejects_bad_p_and_unsupported_options():
    with pytest.raises(ValueError, match="^p "):
        rnnreg.EmbeddingDropout(5, 2, p=1.5)
    with pytest.raises(ValueError, match="max_norm"):
        rnnreg.EmbeddingDropout(5, 2, max_norm=1.0, p=0.1)(torch.tensor([1]))
    with pytest.raises(ValueError, match="sparse"):
        rnnreg.EmbeddingDropout(5, 2, sparse=True, p=0.1)(torch.tensor([1]))


def test_embedding_dropout_module_honours_scale_grad_by_freq():
    torch.manual_seed(0)
    ours = rnnreg.EmbeddingDropout(5, 2, scale_grad_by_freq=True, p=0.5)
    ref = nn.Embedding(5, 2, scale_grad_by_freq=True)
    ref.load_state_dict(ours.state_dict())
    ids = torch.tensor([1, 1, 1, 2])
    ours.eval()
    ours(ids).sum().backward()
    ref(ids).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


# --- weight drop ------------------------------------------------------------------------------


def _linear(in_features=30, out_features=20):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.rand_like(lin.weight) + 0.5)  # no accidental zeros
    return lin


def test_weight_drop_linear_drops_weights_not_the_parameter():
    p = 0.4
    lin = _linear()
    original = lin.weight.detach().clone()
    bias = lin.bias.detach().clone()
    wrapped = rnnreg.WeightDrop(lin, ["weight"], p)
    assert "weight" in repr(wrapped) and "0.4" in repr(wrapped)
    eye = torch.eye(30, dtype=torch.float64)
    torch.manual_seed(0)
    out = wrapped(eye)  # row j: W_dropped[:, j] + b
    effective = (out - bias).t()
    ratio = effective.detach() / original
    assert_scaled_mask(ratio, p)
    dropped = (ratio == 0).double().mean().item()
    assert abs(dropped - p) <= tolerance(p, ratio.numel())
    assert torch.equal(lin.weight.detach(), original)
    assert isinstance(lin.weight, nn.Parameter)
    assert [name for name, _ in wrapped.named_parameters()] == ["module.weight", "module.bias"]
    # gradient reaches only the kept entries, scaled by 1/(1-p)
    out.sum().backward()
    torch.testing.assert_close(lin.weight.grad, ratio)
    torch.testing.assert_close(lin.bias.grad, torch.full((20,), 30.0, dtype=torch.float64))


def test_weight_drop_fresh_mask_per_call_and_eval_is_plain():
    lin = _linear()
    wrapped = rnnreg.WeightDrop(lin, ["weight", "bias"], 0.5)
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.manual_seed(0)
    assert not torch.equal(wrapped(x), wrapped(x))
    wrapped.eval()
    assert torch.equal(wrapped(x), lin(x))
    wrapped.train()
    assert torch.equal(rnnreg.WeightDrop(lin, ["weight"], 0.0)(x), lin(x))


def test_weight_drop_bias_only():
    lin = _linear(3, 50)
    wrapped = rnnreg.WeightDrop(lin, ["bias"], 0.5)
    zero = torch.zeros(1, 3, dtype=torch.float64)
    torch.manual_seed(0)
    ratio = wrapped(zero)[0].detach() / lin.bias.detach()
    assert_scaled_mask(ratio, 0.5)
    assert bool((ratio == 0).any()) and bool((ratio != 0).any())


def test_weight_drop_errors_name_the_problem():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="weight_hh"):
        rnnreg.WeightDrop(lin, ["weight_hh"], 0.5)
    with pytest.raises(ValueError, match="none given"):
        rnnreg.WeightDrop(lin, [], 0.5)
    with pytest.raises(ValueError, match="^p "):
        rnnreg.WeightDrop(lin, ["weight"], 1.5)
