"""Masks that are one weight per call run on torch's fused kernel: weight drop and batch-shared
recurrent masks (``recurrent_mask="batch"``), and the layers' contract around every engine.

Oracles: ``torch.nn.LSTM``/``GRU``/``RNN`` holding the masked ``weight_hh`` (``W_hh * M`` for
weight drop, ``W_hh diag(m)`` for a mask m on the units of h(t-1)), rnnreg's own loop run with
the same mask given per row, float64 gradcheck, probe networks whose output reads the mask back,
and mask statistics.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnreg
from rnnreg.nn import FUSED, engine_for, loops

CELLS = {"LSTM": (rnnreg.LSTM, nn.LSTM, {}), "GRU": (rnnreg.GRU, nn.GRU, {}),
         "RNN": (rnnreg.RNN, nn.RNN, {}),
         "RNN_RELU": (rnnreg.RNN, nn.RNN, {"nonlinearity": "relu"})}
T, B, F_IN, H = 5, 3, 4, 6
LENGTHS = torch.tensor([5, 2, 4])  # unequal and unsorted
SETTINGS = {
    "weight": dict(weight_dropout=0.5),
    "batch": dict(recurrent_dropout=0.5, recurrent_mask="batch", variational=True),
    "weight+batch": dict(weight_dropout=0.5, recurrent_dropout=0.5, recurrent_mask="batch",
                         variational=True),
}


def own_loop():
    """The own loop's engine on this machine's CPU (the C++ or the Python loop)."""
    return loops.name("cpu")


def build(cell, *, num_layers=2, bidirectional=False, dtype=torch.float32, seed=0, **reg):
    ours, _, extra = CELLS[cell]
    torch.manual_seed(seed)
    return ours(F_IN, H, num_layers, bidirectional=bidirectional, dtype=dtype, **extra, **reg)


def suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def dropped_reference(cell, module, masks):
    """A torch.nn module with ``module``'s weights, its ``weight_hh`` multiplied by the masks
    written out by hand: ``M`` elementwise, then the recurrent mask on the columns.

    Returns it and the factor each raw ``weight_hh`` gradient gets (d(W*F)/dW = F).
    """
    _, theirs, extra = CELLS[cell]
    d = 2 if module.bidirectional else 1
    ref = theirs(F_IN, H, module.num_layers, bidirectional=module.bidirectional,
                 dtype=next(module.parameters()).dtype, **extra)
    ref.load_state_dict(module.state_dict())
    factors = {}
    with torch.no_grad():
        for layer in range(module.num_layers):
            for direction in range(d):
                name = "weight_hh" + suffix(layer, direction)
                factor = torch.ones_like(getattr(ref, name))
                if masks.weight[layer] is not None:
                    factor = factor * masks.weight[layer][direction]
                if masks.recurrent[layer] is not None:
                    column = masks.recurrent[layer][0, direction, 0]  # (H,): unit j of h(t-1)
                    factor = factor * column.expand_as(factor)
                getattr(ref, name).mul_(factor)
                factors[name] = factor
    return ref, factors


def inputs(cell, module, *, packed, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(module.parameters()).dtype
    d = 2 if module.bidirectional else 1
    x = torch.randn(T, B, F_IN, generator=gen, dtype=dtype, requires_grad=True)
    states = [torch.randn(module.num_layers * d, B, H, generator=gen, dtype=dtype,
                          requires_grad=True) for _ in range(2 if cell == "LSTM" else 1)]
    feed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False) if packed else x
    hx = tuple(states) if cell == "LSTM" else states[0]
    return feed, hx, [x, *states]


def run(module, feed, hx, leaves, masks=None):
    """Outputs, final states and gradients (inputs, states, parameters) of a random loss."""
    out, state = module(feed, hx) if masks is None else module.forward_with_masks(feed, hx,
                                                                                 masks)
    data = out.data if isinstance(out, PackedSequence) else out
    states = state if isinstance(state, tuple) else (state,)
    gen = torch.Generator().manual_seed(2)
    loss = (data * torch.randn(data.shape, generator=gen, dtype=data.dtype)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, [*leaves, *params.values()], retain_graph=True)
    return data, states, dict(zip([f"leaf{i}" for i in range(len(leaves))] + list(params),
                                  grads))


def assert_close_runs(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=atol)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=atol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=atol, rtol=atol, msg=name)


# --- 1. equality with torch.nn holding the dropped weight_hh --------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_fused_masks_equal_torch_with_the_dropped_weight(cell, setting, bidirectional, packed):
    module = build(cell, bidirectional=bidirectional, **SETTINGS[setting])
    torch.manual_seed(3)
    masks = module.sample_masks(T, B)
    assert engine_for(module) == FUSED
    assert engine_for(module, masks) == FUSED
    ref, factors = dropped_reference(cell, module, masks)
    feed, hx, leaves = inputs(cell, module, packed=packed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(module, feed, hx, leaves, masks)
    out, states, grads = run(ref, feed, hx, leaves)
    for name, factor in factors.items():  # the chain rule through W * F, by hand
        grads[name] = grads[name] * factor
    assert_close_runs(got, (out, states, grads))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_training_forward_is_sample_masks_then_the_fused_kernel(cell, setting):
    """A training forward draws the masks sample_masks draws and applies them as weights."""
    module = build(cell, bidirectional=True, **SETTINGS[setting])
    feed, hx, leaves = inputs(cell, module, packed=True)
    torch.manual_seed(4)
    masks = module.sample_masks(T, B)
    ref, factors = dropped_reference(cell, module, masks)
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(module, feed, hx, leaves)
    out, states, grads = run(ref, feed, hx, leaves)
    for name, factor in factors.items():
        grads[name] = grads[name] * factor
    assert_close_runs(got, (out, states, grads))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_fused_path_equals_the_own_loop_on_the_same_masks(cell, packed):
    """The same masks through both engines: the batch mask given per row (the own loop's
    input, every row the same) and the weight mask with it. Gradients to the raw weight_hh
    and to both masks agree."""
    module = build(cell, bidirectional=True, **SETTINGS["weight+batch"])
    torch.manual_seed(5)
    shared = module.sample_masks(T, B)
    per_row = rnnreg.DropoutMasks(shared.input, shared.between,
                                  tuple(m.expand(1, 2, B, H) for m in shared.recurrent),
                                  shared.weight, shared.output)
    assert engine_for(module, shared) == FUSED and engine_for(module, per_row) == own_loop()

    def with_mask_grads(masks):
        leaf_masks = rnnreg.DropoutMasks(
            None, masks.between, tuple(m.clone().requires_grad_() for m in masks.recurrent),
            tuple(m.clone().requires_grad_() for m in masks.weight), None)
        feed, hx, leaves = inputs(cell, module, packed=packed)
        mask_leaves = [*leaf_masks.recurrent, *leaf_masks.weight]
        out, states, grads = run(module, feed, hx, [*leaves, *mask_leaves], leaf_masks)
        # the own loop's recurrent-mask gradient is per row: the shared mask's is its sum
        for k in range(len(leaves), len(leaves) + len(leaf_masks.recurrent)):
            grads[f"leaf{k}"] = grads[f"leaf{k}"].sum(2, keepdim=True)
        return out, states, grads

    assert_close_runs(with_mask_grads(shared), with_mask_grads(per_row))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN)")
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_fused_masks_on_cudnn_equal_torch_without_a_weight_layout_warning(cell, setting):
    """cuDNN warns about weights that are not one contiguous chunk; the dropped weight_hh of
    one layer of a stack is not one, so rnnreg hands cuDNN a fresh buffer."""
    module = build(cell, bidirectional=True, **SETTINGS[setting])
    torch.manual_seed(13)
    masks = module.sample_masks(T, B)
    ref, factors = dropped_reference(cell, module, masks)
    module.cuda()
    ref.cuda()
    masks = rnnreg.DropoutMasks(None, masks.between, *(
        tuple(None if m is None else m.cuda() for m in group)
        for group in (masks.recurrent, masks.weight)), None)
    _, _, leaves = inputs(cell, module, packed=True)
    x = leaves[0].detach().cuda().requires_grad_()
    states = [s.detach().cuda().requires_grad_() for s in leaves[1:]]
    feed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    hx = tuple(states) if cell == "LSTM" else states[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(module, feed, hx, [x, *states], masks)
    out, final, grads = run(ref, feed, hx, [x, *states])
    for name, factor in factors.items():
        grads[name] = grads[name] * factor.cuda()
    assert_close_runs(got, (out, final, grads), atol=1e-4)


class WithMasks(nn.Module):
    """Calls the layer's forward_with_masks, so that functional_call can put a tensor of the
    test's in place of its weight_hh."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, masks):
        return self.layer.forward_with_masks(x, None, masks)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_gradcheck_through_the_masks_and_the_raw_weight(cell):
    """float64 finite differences through weight_hh, the weight mask and the batch mask."""
    module = WithMasks(build(cell, num_layers=1, bidirectional=True, dtype=torch.float64,
                             **SETTINGS["weight+batch"]))
    torch.manual_seed(6)
    masks = module.layer.sample_masks(3, 2)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, F_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    w_hh = module.layer.weight_hh_l0.detach().clone().requires_grad_()
    weight = masks.weight[0].clone().requires_grad_()
    recurrent = masks.recurrent[0].clone().requires_grad_()

    def forward(x, w_hh, weight, recurrent):
        call = rnnreg.DropoutMasks(None, (), (recurrent,), (weight,), None)
        assert engine_for(module.layer, call) == FUSED
        out, state = functional_call(module, {"layer.weight_hh_l0": w_hh}, (x, call))
        return (out, *(state if isinstance(state, tuple) else (state,)))

    assert torch.autograd.gradcheck(forward, (x, w_hh, weight, recurrent))


