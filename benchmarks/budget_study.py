"""Full against adaptive softmax at equal time budgets, on PTB and a larger-vocabulary corpus.

Every run is an ordinary ``rnnreg train`` command, configured by the budget rule
(``rnnreg.lm.presets.budget_config``: the measured recipe for the budget and the vocabulary)
with the softmax forced to each kind, so both get the same minutes and each the model size the
rule gives it. ``--same-size`` adds, per budget, the adaptive softmax at the full softmax's
size, which separates the speed of the decoder from the capacity it buys.

Corpora: PTB (10k words) from the rnnreg data directory (``rnnreg download ptb``), and one
built here from the English text of Vim's documentation (``/usr/share/vim/vim*/doc``, shipped
by the vim-runtime package), lowercased and split into words, numbers and punctuation; words
seen fewer than ``--min-count`` times in its training part become ``<unk>``, as in PTB. Its
blocks of 100 lines go to valid (every 20th), test (the next) and train (the rest). It is built
under OUT/corpora and never belongs in the repository. (With vim 9.0's documentation and the
default min count: about 2.4M training tokens over 18k words. That is below the rule's
``adaptive_above``, so left to itself the rule would keep the full softmax there; the study
forces each kind.) A budget shorter than an epoch ends mid-epoch: its run then has only the
final record, scored at the budget.

The runs are trained one after another (time budgets need an otherwise idle machine); a
finished run is skipped and an interrupted one resumed, so rerunning the command continues the
study. OUT/commands.sh lists every command; OUT/report.md tabulates each run's valid
perplexity against training minutes, one row per epoch, and the final scores.

    python benchmarks/budget_study.py --out results/budget --dry-run   # corpora + commands only
    python benchmarks/budget_study.py --out results/budget             # train everything
    python benchmarks/budget_study.py --out results/budget --report-only
"""

from __future__ import annotations

import argparse
import collections
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from rnnreg.cli.flags import flag as cli_flag
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import DataError, locate_corpus
from rnnreg.lm.presets import BUDGET_RULE, budget_config, preset_config
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import read_records

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")


