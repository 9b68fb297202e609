"""The one training loop: every preset, strategy and cell trains here.

The recipe is the paper's (Zaremba et al. 2014, section 4.1): plain SGD on the loss summed over
the unrolled steps and averaged over the batch, global gradient-norm clipping, the hidden state
carried across windows (detached), a geometric learning-rate decay, validation each epoch and
the test split scored as one stream at the end. AWD-LSTM's additions (Merity et al. 2018) are
configuration of the same loop: AR/TAR penalties, variable-length windows, NT-ASGD.

A run directory holds the config, the vocabulary, metrics (JSON lines), TensorBoard scalars
and checkpoints: ``last`` (weights, optimizer, RNG states, position in the epoch, carried hidden
state) written atomically each epoch and every few minutes, and ``best`` (weights only).

Launched by ``torchrun``, the same loop trains data-parallel (:mod:`rnnreg.lm.distributed`): each
rank owns ``B / world size`` of the streams, gradients are averaged by DDP, and every number
that steers the loop (losses, time, stop and checkpoint decisions) is agreed between ranks, so
the run follows the single-process run step for step. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rnnreg.lm import distributed
from rnnreg.lm.config import Config
from rnnreg.lm.data import Corpus, Vocabulary, batchify, shard_streams
from rnnreg.lm.distributed import World
from rnnreg.lm.evaluation import perplexity, score_stream
from rnnreg.lm.model import LanguageModel, count_parameters, map_state, summed_loss
from rnnreg.lm.rundir import RunDir, RunDirError, atomic_write_text, describe_machine, git_commit

__all__ = ["TrainingDiverged", "load_model", "resolve_device", "train"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


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
    valid_history: list[float] = field(default_factory=list)
    averaging: bool = False        # NT-ASGD has switched to averaging
    finished: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here")
    return device


def train(config: Config, out: str | Path, *, data_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True, verbose: bool = True,
          on_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) the run in ``out``; returns the final summary also written to metrics.

    ``progress`` shows a live bar per epoch; ``verbose`` prints one line per epoch.
    ``on_step`` is called with the global step after every optimizer step (progress hooks and
    tests); it must not touch the model.

    Under ``torchrun`` every rank calls this with the same arguments (see
    :mod:`rnnreg.lm.distributed`); only rank 0 needs ``out``, and every rank ``data_dir``.
    """
    run = RunDir(out)
    with distributed.launch() as world, contextlib.ExitStack() as held:
        # Rank 0 alone writes, so it alone locks and reads the run; the others get what it read.
        config, vocab, checkpoint = world.from_main(
            lambda: _open_run(run, held, config, resume, world.size))
        corpus = world.everywhere(lambda: Corpus.load(data_dir, config.level, vocab))
        if not resume:  # only once the data loaded, so a failed start leaves no half-made run
            world.from_main(lambda: _create_run(run, config, corpus.vocab, world.size))
        trainer = _Trainer(config, corpus, run, world, progress, on_step, verbose)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        try:
            return trainer.fit()
        finally:
            # Its DDP wrapper holds the process group: release it before launch() tears the
            # group down, the order torch.distributed asks for at shutdown.
            del trainer


def _open_run(run: RunDir, held: contextlib.ExitStack, config: Config, resume: bool,
              world_size: int) -> tuple[Config, Vocabulary | None, dict | None]:
    """Lock the run for the rest of training; for a resume, read its config, vocab, checkpoint.

    Also refuses a job the run cannot take, before anything is written.
    """
    held.enter_context(run.lock())
    vocab = checkpoint = None
    if resume:
        if not run.exists():
            raise RunDirError(f"nothing to resume in {run.path}: no config.json; "
                              "start a new run without --resume")
        config, vocab = Config.from_dict(run.read_config()["config"]), _read_vocab(run)
        # With no checkpoint yet, the run restarts from its saved config and vocabulary.
        checkpoint = run.load_checkpoint("last") if run.has_checkpoint("last") else None
    if config.batch_size % world_size:
        raise ValueError(f"batch size {config.batch_size} is not divisible by world size "
                         f"{world_size}: each process trains B / world size whole streams")
    if checkpoint is not None:
        _check_ranks(run, checkpoint, world_size)
    return config, vocab, checkpoint