# --- 2. the batch-shared recurrent mask --------------------------------------------------------


def probe_rnn(hidden, **reg):
    """relu RNN with W_ih = W_hh = I and no bias, float64: on ones input,
    h_t = 1 + m_t * h_{t-1}, so the mask of each step and row reads back as
    m_t = (h_t - 1) / h_{t-1}."""
    module = rnnreg.RNN(hidden, hidden, 1, "relu", bidirectional=True, dtype=torch.float64,
                        **reg)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.eye(*p.shape) if name.startswith("weight") else torch.zeros_like(p))
    return module


def read_back(out, h0, hidden):
    """Per-direction masks ``(T, B, H)`` in processing order, from a probe's output."""
    masks = []
    for direction, seq in enumerate((out[..., :hidden], out[..., hidden:].flip(0))):
        prev = torch.cat([h0[direction].unsqueeze(0), seq[:-1]])
        masks.append((seq - 1.0) / prev)
    return masks


@pytest.mark.parametrize("recurrent_mask", ["sequence", "batch"])
def test_real_forward_batch_mask_is_one_mask_for_every_row_and_step(recurrent_mask):
    p, hidden, steps, batch = 0.4, 400, 4, 5
    module = probe_rnn(hidden, recurrent_dropout=p, variational=True,
                       recurrent_mask=recurrent_mask)
    assert engine_for(module) == (FUSED if recurrent_mask == "batch" else own_loop())
    x = torch.ones(steps, batch, hidden, dtype=torch.float64)
    h0 = torch.ones(2, batch, hidden, dtype=torch.float64)
    torch.manual_seed(8)
    with torch.no_grad():
        out, _ = module(x, h0)
    forward, backward = read_back(out, h0, hidden)
    scale = 1 / (1 - p)
    for mask in (forward, backward):
        assert bool((torch.isclose(mask, torch.zeros_like(mask), atol=1e-9)
                     | torch.isclose(mask, torch.full_like(mask, scale), atol=1e-9)).all())
        assert torch.allclose(mask, mask[:1].expand_as(mask), atol=1e-9)  # same every step
        same_rows = torch.allclose(mask, mask[:, :1].expand_as(mask), atol=1e-9)
        assert same_rows == (recurrent_mask == "batch")
        dropped = (mask[0] < 0.5).double().mean(1)  # per row: the fraction of units dropped
        assert bool(((dropped - p).abs() <= 5 * math.sqrt(p * (1 - p) / hidden)).all())
    assert not torch.allclose(forward, backward)  # the directions draw independently


