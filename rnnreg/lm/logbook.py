"""What a run records as it trains: metrics.jsonl, TensorBoard scalars, the learning curve.

One object holds all three so the trainer only says *what* happened (a step, an epoch, the
end) and never how it is written. Only the writing rank has a real logbook; the others get one
that is switched off, so the trainer calls it unconditionally.

Every record is strict JSON: a perplexity that overflowed (or a best valid perplexity that does
not exist yet) is written as ``null``, because jq and JavaScript's ``JSON.parse`` reject the
``Infinity`` and ``NaN`` Python would write.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rnnreg.lm.rundir import RunDir

__all__ = ["STEP_SECONDS", "Logbook", "strict"]

# Without --log-every, a step record about this often: curves within a minute of the start,
# and a file that stays small over a day-long run.
STEP_SECONDS = 30.0
CURVE_NAME = "learning_curve.png"


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively (JSON's null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    return value


class Logbook:
    """The run's records; ``enabled=False`` (ranks other than 0) makes every call a no-op."""

    def __init__(self, run: RunDir, *, enabled: bool, log_every: int) -> None:
        self.run, self.enabled, self.log_every = run, enabled, log_every
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run.tensorboard_dir))
        self._since_nll, self._since_tokens, self._since_seconds = 0.0, 0, 0.0
        self._last = time.monotonic()

    def rewind(self, epoch: int, step: int) -> None:
        """Drop what was written after the checkpoint a resume continues from.

        The replayed windows are logged again, so their records must not appear twice; a final
        record is dropped too, since the resumed run writes its own.
        """
        if not self.enabled:
            return

        def keep(record: dict) -> bool:
            if record.get("event") == "epoch":
                return record.get("epoch", 0) < epoch
            if record.get("event") == "step":
                return record.get("step", 0) <= step
            return False

        self.run.truncate_metrics(keep)

    def window(self, record: dict, nll: float, tokens: int, seconds: float) -> dict | None:
        """Count one window; every ``log_every`` windows (or ~30 s) write a ``step`` record.

        ``record`` holds the step's coordinates (epoch, step, epochs_done, lr, train_seconds);
        loss, perplexity and tokens/s are over the windows since the previous step record.
        Returns the record written, if one was.
        """
        self._since_nll += nll
        self._since_tokens += tokens
        self._since_seconds += seconds
        if not self.enabled or not self._due(record["step"]):
            return None
        loss = self._since_nll / max(self._since_tokens, 1)
        record = {"event": "step", **record, "train_loss": loss,
                  "train_ppl": math.exp(loss) if loss < 709 else math.inf,
                  "tokens_per_s": self._since_tokens / max(self._since_seconds, 1e-9)}
        self._append(record)
        for key in ("train_loss", "train_ppl", "tokens_per_s", "lr"):
            self._scalar(f"step/{key}", record[key], record["step"])
        self._writer.flush()
        self._since_nll, self._since_tokens, self._since_seconds = 0.0, 0, 0.0
        self._last = time.monotonic()
        return record

    def _due(self, step: int) -> bool:
        if self.log_every:
            return step % self.log_every == 0
        return time.monotonic() - self._last >= STEP_SECONDS

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append({"event": "epoch", **record})
        for key in ("train_ppl", "valid_ppl", "lr", "tokens_per_s"):
            self._scalar(key, record[key], record["epoch"])
        self._writer.flush()

    def final(self, summary: dict, epoch: int) -> None:
        """The run's one final record (replacing an earlier one), then close TensorBoard."""
        if not self.enabled:
            return
        self.run.truncate_metrics(lambda r: r.get("event") != "final")
        self._append(summary)
        if summary.get("test_ppl") is not None:
            self._scalar("test_ppl", summary["test_ppl"], epoch)
        self._writer.close()

    def curve(self) -> None:
        """Draw the run's learning curve into plots/ (at the end and at every stop)."""
        if not self.enabled:
            return
        from rnnreg.lm.curves import learning_curves

        records = [r for r in self.run.read_metrics()
                   if r.get("event") in ("epoch", "step", "final")]
        learning_curves({self.run.path.resolve().name: records},
                        self.run.plots_dir / CURVE_NAME)

    def _append(self, record: dict) -> None:
        self.run.append_metrics(strict(record))

    def _scalar(self, key: str, value: float | None, step: int) -> None:
        if value is not None and math.isfinite(value):
            self._writer.add_scalar(key, value, step)
