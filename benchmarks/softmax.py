"""Training throughput of the full against the adaptive softmax at growing vocabularies.

For each vocabulary size two ``rnnreg.LanguageModel`` s of the same shape are built, one with
the full V-way softmax and one with the adaptive softmax (Grave et al. 2017; default cutoffs,
``rnnreg.lm.adaptive.default_cutoffs``), both untied (rnnreg refuses tying with the adaptive
softmax). One iteration is a whole training step as the trainer takes it: forward with the
targets, the summed loss, backward, gradient clipping and the SGD update. The ids are
synthetic, drawn from a Zipf distribution (p(rank k) ~ 1/k) over the vocabulary, which is how
word frequencies fall and what decides how many targets reach the adaptive clusters.

The two models are timed in interleaved rounds (full, adaptive, full, adaptive, ...) after a
warm-up, so drifts in machine load hit both alike. Throughput uses the median step time; the
speed-up is the median over rounds of the per-round time ratio full / adaptive (above 1: the
adaptive softmax is faster).

    python benchmarks/softmax.py --markdown                  # 10k, 33k, 100k words, CPU
    python benchmarks/softmax.py --device cuda --markdown    # the same on a GPU
    python benchmarks/softmax.py --quick                     # tiny plumbing check, no timing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import rnnreg
from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.training.loss import summed_loss

VOCABULARIES = (10_000, 33_278, 100_000)    # PTB, WikiText-2, a large-vocabulary corpus
QUICK_VOCABULARIES = (200, 3_000)


def zipf_ids(vocab: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Ids with p(id k) proportional to 1 / (k + 1): frequency-ordered, like the vocabulary."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    flat = torch.multinomial(weights, int(torch.tensor(shape).prod()), replacement=True,
                             generator=generator)
    return flat.view(shape)


def make_step(model: LanguageModel, ids: torch.Tensor, clip: float):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = ids[:-1], ids[1:]

    def step() -> None:
        out = model(inputs, targets=targets)
        loss = summed_loss(out.scores.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    return step


def measure(steps: dict, warmup: int, repeats: int,
            device: torch.device) -> dict[str, list[float]]:
    def sync() -> None:  # CUDA runs asynchronously: time finished work only
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def run_vocabulary(vocab: int, args: argparse.Namespace) -> dict[str, object]:
    device = torch.device(args.device)
    config = Config(hidden_size=args.hidden, num_layers=args.layers, batch_size=args.batch,
                    bptt=args.steps)
    ids = zipf_ids(vocab, (args.steps + 1, args.batch),
                   torch.Generator().manual_seed(0)).to(device)
    models = {}
    for softmax in ("full", "adaptive"):
        torch.manual_seed(0)
        models[softmax] = LanguageModel(vocab, config.replace(softmax=softmax)).to(device).train()
    times = measure({name: make_step(model, ids, config.clip_norm)
                     for name, model in models.items()}, args.warmup, args.repeats, device)
    tokens = args.steps * args.batch
    full, adaptive = statistics.median(times["full"]), statistics.median(times["adaptive"])
    return {
        "vocab": vocab,
        "cutoffs": models["adaptive"].decoder.cutoffs,
        "full": tokens / full,
        "adaptive": tokens / adaptive,
        "speedup": statistics.median(f / a for f, a in zip(times["full"], times["adaptive"])),
    }


HEADERS = ("words", "adaptive cutoffs", "full tokens/s", "adaptive tokens/s",
           "speed-up (full / adaptive time)")


def print_table(rows: list[dict[str, object]], markdown: bool) -> None:
    cells = [(f"{r['vocab']:,}", ", ".join(f"{c:,}" for c in r["cutoffs"]),
              f"{r['full']:,.0f}", f"{r['adaptive']:,.0f}", f"{r['speedup']:.2f}x")
             for r in rows]
    if markdown:
        print("| " + " | ".join(HEADERS) + " |")
        print("|" + "|".join(["---:", "---", "---:", "---:", "---:"]) + "|")
        for line in cells:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    print("  ".join(h.rjust(w) for h, w in zip(HEADERS, widths)))
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default=",".join(map(str, VOCABULARIES)),
                        help="comma-separated vocabulary sizes (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=400, help="units per layer (cpu-30min)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=35, help="window length (bptt)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and vocabularies, one round: checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab = ",".join(map(str, QUICK_VOCABULARIES))
        args.hidden, args.batch, args.steps, args.repeats, args.warmup = 16, 4, 5, 1, 0
    try:
        args.vocab = [int(v) for v in args.vocab.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--vocab takes comma-separated integers, got {args.vocab!r}")
    if not args.vocab or min(args.vocab) < 2:
        parser.error("--vocab needs sizes of at least 2 words")
    if min(args.hidden, args.layers, args.batch, args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("sizes and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    header = (f"rnnreg {rnnreg.__version__}, torch {torch.__version__}, {args.device}, threads "
              f"{torch.get_num_threads()}, {args.layers}x{args.hidden} LSTM, batch {args.batch}, "
              f"{args.steps} steps, Zipfian ids; {args.repeats} interleaved rounds (warm-up "
              f"{args.warmup}) of a whole training step; speed-up is the median over rounds of "
              "full / adaptive step time")
    print(f"*{header}*\n" if args.markdown else header)
    rows = []
    for vocab in args.vocab:
        rows.append(run_vocabulary(vocab, args))
        print(f"  {vocab:,} words done", file=sys.stderr, flush=True)
    print_table(rows, args.markdown)


if __name__ == "__main__":
    main()
