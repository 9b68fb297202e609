"""Tests for benchmarks/flops.py: its FLOP count against torch's own counter on an LSTM made of
matrix products with either the full softmax or the library's adaptive softmax, the weights it
counts against the library's model, its refusals, and (slow: it trains) the whole ``--quick``
run and its report."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rnnreg.lm.adaptive import AdaptiveSoftmax
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.presets import budget_config
from support import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import flops  # noqa: E402  (a script, not a package)

CONFIGS = {
    "uniform, tied": Config(hidden_size=8, num_layers=2, bptt=4, batch_size=3, tie_weights=True),
    "one layer": Config(hidden_size=6, num_layers=1, bptt=5, batch_size=2),
    "per-layer sizes, own embedding width": Config(
        hidden_size=7, num_layers=3, layer_sizes=(12, 5, 7), embedding_size=9, bptt=3,
        batch_size=4),
    # Clusters [3, 7) and [7, 11), projections 8 // 2 = 4 and 8 // 4 = 2 wide.
    "adaptive, two clusters": Config(hidden_size=8, num_layers=2, bptt=4, batch_size=3,
                                     softmax="adaptive", adaptive_cutoffs=(3, 7),
                                     adaptive_div_value=2.0),
    # Widths rounded down as the layer rounds them: 7 // 1.5 = 4, 7 // 2.25 = 3.
    "adaptive, widths rounded down": Config(hidden_size=7, num_layers=1, bptt=5, batch_size=2,
                                            softmax="adaptive", adaptive_cutoffs=(4, 8),
                                            adaptive_div_value=1.5),
}
VOCAB = 11
# Which target ids a window draws: any word, or none from the last cluster (ids 7-10 above).
TARGETS = {"any word": VOCAB, "last cluster empty": 7}


def window_ids(config: Config, high: int = VOCAB) -> torch.Tensor:
    """A window's inputs and targets, ``(bptt + 1, batch)`` ids below ``high``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, high, (config.bptt + 1, config.batch_size), generator=generator)


def shares_of(config: Config, ids: torch.Tensor) -> tuple[float, ...] | None:
    """The tail-cluster shares of the window's targets (None for the full softmax)."""
    if config.softmax == "full":
        return None
    return flops.cluster_shares(config, VOCAB, ids[1:])


