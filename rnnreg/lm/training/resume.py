"""When the trainer writes its checkpoints, and how a run goes on from one.

``last`` holds a whole :class:`~rnnreg.lm.training.state.TrainingState` (what a resume needs)
and is written at the end of every epoch, every few minutes or steps, and at a stop: Ctrl-C or
SIGTERM is a request the loop honours at the next window boundary, so that the checkpoint
matches the position it records. ``best`` holds the weights of the best validation epoch,
written after ``last`` (a hard link to it while they hold the same weights). Going on from a
checkpoint also cuts the run's history back to it, and a resume that found no checkpoint clears
what an earlier attempt left. A resume continues with the saved config, raised or changed only
where :func:`resumed_config` allows.

What a checkpoint holds is :mod:`rnnreg.lm.training.state`'s alone; this module decides when
and under which name it is written, which needs the run directory, the logbook, the optimizer
and the ranks.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time

from tqdm.auto import tqdm

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config, on_resume
from rnnreg.lm.distributed import World
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import Logbook
from rnnreg.lm.training.asgd import NTASGD
from rnnreg.lm.training.state import Progress, TrainingState

__all__ = ["EXTENDABLE", "OPERATIONAL", "Checkpoints", "StopRequests", "changed_settings",
           "resumed_config"]

# The fields a resume may raise to extend a run, and those it may change freely (how the run
# is saved and logged); every other field must equal the saved one (Config's field metadata).
EXTENDABLE = on_resume("raise")
OPERATIONAL = on_resume("change")


def resumed_config(saved: Config, wanted: Config) -> Config:
    """The config a resume continues with: ``saved``, with ``epochs``/``max_train_minutes``
    raised to ``wanted``'s and the operational settings (checkpoint cadence, logging) taken
    from ``wanted``.

    Rerunning the command that started a run (with ``--resume``) must be accepted, so equal
    settings are fine; a setting that defines the run and differs would train a different model
    under the old name, so it is refused, every difference named in one line.
    """
    differences = []
    for config_field in dataclasses.fields(Config):
        name = config_field.name
        have, want = getattr(saved, name), getattr(wanted, name)
        if (have == want or name in OPERATIONAL
                or (name in EXTENDABLE and _raised(name, have, want))):
            continue
        note = " (it may only be raised)" if name in EXTENDABLE else ""
        differences.append(f"`{name}`: run has {_shown(have)}, "
                           f"command says {_shown(want)}{note}")
    if differences:
        raise RnnregError("the run was started with other settings: " + "; ".join(differences)
                          + " (a resumed run keeps them; use another `out` for a new run)")
    return saved.replace(**{name: getattr(wanted, name) for name in EXTENDABLE + OPERATIONAL})


def changed_settings(saved: Config, resumed: Config) -> dict[str, dict]:
    """What a resume changed, field by field (``{"from": old, "to": new}``), for the run's
    records."""
    return {name: {"from": getattr(saved, name), "to": getattr(resumed, name)}
            for name in EXTENDABLE + OPERATIONAL
            if getattr(saved, name) != getattr(resumed, name)}


def _raised(name: str, have: float, want: float) -> bool:
    if name == "max_train_minutes":  # 0 is no limit: the highest of all
        return want == 0 or (have != 0 and want > have)
    return want > have


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)



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
        """Checkpoint everything a resume needs into ``last``; every rank must take part."""
        state = TrainingState.capture(model, optim, progress, hidden, self.world)
        if self.world.is_main:
            state.save(self.run, "last")
        self.saved_step = progress.step
        self._last_save = time.monotonic()

    def save_best(self, optim: NTASGD) -> None:
        """Write `best` after `last`: as a link to it while the weights evaluated are the
        iterates themselves, in full once NT-ASGD or the EMA evaluates an average instead."""
        if optim.averaged:
            TrainingState(model=optim.evaluated_state()).save(self.run, "best")
        else:
            self.run.copy_checkpoint("last", "best")

    def resumed(self, progress: Progress, optim: NTASGD) -> None:
        """Continue from a restored checkpoint at ``progress``: a finished run whose budget
        was raised has more to do, the history is cut back to the checkpoint, and a ``best``
        a kill left one epoch behind is written again."""
        self.saved_step = progress.step
        # Raised epochs or time budget: a finished run has more to do.
        if (progress.finished and progress.epoch <= self.config.epochs
                and not progress.out_of_time(self.config.max_train_minutes)):
            progress.finished = False
        dropped = self.logbook.rewind(progress.epoch, progress.step, progress.finished,
                                     progress.train_seconds)
        if dropped and self.verbose:
            tqdm.write(f"resuming at step {progress.step} (epoch {progress.epoch}): dropped "
                       f"{dropped} metrics event(s) logged after that checkpoint")
        # A kill between the end-of-epoch `last` and its `best` leaves `best` one epoch behind.
        if (self.world.is_main and not progress.finished and progress.position == 0
                and progress.best_epoch > 0 and progress.best_epoch == progress.epoch - 1):
            self.save_best(optim)

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