def build_text_corpus(source: Path, target: Path, min_count: int) -> Path:
    """Write target/{train,valid,test}.txt from every ``*.txt`` under ``source``; see module."""
    if all((target / f"{split}.txt").is_file() for split in ("train", "valid", "test")):
        return target
    lines = []
    for path in sorted(source.glob("*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            tokens = _TOKEN.findall(line.lower())
            if tokens:
                lines.append(tokens)
    if not lines:
        raise SystemExit(f"no text found under {source}: pass --text-dir")
    splits = {"train": [], "valid": [], "test": []}
    for start in range(0, len(lines), 100):
        block = start // 100 % 20
        split = "valid" if block == 0 else "test" if block == 1 else "train"
        splits[split].extend(lines[start:start + 100])
    counts = collections.Counter(t for line in splits["train"] for t in line)
    known = {t for t, n in counts.items() if n >= min_count}
    target.mkdir(parents=True, exist_ok=True)
    for split, split_lines in splits.items():
        text = "".join(" ".join(t if t in known else "<unk>" for t in line) + "\n"
                       for line in split_lines)
        (target / f"{split}.txt").write_text(text, encoding="utf-8")
    return target


def flags(config: Config) -> list[str]:
    """The flags that turn the rule's base preset into ``config``."""
    base = preset_config(BUDGET_RULE["base"])
    out = ["--preset", BUDGET_RULE["base"]]
    for field in fields(Config):
        value = getattr(config, field.name)
        if value == getattr(base, field.name):
            continue
        flag = cli_flag(field.name)
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            out += [flag, *map(str, value)]
        else:
            out += [flag, "none" if value is None else str(value)]
    return out


def plan(corpora: dict[str, Path], budgets: list[float], same_size: bool, out: Path):
    """(run directory, data directory, config) for every run of the study."""
    runs = []
    for name, data_dir in corpora.items():
        try:
            vocab = len(Corpus.load(data_dir).vocab)
        except DataError as error:
            raise SystemExit(f"{name}: {error}; or pass --ptb-dir") from None
        for minutes in budgets:
            full = budget_config(minutes, vocab, softmax="full")
            configs = {"full": full, "adaptive": budget_config(minutes, vocab,
                                                               softmax="adaptive")}
            if same_size:
                configs["adaptive-same-size"] = configs["adaptive"].replace(
                    hidden_size=full.hidden_size)
            for label, config in configs.items():
                runs.append((out / "runs" / f"{name}-{minutes:g}min-{label}", data_dir, config))
    return runs


def command(run: Path, data_dir: Path, config: Config, resume: bool) -> list[str]:
    head = ["python3", "-m", "rnnreg", "train", "--out", str(run), "--no-progress"]
    if resume:
        return head + ["--resume"]
    return head + ["--data-dir", str(data_dir), *flags(config)]


def finished(run: Path) -> bool:
    return RunDir(run).exists() and bool(read_records(run, "final"))


def report(runs, out: Path) -> Path:
    lines = ["# Full vs adaptive softmax at equal time budgets", "",
             "Valid perplexity after each epoch against training minutes; `final` is the last "
             "weights scored as one stream. Runs listed in commands.sh.", "",
             "| run | words | hidden | softmax | epoch | train min | tokens/s | valid ppl |"
             " test ppl |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for run, data_dir, config in runs:
        if not RunDir(run).exists():
            continue
        vocab = len(Corpus.load(data_dir).vocab)
        for record in read_records(run, "epoch", "final"):
            if record.get("event") == "epoch":
                cells = (record["epoch"], f"{record['train_seconds'] / 60:.1f}",
                         f"{record['tokens_per_s']:,.0f}", f"{record['valid_ppl']:.2f}", "")
            elif record.get("event") == "final":
                cells = ("final", f"{record['train_seconds'] / 60:.1f}", "",
                         f"{record['valid_ppl']:.2f}", f"{record['test_ppl']:.2f}")
            else:
                continue
            lines.append(f"| {run.name} | {vocab:,} | {config.hidden_size} | {config.softmax} | "
                         + " | ".join(map(str, cells)) + " |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="study directory")
    parser.add_argument("--minutes", default="12,30", help="budgets (default: %(default)s)")
    parser.add_argument("--ptb-dir", type=Path, default=None,
                        help="PTB directory (default: $RNNREG_DATA, else the user cache)")
    text_dirs = sorted(Path("/usr/share/vim").glob("vim*/doc"))
    parser.add_argument("--text-dir", type=Path, default=text_dirs[-1] if text_dirs else None,
                        help="text files for the larger corpus (default: %(default)s)")
    parser.add_argument("--min-count", type=int, default=2,
                        help="rarer training words become <unk> (default: %(default)s)")
    parser.add_argument("--same-size", action="store_true",
                        help="also the adaptive softmax at the full softmax's hidden size")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the corpora and write commands.sh, train nothing")
    parser.add_argument("--report-only", action="store_true", help="only rewrite report.md")
    args = parser.parse_args(argv)
    try:
        args.minutes = [float(m) for m in args.minutes.split(",") if m.strip()]
    except ValueError:
        parser.error(f"--minutes takes comma-separated numbers, got {args.minutes!r}")
    if not args.minutes or min(args.minutes) <= 0:
        parser.error("--minutes needs budgets > 0")
    if args.text_dir is None or not args.text_dir.is_dir():
        parser.error("no text directory for the larger corpus: pass --text-dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    corpora = {"ptb": locate_corpus(args.ptb_dir).path,
               "vimdoc": build_text_corpus(args.text_dir, args.out / "corpora" / "vimdoc",
                                           args.min_count)}
    runs = plan(corpora, args.minutes, args.same_size, args.out)
    script = ["#!/usr/bin/env bash", "set -euo pipefail"]
    script += [shlex.join(command(*run, resume=False)) for run in runs]
    (args.out / "commands.sh").write_text("\n".join(script) + "\n", encoding="utf-8")
    if not (args.dry_run or args.report_only):
        for run, data_dir, config in runs:
            if finished(run):
                continue
            subprocess.run(command(run, data_dir, config, resume=RunDir(run).exists()),
                           check=True)
    print(report(runs, args.out) if not args.dry_run else args.out / "commands.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
