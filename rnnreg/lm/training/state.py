"""A run's training state: the one owner of what a checkpoint holds.

A checkpoint is a :class:`TrainingState`. ``last`` holds a whole one (weights, optimizer,
:class:`Progress`, the carried hidden state, the random generators' states, the weight average),
everything a resume needs to draw the same dropout masks and take the same steps as an
uninterrupted run; ``best`` holds either a copy of an epoch's ``last`` or, once NT-ASGD or the
EMA evaluates an average, that average's weights alone. Only this module names the entries of
the file; the file format (a safetensors tree, loaded without executing code) is
:mod:`rnnreg.lm.rundir.checkpoint`, and its name and place the run directory's.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rnnreg.errors import RnnregError
from rnnreg.lm.distributed import World
from rnnreg.lm.model import map_state
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir

__all__ = ["Progress", "TrainingState", "seed_everything"]


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


@dataclass(frozen=True)
class TrainingState:
    """One checkpoint's content. ``model`` is always there; the rest (None in a weights-only
    checkpoint, :attr:`resumable` False) is what training continues from.

    ``hidden`` is the carried recurrent state of the full batch and ``rng`` one generator state
    per rank, so the file has the same shape whichever rank count wrote it; ``ema`` is
    :meth:`~rnnreg.lm.training.averaging.WeightEMA.state` (None before the average started).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict | None = None
    progress: Progress | None = None
    hidden: Any = None
    rng: list[dict] | None = None
    ema: dict | None = None

    @property
    def resumable(self) -> bool:
        """Whether training can continue from it (a ``last``, or a ``best`` copied from one)."""
        return self.progress is not None

    @property
    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        """The weight average the run evaluates, by parameter name, once it started."""
        return None if self.ema is None else self.ema["weights"]

    @property
    def ema_updates(self) -> int:
        """The optimizer steps the weight average took in (0: not started)."""
        return 0 if self.ema is None else int(self.ema["updates"])

    @classmethod
    def capture(cls, model: torch.nn.Module, optim, progress: Progress, hidden,
                world: World) -> TrainingState:
        """The state of a training run as it stands; every rank must take part (the hidden
        state's columns and the generators' states are gathered from all of them)."""
        return cls(model=model.state_dict(), optimizer=optim.optimizer.state_dict(),
                   progress=dataclasses.replace(progress,
                                                valid_history=list(progress.valid_history)),
                   hidden=world.gather_columns(hidden), rng=world.gather_objects(_rng_states()),
                   ema=None if optim.ema is None else optim.ema.state())

    def save(self, run: RunDir, name: str) -> None:
        run.save_checkpoint(name, self._tree())

    @classmethod
    def load(cls, run: RunDir, name: str, device: str | torch.device = "cpu") -> TrainingState:
        """Checkpoint ``name`` of ``run``; a file that lacks what it must hold is a
        :class:`~rnnreg.lm.rundir.files.RunDirError`, like a corrupt one."""
        tree = run.load_checkpoint(name, device)
        try:
            if "progress" not in tree:
                return cls(model=tree["model"])
            return cls(model=tree["model"], optimizer=tree["optimizer"],
                       progress=Progress(**tree["progress"]), hidden=tree["hidden"],
                       rng=tree["rng"], ema=tree.get("ema"))  # older files have no entry
        except (KeyError, TypeError) as error:
            raise RunDirError(f"checkpoint {run.checkpoint_path(name)} lacks an entry or has "
                              f"one of the wrong form ({error!r}); load an earlier checkpoint "
                              "or rerun the training that wrote it") from error

    def restore_into(self, model: torch.nn.Module, optim, world: World, device: torch.device):
        """Load the weights, the optimizer, the weight average and this rank's generators'
        states; returns this rank's columns of the carried hidden state, on ``device``.

        ``optim`` must be built for :attr:`progress` (averaging or not: NT-ASGD's averaging
        phase has another optimizer).
        """
        if not self.resumable:
            raise RnnregError("a weights-only checkpoint holds no training state to resume")
        model.load_state_dict(self.model)
        optim.optimizer.load_state_dict(self.optimizer)
        if optim.ema is not None:
            optim.ema.restore(self.ema, device)
        hidden = map_state(world.shard_columns(self.hidden), lambda h: h.to(device))
        _set_rng_states(self.rng[world.rank])
        return hidden

    def _tree(self) -> dict:
        """The checkpoint's entries, in the order the file has always held them."""
        if not self.resumable:
            return {"model": self.model}
        return {"model": self.model, "optimizer": self.optimizer,
                "progress": dataclasses.asdict(self.progress), "hidden": self.hidden,
                "rng": self.rng, "ema": self.ema}


def seed_everything(seed: int) -> None:
    """Seed every generator a checkpoint saves (torch's seeds CUDA's too)."""
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