def counted_window(config: Config, vocab: int, ids: torch.Tensor | None = None, *,
                   state_grad: bool = False) -> int:
    """FlopCounterMode's FLOPs for forward + backward of one window of an LSTM language model
    written out of ``nn.Linear`` products (the gate equations of Zaremba et al. 2014, eq. 1),
    the incoming state detached as the trainer carries it, unless ``state_grad``; its softmax
    is an ``nn.Linear`` or the library's :class:`AdaptiveSoftmax` scoring the targets, as the
    trainer does. ``ids`` are the window's inputs and targets (random by default)."""
    torch.manual_seed(0)
    inputs = (config.embedding_dim, *config.sizes[:-1])
    embedding = nn.Embedding(vocab, config.embedding_dim)
    cells = [(nn.Linear(i, 4 * h), nn.Linear(h, 4 * h, bias=False))
             for i, h in zip(inputs, config.sizes)]
    if config.softmax == "adaptive":
        decoder = AdaptiveSoftmax(config.sizes[-1], vocab, config.adaptive_cutoffs,
                                  config.adaptive_div_value)
    else:
        decoder = nn.Linear(config.sizes[-1], vocab)
    if config.tie_weights:
        decoder.weight = embedding.weight
    steps, batch = config.bptt, config.batch_size
    if ids is None:
        ids = torch.randint(0, vocab, (steps + 1, batch))
    with FlopCounterMode(display=False) as counter:
        x = embedding(ids[:-1])
        for (w_ih, w_hh), size in zip(cells, config.sizes):
            h = torch.zeros(batch, size, requires_grad=state_grad)
            c = torch.zeros(batch, size, requires_grad=state_grad)
            outputs = []
            for t in range(steps):
                i, f, g, o = (w_ih(x[t]) + w_hh(h)).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs)
        if config.softmax == "adaptive":
            loss = -decoder.target_log_probs(x, ids[1:]).sum()
        else:
            loss = F.cross_entropy(decoder(x).reshape(-1, vocab), ids[1:].reshape(-1),
                                   reduction="sum")
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("name", CONFIGS)
def test_the_count_equals_torchs_flop_counter_for_forward_and_backward(name, targets):
    # The adaptive softmax's count is exact for a window when given that window's shares.
    config = CONFIGS[name]
    ids = window_ids(config, TARGETS[targets])
    assert flops.train_flops_per_window(config, VOCAB, shares_of(config, ids)) == pytest.approx(
        counted_window(config, VOCAB, ids), rel=1e-12, abs=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_count_leaves_out_exactly_the_gradient_of_the_detached_state(name):
    # The one product a full 3x-forward count would add: dL/dh(t-1) of each layer's first step.
    config = CONFIGS[name]
    ids = window_ids(config)
    extra = sum(2 * config.batch_size * 4 * h * h for h in config.sizes)
    assert counted_window(config, VOCAB, ids, state_grad=True) == pytest.approx(
        flops.train_flops_per_window(config, VOCAB, shares_of(config, ids)) + extra,
        rel=1e-12, abs=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_forward_count_is_one_multiply_add_per_weight_of_the_librarys_model(name):
    # Each weight of a product is used once per token; tied, the decoder reuses the embedding.
    # The adaptive softmax uses every weight of a tail cluster for the tokens of that cluster
    # only: with every token counted in every cluster (shares of 1), once per token again.
    config = CONFIGS[name]
    model = LanguageModel(VOCAB, config)
    recurrent = sum(p.numel() for n, p in model.rnn.named_parameters()
                    if "weight_ih" in n or "weight_hh" in n)
    softmax = sum(p.numel() for n, p in model.decoder.named_parameters() if "weight" in n)
    shares = None if config.softmax == "full" else (1.0,) * len(model.decoder.tails)
    assert recurrent + softmax == flops.forward_macs_per_token(config, VOCAB, shares)


def test_cluster_shares_count_targets_by_id_range():
    # Clusters [3, 7) and [7, 11): ids 3 6 6 fall in the first, 7 10 in the second.
    targets = torch.tensor([[0, 2, 3, 6], [6, 7, 10, 1]])
    assert flops.cluster_shares(CONFIGS["adaptive, two clusters"], VOCAB, targets) == (3 / 8,
                                                                                       2 / 8)


def test_the_timed_targets_are_the_last_windows_of_the_trainers_streams():
    # 2 streams of 10 ids (0-9, 10-19), windows of 3: targets rows 1-3, 4-6, 7-9; the first
    # window is the warm-up.
    config = Config(batch_size=2, bptt=3)
    targets = flops.timed_targets(config, windows=2, warmup=1, train_ids=torch.arange(100))
    assert sorted(targets.tolist()) == [*range(4, 10), *range(14, 20)]


@pytest.mark.parametrize("config, shares, words", [
    (Config(cell="gru"), None, "lstm cell"),
    # The adaptive softmax cannot be counted without its shares, nor with the wrong number.
    (Config(softmax="adaptive"), None, "share of targets in each of its 1 tail cluster"),
    (CONFIGS["adaptive, two clusters"], (0.5,), "share of targets in each of its 2 tail"),
])
def test_the_count_refuses_what_it_does_not_cover(config, shares, words):
    with pytest.raises(ValueError, match=words):
        flops.train_flops_per_window(config, VOCAB, shares)


@pytest.mark.parametrize("minutes", [5, 12, 30])
def test_budget_shapes_follow_budget_config_and_full_forces_the_full_softmax(minutes):
    # Whatever the rule picks (softmax, tying, precision) at a large and at PTB's vocabulary.
    for vocab in (10_000, 50_000):
        assert flops.shape_config(f"budget-{minutes}", vocab) == budget_config(minutes, vocab)
        full = flops.shape_config(f"budget-{minutes}-full", vocab)
        assert full == budget_config(minutes, vocab, softmax="full")
        assert full.softmax == "full"


@pytest.mark.parametrize("argv, words", [
    (["--shapes", "nonsense"], "unknown shape 'nonsense'"),
    (["--shapes", ","], "names no shape"),
    (["--shapes", "budget-0"], "minutes > 0"),
    (["--shapes", "budget-soon"], "budget-M takes minutes"),
    (["--shapes", "budget-soon-full"], "budget-M takes minutes"),
    (["--shapes", "budget-0-full"], "minutes > 0"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--warmup", "0"], "--warmup must be at least 1"),
    (["--repeats", "-2"], "--repeats must be at least 1"),
    (["--squares", "64,x"], "--squares takes comma-separated sizes"),
    (["--squares", "0"], "--squares must be positive"),
    (["--out", "no/such/folder/flops.md"], "does not exist"),
])
def test_bad_arguments_are_refused_with_a_clear_error(argv, words, capsys):
    with pytest.raises(SystemExit) as exit:
        flops.main(["--quick", *argv])
    assert exit.value.code == 2
    assert words in capsys.readouterr().err


def test_a_missing_data_dir_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        flops.main(["--quick", "--data-dir", str(tmp_path / "missing")])
    assert exit.value.code == 2
    assert f"--data-dir {tmp_path / 'missing'}" in capsys.readouterr().err


def _table(report: str, first: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``first``."""
    lines = report.split(f"| {first} |", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    assert set(lines[1]) <= set("|-:"), "the header must be followed by its alignment row"
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow  # trains one tiny run
def test_quick_run_writes_the_report_with_ratios_to_the_measured_peak(tmp_path, capsys):
    out = tmp_path / "flops.md"
    printed = flops.main(["--quick", "--markdown", "--out", str(out)])
    report = out.read_text(encoding="utf-8")
    assert report == printed == capsys.readouterr().out
    head = report.split("\n\n", 1)[0]
    for words in ("command: python benchmarks/flops.py --quick", "commit: ", "torch ",
                  f"torch threads: {torch.get_num_threads()}", "corpus: synthetic"):
        assert words in head
    peaks = _table(report, "product")
    assert {precision for _, precision, _ in peaks} == {"float32", "bfloat16"}
    assert all(float(rate) > 0 for *_, rate in peaks)
    stated = {part.split()[0]: float(part.split()[1]) for part in
              report.split("\npeak: ", 1)[1].splitlines()[0].split(", ")}
    assert stated == {precision: max(float(rate) for _, p, rate in peaks if p == precision)
                      for precision in ("float32", "bfloat16")}
    rows = _table(report, "shape")
    # Float32 shapes, one with the adaptive softmax, and a bfloat16 one (budget-1: the
    # cpu-30min recipe, bfloat16 autocast).
    assert [(row[0].split()[0], row[1]) for row in rows] == [
        ("tiny", "float32"), ("tiny-adaptive", "float32"), ("budget-1", "bfloat16")]
    # The adaptive shape's count uses the stated share of its one tail cluster (ids 20-99 of
    # the 100 words, projected to 16 // 4 = 4 features).
    stated = report.split("tiny-adaptive cluster 1 (80 words, width 4) ", 1)[1]
    share = float(stated.split(";", 1)[0].split(")", 1)[0])
    assert 0 < share < 1
    config = flops.shape_config("tiny-adaptive", 100)
    expected = (flops.train_flops_per_window(config, 100, (share,))
                / (config.bptt * config.batch_size) / 1e6)
    assert float(rows[1][2]) == pytest.approx(expected, rel=2e-3)
    for _, precision, mflop, tokens, gflops, peak, ratio in rows:
        best = max(float(rate) for _, p, rate in peaks if p == precision)
        assert float(peak) == pytest.approx(best, rel=1e-3)
        tokens_per_s = float(tokens.replace(",", ""))  # rounded to a whole token
        assert float(gflops) == pytest.approx(float(mflop) * 1e6 * tokens_per_s / 1e9,
                                              rel=1e-3 + 0.5 / tokens_per_s)
        assert 0 < float(ratio) <= 1.5
        assert float(ratio) == pytest.approx(float(gflops) / float(peak), rel=1e-2)
