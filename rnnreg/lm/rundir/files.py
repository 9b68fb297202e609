"""Durable, atomic file writes, and the errors every run-directory file problem raises.

A run directory is read back by ``--resume``, ``evaluate`` and the study report, possibly after
the writing process was killed at any instant; every file rnnreg writes therefore appears whole
or not at all (write beside, fsync, rename), and an append either lands whole or is undone.
A write that fails (disk full, permission, read-only filesystem, file size limit) raises
:class:`WriteError` naming the file and the cause, after the file was put back as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeAlias

from rnnreg.errors import RnnregError

__all__ = ["RunDirError", "StrPath", "WriteError", "append_bytes", "atomic_write_bytes",
           "atomic_write_text", "check_writable", "is_temporary", "replacing", "writing"]

StrPath: TypeAlias = str | os.PathLike[str]


class RunDirError(RnnregError, RuntimeError):
    """A run directory or one of its files is missing, corrupt or unusable: a user error
    (:class:`rnnreg.errors.RnnregError`), and a RuntimeError as it always was."""


# Causes worth naming in words, and what the user can do about each.
_CAUSES = {
    errno.ENOSPC: ("disk full", "free space on that filesystem"),
    errno.EFBIG: ("file size limit reached", "raise the file size limit (ulimit -f)"),
    errno.EACCES: ("permission denied", "make it writable"),
    errno.EPERM: ("permission denied", "make it writable"),
    errno.EROFS: ("read-only filesystem", "use a writable filesystem"),
}
if hasattr(errno, "EDQUOT"):  # POSIX only
    _CAUSES[errno.EDQUOT] = ("disk quota exceeded", "free space or raise the quota")


class WriteError(RunDirError):
    """Writing a file failed; the file holds its previous contents (or still does not exist).

    ``path`` is the file (or directory) that could not be written, ``errno`` the cause's error
    number (None if the cause was no OS error) and ``remedy`` what fixes the cause, if known.
    """

    def __init__(self, path: StrPath, errno_: int | None, detail: str, advice: str = "") -> None:
        self.path, self.errno, self.detail, self.advice = Path(path), errno_, detail, advice
        cause, self.remedy = _CAUSES.get(errno_, (detail, ""))
        if _letters(cause) != _letters(detail):  # "disk full (No space left on device)"
            cause = f"{cause} ({detail})"
        super().__init__(f"cannot write {path}: {cause}" + (f"; {advice}" if advice else ""))

    def advise(self, advice: str) -> WriteError:
        """The same error, with what to do next appended to its one-line message."""
        return WriteError(self.path, self.errno, self.detail, advice)

    def __reduce__(self):
        # Rebuilt from its fields, not its message, when it crosses processes (torchrun, Ray).
        return WriteError, (self.path, self.errno, self.detail, self.advice)


def _letters(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalpha())


def _write_error(path: Path, error: OSError) -> WriteError:
    return WriteError(path, error.errno, error.strerror or str(error))


@contextlib.contextmanager
def writing(path: StrPath) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a WriteError that names it."""
    try:
        yield
    except OSError as error:
        raise _write_error(Path(path), error) from error


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary file of an unfinished write: `replacing`'s own
    (``.NAME.HEX.tmp``), or the ``.tmpXXXXXX`` that safetensors writes before its rename."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp"))


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once it is written, make it durable and move it over.

    The temporary file lives in the same directory because `os.replace` is only atomic within one
    filesystem. Readers therefore see either the old or the new file, never a torn one, even if the
    process is killed at any instant. On failure the temporary file is removed, and an OSError
    becomes a WriteError naming `path`. The temporary file is created here, so the result gets
    the mode the user's umask gives a new file, whatever the writer does (safetensors writes its
    own temporary file, mode 0600, and renames it onto ours).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        mode = _create(tmp)
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != mode:
            with contextlib.suppress(OSError):  # a filesystem without modes keeps its own
                os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise
    _fsync_dir(path.parent)


def _create(path: Path) -> int:
    """Create an empty file as a new file of the user's is created; return its permission bits."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file's data to disk, so the rename cannot be persisted before the contents are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a completed rename survives a power loss.

    Best effort: Windows cannot open directories and some network filesystems refuse to fsync them;
    the rename is still atomic there, only its durability is up to the filesystem.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: StrPath, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new contents."""
    with replacing(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: StrPath, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically; no newline translation, same bytes on any OS."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_bytes(path: StrPath, data: bytes,
                 prepare: Callable[[BinaryIO], None] | None = None) -> None:
    """Append `data` to `path` and force it to disk; if that fails, cut the file back.

    A full disk or a file size limit can let part of `data` in before the error; truncating to
    the old length takes it out again, so the file never ends in a partial record. `prepare` gets
    the open file first (to repair a tail torn by a killed writer). The file is unbuffered so
    that nothing is left pending to be written after the truncation.
    """
    path = Path(path)
    with writing(path), open(path, "a+b", buffering=0) as f:
        if prepare is not None:
            prepare(f)
        size = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may take only part of the bytes
                view = view[f.write(view):]
            os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise


def check_writable(directory: StrPath) -> None:
    """Raise WriteError unless a file can be created in `directory` (read-only, no permission).

    Creating and removing a file is the only reliable test: permission bits say nothing about a
    read-only mount, an ACL or root's privileges.
    """
    directory = Path(directory)
    probe = directory / f".write-check.{secrets.token_hex(6)}.tmp"
    with writing(directory):
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
