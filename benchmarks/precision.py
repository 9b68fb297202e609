"""Training-step throughput with ``precision="bfloat16"`` against float32, side by side.

One step is what the trainer does per window: the language model's forward (under
``torch.autocast`` for bfloat16), the summed loss in float32, backward, clipping and the SGD
step. Both precisions run alternately in one process on the same model and batch; the ratio
is the median over rounds of float32 time / bfloat16 time (above 1: bfloat16 is faster).
Whether it pays depends on the hardware: CPUs with AVX512-BF16 or AMX, and GPUs, have fast
bfloat16 matrix products; elsewhere autocast can be slower.

    python benchmarks/precision.py
    python benchmarks/precision.py --shapes cpu-30min --rounds 20
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from rnnreg.lm.config import Config
from rnnreg.lm.model import LanguageModel, detach_state
from rnnreg.lm.presets import preset_config
from rnnreg.lm.training.loss import summed_loss

VOCAB = 10_000


def make_step(config: Config, bfloat16: bool):
    """A closure timing one training window of ``config``'s shape."""
    torch.manual_seed(config.seed)
    model = LanguageModel(VOCAB, config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    ids = torch.randint(0, VOCAB, (config.bptt + 1, config.batch_size))
    state = None

    def step() -> float:
        nonlocal state
        start = time.perf_counter()
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bfloat16
                    else contextlib.nullcontext())
        with autocast:
            out = model(ids[:-1], state)
        loss = summed_loss(out.logits.float(), ids[1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        state = tuple(s.float() for s in detach_state(out.state))
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,cpu-30min,medium",
                        help="presets whose model and window sizes to use")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.rounds} alternating rounds")
    print("| shape | float32 tok/s | bfloat16 tok/s | speed-up |\n|---|---|---|---|")
    for name in args.shapes.split(","):
        config = preset_config(name)
        steps = {"float32": make_step(config, False), "bfloat16": make_step(config, True)}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times = {key: [] for key in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                times[key].append(step())
        tokens = config.bptt * config.batch_size
        f32, b16 = (tokens / statistics.median(times[key]) for key in steps)
        ratio = statistics.median(a / b for a, b in zip(times["float32"], times["bfloat16"]))
        print(f"| {name} (B{config.batch_size} T{config.bptt} H{config.hidden_size}"
              f"{' tied' if config.tie_weights else ''}) | {f32:,.0f} | {b16:,.0f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
