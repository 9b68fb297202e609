"""Trainer throughput against a plain PyTorch training loop, side by side in one process.

The candidate is ``rnnreg.lm.training.loop.train`` itself (one epoch on a synthetic 10k-word
corpus; the tokens/s it logs counts training steps only, evaluation excluded). The baseline is the
loop a practitioner would write: ``nn.Embedding`` -> ``nn.Dropout`` -> ``nn.LSTM(dropout=p)`` ->
``nn.Dropout`` -> ``nn.Linear``, the same summed loss, clipping and SGD step. Runs alternate
(baseline, candidate, baseline, ...) so drifts in machine load hit both; medians are reported.

    python benchmarks/train.py --shapes small,medium --repeats 3
    python benchmarks/train.py --device cuda --shapes small,medium,large --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from rnnreg.lm.config import Config
from rnnreg.lm.presets import PRESETS, preset_config
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import read_records
from rnnreg.lm.training.loop import train

VOCAB = 10_000  # PTB's
# The paper's presets by name, plus "tiny", which only exercises the plumbing
# (benchmarks/device_check.py --quick) with a 100-word vocabulary: its numbers mean nothing.
TINY = dict(hidden_size=16, batch_size=4, bptt=5)
TINY_VOCAB = 100


def shape_config(name: str) -> Config:
    config = preset_config("small").replace(**TINY) if name == "tiny" else preset_config(name)
    return config.replace(epochs=1, eval_bptt=200, checkpoint_minutes=0)


def write_corpus(directory: Path, tokens: int, seed: int, vocab: int = VOCAB) -> None:
    """A synthetic corpus with PTB's vocabulary size: speed depends on sizes, not on words.

    Like PTB it has ``<unk>`` in its text, so the trainer's vocabulary is these words plus
    ``<eos>``, exactly ``vocab`` entries. Without it the vocabulary gains an ``<unk>`` (raw
    text), and one more softmax row is not a neutral difference: 10,001 output columns instead
    of 10,000 slow the decoder's matrix products measurably on the CPU (see
    results/benchmarks/layout-before-after/README.md), which the baseline would not pay.
    """
    generator = torch.Generator().manual_seed(seed)
    words = ["<unk>"] + [f"w{i}" for i in range(vocab - 2)]  # plus <eos>: vocab entries
    for split, count in (("train", tokens), ("valid", 2000), ("test", 2000)):
        ids = torch.randint(0, vocab - 1, (count,), generator=generator).tolist()
        lines = [" ".join(words[i] for i in ids[start:start + 20])
                 for start in range(0, count, 20)]
        # Every word once in train so the vocabulary always has vocab entries.
        if split == "train":
            lines.append(" ".join(words))
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")


def baseline_tokens_per_s(config: Config, data: torch.Tensor, device: torch.device,
                          vocab: int = VOCAB) -> float:
    """The hand-written loop: same model sizes, loss, clipping and optimizer step."""
    torch.manual_seed(config.seed)
    h, p = config.hidden_size, config.strategy_p
    embedding, decoder = nn.Embedding(vocab, h), nn.Linear(h, vocab)
    lstm = nn.LSTM(h, h, config.num_layers, dropout=p if config.num_layers > 1 else 0.0)
    drop = nn.Dropout(p)
    modules = nn.ModuleList([embedding, lstm, decoder])
    for w in modules.parameters():
        nn.init.uniform_(w, -config.init_range, config.init_range)
    modules.to(device)
    optimizer = torch.optim.SGD(modules.parameters(), lr=config.lr)
    streams = data[: data.numel() // config.batch_size * config.batch_size]
    streams = streams.view(config.batch_size, -1).t().contiguous().to(device)
    # Device work is asynchronous: each step's time ends when the GPU has finished it.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hidden, tokens, seconds = None, 0, 0.0
    for i in range(0, streams.size(0) - 1, config.bptt):
        n = min(config.bptt, streams.size(0) - 1 - i)
        inputs, targets = streams[i:i + n], streams[i + 1:i + 1 + n]
        started = time.perf_counter()
        out, hidden = lstm(drop(embedding(inputs)), hidden)
        logits = decoder(drop(out))
        loss = nn.functional.cross_entropy(logits.view(-1, vocab), targets.reshape(-1),
                                           reduction="sum") / config.batch_size
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(modules.parameters(), config.clip_norm)
        optimizer.step()
        hidden = tuple(s.detach() for s in hidden)
        sync()
        seconds += time.perf_counter() - started
        tokens += n * config.batch_size
    return tokens / seconds


def trainer_tokens_per_s(config: Config, data_dir: Path, workdir: Path,
                        vocab: int = VOCAB) -> float:
    out = workdir / f"run-{time.monotonic_ns()}"
    summary = train(config, out, data_dir=data_dir, progress=False, verbose=False)
    assert summary["complete"]
    words = len(RunDir(out).read_vocab())
    if words != vocab:  # the comparison holds only at the same softmax size
        raise RuntimeError(f"the trainer's vocabulary has {words} words, the baseline {vocab}")
    return read_records(out, "epoch")[0]["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,medium",
                        help="presets whose sizes to use, or 'tiny' (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=60, help="training windows per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s != "tiny" and s not in PRESETS]
    if unknown or not shapes:
        parser.error(f"unknown shape(s) {unknown}; choose presets or 'tiny'")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads; "
          f"{args.windows} windows per timing, {args.repeats} alternating repeats\n")
    print("| shape | plain PyTorch tok/s | rnnreg trainer tok/s | ratio |\n|---|---|---|---|")
    for shape in shapes:
        config = shape_config(shape).replace(device=args.device)
        vocab = TINY_VOCAB if shape == "tiny" else VOCAB
        tokens = args.windows * config.bptt * config.batch_size + 1
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "corpus"
            data_dir.mkdir()
            write_corpus(data_dir, tokens, seed=0, vocab=vocab)
            data = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))
            base, cand = [], []
            for _ in range(args.repeats):
                base.append(baseline_tokens_per_s(config, data, device, vocab))
                cand.append(trainer_tokens_per_s(config, data_dir, Path(tmp), vocab))
            b, c = statistics.median(base), statistics.median(cand)
            print(f"| {shape} (B{config.batch_size} T{config.bptt} H{config.hidden_size} "
                  f"p{config.strategy_p}) | {b:,.0f} | {c:,.0f} | {c / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
