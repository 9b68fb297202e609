"""Tests for benchmarks/flops.py: its FLOP count against torch's own counter on an LSTM made of
matrix products, the weights it counts against the library's model, its refusals, and (slow:
it trains) the whole ``--quick`` run and its report."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import flops  # noqa: E402  (a script, not a package)

CONFIGS = {
    "uniform, tied": Config(hidden_size=8, num_layers=2, bptt=4, batch_size=3, tie_weights=True),
    "one layer": Config(hidden_size=6, num_layers=1, bptt=5, batch_size=2),
    "per-layer sizes, own embedding width": Config(
        hidden_size=7, num_layers=3, layer_sizes=(12, 5, 7), embedding_size=9, bptt=3,
        batch_size=4),
}
VOCAB = 11


def counted_window(config: Config, vocab: int, *, state_grad: bool = False) -> int:
    """FlopCounterMode's FLOPs for forward + backward of one window of an LSTM language model
    written out of ``nn.Linear`` products (the gate equations of Zaremba et al. 2014, eq. 1),
    the incoming state detached as the trainer carries it, unless ``state_grad``."""
    torch.manual_seed(0)
    inputs = (config.embedding_dim, *config.sizes[:-1])
    embedding = nn.Embedding(vocab, config.embedding_dim)
    cells = [(nn.Linear(i, 4 * h), nn.Linear(h, 4 * h, bias=False))
             for i, h in zip(inputs, config.sizes)]
    decoder = nn.Linear(config.sizes[-1], vocab)
    if config.tie_weights:
        decoder.weight = embedding.weight
    steps, batch = config.bptt, config.batch_size
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
        loss = F.cross_entropy(decoder(x).reshape(-1, vocab), ids[1:].reshape(-1),
                               reduction="sum")
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", CONFIGS)
def test_the_count_equals_torchs_flop_counter_for_forward_and_backward(name):
    config = CONFIGS[name]
    assert flops.train_flops_per_window(config, VOCAB) == counted_window(config, VOCAB)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_count_leaves_out_exactly_the_gradient_of_the_detached_state(name):
    # The one product a full 3x-forward count would add: dL/dh(t-1) of each layer's first step.
    config = CONFIGS[name]
    extra = sum(2 * config.batch_size * 4 * h * h for h in config.sizes)
    assert (counted_window(config, VOCAB, state_grad=True)
            == flops.train_flops_per_window(config, VOCAB) + extra)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_forward_count_is_one_multiply_add_per_weight_of_the_librarys_model(name):
    # Each weight of a product is used once per token; tied, the decoder reuses the embedding.
    config = CONFIGS[name]
    model = LanguageModel(VOCAB, config)
    recurrent = sum(p.numel() for n, p in model.rnn.named_parameters()
                    if "weight_ih" in n or "weight_hh" in n)
    assert recurrent + model.decoder.weight.numel() == flops.forward_macs_per_token(config,
                                                                                    VOCAB)


@pytest.mark.parametrize("changes, words", [
    (dict(cell="gru"), "lstm cell"),
    (dict(softmax="adaptive", tie_weights=False), "full softmax"),
])
def test_the_count_refuses_what_it_does_not_cover(changes, words):
    with pytest.raises(ValueError, match=words):
        flops.train_flops_per_window(Config().replace(**changes), 100)


@pytest.mark.parametrize("argv, words", [
    (["--shapes", "nonsense"], "unknown shape 'nonsense'"),
    (["--shapes", ","], "names no shape"),
    (["--shapes", "budget-0"], "must be > 0 minutes"),
    (["--shapes", "budget-soon"], "budget-M takes minutes"),
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
    # A float32 shape and a bfloat16 one (budget-1: the cpu-30min recipe, bfloat16 autocast).
    assert [(row[0].split()[0], row[1]) for row in rows] == [("tiny", "float32"),
                                                             ("budget-1", "bfloat16")]
    for _, precision, mflop, tokens, gflops, peak, ratio in rows:
        best = max(float(rate) for _, p, rate in peaks if p == precision)
        assert float(peak) == pytest.approx(best, rel=1e-3)
        tokens_per_s = float(tokens.replace(",", ""))  # rounded to a whole token
        assert float(gflops) == pytest.approx(float(mflop) * 1e6 * tokens_per_s / 1e9,
                                              rel=1e-3 + 0.5 / tokens_per_s)
        assert 0 < float(ratio) <= 1.5
        assert float(ratio) == pytest.approx(float(gflops) / float(peak), rel=1e-2)