def _check_ranks(run: RunDir, checkpoint: dict, world_size: int) -> None:
    """Refuse to resume with another process count than the checkpoint was written by.

    Each rank's dropout stream continues from its own saved state; with another rank count
    there is no such state, and the run would silently stop being reproducible.
    """
    saved = len(_rng_per_rank(checkpoint["rng"]))
    if saved != world_size:
        raise ValueError(f"{run.path} was checkpointed by {saved} process(es); resume it with "
                         f"the same number (torchrun --nproc-per-node {saved}), "
                         f"not {world_size}")


def _read_vocab(run: RunDir) -> Vocabulary:
    path = run.path / "vocab.json"
    if not path.exists():
        raise RunDirError(f"{run.path} has no vocab.json; was the run started?")
    return Vocabulary.from_json(json.loads(path.read_text()))


def _create_run(run: RunDir, config: Config, vocab: Vocabulary, world_size: int) -> None:
    if run.exists():
        raise RunDirError(f"{run.path} already holds a run; pass --resume to continue it "
                          "or choose another --out")
    run.create(exist_ok=True)
    atomic_write_text(run.path / "vocab.json", json.dumps(vocab.to_json()))
    run.write_config({"config": config.to_dict(), "commit": git_commit(),
                      "machine": describe_machine(), "processes": world_size,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


class _Trainer:
    def __init__(self, config: Config, corpus: Corpus, run: RunDir, world: World,
                 progress: bool, on_step: Callable[[int], None] | None, verbose: bool) -> None:
        self.config, self.corpus, self.run, self.world = config, corpus, run, world
        self.show_progress, self.on_step = progress and world.is_main, on_step
        self.verbose = verbose and world.is_main
        self.device = world.device(resolve_device(config.device))
        train_ids = corpus.train[:config.train_tokens] if config.train_tokens else corpus.train
        self.streams = shard_streams(batchify(train_ids, config.batch_size), world.rank,
                                     world.size).to(self.device)
        _seed_everything(config.seed)
        self.model = LanguageModel(len(corpus.vocab), config).to(self.device)
        if world.distributed:
            # Same weights on every rank (the common seed above), but each rank's columns need
            # their own dropout masks: reseed only torch, because Python's generator draws the
            # variable window lengths, which every rank must agree on.
            torch.manual_seed(config.seed + world.rank)
        self.trained = world.wrap(self.model)
        self.optimizer = _make_optimizer(self.model, config, averaging=False)
        self.state = Progress()
        self.hidden = None
        self.writer = _tensorboard(run) if world.is_main else None

    # --- checkpoints -----------------------------------------------------------------------

    def checkpoint_tree(self) -> dict:
        """Everything a resume needs, for the whole job: every rank must take part.

        The carried state is stored as the full batch and the RNG states as a list indexed by
        rank, so the file is the same shape whichever rank count wrote it.
        """
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": self.state.__dict__.copy(),
            "hidden": self.world.gather_columns(self.hidden),
            "rng": self.world.gather_objects(_rng_states()),
        }

    def save(self) -> None:
        tree = self.checkpoint_tree()
        if self.world.is_main:
            self.run.save_checkpoint("last", tree)
        self._last_save = time.monotonic()

    def restore(self, tree: dict) -> None:
        self.state = Progress(**tree["progress"])
        self.model.load_state_dict(tree["model"])
        self.optimizer = _make_optimizer(self.model, self.config, self.state.averaging)
        self.optimizer.load_state_dict(tree["optimizer"])
        hidden = self.world.shard_columns(tree["hidden"])
        self.hidden = None if hidden is None else _to_device(hidden, self.device)
        _set_rng_states(_rng_per_rank(tree["rng"])[self.world.rank])
        resumed_epoch = self.state.epoch
        if self.world.is_main:
            self.run.truncate_metrics(lambda r: r.get("epoch", 0) < resumed_epoch
                                      and r.get("event") == "epoch")

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> dict:
        self._last_save = time.monotonic()
        if not self.state.finished:
            self._log_start()
            with _StopRequests() as stop:
                self._stop = stop
                while self.state.epoch <= self.config.epochs and not self._out_of_time():
                    self._train_epoch()
                    if self.state.position < self.streams.size(0) - 1:
                        break  # stopped by the time budget mid-epoch
                    self._end_epoch()
            self.state.finished = True
            self.save()
        return self._final_evaluation()

    def _train_epoch(self) -> None:
        config, state = self.config, self.state
        self.trained.train()
        rows = self.streams.size(0) - 1
        bar = tqdm(total=rows, initial=state.position, disable=not self.show_progress,
                   desc=f"epoch {state.epoch}/{config.epochs}", unit="row", leave=False,
                   mininterval=0.5)
        while state.position < rows and not self._out_of_time():
            lr = state.lr = config.lr_now(state.epoch, self._fraction_done())
            started = time.perf_counter()
            length = self._window_length(rows - state.position)
            nll = self._step(state.position, length, lr)
            elapsed = time.perf_counter() - started
            state.position += length
            state.step += 1
            state.epoch_nll += nll
            state.epoch_tokens += length * self.streams.size(1) * self.world.size
            if self.on_step is not None:
                self.on_step(state.step)
            # Every rank must take the same branch below, or some would wait forever for the
            # others at the next collective: a stop asked of any rank stops all, a checkpoint
            # due on any rank is due on all, and the slowest rank's time is the step's time
            # (it is what the time budget counts).
            elapsed, stop, save = self.world.max(elapsed, self._stop.requested,
                                                 self._checkpoint_due())
            state.epoch_seconds += elapsed
            state.train_seconds += elapsed
            bar.update(length)
            bar.set_postfix(ppl=f"{perplexity(state.epoch_nll, state.epoch_tokens):.1f}",
                            tok_s=f"{state.epoch_tokens / max(state.epoch_seconds, 1e-9):.0f}",
                            lr=f"{lr:.3g}", refresh=False)
            if stop:
                self.save()
                raise KeyboardInterrupt(f"stopped at step {state.step}; checkpoint saved in "
                                        f"{self.run.path}: continue with --resume")
            if save:
                self.save()
        bar.close()

    def _fraction_done(self) -> float:
        """How much of the run is behind: by epochs, or by the time budget if that binds first."""
        config, state = self.config, self.state
        rows = self.streams.size(0) - 1
        by_tokens = ((state.epoch - 1) * rows + state.position) / (config.epochs * rows)
        limit = config.max_train_minutes * 60
        return max(by_tokens, state.train_seconds / limit if limit else 0.0)

    def _window_length(self, remaining: int) -> int:
        """Fixed bptt, or AWD's variable length: bptt (95%) or bptt/2, jittered (sec. 4.1)."""
        config = self.config
        if not config.variable_bptt:
            return min(config.bptt, remaining)
        base = config.bptt if random.random() < 0.95 else config.bptt / 2
        return max(1, min(int(random.gauss(base, 5)), remaining, config.bptt + 20))

    def _step(self, position: int, length: int, lr: float) -> float:
        """One truncated-BPTT window; returns its summed NLL over all ranks (for perplexity).

        Each rank's loss is the paper's loss over its own columns: summed over steps, averaged
        over its B/N columns. DDP averages the ranks' gradients, and the mean over N ranks of
        per-rank means over B/N columns is the mean over all B columns: the gradient of the
        single-process loss, with no rescaling. The AR/TAR penalties are means too, so the same
        holds for them. Clipping then sees that gradient, identical on every rank.
        """
        config = self.config
        inputs = self.streams[position:position + length]
        targets = self.streams[position + 1:position + 1 + length]
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=config.precision == "bfloat16"):
            out = self.trained(inputs, self.hidden)
        loss = summed_loss(out.logits.float(), targets)
        # Summed over ranks before the checks, so every rank judges the same number.
        nll, = self.world.sum(float(loss.detach()) * targets.size(1))
        # A loss whose perplexity overflows float64 has diverged as surely as a NaN one.
        self._check_finite("loss", nll, lr)
        self._check_finite("perplexity", perplexity(nll, targets.numel() * self.world.size),
                           lr)
        loss = loss + self._activation_penalties(out, length)
        # AWD scales the step with the window length so short windows do not dominate.
        scale = length / config.bptt if config.variable_bptt else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_norm)
        self._check_finite("gradient norm", float(norm), lr)  # before the step spoils weights
        self.optimizer.step()
        # Detached (truncated BPTT carries values, not gradients) and float32 whatever the
        # forward's precision: checkpoints and evaluation expect it.
        self.hidden = map_state(out.state, lambda s: s.detach().float())
        return nll

    def _check_finite(self, what: str, value: float, lr: float) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"{what} became {value} at epoch {self.state.epoch}, step {self.state.step + 1} "
                f"(lr {lr:.3g}); the last good checkpoint in {self.run.checkpoint_dir} is intact. "
                "Lower --lr or the clip norm, then resume or restart.")

    def _activation_penalties(self, out, length: int):
        """AR and TAR (Merity et al. 2018, eqs. 3-4), scaled like the summed loss per step."""
        config, penalty = self.config, 0.0
        if config.activation_reg:
            penalty = penalty + config.activation_reg * out.dropped.pow(2).mean() * length
        if config.temporal_activation_reg and out.hidden.size(0) > 1:
            diff = out.hidden[1:] - out.hidden[:-1]
            penalty = penalty + config.temporal_activation_reg * diff.pow(2).mean() * length
        return penalty

    def _end_epoch(self) -> None:
        state, config = self.state, self.config
        # Scored on rank 0 and shared: every rank then takes NT-ASGD's decision on one number.
        valid = self.world.from_main(
            lambda: self._evaluate(self.corpus.valid, config.valid_batch_size))
        record = {
            "event": "epoch", "epoch": state.epoch, "lr": state.lr,
            "train_ppl": perplexity(state.epoch_nll, state.epoch_tokens),
            "valid_ppl": valid.perplexity,
            "tokens_per_s": state.epoch_tokens / max(state.epoch_seconds, 1e-9),
            "epoch_seconds": state.epoch_seconds, "train_seconds": state.train_seconds,
            "step": state.step, "averaging": state.averaging,
        }
        if self.world.is_main:
            self._record_epoch(record)
        if valid.perplexity < state.best_valid:
            state.best_valid = valid.perplexity
            if self.world.is_main:
                self.run.save_checkpoint("best", {"model": self._eval_weights()})
        self._maybe_start_averaging(valid.perplexity)
        if self.verbose:
            tqdm.write(f"epoch {state.epoch:3d}  lr {record['lr']:.4g}  "
                       f"train ppl {record['train_ppl']:8.2f}  valid ppl {valid.perplexity:8.2f}"
                       f"  {record['tokens_per_s']:7.0f} tok/s")
        state.epoch += 1
        state.position = 0
        state.epoch_nll, state.epoch_tokens, state.epoch_seconds = 0.0, 0, 0.0
        self.hidden = None  # each epoch starts the streams from their beginning
        self.save()

    def _record_epoch(self, record: dict) -> None:
        self.run.append_metrics(record)
        for key in ("train_ppl", "valid_ppl", "lr", "tokens_per_s"):
            self.writer.add_scalar(key, record[key], record["epoch"])
        self.writer.flush()

    def _maybe_start_averaging(self, valid_ppl: float) -> None:
        """NT-ASGD (Merity et al. 2018, Algorithm 1): average once validation stops improving."""
        state, config = self.state, self.config
        history = state.valid_history
        if (config.optimizer == "asgd" and not state.averaging
                and len(history) > config.asgd_nonmono
                and valid_ppl > min(history[:-config.asgd_nonmono])):
            state.averaging = True
            self.optimizer = _make_optimizer(self.model, config, averaging=True)
        history.append(valid_ppl)

    def _eval_weights(self) -> dict:
        """The weights to evaluate: ASGD's running average once averaging has started."""
        weights = self.model.state_dict()
        if not self.state.averaging:
            return weights
        averaged = dict(weights)
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if "ax" in self.optimizer.state.get(p, {}):
                    averaged[names[id(p)]] = self.optimizer.state[p]["ax"].clone()
        return averaged

    def _evaluate(self, ids, batch_size: int):
        if not self.state.averaging:
            return score_stream(self.model, ids, bptt=self.config.eval_bptt, batch_size=batch_size)
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self._eval_weights())
        try:
            return score_stream(self.model, ids, bptt=self.config.eval_bptt,
                                batch_size=batch_size)
        finally:
            self.model.load_state_dict(current)

    def _final_evaluation(self) -> dict:
        """The final record, scored and written by rank 0; every rank returns it."""
        return self.world.from_main(self._score_final)

    def _score_final(self) -> dict:
        self.model.load_state_dict(self._eval_weights())
        valid = score_stream(self.model, self.corpus.valid, bptt=self.config.eval_bptt)
        test = score_stream(self.model, self.corpus.test, bptt=self.config.eval_bptt)
        summary = {
            "event": "final", "epochs_completed": self.state.epoch - 1,
            "complete": self.state.epoch > self.config.epochs,
            "valid_ppl": valid.perplexity, "test_ppl": test.perplexity,
            "best_valid_ppl": self.state.best_valid, "train_seconds": self.state.train_seconds,
            "test_seconds": test.seconds, "parameters": count_parameters(self.model),
        }
        self.run.truncate_metrics(lambda r: r.get("event") != "final")
        self.run.append_metrics(summary)
        self.writer.add_scalar("test_ppl", test.perplexity, self.state.epoch - 1)
        self.writer.close()
        if self.verbose:
            tqdm.write(f"final  valid ppl {valid.perplexity:.2f}  test ppl {test.perplexity:.2f}"
                       f"  (test scored as one stream in {test.seconds:.1f}s)")
        return summary

    # --- bookkeeping -----------------------------------------------------------------------

    def _log_start(self) -> None:
        if self.verbose and self.state.step == 0:
            world = self.world.size
            ranks = f" x {world} processes" if self.world.distributed else ""
            tqdm.write(f"{count_parameters(self.model):,} parameters on {self.device}{ranks}; "
                       f"{self.streams.numel() * world:,} training tokens in "
                       f"{self.streams.size(1) * world} streams; run directory {self.run.path}")

    def _checkpoint_due(self) -> bool:
        config = self.config
        if config.checkpoint_steps and self.state.step % config.checkpoint_steps == 0:
            return True
        minutes = (time.monotonic() - self._last_save) / 60
        return config.checkpoint_minutes > 0 and minutes >= config.checkpoint_minutes

    def _out_of_time(self) -> bool:
        limit = self.config.max_train_minutes
        return limit > 0 and self.state.train_seconds >= limit * 60


