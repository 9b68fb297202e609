"""What a training run prints: the lines at its start, per step and epoch, at a stop, at the end,
and each epoch's progress bar.

Apart from the loop (:mod:`rnnreg.lm.training.loop`) so that the loop reads as windows, steps and
epochs, and the wording of its lines lives in one place. Nothing here decides anything: the
trainer says when to print, and only the writing rank does. Lines go through
``tqdm.write`` so that they never break a live bar.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.distributed import World
from rnnreg.lm.model import count_parameters
from rnnreg.lm.training.state import Progress

__all__ = ["announce_final", "announce_start", "epoch_bar", "epoch_line", "finished_line",
           "saved_line", "show_window", "step_line", "stopped_line", "where", "window_postfix"]


def where(progress: Progress) -> str:
    """Where a checkpoint's progress stands: "after epoch 3", or "in epoch 4, row 120"."""
    if progress.position == 0:
        return f"after epoch {progress.epoch - 1}"
    return f"in epoch {progress.epoch}, row {progress.position}"


def announce_start(run_path: Path, corpus: Corpus, world: World, progress: Progress,
                   model: nn.Module, streams: torch.Tensor, device: torch.device) -> None:
    """The lines a run prints as it (re)starts: size, absolute run directory, corpus notes.

    ``streams`` is this rank's share of the training streams.
    """
    if progress.step == 0:
        ranks = f" x {world.size} processes" if world.distributed else ""
        tqdm.write(f"{count_parameters(model):,} parameters on {device}{ranks}; "
                   f"{streams.numel() * world.size:,} training tokens in "
                   f"{streams.size(1) * world.size} streams; run directory "
                   f"{run_path.resolve()}")
    else:
        tqdm.write(f"resuming {run_path.resolve()} {where(progress)} "
                   f"(step {progress.step})")
    for note in corpus.notes:
        tqdm.write(note)
    tqdm.write(corpus.describe_unknown())


# tqdm's own rate is left out: the speed shown is the step record's, the one metrics.jsonl holds.
_BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens "
               "[{elapsed}<{remaining}{postfix}]")


def epoch_bar(progress: Progress, epochs: int, rows: int, columns: int, show: bool) -> tqdm:
    """The epoch's live bar, in training tokens (``rows`` of ``columns`` streams, over all
    ranks); ``show=False`` gives a silent one."""
    return tqdm(total=rows * columns, initial=progress.position * columns, disable=not show,
                desc=f"epoch {progress.epoch}/{epochs}", unit="tok", unit_scale=True,
                bar_format=_BAR_FORMAT, leave=False, mininterval=0.5)


def show_window(bar: tqdm, tokens: int, record: dict | None) -> None:
    """Advance the epoch's bar past a window of ``tokens``; its postfix is the latest step
    record (``None`` before the first), so the bar and metrics.jsonl never disagree."""
    bar.update(tokens)
    if record is not None:
        bar.set_postfix_str(window_postfix(record), refresh=False)


def window_postfix(record: dict) -> str:
    """A step record as the bar shows it: the perplexity and speed since the record before."""
    return (f"train ppl {record['train_ppl']:.1f}, {record['tokens_per_s']:,.0f} tok/s, "
            f"lr {record['lr']:.3g}")


def saved_line(progress: Progress, rows: int, run_path: Path) -> str:
    """What the last checkpoint holds and where, for the line printed at every stop."""
    return (f"saved {where(progress)} of {rows} "
            f"(step {progress.step}) in {run_path.resolve()}")


def stopped_line(progress: Progress, rows: int, run_path: Path) -> str:
    """The message of the KeyboardInterrupt a requested stop ends with."""
    return f"stopped: {saved_line(progress, rows, run_path)}; continue with `resume=True`"


def finished_line(progress: Progress, run_path: Path) -> str:
    """What a rerun of a finished run says before it scores the run again."""
    return (f"{run_path.resolve()} holds a finished run ({where(progress)}): scoring "
            "it again; raise --epochs or --max-train-minutes to train on, or choose another "
            "--out for a new run")


def step_line(record: dict) -> str:
    return (f"step {record['step']:6d}  epoch {record['epochs_done']:.2f}  "
            f"lr {record['lr']:.4g}  train ppl {record['train_ppl']:8.2f}  "
            f"{record['tokens_per_s']:7.0f} tok/s")


def epoch_line(config: Config, record: dict) -> str:
    # Scored in B streams, the valid perplexity is approximate (each stream starts from a zero
    # state); the final line scores one stream, as the paper does, and so may differ.
    streams = (f" ({config.valid_batch_size} streams, approximate)"
               if config.valid_batch_size > 1 else "")
    # Once the weight average has started, valid scores it, not the weights just trained.
    ema = (f"  (EMA of {record['ema_updates']} steps)" if record.get("ema_updates") else "")
    return (f"epoch {record['epoch']:3d}  lr {record['lr']:.4g}  "
            f"train ppl {record['train_ppl']:8.2f}  valid ppl {record['valid_ppl']:8.2f}"
            f"{streams}{ema}  {record['tokens_per_s']:7.0f} tok/s")


def announce_final(valid, test, progress: Progress, run_path: Path,
                   ema_updates: int | None = None) -> None:
    """The final score's line: last weights (or their EMA over ``ema_updates`` steps), each
    split as one stream (not an epoch line)."""
    tested = ("no test split: test score skipped" if test is None else
              f"test ppl {test.perplexity:.2f}")
    weights = f"the weights' EMA, {ema_updates} steps in" if ema_updates else "last weights"
    tqdm.write(f"final  valid ppl {valid.perplexity:.2f}  {tested}  ({weights}, "
               f"{where(progress)}; each split scored as one stream)")
    tqdm.write(f"run directory {run_path.resolve()}")
