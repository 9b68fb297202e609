"""The one training loop: every preset, strategy and cell trains here.

The recipe is the paper's (Zaremba et al. 2014, section 4.1): plain SGD on the loss summed over
the unrolled steps and averaged over the batch, global gradient-norm clipping, the hidden state
carried across windows (detached), a geometric learning-rate decay, validation each epoch and
the test split scored as one stream at the end. AWD-LSTM's additions (Merity et al. 2018) are
configuration of the same loop: AR/TAR penalties, variable-length windows, NT-ASGD.

A run directory holds the config, the vocabulary, metrics (JSON lines), TensorBoard scalars
and checkpoints: ``last`` (weights, optimizer, RNG states, position in the epoch, carried hidden
state) written atomically each epoch and every few minutes, and ``best`` (the weights of the
best validation epoch). ``last`` is written first, being what ``--resume`` needs; ``best`` is then
a hard link to it when they hold the same weights. A resumed run's metrics and TensorBoard
history are cut back to its checkpoint, so they never hold an epoch twice. Everything before
the first step (locking, checking, creating or resuming the run) is :mod:`rnnreg.lm.training.start`;
what a checkpoint holds (and restores), :mod:`rnnreg.lm.training.state`; when checkpoints are
written and how a resume goes on, :mod:`rnnreg.lm.training.resume`; the lines the loop prints,
:mod:`rnnreg.lm.training.console`.

Launched by ``torchrun``, the same loop trains data-parallel (:mod:`rnnreg.lm.distributed`): each
rank owns ``B / world size`` of the streams, gradients are averaged by DDP, and every number
that steers the loop (losses, time, stop and checkpoint decisions) is agreed between ranks, so
the run follows the single-process run step for step. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from rnnreg.errors import RnnregError
from rnnreg.lm import distributed
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus, batchify, shard_streams, window_at
from rnnreg.lm.distributed import World, resolve_device
from rnnreg.lm.evaluation import perplexity, score_stream
from rnnreg.lm.model import LanguageModel, count_parameters, map_state
from rnnreg.lm.rundir.files import WriteError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import Logbook, strict
from rnnreg.lm.training import console
from rnnreg.lm.training.asgd import NTASGD
from rnnreg.lm.training.loss import activation_penalties, summed_loss
from rnnreg.lm.training.resume import Checkpoints, StopRequests
from rnnreg.lm.training.start import Start, after_write_error, start_run
from rnnreg.lm.training.state import Progress, seed_everything
from rnnreg.nn.engines import engine_for

__all__ = ["TrainingDiverged", "train"]


class TrainingDiverged(RnnregError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched. A user
    error (the settings diverge), and a RuntimeError as it always was."""


