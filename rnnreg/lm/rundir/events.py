"""TensorBoard event files, written synchronously so a failed write is an error, not a lost thread.

``torch.utils.tensorboard.SummaryWriter`` writes from a background thread: a full disk there
prints that thread's traceback, surfaces later as a bare OSError, and may leave a torn record in
the event file. The trainer logs a few scalars per epoch, so it writes each event itself, in
the same TFRecord framing and Event protos TensorBoard reads, through
:func:`rnnreg.lm.rundir.files.append_bytes`: an event lands whole or the file is cut back, and a
failure is a :class:`~rnnreg.lm.rundir.files.WriteError` naming the event file.
"""

from __future__ import annotations

import io
import re
import socket
import time
from pathlib import Path

from rnnreg.lm.rundir.files import append_bytes, writing

__all__ = ["ScalarLog"]

_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


class ScalarLog:
    """One session's event file in a run's ``tensorboard/`` directory.

    ``purge_step`` is for a resumed run: TensorBoard then drops what earlier files logged at
    that step or later (the steps the resumed run trains again), so the curves read as if the
    run had never been interrupted. ``add_scalar`` is SummaryWriter's; nothing is buffered or
    held open, so each event is on disk when it returns and there is nothing to flush or close.
    """

    def __init__(self, directory: str | Path, purge_step: int | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self._event = Event
        directory = Path(directory)
        with writing(directory):
            directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / _event_file_name(directory)
        self._write(Event(wall_time=time.time(), step=purge_step or 0,
                          file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from torch.utils.tensorboard.summary import scalar

        self._write(self._event(wall_time=time.time(), step=step, summary=scalar(tag, value)))

    def _write(self, event) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        record = io.BytesIO()
        RecordWriter(record).write(event.SerializeToString())  # length, data and their CRCs
        append_bytes(self.path, record.getvalue())


def _event_file_name(directory: Path) -> str:
    """A new event file name that sorts after the directory's others.

    TensorBoard reads a directory's event files in name order and a purge applies to what was
    read before it, so a resumed session's file must come last even within the same second.
    """
    stamps = [int(m.group(1)) for p in directory.iterdir()
              if (m := _EVENT_FILE.match(p.name))]
    stamp = max([int(time.time()), *(s + 1 for s in stamps)])
    return f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.rnnreg"
