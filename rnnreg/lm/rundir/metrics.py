"""What a run records as it trains: metrics.jsonl, TensorBoard scalars, the learning curve.

One object holds all three so the trainer only says *what* happened (a step, an epoch, the
end) and never how it is written. Only the writing rank has a real logbook; the others get one
that is switched off, so the trainer calls it unconditionally.

The history always agrees with the checkpoint a run continues from: a resume cuts
metrics.jsonl back to it and starts TensorBoard with a purge step, so the records read as if
the run had never been interrupted. Epoch scalars live in ``tensorboard/`` (x = epoch) and step
scalars in ``tensorboard/steps/`` (x = global step), because one purge step serves one axis.

Every record is strict JSON: a perplexity that overflowed (or a best valid perplexity that does
not exist yet) is written as ``null``, because jq and JavaScript's ``JSON.parse`` reject the
``Infinity`` and ``NaN`` Python would write.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from torch.utils._pytree import tree_map

from rnnreg.lm.rundir.events import ScalarLog
from rnnreg.lm.rundir.files import StrPath
from rnnreg.lm.rundir.layout import RunDir

__all__ = ["STEP_SECONDS", "Logbook", "of_events", "read_records", "strict"]

# Without --log-every, a step record after about this many seconds of training: curves within
# a minute of the start, and a file that stays small over a day-long run.
STEP_SECONDS = 30.0


def read_records(run: RunDir | StrPath, *events: str) -> list[dict[str, Any]]:
    """The metrics records of the run in ``run`` (a :class:`RunDir` or its path), in order;
    only those of the given ``events`` ("step", "epoch", "final", "settings",
    "dynamic_eval") when any are named. Every reader of metrics.jsonl reads through here."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    return of_events(run.read_metrics(), *events)


