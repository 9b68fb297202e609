"""The trainer's checkpoints: when ``last`` is written, what goes to ``last`` and ``best``, and
what a resume takes back from them: besides the weights, the trainer's :class:`Progress` and the
random generators' states (and their common seed), so that a resumed run draws the same dropout
masks as an uninterrupted one, and the config it continues with (:func:`resumed_config`).

``last`` holds everything a resume needs (weights, optimizer, RNG states, the position in the
epoch, the carried hidden state) and is written at the end of every epoch, every few minutes
or steps, and at a stop: Ctrl-C or SIGTERM is a request the loop honours at the next window
boundary, so that the checkpoint matches the position it records. ``best`` holds the weights of
the best validation epoch, written after ``last`` (a hard link to it while they hold the same
weights). Restoring also cuts the run's history back to the checkpoint, and a resume that found
no checkpoint clears what an earlier attempt left.

Not part of :mod:`rnnreg.lm.rundir.checkpoint`: that module is the file format alone, below the
run directory. Writing and restoring a run's checkpoints needs the run directory, the logbook,
the optimizer and the ranks, so it sits above them, beside the loop of
:mod:`rnnreg.lm.training.loop` that calls it, and the loop keeps only the calls.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config, on_resume
from rnnreg.lm.distributed import World
from rnnreg.lm.model import LanguageModel, map_state
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import Logbook
from rnnreg.lm.training.asgd import NTASGD

__all__ = ["EXTENDABLE", "OPERATIONAL", "Checkpoints", "Progress", "StopRequests",
           "changed_settings", "resumed_config", "seed_everything"]

# The fields a resume may raise to extend a run, and those it may change freely (how the run
# is saved and logged); every other field must equal the saved one (Config's field metadata).
EXTENDABLE = on_resume("raise")
OPERATIONAL = on_resume("change")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resume continues exactly."""

    epoch: int = 1                 # 1-based epoch being trained
    position: int = 0              # first row of the next window in the training streams
    step: int = 0                  # optimizer steps over the whole run
    epoch_nll: float = 0.0         # summed NLL of this epoch's windows so far
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0     # training time spent in this epoch so far
    train_seconds: float = 0.0     # training time over the whole run (evaluation excluded)
    lr: float = 0.0                # learning rate of the latest step (schedules may be per step)
    best_valid: float = math.inf
    best_epoch: int = 0            # the epoch whose weights `best` holds (0: none yet)
    valid_history: list[float] = field(default_factory=list)
    averaging: bool = False        # NT-ASGD has switched to averaging
    finished: bool = False

    def out_of_time(self, max_train_minutes: float) -> bool:
        """Whether the time budget (0: none) is spent; evaluation time does not count."""
        return max_train_minutes > 0 and self.train_seconds >= max_train_minutes * 60


def seed_everything(seed: int) -> None:
    """Seed every generator :func:`_rng_states` saves (torch's seeds CUDA's too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_states() -> dict:
    """Every generator a training step draws from: torch (masks), Python (AWD's window
    lengths), NumPy, and CUDA's when present."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": _numpy_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
        """Checkpoint everything a resume needs; every rank must take part.

        The carried state is stored as the full batch and the RNG states as a list indexed by
        rank, so the file is the same shape whichever rank count wrote it.
        """
        tree = {
            "model": model.state_dict(),
            "optimizer": optim.optimizer.state_dict(),
            "progress": progress.__dict__.copy(),
            "hidden": self.world.gather_columns(hidden),
            "rng": self.world.gather_objects(_rng_states()),
            "ema": None if optim.ema is None else optim.ema.state(),
        }
        if self.world.is_main:
            self.run.save_checkpoint("last", tree)
        self.saved_step = progress.step
        self._last_save = time.monotonic()

    def save_best(self, optim: NTASGD) -> None:
        """Write `best` after `last`: as a link to it while the weights evaluated are the
        iterates themselves, in full once NT-ASGD or the EMA evaluates an average instead."""
        if optim.averaged:
            self.run.save_checkpoint("best", {"model": optim.evaluated_state()})
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
        if optim.ema is not None:
            optim.ema.restore(tree.get("ema"), device)
        hidden = self.world.shard_columns(tree["hidden"])
        hidden = map_state(hidden, lambda h: h.to(device))
        _set_rng_states(tree["rng"][self.world.rank])
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
