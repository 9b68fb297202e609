"""Run directories: everything about one training run, laid out so it can be re-read and resumed.

Layout of a run directory::

    config.json        the resolved configuration (indented, sorted keys)
    metrics.jsonl      one JSON object per line, appended as training goes
    checkpoints/       NAME.safetensors: weights and training state, written atomically
    tensorboard/       event files, written by the trainer
    plots/             figures
    .lock              who is writing the run (informational; the real lock is an OS lock)

Checkpoints are safetensors files, so loading one never executes code (no pickle). Any nested
structure of dicts, lists, tuples, scalars, strings, None and tensors (a "tree": model and
optimizer state dicts, RNG states, counters) is stored as one file: tensors as entries, the
structure as JSON in the file's metadata.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import safetensors
import safetensors.torch
import torch

try:
    import fcntl
except ImportError:  # Windows: no flock, so run locking is unavailable there (see RunDir.lock)
    fcntl = None  # type: ignore[assignment]

Tree: TypeAlias = Any
"""Nested dict (str or int keys) / list / tuple / int / float / bool / str / None / Tensor."""

StrPath: TypeAlias = str | os.PathLike[str]

_TREE_FORMAT = "rnnreg-tree/1"
# Checkpoint names become file names; keeping them to a safe alphabet rules out path traversal
# and hidden files (temporary files start with ".").
_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RunDirError(RuntimeError):
    """A run directory or one of its files is missing, corrupt or unusable."""


class RunLockedError(RunDirError):
    """Another live process is writing the run directory."""


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
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
    with _replacing(Path(path)) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_text(path: StrPath, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically; no newline translation, same bytes on any OS."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- trees


def _escape_key(key: str) -> str:
    """Make a dict key safe inside a "/"-separated entry name ("~" is the escape character)."""
    return key.replace("~", "~0").replace("/", "~1")


def _child_path(path: str, part: str) -> str:
    return f"{path}/{part}" if path else part


def _encode(node: Tree, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn a tree into JSON, moving tensors into `tensors` under their path.

    Every JSON object in the result is a one-key tag, so user data can never be mistaken for
    structure: {"__tensor__": name}, {"__tuple__": [...]} and {"__dict__": [[key, value], ...]}.
    Dicts are stored as pairs because JSON object keys are always strings, while optimizer state
    dicts use int keys that must come back as ints.
    """
    if isinstance(node, torch.Tensor):
        return {"__tensor__": _add_tensor(node, path, tensors)}
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list | tuple):
        items = [_encode(v, _child_path(path, str(i)), tensors) for i, v in enumerate(node)]
        return items if isinstance(node, list) else {"__tuple__": items}
    if isinstance(node, dict):
        pairs = []
        for key, value in node.items():
            _check_key(key, path)
            pairs.append([key, _encode(value, _child_path(path, _escape_key(str(key))), tensors)])
        return {"__dict__": pairs}
    raise TypeError(
        f"cannot save a {type(node).__name__} at {path or '<root>'!r} in a checkpoint; convert it "
        "to a tensor, a plain Python scalar/str/None, or a dict/list/tuple of those"
    )


def _check_key(key: object, path: str) -> None:
    # bool is an int subclass, but True would come back as 1 from JSON; refuse rather than mangle.
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise TypeError(
            f"dict key {key!r} at {path or '<root>'!r} is a {type(key).__name__}; checkpoint dicts "
            "need str or int keys"
        )


def _add_tensor(tensor: torch.Tensor, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Store a private, contiguous CPU copy of `tensor` under `name`.

    Copying is what lets tied weights (two names, one storage) and views be saved: safetensors
    refuses tensors that share memory or do not own their whole storage.
    """
    if name in tensors:
        raise ValueError(
            f"two tensors map to checkpoint entry {name!r} (dict keys like 1 and '1' side by "
            "side); rename one of the keys"
        )
    if tensor.layout != torch.strided:
        raise TypeError(f"cannot save the {tensor.layout} tensor at {name!r}; make it dense first")
    tensors[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return name


def _decode(node: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Tree:
    """Inverse of `_encode`; malformed structure raises KeyError/TypeError/ValueError."""
    if isinstance(node, list):
        return [_decode(v, tensors, device) for v in node]
    if not isinstance(node, dict):
        return node
    ((tag, value),) = node.items()
    if tag == "__tensor__":
        return tensors[value].to(device)
    if tag == "__tuple__":
        return tuple(_decode(v, tensors, device) for v in value)
    if tag == "__dict__":
        return {key: _decode(v, tensors, device) for key, v in value}
    raise ValueError(f"unknown tag {tag!r}")


def save_tree(path: StrPath, tree: Tree) -> None:
    """Save a tree as one safetensors file, atomically (see `atomic_write_bytes`).

    Tensors come back as plain tensors (not Parameters) with the same dtype and shape; storage
    sharing between tensors is not preserved (tie weights again after loading a model). Dict
    subclasses come back as plain dicts, so a state dict loses its `_metadata` attribute, which
    `load_state_dict` only needs for modules whose state format changed across torch versions.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, "", tensors)
    metadata = {"format": _TREE_FORMAT, "tree": json.dumps(structure)}
    with _replacing(Path(path)) as tmp:
        # Writing straight to the file avoids holding a second in-memory copy of all the weights.
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