def test_sample_masks_gives_one_batch_mask_per_layer_and_direction():
    p, hidden = 0.3, 500
    module = rnnreg.LSTM(F_IN, hidden, 2, bidirectional=True, recurrent_dropout=p,
                         variational=True, recurrent_mask="batch")
    torch.manual_seed(9)
    masks = module.sample_masks(7, 11)
    assert len(masks.recurrent) == 2
    for mask in masks.recurrent:
        assert mask.shape == (1, 2, 1, hidden)
        kept = mask != 0
        assert torch.allclose(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
        dropped = 1 - kept.double().mean().item()
        assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / mask.numel())
    assert not torch.equal(masks.recurrent[0], masks.recurrent[1])
    assert not torch.equal(masks.recurrent[0][0, 0], masks.recurrent[0][0, 1])


def test_sequence_masks_keep_gals_per_row_shape_and_the_own_loop():
    module = rnnreg.GRU(F_IN, H, 2, recurrent_dropout=0.3, variational=True)
    assert module.recurrent_mask == "sequence"
    assert all(m.shape == (1, 1, B, H) for m in module.sample_masks(T, B).recurrent)
    assert engine_for(module) == own_loop()
    module.eval()
    assert engine_for(module) == FUSED


def _option_sets():
    """Every strategy at p = 0.5 and the option combinations the layer tests use (all rates,
    fresh or per-sequence masks, per-row or batch-shared recurrent masks, zoneout), as
    ``(name, cell, options)`` for each cell."""
    sets = {f"strategy {name}": rnnreg.strategy(name, 0.5) for name in rnnreg.STRATEGIES}
    for variational in (False, True):
        for recurrent_mask in ("sequence", "batch") if variational else ("sequence",):
            for zoneout in (0.0, 0.3):
                sets[f"rates v={variational} {recurrent_mask} z={zoneout}"] = dict(
                    input_dropout=0.5, dropout=0.5, output_dropout=0.5, recurrent_dropout=0.5,
                    weight_dropout=0.5, variational=variational, recurrent_mask=recurrent_mask,
                    zoneout_hidden=zoneout)
    sets["weight only"] = dict(weight_dropout=0.5)
    sets["cell zoneout only"] = dict(zoneout_cell=0.2)
    for name, options in sets.items():
        for cell in ("LSTM", "GRU", "RNN"):  # only the LSTM has a cell state
            yield name, cell, {k: v for k, v in options.items()
                               if k != "zoneout_cell" or cell == "LSTM"}


