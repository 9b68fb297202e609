"""Durable, atomic file writes, and the error every run-directory file problem raises.

A run directory is read back by ``--resume``, ``evaluate`` and the study report, possibly after
the writing process was killed at any instant; every file rnnreg writes therefore appears whole
or not at all (write beside, fsync, rename).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

__all__ = ["RunDirError", "StrPath", "atomic_write_bytes", "atomic_write_text", "replacing"]

StrPath: TypeAlias = str | os.PathLike[str]


class RunDirError(RuntimeError):
    """A run directory or one of its files is missing, corrupt or unusable."""


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once it is written, make it durable and move it over.

    The temporary file lives in the same directory because `os.replace` is only atomic within one
    filesystem. Readers therefore see either the old or the new file, never a torn one, even if the
    process is killed at any instant. On failure the temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
    with replacing(Path(path)) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_text(path: StrPath, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically; no newline translation, same bytes on any OS."""
    atomic_write_bytes(path, text.encode("utf-8"))