def train(config: Config | None, out: str | Path, *, data_dir: str | Path | None = None,
          resume: bool = False, download: bool = True, progress: bool = True,
          verbose: bool = True, on_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) the run in ``out``; returns the final summary also written to metrics.

    ``resume=True`` continues the run in ``out`` where it stopped, so one call (and one command
    line) serves the first launch and every restart: with no run in ``out`` yet it starts one.
    Nothing passed is ignored: ``config`` must equal the saved config except that ``epochs``
    and ``max_train_minutes`` may be raised to extend the run and the operational settings
    (checkpoint cadence, logging: :func:`rnnreg.lm.config.on_resume`) may change, both recorded
    in the run (``config=None`` takes the saved one), and ``data_dir`` (default: the corpus
    recorded in the run) must hold the same files, by MD5, as when the run was trained.
    ``download`` fetches PTB into the cache when no corpus is given anywhere (no ``data_dir``,
    no ``$RNNREG_DATA``) and the cache has none.

    ``progress`` shows a live bar per epoch; ``verbose`` prints one line per epoch.
    ``on_step`` is called with the global step after every optimizer step (progress hooks and
    tests); it must not touch the model.

    Under ``torchrun`` every rank calls this with the same arguments (see
    :mod:`rnnreg.lm.distributed`); only rank 0 needs ``out``, and every rank ``data_dir``.
    """
    run = RunDir(out)
    with distributed.launch() as world, contextlib.ExitStack() as held:
        start = start_run(run, held, world, config, data_dir, resume=resume,
                          download=download, show_progress=progress, verbose=verbose)
        trainer = _Trainer(start, run, world, progress, on_step, verbose)
        try:
            return trainer.fit()
        except WriteError as error:
            raise error.advise(after_write_error(error, trainer.saved_step)) from error
        finally:
            # Its DDP wrapper holds the process group: release it before launch() tears the
            # group down, the order torch.distributed asks for at shutdown.
            del trainer


class _Trainer:
    """The loop of one run: windows -> steps -> epochs, checkpoints and the final score."""

    def __init__(self, start: Start, run: RunDir, world: World, show_progress: bool,
                 on_step: Callable[[int], None] | None, verbose: bool) -> None:
        """The trainer of the run :func:`start_run` opened, restored from its checkpoint if
        it has one."""
        config, corpus, state = start.config, start.corpus, start.checkpoint
        self.config, self.corpus, self.run, self.world = config, corpus, run, world
        self.show_progress, self.on_step = show_progress and world.is_main, on_step
        self.verbose = verbose and world.is_main
        self.device = world.device(resolve_device(config.device))
        self.streams = _training_streams(config, corpus, world).to(self.device)
        self.rows = self.streams.size(0) - 1  # an epoch's inputs; the last row is only a target
        self.model, self.trained = _seeded_model(config, len(corpus.vocab), world, self.device)
        _build_loops(self.model)
        self.progress = Progress() if state is None else state.progress
        # Built for where the run stands: NT-ASGD's averaging phase has its own optimizer.
        self.optim = NTASGD(self.model, config, averaging=self.progress.averaging)
        # The recurrent state carried from window to window; the generators continue too.
        self.hidden = (None if state is None
                       else state.restore_into(self.model, self.optim, world, self.device))
        self._unsettled: list[_Window] = []  # trained windows whose losses are not read yet
        self.logbook = Logbook(run, enabled=world.is_main, log_every=config.log_every)
        self.checkpoints = Checkpoints(run, world, config, self.logbook, self.verbose)
        if state is not None:
            self.checkpoints.resumed(self.progress, self.optim)
        elif start.start_over:
            self.checkpoints.start_over()

    @property
    def saved_step(self) -> int | None:
        """The step of the checkpoint `last` on disk, if any: what a failed write leaves."""
        return self.checkpoints.saved_step

    def save(self) -> None:
        """Checkpoint the run as it stands into `last`; every rank must take part.

        The windows not yet read are settled first: a diverged one raises before it is saved.
        """
        self._settle()
        self.checkpoints.save(self.model, self.optim, self.progress, self.hidden)

    def fit(self) -> dict:
        self.checkpoints.start_clock()
        if not self.progress.finished:
            if self.verbose:
                console.announce_start(self.run.path, self.corpus, self.world, self.progress,
                                       self.model, self.streams, self.device)
            with StopRequests() as self._stop:
                try:
                    self._epochs()
                except TrainingDiverged:
                    self.logbook.curve()  # the curve up to the last good step explains it
                    raise
            self.progress.finished = True
            self.save()
            if self.verbose and self.progress.epoch <= self.config.epochs:
                tqdm.write(f"time budget of {self.config.max_train_minutes:g} min reached: "
                           f"{console.saved_line(self.progress, self.rows, self.run.path)}")
        elif self.verbose:
            tqdm.write(console.finished_line(self.progress, self.run.path))
        return self.world.from_main(self._score_final)

    def _epochs(self) -> None:
        epochs, minutes, progress = self.config.epochs, self.config.max_train_minutes, self.progress
        while progress.epoch <= epochs and not progress.out_of_time(minutes):
            self._train_epoch()
            if progress.position < self.rows:
                break  # stopped by the time budget mid-epoch
            self._end_epoch()

    def _train_epoch(self) -> None:
        self.trained.train()
        bar = console.epoch_bar(self.progress, self.config.epochs, self.rows,
                                self.streams.size(1) * self.world.size, self.show_progress)
        try:  # the bar is closed first, so the lines printed at a stop start on their own line
            self._windows(bar, self.rows)
        finally:
            bar.close()

    def _windows(self, bar, rows: int) -> None:
        config, progress, world = self.config, self.progress, self.world
        columns = self.streams.size(1) * world.size  # tokens per row, over all ranks
        due, print_steps = self.checkpoints.due, self.verbose and not self.show_progress
        while progress.position < rows and not progress.out_of_time(config.max_train_minutes):
            done = _fraction_done(config, progress, rows)
            lr = progress.lr = config.lr_at(progress.epoch, done)
            started = time.perf_counter()
            length = _window_length(config, rows - progress.position)
            self._step(progress.position, length, lr)
            self.optim.after_step(done)
            tokens = length * columns
            _count_window(progress, length, tokens)
            # Decided from what every rank agrees on (the step, the training time so far), so
            # all ranks settle together; inside the timed window, so on a GPU the time the
            # device still owed is counted.
            log = self.logbook.due(progress.step, progress.train_seconds)
            if log or progress.position >= rows:
                self._settle()
            elapsed = time.perf_counter() - started
            if self.on_step is not None:
                self.on_step(progress.step)
            # Every rank must take the same branch below, or some would wait forever for the
            # others at the next collective: a stop asked of any rank stops all, a checkpoint
            # due on any rank is due on all, and the slowest rank's time is the step's time
            # (it is what the time budget counts).
            elapsed, stop, save = world.max(elapsed, self._stop.requested, due(progress.step))
            progress.epoch_seconds += elapsed
            progress.train_seconds += elapsed
            logged = self.logbook.window(_window_record(progress, rows, lr), tokens, elapsed,
                                         due=log)
            if logged and print_steps:  # a log needs lines, no bar
                tqdm.write(console.step_line(logged))
            console.show_window(bar, tokens, self.logbook.latest)
            if stop:
                self.save()
                self.logbook.curve()
                raise KeyboardInterrupt(console.stopped_line(progress, rows, self.run.path))
            if save:
                self.save()

    def _step(self, position: int, length: int, lr: float) -> None:
        """One truncated-BPTT window; its loss and gradient norm wait on the device, unread,
        until :meth:`_settle`.

        Each rank's loss is the paper's loss over its own columns: summed over steps, averaged
        over its B/N columns. DDP averages the ranks' gradients, and the mean over N ranks of
        per-rank means over B/N columns is the mean over all B columns: the gradient of the
        single-process loss, with no rescaling. The AR/TAR penalties are means too, so the same
        holds for them. Clipping then sees that gradient, identical on every rank.
        """
        config, optimizer = self.config, self.optim.optimizer
        inputs, targets = window_at(self.streams, position, length)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=config.precision == "bfloat16"):
            out = self.trained(inputs, self.hidden, targets=targets)
        loss = summed_loss(out.scores.float(), targets)
        self._unsettled.append(_Window(self.progress.epoch, self.progress.step + 1, lr,
                                       targets.size(1), targets.numel(), loss.detach()))
        loss = loss + activation_penalties(out, config, length)
        # AWD scales the step with the window length so short windows do not dominate.
        scale = length / config.bptt if config.variable_bptt else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._unsettled[-1].norm = nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             config.clip_norm)
        optimizer.step()
        # Detached (truncated BPTT carries values, not gradients) and float32 whatever the
        # forward's precision: checkpoints and evaluation expect it.
        self.hidden = map_state(out.state, lambda s: s.detach().float())

    def _settle(self) -> None:
        """Read the losses and gradient norms of the windows trained since the last settle
        (one copy from the device), check them, and add them to the epoch's and the log's sums.

        Reading a number off a GPU waits for all the work queued before it, so the loop reads
        only here: at log points, at the end of each epoch and before every checkpoint, never
        per window. Divergence is therefore caught there, not at the window it happened in;
        the error still names that window, and nothing is checkpointed before the check, so
        the last checkpoint is always a good one. Each window's NLL is its float32 loss times
        its columns, summed over ranks and added in window order in float64: the sums a
        per-window read would give.
        """
        windows, self._unsettled = self._unsettled, []
        if not windows:
            return
        losses = torch.stack([window.loss for window in windows]).tolist()
        norms = torch.stack([window.norm for window in windows]).tolist()
        # Summed over ranks before the checks, so every rank judges the same numbers.
        nlls = self.world.sum(*(loss * window.columns for loss, window in zip(losses, windows)))
        for window, nll, norm in zip(windows, nlls, norms):
            # A loss whose perplexity overflows float64 has diverged as surely as a NaN one;
            # a gradient norm that is not finite has spoiled the weights of that step.
            _check_finite("loss", nll, window, self.run)
            _check_finite("perplexity", perplexity(nll, window.tokens * self.world.size),
                          window, self.run)
            _check_finite("gradient norm", norm, window, self.run)
            self.progress.epoch_nll += nll
        self.logbook.losses(nlls)

    def _end_epoch(self) -> None:
        progress, config = self.progress, self.config
        # Scored on rank 0 and shared: every rank then takes NT-ASGD's decision on one number.
        valid = self.world.from_main(lambda: self._score(self._held_out("valid"),
                                                         config.valid_batch_size))
        record = _epoch_record(progress, valid.perplexity, _ema_updates(self.optim))
        self.logbook.epoch(record)
        improved = _judge_epoch(progress, self.optim, valid.perplexity)
        if self.verbose:
            tqdm.write(console.epoch_line(config, record))
        _next_epoch(progress)
        self.hidden = None  # each epoch starts the streams from their beginning
        self.save()
        if improved and self.world.is_main:
            self.checkpoints.save_best(self.optim)

    def _held_out(self, split: str) -> torch.Tensor:
        """The valid or test ids the run scores: the first ``eval_tokens`` of them, or all."""
        ids = getattr(self.corpus, split)
        return ids[:self.config.eval_tokens] if self.config.eval_tokens else ids

    def _score(self, ids, batch_size: int = 1):
        with self.optim.evaluated_state_loaded():
            return score_stream(self.model, ids, bptt=self.config.eval_bptt,
                                batch_size=batch_size)

    def _score_final(self) -> dict:
        """The final record, scored and written by rank 0; every rank returns it.

        Both splits are scored as one stream with the last weights (their average, NT-ASGD's or
        the EMA's, once it started), which the line printed says, so it can be told apart from
        the epoch lines.
        """
        self.model.load_state_dict(self.optim.evaluated_state())
        valid = self._score(self._held_out("valid"))
        test = None if self.corpus.test is None else self._score(self._held_out("test"))
        summary = _final_record(self.config, self.progress, valid, test, self.model,
                                _ema_updates(self.optim))
        self.logbook.final(summary, self.progress.epoch - 1)
        self.logbook.curve()
        if self.verbose:
            console.announce_final(valid, test, self.progress, self.run.path,
                                   _ema_updates(self.optim))
        return strict(summary)


# --- the loop's parts that need no trainer: its setup, each window, each epoch, the end ---


def _training_streams(config: Config, corpus: Corpus, world: World) -> torch.Tensor:
    """This rank's columns of the training streams (rows: time, columns: streams)."""
    train_ids = corpus.train[:config.train_tokens] if config.train_tokens else corpus.train
    return shard_streams(batchify(train_ids, config.batch_size), world.rank, world.size)


def _seeded_model(config: Config, vocab_size: int, world: World,
                  device: torch.device) -> tuple[LanguageModel, nn.Module]:
    """The model and the module that trains it (DDP's wrapper under torchrun)."""
    seed_everything(config.seed)
    model = LanguageModel(vocab_size, config).to(device)
    if world.distributed:
        # Same weights on every rank (the common seed above), but each rank's columns need
        # their own dropout masks: reseed only torch, because Python's generator draws the
        # variable window lengths, which every rank must agree on.
        torch.manual_seed(config.seed + world.rank)
    return model, world.wrap(model)


def _build_loops(model: LanguageModel) -> None:
    """Set up the own recurrence's engine now, if the model runs it, so that its set-up (the
    C++ build on a CPU, tens of seconds once per machine; importing Triton on a GPU) is not
    counted as training time. Asked in training mode, which covers evaluation: only zoneout
    runs the own loop there, and it does in training too."""
    engine_for(model.rnn)


def _fraction_done(config: Config, progress: Progress, rows: int) -> float:
    """How much of the run is behind: by epochs, or by the time budget if that binds first."""
    by_tokens = ((progress.epoch - 1) * rows + progress.position) / (config.epochs * rows)
    limit = config.max_train_minutes * 60
    return max(by_tokens, progress.train_seconds / limit if limit else 0.0)


def _window_length(config: Config, remaining: int) -> int:
    """Fixed bptt, or AWD's variable length: bptt (95%) or bptt/2, jittered (sec. 4.1)."""
    if not config.variable_bptt:
        return min(config.bptt, remaining)
    base = config.bptt if random.random() < 0.95 else config.bptt / 2
    return max(1, min(int(random.gauss(base, 5)), remaining, config.bptt + 20))


@dataclass
class _Window:
    """A trained window as :meth:`_Trainer._settle` needs it: where it was, and its loss and
    gradient norm still on the device."""

    epoch: int
    step: int                        # the global step this window took (1-based)
    lr: float
    columns: int                     # this rank's streams: the loss is averaged over them
    tokens: int                      # this rank's targets
    loss: torch.Tensor
    norm: torch.Tensor | None = None


def _check_finite(what: str, value: float, window: _Window, run: RunDir) -> None:
    """Stop at a number that is not finite, before it reaches `last`."""
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{what} became {value} at epoch {window.epoch}, step {window.step} "
            f"(lr {window.lr:.3g}); the last good checkpoint in {run.checkpoint_dir} is "
            "intact. Lower `lr` or `clip_norm`, then resume or restart.")