def _modules(cell, options):
    """The layer (2 layers, bidirectional) and the StackedRNN built with ``options``."""
    yield CELLS[cell][0](F_IN, H, 2, bidirectional=True, **options)
    yield rnnreg.StackedRNN(cell.lower(), F_IN, (H, H + 1), **options)


def _per_row_rule(module) -> bool:
    """Oracle: the masks a forward in the module's mode draws (in a forked RNG, two rows),
    judged by the rule on tensors: a recurrent mask with more than one row or step, or any
    zoneout factor."""
    from rnnreg.nn.engines import layer_zoneout, per_row

    with torch.random.fork_rng(devices=[]):
        masks = (module.sample_masks(1, 2) if module.training
                 else module.regularization.evaluation_masks(
                     module._mask_sizes(), 2, device=torch.device("cpu"), dtype=torch.float32))
    return any(per_row(masks.recurrent[k]) or layer_zoneout(masks, k) is not None
               for k in range(len(masks.recurrent)))


def test_needs_own_loop_agrees_with_the_masks_sampled_for_every_strategy_and_option():
    from rnnreg.nn.engines import needs_own_loop

    disagree = []
    for name, cell, options in _option_sets():
        for module in _modules(cell, options):
            for training in (True, False):
                module.train(training)
                if needs_own_loop(module) != _per_row_rule(module):
                    disagree.append((name, cell, type(module).__name__, training))
    assert not disagree


