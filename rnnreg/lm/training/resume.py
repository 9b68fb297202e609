"""The trainer's checkpoints: when ``last`` is written, what goes to ``last`` and ``best``, and
what a resume takes back from them.

``last`` holds everything a resume needs (weights, optimizer, RNG states, the position in the
epoch, the carried hidden state) and is written at the end of every epoch, every few minutes
or steps, and at a stop: Ctrl-C or SIGTERM is a request the loop honours at the next window
boundary, so that the checkpoint matches the position it records. ``best`` holds the weights of
the best validation epoch, written after ``last`` (a hard link to it while they hold the same
weights). Restoring also cuts the run's history back to the checkpoint, and a resume that found
no checkpoint clears what an earlier attempt left.

Not part of :mod:`rnnreg.lm.rundir.checkpoint`: that module is the file format and the values stored
(:class:`Progress`, the RNG states), below the run directory and the logbook, which import it.
Writing and restoring a run's checkpoints needs the run directory, the logbook, the optimizer
and the ranks, so it sits above them, beside the loop of :mod:`rnnreg.lm.training.loop` that calls
it, and the loop keeps only the calls.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
from tqdm.auto import tqdm

from rnnreg.lm.config import Config
from rnnreg.lm.distributed import World
from rnnreg.lm.model import LanguageModel, map_state
from rnnreg.lm.rundir.checkpoint import Progress, rng_per_rank, rng_states, set_rng_states
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import Logbook
from rnnreg.lm.training.asgd import NTASGD

__all__ = ["Checkpoints", "StopRequests"]


class Checkpoints:
    """A run's ``last`` and ``best`` as the trainer writes and restores them; every rank holds
    one and takes part in each save (rank 0 alone writes)."""

    def __init__(self, run: RunDir, world: World, config: Config, logbook: Logbook,
                 verbose: bool) -> None:
        self.run, self.world, self.config, self.logbook = run, world, config, logbook
        self.verbose = verbose
        self.saved_step: int | None = None  # step of the checkpoint `last` on disk, if any
        self._last_save = time.monotonic()

    def start_clock(self) -> None:
        """Count the minutes to the next checkpoint from now: training starts."""
        self._last_save = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether ``last`` is due after ``step``: every ``checkpoint_steps`` steps, or once
        ``checkpoint_minutes`` have passed since the last save."""
        config = self.config
        if config.checkpoint_steps and step % config.checkpoint_steps == 0:
            return True
        minutes = (time.monotonic() - self._last_save) / 60
        return config.checkpoint_minutes > 0 and minutes >= config.checkpoint_minutes

    def save(self, model: LanguageModel, optim: NTASGD, progress: Progress, hidden) -> None:
        """Checkpoint everything a resume needs; every rank must take part.

        The carried state is stored as the full batch and the RNG states as a list indexed by
        rank, so the file is the same shape whichever rank count wrote it.
        """
        tree = {
            "model": model.state_dict(),
            "optimizer": optim.optimizer.state_dict(),
            "progress": progress.__dict__.copy(),
            "hidden": self.world.gather_columns(hidden),
            "rng": self.world.gather_objects(rng_states()),
        }
        if self.world.is_main:
            self.run.save_checkpoint("last", tree)
        self.saved_step = progress.step
        self._last_save = time.monotonic()

    def save_best(self, optim: NTASGD) -> None:
        """Write `best` after `last`: as a link to it while the weights evaluated are the
        iterates themselves, in full once NT-ASGD evaluates their average instead."""
        if optim.averaging:
            self.run.save_checkpoint("best", {"model": optim.eval_weights()})
        else:
            self.run.copy_checkpoint("last", "best")

    def restore(self, tree: dict, model: LanguageModel,
                device: torch.device) -> tuple[Progress, NTASGD, object]:
        """Load the checkpoint ``tree`` into ``model`` and the random generators; returns the
        progress, the optimizer and the carried hidden state to continue from."""
        progress = Progress(**tree["progress"])
        model.load_state_dict(tree["model"])
        optim = NTASGD(model, self.config, averaging=progress.averaging)
        optim.optimizer.load_state_dict(tree["optimizer"])
        hidden = self.world.shard_columns(tree["hidden"])
        hidden = map_state(hidden, lambda h: h.to(device))
        set_rng_states(rng_per_rank(tree["rng"])[self.world.rank])
        self.saved_step = progress.step
        # Raised epochs or time budget: a finished run has more to do.
        if (progress.finished and progress.epoch <= self.config.epochs
                and not progress.out_of_time(self.config.max_train_minutes)):
            progress.finished = False
        dropped = self.logbook.rewind(progress)
        if dropped and self.verbose:
            tqdm.write(f"resuming at step {progress.step} (epoch {progress.epoch}): dropped "
                       f"{dropped} metrics event(s) logged after that checkpoint")
        # A kill between the end-of-epoch `last` and its `best` leaves `best` one epoch behind.
        if (self.world.is_main and not progress.finished and progress.position == 0
                and progress.best_epoch > 0 and progress.best_epoch == progress.epoch - 1):
            self.save_best(optim)
        return progress, optim, hidden

    def start_over(self) -> None:
        """Resume found a config but no checkpoint: train from the start, with a clean history.

        Whatever an earlier attempt logged (metrics, TensorBoard, a `best` checkpoint) describes
        training that is now lost, and would otherwise be mixed with the new run's.
        """
        if not self.world.is_main:
            return
        stale = self.logbook.clear()
        if self.run.has_checkpoint("best"):
            self.run.remove_checkpoint("best")
            stale.append("the best checkpoint")
        if self.verbose:
            cleared = f"; cleared {', '.join(stale)} of an earlier attempt" if stale else ""
            tqdm.write(f"{self.run.path} has no checkpoint to resume: training from the start "
                       f"with its saved config{cleared}")


class StopRequests:
    """Turn Ctrl-C and SIGTERM into a request honoured at the next window boundary.

    Stopping mid-step would checkpoint weights that do not match the saved position; a second
    Ctrl-C still interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
