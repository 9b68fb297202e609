"""Forward+backward speed of rnnreg's own recurrence against torch's fused kernel.

rnnreg runs its own loop (``rnnreg/nn/recurrence.py``) whenever a mask acts inside the recurrence,
e.g. the ``variational`` strategy of Gal & Ghahramani (2016); ``torch.nn.LSTM``/``GRU`` with
``dropout=0.5`` (Zaremba et al. 2014's placement) stays on the fused kernel (oneDNN on CPU). This
script times one training step of each at the paper's small (20 x 20 steps x 200 units) and
medium (20 x 35 x 650) configurations, both with 2 layers and input size = hidden size.

The two are timed alternately in the same process, and their order swaps every repeat, so a
shared, noisy CPU slows both alike; the reported numbers are medians. The ratio is
speed(rnnreg) / speed(torch) = median time(torch) / median time(rnnreg): 1.0 means parity.

    python benchmarks/recurrence.py --repeats 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without installing: the package sits next to this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rnnreg  # noqa: E402

# name -> (batch, steps, hidden, layers); Zaremba et al. (2014), section 4.1.
SHAPES = {"small": (20, 20, 200, 2), "medium": (20, 35, 650, 2)}
MODELS = {"LSTM": (rnnreg.LSTM, torch.nn.LSTM), "GRU": (rnnreg.GRU, torch.nn.GRU)}


def training_step(model, x, grad_out):
    """One forward and backward pass, as in a training loop; returns its wall time in seconds."""
    for p in model.parameters():
        p.grad = None
    x.grad = None
    start = time.perf_counter()
    out, _ = model(x)
    out.backward(grad_out)
    return time.perf_counter() - start


def compare(mode: str, shape: str, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds per training step of (rnnreg variational, torch.nn with dropout=0.5)."""
    batch, steps, hidden, layers = SHAPES[shape]
    ours_cls, torch_cls = MODELS[mode]
    torch.manual_seed(0)
    ours = ours_cls(hidden, hidden, layers, **rnnreg.strategy("variational", 0.5)).train()
    theirs = torch_cls(hidden, hidden, layers, dropout=0.5).train()
    theirs.load_state_dict(ours.state_dict())  # identical weights: same work for both
    x = torch.randn(steps, batch, hidden, requires_grad=True)  # e.g. embedding output
    grad_out = torch.randn(steps, batch, hidden)
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for i in range(warmup + repeats):
        # Swap the order every repeat so neither side always runs right after the other.
        order = (("ours", ours), ("torch", theirs))
        for name, model in order if i % 2 == 0 else order[::-1]:
            elapsed = training_step(model, x, grad_out)
            if i >= warmup:
                times[name].append(elapsed)
    return statistics.median(times["ours"]), statistics.median(times["torch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--modes", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (medians)")
    print(f"{'mode':<5} {'shape':<7} {'rnnreg ms':>10} {'torch ms':>10} {'speed ratio':>12}")
    for mode in args.modes:
        for shape in args.shapes:
            ours, theirs = compare(mode, shape, args.repeats, args.warmup)
            print(f"{mode:<5} {shape:<7} {ours * 1e3:>10.1f} {theirs * 1e3:>10.1f} "
                  f"{theirs / ours:>12.2f}")


if __name__ == "__main__":
    main()