def test_engine_for_leaves_torchs_random_state_untouched(monkeypatch):
    """Asking which engine runs a model must not change the masks the model draws next."""
    monkeypatch.setenv(loops.VARIABLE, "python")  # no C++ build needed to ask
    asked = 0
    for _, cell, options in _option_sets():
        for module in _modules(cell, options):
            for training in (True, False):
                module.train(training)
                before = torch.get_rng_state()
                engine_for(module)
                engine_for(module, layer=0)
                assert torch.equal(torch.get_rng_state(), before)
                asked += 1
    assert asked > 100
    torch.manual_seed(3)
    module = rnnreg.LSTM(F_IN, H, recurrent_dropout=0.5, variational=True)
    torch.manual_seed(4)
    drawn = module.sample_masks(T, B).recurrent[0]
    torch.manual_seed(4)
    engine_for(module)
    assert torch.equal(module.sample_masks(T, B).recurrent[0], drawn)


@pytest.mark.parametrize("cls", [rnnreg.LSTM, rnnreg.GRU, rnnreg.RNN])
def test_recurrent_mask_is_checked_and_says_why(cls):
    with pytest.raises(ValueError, match="variational=True"):
        cls(F_IN, H, recurrent_dropout=0.5, recurrent_mask="batch")
    with pytest.raises(ValueError, match="recurrent_mask"):
        cls(F_IN, H, recurrent_mask="row", variational=True)
    module = cls(F_IN, H, recurrent_dropout=0.5, recurrent_mask="batch", variational=True)
    assert "recurrent_mask='batch'" in repr(module)


def test_stacked_rnn_hands_the_batch_mask_to_its_layers():
    stack = rnnreg.StackedRNN("lstm", F_IN, (H, H + 2), dropout=0.3, recurrent_dropout=0.5,
                              weight_dropout=0.2, variational=True, recurrent_mask="batch")
    assert all(layer.recurrent_mask == "batch" for layer in stack.layers)
    masks = stack.sample_masks(T, B)
    assert [m.shape for m in masks.recurrent] == [(1, 1, 1, H), (1, 1, 1, H + 2)]
    assert engine_for(stack) == FUSED and engine_for(stack, masks) == FUSED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = stack(torch.randn(T, B, F_IN))
        out.sum().backward()
    with pytest.raises(ValueError, match="variational"):
        rnnreg.StackedRNN("gru", F_IN, (H,), recurrent_mask="batch")


# --- 3. one contract on every engine --------------------------------------------------------

ENGINES = {
    "whole stack": {},                                  # torch's multi-layer call
    "fused per layer": dict(weight_dropout=0.5),        # rnnreg's masks, torch's kernel
    "own loop": dict(recurrent_dropout=0.5),            # rnnreg's recurrence
}


@pytest.mark.parametrize("method", ["forward", "forward_with_masks"])
@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_wrong_dtype_or_device_is_one_clear_error_on_every_engine(cell, engine, method):
    module = build(cell, **ENGINES[engine])

    def call(x, hx=None):
        if method == "forward":
            return module(x, hx)
        return module.forward_with_masks(x, hx, module.sample_masks(T, B))

    good = torch.randn(T, B, F_IN)
    for bad in (good.double(), good.long(), good.half()):
        with pytest.raises(ValueError, match=rf"input dtype \({bad.dtype}\) does not match "
                                             r"weight dtype \(torch.float32\)"):
            call(bad)
    packed = pack_padded_sequence(good.double(), LENGTHS, enforce_sorted=False)
    with pytest.raises(ValueError, match="input dtype"):
        call(packed)
    h = torch.randn(2, B, H)
    for name, states in (("h_0", (h.to("meta"), h)), ("c_0", (h, h.to("meta")))):
        if cell != "LSTM" and name == "c_0":
            continue
        with pytest.raises(ValueError, match=f"{name} is on device meta but the weights are on "
                                             "cpu"):
            call(good, states if cell == "LSTM" else states[0])
    with pytest.raises(ValueError, match="h_0 dtype"):
        call(good, (h.double(), h) if cell == "LSTM" else h.double())
    assert call(good, (h, h) if cell == "LSTM" else h)[0].shape == (T, B, H)