def _count_window(progress: Progress, length: int, tokens: int) -> None:
    """Move past a trained window (its loss is added when settled, its time once the ranks
    agree on it)."""
    progress.position += length
    progress.step += 1
    progress.epoch_tokens += tokens


def _window_record(progress: Progress, rows: int, lr: float) -> dict:
    """Where a window left the run, for the logbook's step records."""
    return {"epoch": progress.epoch, "step": progress.step,
            "epochs_done": progress.epoch - 1 + progress.position / rows, "lr": lr,
            "train_seconds": progress.train_seconds}


def _epoch_record(progress: Progress, valid_ppl: float, ema_updates: int | None) -> dict:
    """The record of the epoch just trained, before it is counted as done; ``ema_updates``:
    the steps the weight average has taken in (None: no EMA), 0 while it has not started."""
    return {
        "epoch": progress.epoch, "lr": progress.lr,
        "train_ppl": perplexity(progress.epoch_nll, progress.epoch_tokens),
        "valid_ppl": valid_ppl,
        "tokens_per_s": progress.epoch_tokens / max(progress.epoch_seconds, 1e-9),
        "epoch_seconds": progress.epoch_seconds, "train_seconds": progress.train_seconds,
        "step": progress.step, "averaging": progress.averaging, "ema_updates": ema_updates,
    }


