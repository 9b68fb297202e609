"""Run directories: everything about one training run, laid out so it can be re-read and resumed.

Layout of a run directory::

    config.json        the resolved configuration and where it came from (indented, sorted keys)
    vocab.json         the vocabulary, so ids keep their words when the run is re-read
    metrics.jsonl      one JSON object per line, appended as training goes
    checkpoints/       NAME.safetensors: weights and training state, written atomically
    tensorboard/       event files, written by the trainer
    plots/             figures: learning_curve.png, drawn by the trainer
    .lock              the writer's OS lock (filelock)
    .lock.holder       who holds it

:class:`RunDir` is the one place that knows these names: every other module asks it for a path,
for the run's :class:`~rnnreg.lm.config.Config`, corpus record or vocabulary, or for its lock.
Checkpoints are safetensors trees (:mod:`rnnreg.lm.rundir.checkpoint`), so loading one never
executes code; every file is written atomically (:mod:`rnnreg.lm.rundir.files`), and a write that
fails raises :class:`~rnnreg.lm.rundir.files.WriteError` with the file as it was before.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import filelock
import torch

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.rundir.checkpoint import Tree, load_tree, save_tree
from rnnreg.lm.rundir.files import (
    RunDirError,
    StrPath,
    WriteError,
    append_bytes,
    atomic_write_text,
    check_writable,
    is_temporary,
    replacing,
    writing,
)

__all__ = ["RunDir", "RunLockedError"]

# Checkpoint names become file names; keeping them to a safe alphabet rules out path traversal
# and hidden files (temporary files start with ".").
_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The lock file and the file beside it that says who holds the lock.
_LOCK, _LOCK_HOLDER = ".lock", ".lock.holder"


class RunLockedError(RunDirError):
    """Another live process is writing the run directory."""


# --------------------------------------------------------------------------- metrics lines


def _parse_record(raw: bytes) -> dict | None:
    """One metrics line as a dict, or None if it is not a complete JSON object."""
    try:
        value = json.loads(raw)
    except ValueError:  # includes invalid UTF-8 from a write cut inside a character
        return None
    return value if isinstance(value, dict) else None


def _repair_torn_tail(f: BinaryIO) -> None:
    """Make sure the next append starts on a fresh line.

    A process killed mid-append can leave a partial last line. Appending after it would glue the
    new record onto it and leave an invalid line in the middle, which readers reject; so a partial
    record is dropped, and a complete one that only lacks its newline gets it.
    """
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    data = f.read()
    start = data.rfind(b"\n") + 1
    if _parse_record(data[start:]) is None:
        f.truncate(start)
    else:
        f.write(b"\n")


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _exclusive_lock(run_path: Path) -> Iterator[None]:
    """Hold the run's writer lock (an OS lock through ``filelock``) for the block.

    The kernel releases the lock when its holder exits or is killed, so a crash never leaves a
    stale lock. Who holds it is written to a separate file, because taking the lock file
    truncates it: the details of a killed holder are simply overwritten by the next one.
    """
    lock = filelock.FileLock(run_path / _LOCK, timeout=0)
    holder = run_path / _LOCK_HOLDER
    try:
        lock.acquire()
    except filelock.Timeout:  # an OSError too, so caught first
        raise RunLockedError(f"run directory {run_path} is in use by {_lock_holder(holder)}; "
                             "wait for it to finish or choose another `out`") from None
    except OSError as error:  # the lock file cannot be created: a read-only or foreign --out
        raise WriteError(lock.lock_file, error.errno, error.strerror or str(error)) from error
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        with writing(holder):
            holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": started}))
        yield
    finally:
        # Before unlocking, so no finished process is reported; a directory that has become
        # read-only keeps it, and the error that says so is the one to report.
        with contextlib.suppress(OSError):
            holder.unlink(missing_ok=True)
        lock.release()


def _lock_holder(holder: Path) -> str:
    """Describe who holds the lock, from the informational file beside it."""
    try:
        info = json.loads(holder.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder may have taken the lock but not yet written its details.
        return "another process"


# --------------------------------------------------------------------------- run directory


class RunDir:
    """One training run's directory. Constructing it touches nothing on disk."""

    def __init__(self, path: StrPath) -> None:
        self._path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self._path)!r})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def config_path(self) -> Path:
        return self._path / "config.json"

    @property
    def vocab_path(self) -> Path:
        return self._path / "vocab.json"

    @property
    def metrics_path(self) -> Path:
        return self._path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self._path / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self._path / "tensorboard"

    @property
    def plots_dir(self) -> Path:
        return self._path / "plots"

    @property
    def learning_curve_path(self) -> Path:
        """The figure the trainer draws at the end of training and at every stop."""
        return self.plots_dir / "learning_curve.png"

    def create(self, *, exist_ok: bool) -> RunDir:
        """Make the directory and its subdirectories; refuse to reuse an existing run by accident.

        `exist_ok=False` fails if the directory already holds a run (has config.json), so a new
        run cannot silently mix its metrics and checkpoints with an old one. Resuming passes True.
        """
        if not exist_ok and self.exists():
            raise RunDirError(
                f"{self._path} already holds a run (config.json exists); pass `resume=True` "
                "to continue it or choose another `out`"
            )
        # plots/ is made by whatever draws into it, so it never stands empty.
        for directory in (self.checkpoint_dir, self.tensorboard_dir):
            with writing(directory):
                directory.mkdir(parents=True, exist_ok=True)
        return self

    def check_writable(self) -> None:
        """Raise WriteError unless every part of the run can be written.

        Called before training, so that a read-only or foreign directory is refused at once, not
        at the first checkpoint after minutes of training.
        """
        for directory in (self._path, self.checkpoint_dir, self.tensorboard_dir, self.plots_dir):
            if directory.is_dir():
                check_writable(directory)
        if self.metrics_path.exists():  # appended in place, so the file itself must be writable
            with writing(self.metrics_path):
                os.close(os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND))

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes that a killed process left unfinished.

        Only the lock holder may call this: a live writer's temporary file would go too.
        """
        removed = []
        for directory in (self._path, self.checkpoint_dir, self.plots_dir):
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                if is_temporary(path.name) and path.is_file():
                    with writing(path):
                        path.unlink()
                    removed.append(path)
        return removed

    def remove_unstarted(self) -> bool:
        """Remove what a start writes (config, vocabulary, lock files, empty directories) from
        a run that never trained, and say whether the directory is now empty.

        Only while the directory holds nothing else (no checkpoint, no metrics, no plot): a
        run that trained, even briefly, is kept for a rerun to resume. Call it while holding
        the lock, so no other process can be writing there.
        """
        started_files = {self.config_path.name, self.vocab_path.name, _LOCK, _LOCK_HOLDER}
        started_dirs = (self.checkpoint_dir, self.tensorboard_dir, self.plots_dir)
        for entry in self._path.iterdir():
            if entry in started_dirs and entry.is_dir():
                if any(entry.iterdir()):
                    return False
            elif entry.name not in started_files:
                return False
        for name in started_files:
            (self._path / name).unlink(missing_ok=True)
        for directory in started_dirs:
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()
        return not any(self._path.iterdir())

    def exists(self) -> bool:
        """Whether this is a run directory, i.e. its config has been written."""
        return self.config_path.is_file()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive writer lock: `with run.lock(): ...` raises RunLockedError if already held.

        The lock is an OS advisory lock (flock, through filelock) on `.lock`, so it is released
        automatically when the holder exits or is killed. It is held per open file: a second
        `lock()` in the same process, through this or another RunDir, is refused too. The lock
        is honoured between processes on one host; on network filesystems (NFS, some cluster
        filesystems) flock may be local to each client, so do not point runs on different hosts
        at one directory.
        Never delete `.lock` while a run is active. Creates the directory if needed.
        """
        with writing(self._path):
            self._path.mkdir(parents=True, exist_ok=True)
        return _exclusive_lock(self._path)

    def write_config(self, config: Config, **record: Any) -> None:
        """Write config.json atomically: ``config`` and the ``record`` of where the run came
        from (corpus, commit, machine, ...); sorted, indented keys keep it diffable."""
        self._write_json({"config": config.to_dict(), **record})

    def replace_config(self, config: Config) -> None:
        """Replace the config (a resume that raised its budget), keeping the run's record."""
        self._write_json({**self._read_json(), "config": config.to_dict()})

    def read_config(self) -> Config:
        """The run's :class:`~rnnreg.lm.config.Config`, as it trains."""
        return Config.from_dict(self._read_json()["config"])

    def read_record(self) -> dict[str, Any]:
        """Where the run came from, as :meth:`write_config` recorded it beside the config:
        corpus, commit, machine, processes, start time."""
        return {key: value for key, value in self._read_json().items() if key != "config"}

    def read_corpus(self) -> dict | None:
        """The corpus the run was trained on (path, files' sizes and MD5s); None if not
        recorded."""
        return self.read_record().get("corpus")

    def _write_json(self, content: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, json.dumps(content, indent=2, sort_keys=True) + "\n")

    def _read_json(self) -> dict[str, Any]:
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunDirError(f"{self._path} is not a run directory (no config.json)") from None
        try:
            content = json.loads(text)
        except ValueError as e:
            raise RunDirError(
                f"{self.config_path} is not valid JSON ({e}); fix or restore it"
            ) from e
        if not isinstance(content, dict):
            raise RunDirError(f"{self.config_path} does not hold a JSON object; fix or restore it")
        return content

    def write_vocab(self, vocab: Vocabulary) -> None:
        atomic_write_text(self.vocab_path, json.dumps(vocab.to_json()))

    def read_vocab(self) -> Vocabulary:
        try:
            text = self.vocab_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunDirError(f"{self._path} has no vocab.json; was the run started?") from None
        return Vocabulary.from_json(json.loads(text))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line and force it to disk.

        Serialising first means a record that cannot be encoded writes nothing. NaN and infinity
        are written as NaN/Infinity (a diverged loss is worth recording; Python reads them back).
        """
        if not isinstance(record, dict):
            raise TypeError(f"a metrics record must be a dict, not {type(record).__name__}")
        line = (json.dumps(record) + "\n").encode("utf-8")
        append_bytes(self.metrics_path, line, prepare=_repair_torn_tail)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics records in order; [] if none were written.

        An invalid last line is skipped, since a crash during an append leaves exactly that. An
        invalid line anywhere else means the file was damaged or edited, and raises RunDirError.
        """
        try:
            data = self.metrics_path.read_bytes()
        except FileNotFoundError:
            return []
        lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
        records = []
        for i, (lineno, raw) in enumerate(lines):
            record = _parse_record(raw)
            if record is None:
                if i == len(lines) - 1:
                    break
                raise RunDirError(
                    f"{self.metrics_path} line {lineno} is not a JSON object; the file was "
                    "damaged or edited by hand: fix or delete that line"
                )
            records.append(record)
        return records

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Atomically rewrite the metrics keeping only records where `keep(record)` is true.

        Resuming uses this to drop records written after the checkpoint it resumes from, so the
        replayed steps are not logged twice. Returns the number of records dropped.
        """
        records = self.read_metrics()
        kept = [r for r in records if keep(r)]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def checkpoint_path(self, name: str) -> Path:
        if not _CHECKPOINT_NAME.fullmatch(name):
            raise RnnregError(
                f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return self.checkpoint_dir / f"{name}.safetensors"

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def save_checkpoint(self, name: str, tree: Tree) -> None:
        """Atomically save `tree` as checkpoint `name`, replacing any previous one of that name."""
        path = self.checkpoint_path(name)
        with writing(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        save_tree(path, tree)

    def copy_checkpoint(self, source: str, name: str) -> None:
        """Atomically make checkpoint `name` hold what checkpoint `source` holds.

        A hard link where the filesystem has them: the same state is then not on disk twice, and
        `source` can still be replaced later without touching `name` (a replace makes a new file).
        """
        source_path, path = self.checkpoint_path(source), self.checkpoint_path(name)
        with replacing(path) as tmp:
            tmp.unlink()
            try:
                os.link(source_path, tmp)
            except OSError:  # no hard links here (FAT, some network filesystems): copy instead
                shutil.copyfile(source_path, tmp)

    def remove_checkpoint(self, name: str) -> None:
        path = self.checkpoint_path(name)
        with writing(path):
            path.unlink(missing_ok=True)

    def load_checkpoint(self, name: str, device: str | torch.device = "cpu") -> Tree:
        path = self.checkpoint_path(name)
        if not path.is_file():
            available = sorted(p.stem for p in self.checkpoint_dir.glob("*.safetensors"))
            raise RunDirError(
                f"{self._path} has no checkpoint {name!r} (available: {available or 'none'})"
            )
        return load_tree(path, device)