def test_autocast_input_of_another_dtype_is_allowed_on_every_engine():
    """Under autocast the kernels cast for themselves, as torch's own dtype check allows."""
    for reg in ENGINES.values():
        module = build("LSTM", **reg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = module(torch.randn(T, B, F_IN, dtype=torch.bfloat16))
        assert out.shape == (T, B, H)


# --- 4. no torch warnings for valid settings --------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("name", sorted(rnnreg.STRATEGIES))
@pytest.mark.parametrize("cls", [rnnreg.LSTM, rnnreg.GRU, rnnreg.RNN])
def test_every_strategy_builds_and_runs_without_a_warning(cls, name, num_layers):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A GRU or RNN has no cell state: its zoneout_cell is set to 0 (docs/layers.md).
        cell = {} if cls is rnnreg.LSTM else {"zoneout_cell": 0.0}
        settings = rnnreg.strategy(name, 0.3, **cell)
        module = cls(8, 16, num_layers, **settings)
        out, _ = module(torch.randn(T, B, 8))
        out.sum().backward()
        module.eval()
        module(torch.randn(T, B, 8))


def test_one_layer_keeps_the_between_rate_it_was_given_and_torch_semantics():
    """Between-layer dropout with one layer is a no-op: the same model as torch's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = rnnreg.LSTM(8, 16, **rnnreg.strategy("variational", 0.3))
    assert module.dropout == 0.3 and "dropout=0.3" in repr(module)
    zaremba = rnnreg.LSTM(F_IN, H, dropout=0.9)  # between only: nothing to drop in one layer
    ref = nn.LSTM(F_IN, H)
    ref.load_state_dict(zaremba.state_dict())
    x = torch.randn(T, B, F_IN)
    torch.testing.assert_close(zaremba(x)[0], ref(x)[0])


# --- 5. whole-model pickles ---------------------------------------------------------------------


class TinyLM(nn.Module):
    """pytorch/examples' word_language_model shape: embedding -> recurrent layer -> decoder."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Embedding(10, F_IN)
        self.rnn = rnn
        self.decoder = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 10)

    def forward(self, ids):
        out, _ = self.rnn(self.encoder(ids))
        return self.decoder(out)


def round_trip(model, allowed=()):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(list(allowed)):
        return torch.load(buffer)  # weights_only=True, torch's default


@pytest.mark.parametrize("rnn", [
    lambda: rnnreg.LSTM(F_IN, H, 2, **rnnreg.strategy("awd", 0.3)),
    lambda: rnnreg.GRU(F_IN, H, bidirectional=True, **rnnreg.strategy("variational_batch", 0.2)),
    lambda: rnnreg.RNN(F_IN, H, nonlinearity="relu", recurrent_dropout=0.1),
], ids=["lstm", "gru", "rnn"])
def test_whole_model_loads_with_the_allowlist_a_torch_model_needs(rnn):
    """The classes a script allowlists for its nn.LSTM model suffice for rnnreg's layer."""
    torch.manual_seed(10)
    model = TinyLM(rnn()).eval()
    back = round_trip(model, [TinyLM, nn.Embedding, nn.Linear])
    assert type(back.rnn) is type(model.rnn)
    assert repr(back) == repr(model)
    ids = torch.randint(0, 10, (T, B))
    torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
    back.train()
    torch.manual_seed(11)
    trained = back(ids)
    torch.manual_seed(11)
    model.train()
    torch.testing.assert_close(trained, model(ids), atol=0, rtol=0)


def test_bare_rnnreg_modules_load_with_torch_defaults():
    torch.manual_seed(12)
    x = torch.randn(T, B, F_IN)
    for module, allowed in ((rnnreg.LSTM(F_IN, H, 2, dropout=0.5), ()),
                            (rnnreg.LockedDropout(0.3), ()),
                            (rnnreg.EmbeddingDropout(10, F_IN, p=0.1), ()),
                            (rnnreg.StackedRNN("gru", F_IN, (H, 3)), [nn.ModuleList]),
                            (rnnreg.WeightDrop(rnnreg.GRU(F_IN, H), ["weight_hh_l0"], 0.5), ())):
        back = round_trip(module.eval(), allowed)
        assert repr(back) == repr(module)
        if not isinstance(module, rnnreg.EmbeddingDropout):
            out, got = module(x), back(x)
            first = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, first)


