"""Opening a run: locking, checking, creating or resuming it; everything before the first step.

:func:`start_run` locks the run directory, reads what a resume continues from (config,
vocabulary, checkpoint, the corpus it was trained on), refuses a job the run cannot take, and
loads the corpus; only then does it create the run (or record a resume's raised budget), so a
start that fails leaves the directory as it was, and a directory it made is removed again
(with the parents it made) when anything fails before training wrote into it. It returns what
the trainer starts from and never builds the trainer itself.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import ensure_ptb, locate_corpus, missing_directories, remove_empty
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.distributed import World
from rnnreg.lm.rundir.files import RunDirError, WriteError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.provenance import describe_machine, package_commit
from rnnreg.lm.training.console import where
from rnnreg.lm.training.resume import changed_settings, resumed_config
from rnnreg.lm.training.state import TrainingState

__all__ = ["Start", "UnreadableLast", "after_write_error", "start_run"]


class Start(NamedTuple):
    """What the first step starts from.

    ``checkpoint`` is the ``last`` checkpoint of a resumed run, to restore; ``start_over`` is
    True for a resume of a run that left no checkpoint, which trains from the start with a
    clean history.
    """

    config: Config
    corpus: Corpus
    checkpoint: TrainingState | None
    start_over: bool


def start_run(run: RunDir, held: contextlib.ExitStack, world: World, config: Config | None,
              data_dir, *, resume: bool, download: bool, show_progress: bool,
              verbose: bool) -> Start:
    """Open (or create) the run and load its corpus: everything before the first step."""
    # Rank 0 alone writes, so it alone locks and reads the run; the others get what it read.
    config, vocab, checkpoint, recorded = world.from_main(
        lambda: _open_run(run, held, config, resume, world.size))
    location = locate_corpus(data_dir, None if recorded is None else recorded["data_dir"])
    if download:
        world.from_main(lambda: ensure_ptb(location, show_progress and world.is_main))
    corpus = world.everywhere(lambda: Corpus.load(
        location, config.level, vocab, split_fractions=config.split_fractions,
        max_vocab=config.max_vocab, min_count=config.min_count, recorded=recorded))
    # Only once the data loaded, so a failed start leaves no half-made or half-extended run.
    if vocab is None:
        world.from_main(lambda: _create_run(run, config, corpus, world.size))
        if resume and verbose and world.is_main:  # said only once the data has been read
            tqdm.write(f"no run in {run.path.resolve()} yet: starting a new one")
    else:
        world.from_main(lambda: _record_extension(run, config, checkpoint))
    return Start(config, corpus, checkpoint,
                 start_over=checkpoint is None and vocab is not None)


def _record_extension(run: RunDir, config: Config, checkpoint: TrainingState | None) -> None:
    """A resume that raised the budget or changed how the run is saved or logged: later
    resumes and reports see it in config.json, and metrics.jsonl says from which step on
    (a ``settings`` record at the step of the checkpoint it continues from, which later
    resumes keep)."""
    saved = run.read_config()
    if saved == config:
        return
    run.replace_config(config)
    if checkpoint is not None:  # else the run starts over, with a cleared history
        progress = checkpoint.progress
        run.append_metrics({"event": "settings", "epoch": progress.epoch,
                            "step": progress.step, "changed": changed_settings(saved, config)})


def _lock(run: RunDir, held: contextlib.ExitStack) -> None:
    """Hold the run's lock until ``held`` closes; the directories it makes for the run are
    removed again if the start fails (:func:`_undo_unstarted`)."""
    made = missing_directories(run.path)
    try:
        held.enter_context(run.lock())
    except BaseException:
        remove_empty(made)  # made for a lock that was not taken
        raise
    held.push(_undo_unstarted(run, made))


def _undo_unstarted(run: RunDir, made: list[Path]):
    """An exit callback for the run's ExitStack: if the block fails, remove what this start
    made, so a failed start (no corpus, no network, a bad flag) leaves no folder behind.

    Only ``made``, the directories this call created (deepest first), and only while the run
    holds nothing a start does not write (no checkpoint, no metrics, no plot): a run that
    trained, even briefly, is kept for a rerun to resume. Pushed after the lock is taken, so it
    runs while the lock is still held and no other process can be writing there.
    """
    def on_exit(kind, error, traceback) -> None:
        if kind is not None and made and run.path.is_dir() and run.remove_unstarted():
            remove_empty(made)

    return on_exit


def _open_run(run: RunDir, held: contextlib.ExitStack, config: Config | None, resume: bool,
              world_size: int
              ) -> tuple[Config, Vocabulary | None, TrainingState | None, dict | None]:
    """Lock the run for the rest of training; for a resume, read its config, vocab, checkpoint
    and recorded corpus.

    Also refuses a job the run cannot take, before anything is written.
    """
    try:
        _lock(run, held)
        run.check_writable()
    except WriteError as error:  # refused before any training time is spent
        raise error.advise(f"{error.remedy or 'fix that'}, or choose another `out`") from error
    run.remove_temporaries()  # of writes a killed process left unfinished
    vocab = checkpoint = recorded = None
    if resume and run.exists():
        saved = run.read_config()
        config = saved if config is None else resumed_config(saved, config)
        vocab, recorded = run.read_vocab(), run.read_corpus()
        # With no checkpoint yet, the run restarts from its saved config and vocabulary.
        checkpoint = _read_last(run) if run.has_checkpoint("last") else None
    elif config is None:
        raise RunDirError(f"nothing to resume in {run.path}: no config.json; pass a config "
                          "to start a new run")
    if config.batch_size % world_size:
        raise RnnregError(f"batch size {config.batch_size} is not divisible by world size "
                          f"{world_size}: each process trains B / world size whole streams")
    if checkpoint is not None:
        _check_ranks(run, checkpoint, world_size)
    return config, vocab, checkpoint, recorded


class UnreadableLast(RunDirError):
    """The checkpoint ``last`` of a run being resumed cannot be read.

    ``best`` is the path of the checkpoint ``best`` where that holds a whole training state to
    continue from (None otherwise), and ``best_at`` where it stands ("after epoch 3"): the
    caller can offer to continue from there. Nothing is replaced here, so the damaged file stays
    for the user to inspect, and continuing from ``best`` (which drops the training after it) is
    the user's choice, not a silent fall-back.
    """

    def __init__(self, message: str, last: Path, best: Path | None, best_at: str | None):
        super().__init__(message)
        self.last, self.best, self.best_at = last, best, best_at


def _read_last(run: RunDir) -> TrainingState:
    """The checkpoint ``last``, or :class:`UnreadableLast` saying whether ``best`` can stand in."""
    try:
        return TrainingState.load(run, "last")
    except RunDirError as error:
        best, best_at = _resumable_best(run)
        if best is None:
            advice = ("and no best checkpoint holds a whole training state to continue from: "
                      "train the run again into another directory")
        else:
            advice = (f"the best checkpoint holds the whole training state {best_at}: to "
                      "continue from there, put the damaged file aside, copy the best "
                      "checkpoint in its place and resume")
        raise UnreadableLast(f"{error.message}; {advice}", run.checkpoint_path("last"), best,
                             best_at) from error


def _resumable_best(run: RunDir) -> tuple[Path | None, str | None]:
    """``best``'s path and where it stands, if it is a readable, whole training state (a copy
    of an epoch's ``last``; the averaged weights NT-ASGD or the EMA leave there are not)."""
    try:
        best = TrainingState.load(run, "best") if run.has_checkpoint("best") else None
    except RunDirError:
        return None, None
    if best is None or not best.resumable:
        return None, None
    return run.checkpoint_path("best"), where(best.progress)


