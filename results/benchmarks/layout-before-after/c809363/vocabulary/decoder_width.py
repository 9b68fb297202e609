"""The small preset's softmax layer alone, forward+backward, at 10,000 and 10,001 words.

400 rows (B20 x T20) of width 200 -> V logits -> summed cross-entropy -> backward; the two
widths alternate, 30 rounds after 3 warm-up, medians printed.  python3 decoder_width.py
"""
import statistics
import time

import torch

torch.manual_seed(0)
x = torch.randn(400, 200)
targets = torch.zeros(400, dtype=torch.long)
weights = {v: (torch.randn(v, 200, requires_grad=True), torch.randn(v, requires_grad=True))
           for v in (10000, 10001)}


def step(v: int) -> float:
    w, b = weights[v]
    started = time.perf_counter()
    logits = torch.nn.functional.linear(x.clone().requires_grad_(), w, b)
    torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
    return time.perf_counter() - started


for _ in range(3):
    step(10000), step(10001)
times = {v: [] for v in weights}
for _ in range(30):
    for v in weights:
        times[v].append(step(v))
for v, ts in times.items():
    print(f"V={v}: {statistics.median(ts) * 1e3:.2f} ms per forward+backward")
print(f"10,001 / 10,000: {statistics.median(times[10001]) / statistics.median(times[10000]):.2f}")