# --- 6. recurrent_mask in the language-model toolkit ----------------------------------------


def test_config_recurrent_mask_follows_the_strategy_unless_given():
    from rnnreg.lm.config import Config

    assert Config(strategy="variational", strategy_p=0.3).regularization.recurrent_mask == (
        "sequence")
    batch = Config(strategy="variational_batch", strategy_p=0.3)
    assert batch.regularization.recurrent_mask == "batch"
    given = Config(strategy="variational", strategy_p=0.3, recurrent_mask="batch")
    assert given.regularization.recurrent_mask == "batch"
    sequence = Config(strategy="variational_batch", recurrent_mask="sequence")
    assert sequence.regularization.recurrent_mask == "sequence"
    with pytest.raises(ValueError, match="variational strategy"):
        Config(strategy="zaremba", recurrent_mask="batch")
    with pytest.raises(ValueError, match="recurrent_mask"):
        Config(strategy="variational", recurrent_mask="row")


def test_config_json_round_trips_and_old_configs_without_the_key_still_load():
    import json

    from rnnreg.lm.config import Config

    config = Config(strategy="variational", strategy_p=0.3, recurrent_mask="batch")
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = Config(strategy="variational", strategy_p=0.3).to_dict()
    del old["recurrent_mask"]  # written before the field existed
    loaded = Config.from_dict(old)
    assert loaded.recurrent_mask is None
    assert loaded.regularization.recurrent_mask == "sequence"


def test_recurrent_mask_flag_reaches_the_model_layers():
    from rnnreg import cli
    from rnnreg.cli.flags import config_overrides
    from rnnreg.lm.model import LanguageModel
    from rnnreg.lm.presets import preset_config

    args = cli._parser().parse_args(["train", "--strategy", "variational", "--dropout", "0.3",
                                     "--recurrent-mask", "batch"])
    # "small": the preset train uses when none is named.
    config = preset_config("small").replace(**config_overrides(args))
    assert config.recurrent_mask == "batch"
    for sizes in (None, (12, 8)):
        changed = config.replace(hidden_size=8, num_layers=2, layer_sizes=sizes)
        model = LanguageModel(20, changed)
        layers = getattr(model.rnn, "layers", [model.rnn])
        assert all(layer.recurrent_mask == "batch" for layer in layers)
        assert engine_for(model.rnn) == FUSED


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stacked_rnn_checks_its_input_before_its_own_masks_act(training):
    stack = rnnreg.StackedRNN("lstm", F_IN, (H, 3), input_dropout=0.3, dropout=0.3,
                              recurrent_dropout=0.3, variational=True).train(training)
    good = torch.randn(T, B, F_IN)
    for bad in (good.long(), good.double()):
        with pytest.raises(ValueError, match=rf"input dtype \({bad.dtype}\)"):
            stack(bad)
    with pytest.raises(ValueError, match="is on device meta"):
        stack(good.to("meta"))
    with pytest.raises(ValueError, match="time-major input"):
        stack(torch.randn(T, B, F_IN + 1))
    with pytest.raises(ValueError, match="h_0 dtype"):
        stack(good, ((torch.zeros(1, B, H).double(), torch.zeros(1, B, H)), None))


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_a_mask_shared_by_the_rows_but_not_the_steps_runs_the_own_loop_per_row(cell):
    """(T, D, 1, H): the same for every row, fresh each step (e.g. batch masks stacked over
    steps): not one weight, so the own loop runs it, as the mask given for every row."""
    module = build(cell, bidirectional=True, **SETTINGS["batch"])
    torch.manual_seed(14)
    rec = tuple(rnnreg.nn.functional.dropout_mask((T, 2, 1, H), 0.5) for _ in range(2))
    shared = rnnreg.DropoutMasks(None, (None,), rec, (None, None), None)
    per_row = rnnreg.DropoutMasks(None, (None,), tuple(m.expand(T, 2, B, H).contiguous()
                                                       for m in rec), (None, None), None)
    assert engine_for(module, shared) == own_loop()
    feed, hx, leaves = inputs(cell, module, packed=True)
    assert_close_runs(run(module, feed, hx, leaves, shared),
                      run(module, feed, hx, leaves, per_row))