def load_tree(path: StrPath, device: str | torch.device = "cpu") -> Tree:
    """Load a tree saved by `save_tree`, with every tensor on `device`. Never executes code."""
    path = Path(path)
    advice = "load an earlier checkpoint or rerun the training that wrote it"
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise RunDirError(f"checkpoint {path} does not exist") from None
    except (safetensors.SafetensorError, OSError) as e:
        raise RunDirError(f"checkpoint {path} is truncated or corrupt ({e}); {advice}") from e
    if metadata.get("format") != _TREE_FORMAT:
        raise RunDirError(
            f"{path} is not an rnnreg checkpoint (format {metadata.get('format')!r}, expected "
            f"{_TREE_FORMAT!r}); load it with safetensors directly"
        )
    try:
        return _decode(json.loads(metadata["tree"]), tensors, torch.device(device))
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"checkpoint {path} has a corrupt structure ({e!r}); {advice}") from e


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


def _lock_holder(fd: int) -> str:
    """Describe who holds the lock, from the informational contents of the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder may have taken the OS lock but not yet written its details.
        return "another process"


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, run_path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on `lock_path` for the duration of the block.

    flock is released by the kernel when the holder exits or is killed, so a crash can never leave
    a stale lock behind: an existing lock file that nobody holds is simply taken over. The file is
    never deleted, because deleting it would let two processes lock two different files.
    """
    if fcntl is None:
        raise RunDirError(
            f"cannot lock run directory {run_path}: this platform has no fcntl.flock; "
            "run training on Linux or macOS"
        )
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"run directory {run_path} is in use by {_lock_holder(fd)}; wait for it to "
                "finish or choose another --out"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            # Clear the details before unlocking so nobody reports a finished process as holder.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


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

    def create(self, *, exist_ok: bool) -> RunDir:
        """Make the directory and its subdirectories; refuse to reuse an existing run by accident.

        `exist_ok=False` fails if the directory already holds a run (has config.json), so a new
        run cannot silently mix its metrics and checkpoints with an old one. Resuming passes True.
        """
        if not exist_ok and self.exists():
            raise RunDirError(
                f"{self._path} already holds a run (config.json exists); resume it or choose "
                "another --out"
            )
        for directory in (self.checkpoint_dir, self.tensorboard_dir, self.plots_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        """Whether this is a run directory, i.e. its config has been written."""
        return self.config_path.is_file()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive writer lock: `with run.lock(): ...` raises RunLockedError if already held.

        The lock is an OS advisory lock (flock) on `.lock`, so it is released automatically when
        the holder exits or is killed. It is held per open file: a second `lock()` in the same
        process, through this or another RunDir, is refused too. The lock is honoured between
        processes on one host; on network filesystems (NFS, some cluster filesystems) flock may
        be local to each client, so do not point runs on different hosts at one directory.
        Never delete `.lock` while a run is active. Creates the directory if needed.
        """
        self._path.mkdir(parents=True, exist_ok=True)
        return _exclusive_lock(self._path / ".lock", self._path)

    def write_config(self, config: dict[str, Any]) -> None:
        """Write config.json atomically; sorted, indented keys keep it diffable between runs."""
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunDirError(f"{self._path} is not a run directory (no config.json)") from None
        try:
            config = json.loads(text)
        except ValueError as e:
            raise RunDirError(
                f"{self.config_path} is not valid JSON ({e}); fix or restore it"
            ) from e
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config_path} does not hold a JSON object; fix or restore it")
        return config

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line and force it to disk.

        Serialising first means a record that cannot be encoded writes nothing. NaN and infinity
        are written as NaN/Infinity (a diverged loss is worth recording; Python reads them back).
        """
        if not isinstance(record, dict):
            raise TypeError(f"a metrics record must be a dict, not {type(record).__name__}")
        line = (json.dumps(record) + "\n").encode("utf-8")
        with open(self.metrics_path, "a+b") as f:
            _repair_torn_tail(f)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

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
            raise ValueError(
                f"invalid checkpoint name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return self.checkpoint_dir / f"{name}.safetensors"

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).is_file()

    def save_checkpoint(self, name: str, tree: Tree) -> None:
        """Atomically save `tree` as checkpoint `name`, replacing any previous one of that name."""
        path = self.checkpoint_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tree(path, tree)

    def load_checkpoint(self, name: str, device: str | torch.device = "cpu") -> Tree:
        path = self.checkpoint_path(name)
        if not path.is_file():
            available = sorted(p.stem for p in self.checkpoint_dir.glob("*.safetensors"))
            raise RunDirError(
                f"{self._path} has no checkpoint {name!r} (available: {available or 'none'})"
            )
        return load_tree(path, device)


# --------------------------------------------------------------------------- provenance


def describe_machine() -> dict[str, Any]:
    """The facts about this machine that explain a run's speed and numerics, for run metadata."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda,
    }


def _git(args: list[str], cwd: StrPath | None) -> str | None:
    """Output of a git command, or None if git is missing, fails or hangs."""
    # Optional locks off: `git status` would otherwise refresh the index and could collide with
    # a git command the user is running at the same moment.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(cwd: StrPath | None = None) -> str | None:
    """The checked-out commit, with "-dirty" if tracked files have uncommitted changes.

    Untracked files do not count (as with `git describe --dirty`): run outputs and scratch files
    would otherwise mark nearly every run dirty. None outside a git repository or without git.
    """
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return f"{commit}-dirty" if status else commit