def of_events(records: Iterable[Mapping], *events: str) -> list:
    """The records of the given ``events`` (all when none are named), in order."""
    if not events:
        return list(records)
    return [record for record in records if record.get("event") in events]


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, at any depth (JSON's null)."""
    return tree_map(lambda leaf: None if isinstance(leaf, float) and not math.isfinite(leaf)
                    else leaf, value)


class Logbook:
    """The run's records; ``enabled=False`` (ranks other than 0) makes every call a no-op."""

    def __init__(self, run: RunDir, *, enabled: bool, log_every: int) -> None:
        self.run, self.enabled, self.log_every = run, enabled, log_every
        self.latest: dict | None = None  # the last step record written, for the progress bar
        self._logs: dict[str, ScalarLog] = {}  # opened at their first scalar
        self._purge: dict[str, int | None] = {"epoch": None, "step": None}
        self._final_logged = False  # a finished run resumed: TensorBoard has its test_ppl
        self._since_nll, self._since_tokens, self._since_seconds = 0.0, 0, 0.0
        self._last_seconds = 0.0  # the training time at the last step record

    def rewind(self, epoch: int, step: int, finished: bool, train_seconds: float) -> int:
        """Drop what was written after the checkpoint a resume continues from (taken in
        ``epoch`` after ``step``, at ``train_seconds`` of training, of a ``finished`` run or
        not); returns how many metrics records went.

        The replayed windows are logged again, so their records must not appear twice, and
        TensorBoard drops its points from the purge steps on.
        """
        self._last_seconds = train_seconds
        if not self.enabled:
            return 0
        if not finished:
            self._purge = {"epoch": epoch, "step": step + 1}
        self._final_logged = finished and bool(read_records(self.run, "final"))
        return self.run.truncate_metrics(lambda r: _before_checkpoint(r, epoch, step, finished))

    def clear(self) -> list[str]:
        """Forget an earlier attempt that left no checkpoint (a resume that starts over);
        returns what was cleared, for the line that says so."""
        if not self.enabled:
            return []
        run, stale = self.run, []
        if run.metrics_path.exists() and (dropped := run.truncate_metrics(lambda r: False)):
            stale.append(f"{dropped} metrics event(s)")
        if any(run.tensorboard_dir.rglob("events.out.tfevents.*")):
            self._purge = {"epoch": 0, "step": 0}
            stale.append("the TensorBoard curves")
        return stale

    def due(self, step: int, train_seconds: float) -> bool:
        """Whether the window that took ``step`` gets a step record: every ``log_every``
        windows, or once ``STEP_SECONDS`` of training time (``train_seconds`` before that
        window) have passed since the last record.

        Step and training time are the same on every rank, so every rank, writing or not,
        answers the same: the trainer reads its losses off the device at these points only.
        """
        if self.log_every:
            return step % self.log_every == 0
        return train_seconds - self._last_seconds >= STEP_SECONDS

    def losses(self, nlls: list[float]) -> None:
        """Add the summed NLL of windows, in the order they were trained, to the next record."""
        for nll in nlls:
            self._since_nll += nll

    def window(self, record: dict, tokens: int, seconds: float, *, due: bool) -> dict | None:
        """Count one window; when ``due`` (:meth:`due`), write a ``step`` record.

        ``record`` holds the step's coordinates (epoch, step, epochs_done, lr, train_seconds);
        loss, perplexity and tokens/s are over the windows since the previous step record,
        whose losses :meth:`losses` must have added by then. Returns the record written, if
        one was.
        """
        self._since_tokens += tokens
        self._since_seconds += seconds
        if not due:
            return None
        self._last_seconds = record["train_seconds"]
        loss = self._since_nll / max(self._since_tokens, 1)
        record = {"event": "step", **record, "train_loss": loss,
                  "train_ppl": math.exp(loss) if loss < 709 else math.inf,
                  "tokens_per_s": self._since_tokens / max(self._since_seconds, 1e-9)}
        self._since_nll, self._since_tokens, self._since_seconds = 0.0, 0, 0.0
        if not self.enabled:
            return None
        self._append(record)
        for key in ("train_loss", "train_ppl", "tokens_per_s", "lr"):
            self._scalar("step", f"step/{key}", record[key], record["step"])
        self.latest = record
        return record

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append({"event": "epoch", **record})
        for key in ("train_ppl", "valid_ppl", "lr", "tokens_per_s"):
            self._scalar("epoch", key, record[key], record["epoch"])

    def final(self, summary: dict, epoch: int) -> None:
        """The run's one final record (replacing an earlier one) and its test scalar."""
        if not self.enabled:
            return
        self.run.truncate_metrics(lambda r: r.get("event") != "final")
        self._append(summary)
        if summary.get("test_ppl") is not None and not self._final_logged:
            self._scalar("epoch", "test_ppl", summary["test_ppl"], epoch)

    def curve(self) -> None:
        """Draw the run's learning curve into plots/ (at the end and at every stop)."""
        if not self.enabled:
            return
        from rnnreg.lm.rundir.curves import learning_curves

        records = read_records(self.run, "epoch", "step", "final")
        learning_curves({self.run.path.resolve().name: records}, self.run.learning_curve_path)

    def _append(self, record: dict) -> None:
        self.run.append_metrics(strict(record))

    def _scalar(self, axis: str, key: str, value: float | None, step: int) -> None:
        if value is None or not math.isfinite(value):
            return
        if axis not in self._logs:
            directory = self.run.tensorboard_dir / ("steps" if axis == "step" else "")
            self._logs[axis] = ScalarLog(directory, purge_step=self._purge[axis])
        self._logs[axis].add_scalar(key, value, step)


def _before_checkpoint(record: dict, epoch: int, step: int, finished: bool) -> bool:
    """Whether a metrics record logs training the checkpoint holds (kept on resume).

    An epoch's record counts once that epoch ended in the checkpoint (a checkpoint taken at the
    last step of an epoch, before the epoch's validation, still ends it again); a final record
    only if the checkpoint is of the finished run; any other record by its step.
    """
    event = record.get("event")
    if event == "epoch":
        return record.get("epoch", 0) < epoch
    if event == "final":
        return finished
    return record.get("step", 0) <= step