def _check_ranks(run: RunDir, checkpoint: TrainingState, world_size: int) -> None:
    """Refuse to resume with another process count than the checkpoint was written by.

    Each rank's dropout stream continues from its own saved state; with another rank count
    there is no such state, and the run would silently stop being reproducible.
    """
    saved = len(checkpoint.rng)  # one generator state per rank
    if saved != world_size:
        raise RnnregError(f"{run.path} was checkpointed by {saved} process(es); resume it with "
                          f"the same number (torchrun --nproc-per-node {saved}), "
                          f"not {world_size}")


def _create_run(run: RunDir, config: Config, corpus: Corpus, world_size: int) -> None:
    run.create(exist_ok=False)  # refuses a directory that already holds a run
    run.write_vocab(corpus.vocab)
    run.write_config(config, corpus=corpus.source, commit=package_commit(),
                     machine=describe_machine(), processes=world_size,
                     started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def after_write_error(error: WriteError, saved_step: int | None) -> str:
    """What a failed write during training leaves and how to go on, for its one-line message."""
    fix = error.remedy or "fix the cause"
    if saved_step is None:
        return (f"no checkpoint was saved yet: {fix}, then rerun with `resume=True` "
                "(it starts over)")
    return (f"the last checkpoint (step {saved_step}) is intact: {fix}, then continue with "
            "`resume=True`")
