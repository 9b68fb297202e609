"""One thread's CPU time (time.process_time) of a 2-layer forward+backward at the small or
medium shape: nn.LSTM(dropout) and rnnreg.LSTM per own-loop strategy, medians of 40. Under load
this is far steadier than wall-clock time. PYTHONPATH selects the code:

    OMP_NUM_THREADS=1 python results/benchmarks/cpu-loop/cpu_time.py small
"""

import sys
import time

import torch
from torch import nn

import rnnreg

STRATEGIES = ("variational", "naive", "recurrent_only", "zoneout")


def median_ms(fn, n=40):
    for _ in range(4):
        fn()
    times = []
    for _ in range(n):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[n // 2]


def main():
    torch.set_num_threads(1)
    shape = sys.argv[1] if len(sys.argv) > 1 else "small"
    steps, batch, hidden = (20, 20, 200) if shape == "small" else (35, 20, 650)
    torch.manual_seed(0)
    x = torch.randn(steps, batch, hidden, requires_grad=True)

    def run(model):
        out, _ = model(x)
        out.sum().backward()

    fused = nn.LSTM(hidden, hidden, 2, dropout=0.5)
    base = median_ms(lambda: run(fused))
    times = {}
    for name in STRATEGIES:
        model = rnnreg.LSTM(hidden, hidden, 2, **rnnreg.strategy(name, 0.5))
        times[name] = median_ms(lambda m=model: run(m))
    print(f"{shape}: nn.LSTM(dropout) {base:.2f} ms, "
          + ", ".join(f"{k} {v:.2f} ms ({base / v:.2f}x)" for k, v in times.items()))


if __name__ == "__main__":
    main()