def _ema_updates(optim: NTASGD) -> int | None:
    return None if optim.ema is None else optim.ema.updates


def _judge_epoch(progress: Progress, optim: NTASGD, valid_ppl: float) -> bool:
    """Take in the epoch's validation score: a new best (then True: `best` is due) and
    NT-ASGD's non-monotonic trigger."""
    improved = valid_ppl < progress.best_valid
    if improved:
        progress.best_valid, progress.best_epoch = valid_ppl, progress.epoch
    progress.averaging = optim.averaging or optim.observe(progress.valid_history, valid_ppl)
    return improved


def _next_epoch(progress: Progress) -> None:
    """Count the epoch as done: the next one starts at row 0 with its sums at zero."""
    progress.epoch += 1
    progress.position = 0
    progress.epoch_nll, progress.epoch_tokens, progress.epoch_seconds = 0.0, 0, 0.0


def _final_record(config: Config, progress: Progress, valid, test, model: nn.Module,
                  ema_updates: int | None) -> dict:
    """The run's final record: both splits scored as one stream, and how far it trained;
    ``ema_updates`` as in :func:`_epoch_record` (the scores are the average's when > 0)."""
    return {
        "event": "final", "epochs_completed": progress.epoch - 1,
        "complete": progress.epoch > config.epochs,
        "valid_ppl": valid.perplexity,
        "test_ppl": None if test is None else test.perplexity,
        "best_valid_ppl": progress.best_valid, "train_seconds": progress.train_seconds,
        "test_seconds": None if test is None else test.seconds,
        "parameters": count_parameters(model), "ema_updates": ema_updates,
    }