class _StopRequests:
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

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _make_optimizer(model: nn.Module, config: Config, averaging: bool) -> torch.optim.Optimizer:
    """Plain SGD (the paper); ASGD with t0=0, lambd=0 is AWD's averaging phase."""
    if averaging:
        return torch.optim.ASGD(model.parameters(), lr=config.lr, t0=0, lambd=0.0,
                                weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _tensorboard(run: RunDir):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run.tensorboard_dir))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": _numpy_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _rng_per_rank(saved) -> list[dict]:
    """Per-rank RNG states; checkpoints before data-parallel training held one dict."""
    return [saved] if isinstance(saved, dict) else list(saved)


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _to_device(hidden, device):
    """The carried state on ``device``; checkpoints give tuples back, lists are accepted too."""
    return map_state(hidden, lambda h: h.to(device))


def load_model(run_dir: str | Path, *, weights: str = "best",
               device: str = "auto") -> tuple[LanguageModel, Vocabulary, Config]:
    """Rebuild a trained model from its run directory: config + vocabulary + safetensors weights."""
    run = RunDir(run_dir)
    config = Config.from_dict(run.read_config()["config"])
    vocab = _read_vocab(run)
    name = weights if run.has_checkpoint(weights) else "last"
    tree = run.load_checkpoint(name)
    model = LanguageModel(len(vocab), config)
    model.load_state_dict(tree["model"])
    model.to(resolve_device(device))
    model.eval()
    return model, vocab, config
