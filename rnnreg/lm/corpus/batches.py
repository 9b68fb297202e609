"""Corpora and batches: the encoded splits of one corpus, and the windows training reads.

Data flows in one direction::

    corpus files (sources) -> tokens -> Vocabulary (vocab) -> Corpus: 1-D LongTensor per split
        -> batchify -> (T, B) time-major streams -> windows -> (input, target) pairs

:mod:`rnnreg.lm.corpus.sources` finds and checks the files, :mod:`rnnreg.lm.corpus.vocab` turns
their text into ids; :class:`Corpus` ties the two together and records where the corpus came from,
so a resumed or evaluated run can tell when its files changed, and :mod:`rnnreg.lm.corpus.cache`
keeps what it encoded, so the next command reads the ids instead of tokenizing again. Training
and evaluation cut their windows with the one function :func:`window_at`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from rnnreg.errors import RnnregError
from rnnreg.lm.corpus.cache import DamagedCache, Encoded, cache_key, read_encoded, write_encoded
from rnnreg.lm.corpus.sources import (
    SPLITS,
    CorpusLocation,
    DataError,
    PathArg,
    check_ptb,
    corpus_files,
    decode_text,
    locate_corpus,
    md5_bytes,
    read_bytes,
)
from rnnreg.lm.corpus.vocab import EOS, UNK, Vocabulary, build_vocabulary, check_level, tokenize
from rnnreg.lm.rundir.files import WriteError

__all__ = ["Corpus", "batchify", "num_windows", "shard_streams", "window_at", "windows"]

# --------------------------------------------------------------------------- corpus


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
        data_dir: PathArg | CorpusLocation | None,
        level: str = "word",
        vocab: Vocabulary | None = None,
        *,
        split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
        max_vocab: int | None = None,
        min_count: int = 1,
        recorded: Mapping | None = None,
    ) -> Corpus:
        """Read, check, tokenize and encode the splits of ``data_dir`` (a directory or one file).

        ``data_dir`` is a :class:`CorpusLocation`, or goes through :func:`locate_corpus`, so
        None means ``$RNNREG_DATA`` or the default. The vocabulary comes from the training
        split only (:func:`build_vocabulary`), so validation and test words cannot leak into
        it; resumed and evaluated runs pass their saved ``vocab`` so ids keep matching the
        model's embedding, and their ``recorded`` source, so a file that changed since
        training is an error naming it rather than a silently different number.

        Each file is read and MD5-summed once; when the cache holds this corpus's encoding
        (:mod:`rnnreg.lm.corpus.cache`, keyed by those sums) and its vocabulary is the one
        asked for, its ids are used instead of tokenizing again: the same tensors either way.
        """
        check_level(level)
        location = data_dir if isinstance(data_dir, CorpusLocation) else locate_corpus(data_dir)
        directory = location.path
        with location.named():  # a path from $RNNREG_DATA says so in its errors
            files = corpus_files(directory)
            raw = {role: read_bytes(path) for role, path in files.items()}
            source = _describe(directory, files, raw, split_fractions)
            key = cache_key(source["files"], level=level, max_vocab=max_vocab,
                            min_count=min_count,
                            split_fractions=split_fractions if "text" in files else None)
            cached, cache_notes = _cached(key)
            if cached is not None and vocab is not None and cached.vocab != vocab:
                cached = None  # another vocabulary: encode with it
            # Empty and non-UTF-8 files get their own errors before any checksum is compared.
            tokens = None if cached is not None else _tokens(files, raw, level, split_fractions)
            if recorded is not None:
                _check_unchanged(recorded, source, files)
            notes = list(check_ptb(directory, files, {role: info["md5"] for role, info
                                                      in source["files"].items()}))
            if cached is None:
                cached, cache_notes = _encode(key, files, tokens, vocab, max_vocab, min_count,
                                              cache_notes)
            if "text" in files:
                notes.append(_cut_note(files["text"], cached.splits, split_fractions))
            encoded = {"test": None, **cached.splits}
            if encoded["test"] is None:
                notes.append(f"{directory} has no test split (test.txt): the run will skip the "
                             "test score")
            return cls(vocab=cached.vocab if vocab is None else vocab, level=level, source=source,
                       notes=(*notes, *cache_notes), **encoded)

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


def _describe(directory: Path, files: Mapping[str, Path], raw: Mapping[str, bytes],
              split_fractions: Sequence[float]) -> dict:
    """The record of a corpus a run keeps: absolute path, each file's size and MD5."""
    record: dict = {"data_dir": str(directory.resolve()), "files": {
        role: {"name": path.name, "bytes": len(raw[role]), "md5": md5_bytes(raw[role])}
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
            "`data_dir` with the corpus it was trained on")
    for role, info in source["files"].items():
        if saved[role].get("md5") != info["md5"]:
            raise DataError(
                f"{files[role]} changed since the run was trained on it (md5 {info['md5']}, "
                f"was {saved[role].get('md5')}; {info['bytes']} bytes, was "
                f"{saved[role].get('bytes')}): restore it, or pass `data_dir` with the corpus "
                "it was trained on")


def _cached(key: str) -> tuple[Encoded | None, list[str]]:
    """The cached encoding under ``key`` if there is a sound one, and what to tell the user."""
    try:
        return read_encoded(key), []
    except DamagedCache as damage:
        return None, [f"the cached encoding of this corpus was damaged ({damage}): encoded "
                      "the corpus again"]


def _tokens(files: Mapping[str, Path], raw: Mapping[str, bytes], level: str,
            split_fractions: Sequence[float]) -> dict[str, list[str]]:
    """Each split's tokens (a one-file corpus cut into splits); an empty split is an error."""
    texts = {role: decode_text(files[role], data) for role, data in raw.items()}
    if "text" in files:
        tokens = _cut(files["text"], texts["text"], level, split_fractions)
    else:
        tokens = {name: tokenize(texts[name], level) for name in files}
    for name, split_tokens in tokens.items():
        _check_not_empty(name, files.get(name, files.get("text")), split_tokens)
    return tokens


def _encode(key: str, files: Mapping[str, Path], tokens: Mapping[str, list[str]],
            vocab: Vocabulary | None, max_vocab: int | None, min_count: int,
            notes: list[str]) -> tuple[Encoded, list[str]]:
    """Encode the splits with ``vocab`` (default: built from the training split); keep the
    encoding in the cache when ``vocab`` is the one the training split builds."""
    own = _own_vocabulary(tokens["train"], max_vocab, min_count, required=vocab is None)
    vocab = own if vocab is None else vocab
    encoded = Encoded(vocab, {name: _encode_split(vocab, name, files.get(name, files.get("text")),
                                                  toks) for name, toks in tokens.items()})
    if vocab == own:
        try:
            write_encoded(key, encoded)
        except WriteError as error:
            notes = [*notes, f"the encoded corpus could not be cached ({error}): it is "
                             "encoded again next time"]
    return encoded, notes


def _own_vocabulary(train: list[str], max_vocab: int | None, min_count: int, *,
                    required: bool) -> Vocabulary | None:
    """The vocabulary the training split builds; when another one is given (``required``
    False) it only decides whether the encoding can be cached, so a limit it cannot meet
    means no caching rather than an error."""
    try:
        return build_vocabulary(train, max_vocab=max_vocab, min_count=min_count)
    except DataError:
        if required:
            raise
        return None


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


def _cut_note(path: Path, splits: Mapping[str, Tensor],
              split_fractions: Sequence[float]) -> str:
    sizes = "/".join(f"{len(splits[name]):,}" for name in SPLITS)
    return (f"{path.name}: one text file, cut into contiguous train/valid/test parts by "
            f"{'/'.join(f'{f:g}' for f in split_fractions)} of its tokens ({sizes})")


def _check_not_empty(name: str, path: Path, tokens: list[str]) -> None:
    """A split without words is useless, so it is an error."""
    # Blank lines still yield <eos>, so "no tokens" means nothing but <eos>.
    if all(token == EOS for token in tokens):
        raise DataError(
            f"split {name!r} ({path}) is empty: it has no words, only blank lines or nothing; "
            "put the corpus text in it or point `data_dir` at a complete corpus"
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
        raise RnnregError(f"batch_size must be at least 1, got {batch_size}")
    if ids.dim() != 1:
        raise RnnregError(f"batchify needs a 1-D stream of ids, got shape {tuple(ids.shape)}")
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
        raise RnnregError(f"bptt must be at least 1, got {bptt}")
    if start < 0:
        raise RnnregError(f"start must be a non-negative row offset, got {start}")
    # Validation above runs at call time; a generator body would defer it to the first next().
    return _windows(streams, bptt, start)


def _windows(streams: Tensor, bptt: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(start, streams.size(0) - 1, bptt):
        yield window_at(streams, i, bptt)


def window_at(streams: Tensor, row: int, length: int) -> tuple[Tensor, Tensor]:
    """The ``(input, target)`` window at ``row`` of time-major ``(T, B)`` streams: input rows
    ``[row, row+n)`` and target rows ``[row+1, row+1+n)``, ``n = min(length, T-1-row)``.

    The one place a window is cut: :func:`windows` (evaluation) steps it by a fixed length,
    the trainer by the lengths it draws (AWD's variable BPTT). Views into ``streams``.
    """
    n = min(length, streams.size(0) - 1 - row)
    return streams[row : row + n], streams[row + 1 : row + 1 + n]


def num_windows(streams: Tensor, bptt: int) -> int:
    """How many windows :func:`windows` yields from ``start=0``: ceil((T - 1) / bptt)."""
    if bptt < 1:
        raise RnnregError(f"bptt must be at least 1, got {bptt}")
    targets = max(streams.size(0) - 1, 0)
    return -(-targets // bptt)


def shard_streams(streams: Tensor, rank: int, world_size: int) -> Tensor:
    """The block of columns that ``rank`` owns in data-parallel training.

    Each rank gets ``B // world_size`` whole streams, so hidden state never crosses ranks
    and the ranks together see exactly the single-process batch. The shard is copied to be
    contiguous, like :func:`batchify` output.
    """
    if world_size < 1:
        raise RnnregError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise RnnregError(f"rank must be in [0, {world_size}), got {rank}")
    batch_size = streams.size(1)
    if batch_size % world_size:
        raise RnnregError(
            f"batch size {batch_size} is not divisible by world size {world_size}: "
            "choose a batch size that is a multiple of the number of processes"
        )
    width = batch_size // world_size
    return streams[:, rank * width : (rank + 1) * width].contiguous()
