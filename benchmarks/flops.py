"""How close the trainer runs to this machine: its FLOP rate against the CPU's own matmul peak.

The baseline is the fastest plain ``torch.mm`` this machine runs, measured in the same process:
large square products and the products the training shapes are made of (the gate products of
all B*T rows of a window, the softmax's, one step's recurrent product), in float32 and in
bfloat16, each the best of ``--repeats`` timings after a warm-up, at torch's thread count. The
highest rate of a precision is its peak.

The candidate is ``rnnreg.lm.training.loop.train`` itself, one epoch of ``--warmup`` +
``--windows`` full windows; the time between the trainer's step callbacks over the last
``--windows`` windows is its training time (everything the loop does per window, evaluation and
checkpoints excluded). Its FLOPs are counted, not measured (:func:`train_flops_per_window`, which
``tests/test_flops_benchmark.py`` checks against ``torch.utils.flop_counter.FlopCounterMode``).
The adaptive softmax (Grave et al. 2017) runs each tail cluster only on the tokens whose target
it holds, so its count weights each cluster by the share of the timed windows' targets that fall
in it, read from the corpus the benchmark trains on (the report states the shares). The ratio is
the achieved rate over the peak of the precision the run computes in (bfloat16 for a
bfloat16-autocast run, float32 otherwise). A ratio near 1 means the trainer runs as fast as this
CPU multiplies matrices; what is left below it is time in elementwise work, small products and
overhead.

Shapes: a preset's name, ``budget-M`` for ``rnnreg.lm.presets.budget_config(M, V)`` at the
corpus's vocabulary V (with whatever softmax, tying and precision it picks), ``budget-M-full``
for the same budget forced to the full softmax, or ``tiny`` and ``tiny-adaptive`` (plumbing
only). The corpus is ``--data-dir`` (default: ``$RNNREG_DATA``, else the cache), or a synthetic
one of PTB's 10k words when that holds none: the full softmax's speed depends on sizes, not on
words, but the synthetic words are uniform, so an adaptive shape's tail shares there are far
above real text's (pass a real corpus to time the adaptive softmax).

    python benchmarks/flops.py --data-dir ../shared/data/ptb --markdown --out flops.md
    python benchmarks/flops.py --quick   # seconds, tiny shapes and corpus: checks the plumbing
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from train import TINY, TINY_VOCAB, VOCAB, write_corpus  # benchmarks/train.py, beside this

from rnnreg.lm.adaptive import check_cutoffs, default_cutoffs
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus, batchify
from rnnreg.lm.corpus.batches import windows as cut_windows
from rnnreg.lm.corpus.sources import DataError, locate_corpus
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.presets import PRESETS, budget_config, preset_config
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train

REPO = Path(__file__).resolve().parents[1]
GATES = 4  # an LSTM's: input, forget, cell, output
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLE_SECONDS = 0.02  # a timing repeats a short product until it lasts about this long

# Each profile's defaults; a flag given on the command line wins. FULL's window count keeps
# its five trainings, PTB's loading and the product timings to a few minutes on 2 cores.
FULL = dict(shapes="cpu-30min,budget-5,budget-12,budget-30,medium", windows=30, warmup=3, repeats=5,
            squares="1024,2048")
QUICK = dict(shapes="tiny,tiny-adaptive,budget-1", windows=4, warmup=1, repeats=2, squares="64,128")


# --- the count -------------------------------------------------------------------------------


def check_countable(config: Config) -> None:
    """:func:`train_flops_per_window` counts LSTMs; refuse the other cells."""
    if config.cell != "lstm":
        raise ValueError(f"the FLOP count covers the lstm cell, not {config.cell!r}")


@dataclass(frozen=True)
class Cluster:
    """One tail cluster of the adaptive softmax: its first word id, how many words it scores,
    and the width of the projection it reads the hidden state through."""

    first: int
    words: int
    width: int


def tail_clusters(config: Config, vocab_size: int) -> list[Cluster]:
    """The tail clusters as :class:`rnnreg.lm.adaptive.AdaptiveSoftmax` builds them: cluster
    ``i`` holds the ids ``[cutoffs[i], cutoffs[i+1])`` (the last ends at V) and projects H
    features to ``int(H // div ** (i + 1))`` (Grave et al. 2017, section 4.1)."""
    given = config.adaptive_cutoffs
    cutoffs = check_cutoffs(default_cutoffs(vocab_size) if given is None else given, vocab_size)
    hidden, div = config.sizes[-1], config.adaptive_div_value
    bounds = (*cutoffs, vocab_size)
    return [Cluster(low, high - low, int(hidden // div ** (i + 1)))
            for i, (low, high) in enumerate(zip(bounds[:-1], bounds[1:]))]


def cluster_shares(config: Config, vocab_size: int, targets: Tensor) -> tuple[float, ...]:
    """The share of ``targets`` that falls in each tail cluster (ids are frequency-ordered, so
    a cluster is a range of ids); the rest are head words."""
    clusters = tail_clusters(config, vocab_size)
    bounds = torch.tensor([c.first for c in clusters])
    which = torch.bucketize(targets.reshape(-1), bounds, right=True)  # 0 = head, i + 1 = tail i
    counts = torch.bincount(which, minlength=len(clusters) + 1)
    return tuple(int(n) / which.numel() for n in counts[1:])


def softmax_macs_per_token(config: Config, vocab_size: int,
                           shares: tuple[float, ...] | None = None) -> float:
    """Multiply-adds of the softmax per token. Full: the decoder's ``H V``. Adaptive: the head's
    ``H (cutoffs[0] + clusters)`` for every token, plus, for the share of tokens whose target
    falls in tail cluster i (``shares[i]``, see :func:`cluster_shares`), that cluster's
    projection ``H w_i`` and its word scores ``w_i n_i``."""
    hidden = config.sizes[-1]
    if config.softmax == "full":
        return hidden * vocab_size
    clusters = tail_clusters(config, vocab_size)
    if shares is None or len(shares) != len(clusters):
        raise ValueError(f"the adaptive softmax's count needs the share of targets in each of its "
                         f"{len(clusters)} tail cluster(s) (cluster_shares), got {shares}")
    head = hidden * (clusters[0].first + len(clusters))
    return head + sum(share * (hidden * c.width + c.width * c.words)
                      for share, c in zip(shares, clusters))


def forward_macs_per_token(config: Config, vocab_size: int,
                           shares: tuple[float, ...] | None = None) -> float:
    """Multiply-adds of the forward per token: each LSTM layer's four gates from its input and
    from h(t-1), ``4 H (in + H)``, and the softmax's (:func:`softmax_macs_per_token`; ``shares``
    only for the adaptive one). Embedding lookups, biases and the elementwise cell update are
    not products and are not counted."""
    check_countable(config)
    inputs = (config.embedding_dim, *config.sizes[:-1])
    layers = sum(GATES * h * (i + h) for i, h in zip(inputs, config.sizes))
    return layers + softmax_macs_per_token(config, vocab_size, shares)


def train_flops_per_window(config: Config, vocab_size: int,
                           shares: tuple[float, ...] | None = None) -> float:
    """FLOPs (2 per multiply-add) of one training window of ``config``'s shape; for the
    adaptive softmax ``shares`` are the window's targets' tail-cluster shares.

    The backward repeats each forward product twice, once for the gradient of its input and
    once for its weight's, so a window costs three forwards, less one product per layer: the
    carried state h(t-1) of the window's first step is detached (truncated BPTT), so nothing
    asks for its gradient ``B x 4H x H``.
    """
    tokens = config.bptt * config.batch_size
    forward = tokens * forward_macs_per_token(config, vocab_size, shares)
    skipped = sum(config.batch_size * GATES * h * h for h in config.sizes)
    return 2 * (3 * forward - skipped)


# --- the peak --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    what: str
    m: int
    k: int
    n: int

    @property
    def label(self) -> str:
        return f"{self.what} ({self.m}x{self.k} @ {self.k}x{self.n})"


def products(squares: list[int],
             shapes: list[tuple[Config, int, tuple[float, ...] | None]]) -> list[Product]:
    """The square products, then those of each training shape (a config, its vocabulary size
    and its tail-cluster shares): gates and softmax over all B*T rows of a window (a tail
    cluster's over its share of the rows), and one step's recurrent product (B rows); each
    (m, k, n) once."""
    found = [Product("square", n, n, n) for n in squares]
    for config, vocab_size, shares in shapes:
        rows, batch = config.bptt * config.batch_size, config.batch_size
        inputs = (config.embedding_dim, *config.sizes[:-1])
        for i, h in zip(inputs, config.sizes):
            found += [Product("gates, all steps", rows, i, GATES * h),
                      Product("gates, one step", batch, h, GATES * h)]
        hidden = config.sizes[-1]
        if config.softmax == "full":
            found.append(Product("decoder", rows, hidden, vocab_size))
            continue
        clusters = tail_clusters(config, vocab_size)
        found.append(Product("adaptive head", rows, hidden, clusters[0].first + len(clusters)))
        for i, (share, cluster) in enumerate(zip(shares, clusters)):
            if (m := round(share * rows)) > 0:
                found += [Product(f"cluster {i + 1} projection", m, hidden, cluster.width),
                          Product(f"cluster {i + 1} words", m, cluster.width, cluster.words)]
    unique: dict[tuple[int, int, int], Product] = {}
    for p in found:
        unique.setdefault((p.m, p.k, p.n), p)
    return list(unique.values())


def mm_gflops(product: Product, dtype: torch.dtype, repeats: int) -> float:
    """The best GFLOP/s of ``torch.mm`` at ``product``'s shape over ``repeats`` timings."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(product.m, product.k, generator=generator).to(dtype)
    b = torch.randn(product.k, product.n, generator=generator).to(dtype)
    out = torch.empty(product.m, product.n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    calls = max(1, int(SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * product.m * product.k * product.n / best / 1e9


# --- the trainer -----------------------------------------------------------------------------


def shape_config(name: str, vocab_size: int) -> Config:
    """The model and window sizes a shape name stands for (see the module's docstring)."""
    if name == "tiny":
        config = preset_config("small").replace(**TINY)
    elif name == "tiny-adaptive":
        config = preset_config("small").replace(**TINY, softmax="adaptive", tie_weights=False)
    elif name.startswith("budget-"):
        minutes = name.removeprefix("budget-").removesuffix("-full")
        try:
            minutes = float(minutes)
        except ValueError:
            raise ValueError(f"{name!r}: budget-M takes minutes, e.g. budget-12 or "
                             "budget-12-full") from None
        config = budget_config(minutes, vocab_size,
                               softmax="full" if name.endswith("-full") else None)
    elif name in PRESETS:
        config = preset_config(name)
    else:
        raise ValueError(f"unknown shape {name!r}; choose a preset ({', '.join(PRESETS)}), "
                         "budget-M, budget-M-full, tiny or tiny-adaptive")
    check_countable(config)
    return config


def describe(name: str, config: Config) -> str:
    sizes = "-".join(map(str, config.sizes))
    return (f"{name} (B{config.batch_size} T{config.bptt} H{sizes}"
            f"{' tied' if config.tie_weights else ''}"
            f"{' adaptive' if config.softmax == 'adaptive' else ''})")


def timed_config(config: Config, windows: int) -> Config:
    """``config`` trained for exactly ``windows`` full windows (one epoch on the first tokens of
    the training split), on the CPU, with no time limit and scoring almost nothing. Windows are
    ``bptt`` long even where the recipe draws their lengths (AWD), so the count is exact."""
    rows = windows * config.bptt + 1  # inputs for every window, and the last one's targets
    return config.replace(epochs=1, train_tokens=rows * config.batch_size, device="cpu",
                          variable_bptt=False, max_train_minutes=0.0, checkpoint_minutes=0.0,
                          eval_tokens=200)


def timed_targets(config: Config, windows: int, warmup: int, train_ids: Tensor) -> Tensor:
    """The targets of the timed windows, cut as the trainer cuts them
    (``rnnreg.lm.training.loop``: the first ``train_tokens`` training tokens in ``batch_size``
    streams, ``bptt``-long windows), the warm-up windows left out."""
    timed = timed_config(config, warmup + windows)
    streams = batchify(train_ids[:timed.train_tokens], timed.batch_size)
    return torch.cat([t.reshape(-1) for _, t in list(cut_windows(streams, timed.bptt))[warmup:]])


def trainer_tokens_per_s(config: Config, windows: int, warmup: int, data_dir: Path,
                         workdir: Path) -> tuple[float, Vocabulary]:
    """(tokens/s over the last ``windows`` windows, the run's vocabulary)."""
    stamps: list[float] = []
    out = workdir / f"run-{time.monotonic_ns()}"
    train(timed_config(config, warmup + windows), out, data_dir=data_dir, download=False,
          progress=False, verbose=False, on_step=lambda step: stamps.append(time.perf_counter()))
    if len(stamps) != warmup + windows:
        raise RuntimeError(f"the trainer took {len(stamps)} steps, not {warmup + windows}")
    seconds = stamps[-1] - stamps[warmup - 1]
    return windows * config.bptt * config.batch_size / seconds, RunDir(out).read_vocab()


# --- the report ------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the command -----------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help=f"comma-separated; default {FULL['shapes']}")
    parser.add_argument("--windows", type=int, help=f"timed training windows per shape "
                                                    f"(default {FULL['windows']})")
    parser.add_argument("--warmup", type=int, help=f"untimed windows first, at least 1 "
                                                   f"(default {FULL['warmup']})")
    parser.add_argument("--repeats", type=int, help=f"timings per product, the best kept "
                                                    f"(default {FULL['repeats']})")
    parser.add_argument("--squares", help=f"sizes of the square products (default "
                                          f"{FULL['squares']})")
    parser.add_argument("--data-dir", type=Path, help="the corpus (default: $RNNREG_DATA, else "
                                                      "the cache; synthetic if neither has one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and corpus: seconds, for tests; numbers mean nothing")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, least in (("windows", 1), ("warmup", 1), ("repeats", 1), ("threads", 0)):
        if getattr(args, key) < least:
            parser.error(f"--{key} must be at least {least}, got {getattr(args, key)}")
    try:
        args.squares = [int(s) for s in args.squares.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--squares takes comma-separated sizes, got {args.squares!r}")
    if any(n < 1 for n in args.squares):
        parser.error(f"--squares must be positive sizes, got {args.squares}")
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not args.shapes:
        parser.error("--shapes names no shape")
    try:  # the names now; budget-M's sizes again once the corpus's vocabulary is known
        for shape in args.shapes:
            shape_config(shape, VOCAB)
    except ValueError as error:
        parser.error(f"--shapes: {error}")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    args.error = parser.error
    return args


def load_corpus(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, Corpus]:
    """(the corpus's directory, how the report names it, the corpus): ``--data-dir``, else
    (unless ``--quick``) the default data directory, else a synthetic corpus written in ``tmp``."""
    if args.data_dir is not None:
        try:
            return args.data_dir, str(args.data_dir), Corpus.load(args.data_dir)
        except DataError as error:
            args.error(f"--data-dir {args.data_dir}: {error}")
    if not args.quick:
        default = locate_corpus().path
        try:
            return default, str(default), Corpus.load(default)
        except DataError:
            progress(f"no corpus in {default}: training on a synthetic one")
    directory = tmp / "corpus"
    directory.mkdir()
    needed = max(timed_config(shape_config(s, VOCAB), args.warmup + args.windows).train_tokens
                 for s in args.shapes)
    vocab = TINY_VOCAB if args.quick else VOCAB
    write_corpus(directory, needed, seed=0, vocab=vocab)
    return directory, "synthetic", Corpus.load(directory)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, corpus_name, corpus = load_corpus(args, Path(tmp))
        vocab, train_ids = len(corpus.vocab), corpus.train
        train_tokens = train_ids.numel()
        try:
            configs = {s: shape_config(s, vocab) for s in args.shapes}
        except ValueError as error:  # budget-M's sizes at this vocabulary
            args.error(f"--shapes at {vocab:,} words: {error}")
        for name, config in configs.items():
            needed = timed_config(config, args.warmup + args.windows).train_tokens
            if needed > train_tokens:
                args.error(f"{name}: {args.warmup + args.windows} windows need {needed:,} "
                           f"training tokens, the corpus has {train_tokens:,}: lower --windows")
        achieved = []
        for name, config in configs.items():
            progress(f"training {describe(name, config)}: {args.warmup} + {args.windows} "
                     f"windows, {config.precision}")
            rate, run_vocab = trainer_tokens_per_s(config, args.windows, args.warmup, data_dir,
                                                   Path(tmp))
            words, shares = len(run_vocab), None
            if config.softmax == "adaptive":
                if run_vocab != corpus.vocab:  # the shares read this corpus's ids
                    raise RuntimeError(f"{name}: the trainer built another vocabulary than the "
                                       "benchmark's, so the tail clusters' shares are unknown")
                shares = cluster_shares(config, words, timed_targets(
                    config, args.windows, args.warmup, train_ids))
            flops = train_flops_per_window(config, words, shares) / (config.bptt
                                                                     * config.batch_size)
            progress(f"  {rate:,.0f} tokens/s, {rate * flops / 1e9:.3g} GFLOP/s")
            achieved.append((name, config, words, shares, rate, flops))
    peaks: dict[str, float] = {}
    peak_rows = []
    for product in products(args.squares,
                            [(config, words, shares) for _, config, words, shares, *_ in achieved]):
        for precision, dtype in PRECISIONS.items():
            rate = mm_gflops(product, dtype, args.repeats)
            progress(f"torch.mm {product.label} {precision}: {rate:.3g} GFLOP/s")
            peaks[precision] = max(peaks.get(precision, 0.0), rate)
            peak_rows.append([product.label, precision, f"{rate:.4g}"])
    train_rows, adaptive = [], []
    for name, config, words, shares, rate, flops in achieved:
        if shares is not None:
            adaptive.append(f"{name} " + ", ".join(
                f"cluster {i + 1} ({c.words:,} words, width {c.width}) {share:.4f}"
                for i, (share, c) in enumerate(zip(shares, tail_clusters(config, words)))))
        gflops, peak = rate * flops / 1e9, peaks[config.precision]
        train_rows.append([describe(name, config), config.precision, f"{flops / 1e6:.4g}",
                           f"{rate:,.0f}", f"{gflops:.4g}", f"{peak:.4g}",
                           f"{gflops / peak:.3g}"])
    report = "\n".join([
        "command: " + shlex.join(["python", "benchmarks/flops.py", *(sys.argv[1:]
                                                                     if argv is None else argv)]),
        f"commit: {commit()}",
        f"torch {torch.__version__}, {cpu_model()}, torch threads: {torch.get_num_threads()}, "
        f"{torch.backends.cpu.get_cpu_capability()}",
        f"corpus: {corpus_name} ({vocab:,} words); {args.warmup} + {args.windows} windows per "
        f"shape; best of {args.repeats} timings per product"
        + ("; --quick: tiny shapes, the numbers mean nothing" if args.quick else ""),
        "",
        "Matrix products (torch.mm); the peak of a precision is its highest rate:",
        "",
        table(["product", "precision", "GFLOP/s"], peak_rows, args.markdown),
        "",
        "peak: " + ", ".join(f"{p} {rate:.4g} GFLOP/s" for p, rate in peaks.items()),
        "",
        "The trainer (FLOPs counted: 2 per multiply-add, a window costs 3 forwards less the "
        "gradient of its detached incoming state"
        + ("; the adaptive softmax's head for every token, each tail cluster for the share of "
           "the timed windows' targets in it, counted in this corpus: " + "; ".join(adaptive)
           if adaptive else "")
        + "; ratio = GFLOP/s / peak GFLOP/s of the run's precision):",
        "",
        table(["shape", "precision", "MFLOP/token", "tokens/s", "GFLOP/s", "peak GFLOP/s",
               "ratio"], train_rows, args.markdown),
    ]) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
