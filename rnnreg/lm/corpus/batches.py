"""Corpora and batches: the encoded splits of one corpus, and the windows training reads.

Data flows in one direction::

    corpus files (sources) -> tokens -> Vocabulary (vocab) -> Corpus: 1-D LongTensor per split
        -> batchify -> (T, B) time-major streams -> windows -> (input, target) pairs

:mod:`rnnreg.lm.corpus.sources` finds and checks the files, :mod:`rnnreg.lm.corpus.vocab` turns
their text into ids; :class:`Corpus` ties the two together and records where the corpus came from,
so a resumed or evaluated run can tell when its files changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from rnnreg.errors import RnnregError
from rnnreg.lm.corpus.sources import (
    SPLITS,
    DataError,
    PathArg,
    check_ptb,
    corpus_files,
    md5sum,
    named_origin,
    read_text,
    resolve_data_dir,
)
from rnnreg.lm.corpus.vocab import EOS, UNK, Vocabulary, build_vocabulary, check_level, tokenize

__all__ = ["Corpus", "batchify", "num_windows", "shard_streams", "windows"]

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
        check_level(level)
        directory = resolve_data_dir(data_dir)
        with named_origin(data_dir):  # a path from $RNNREG_DATA says so in its errors
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
            notes = list(check_ptb(directory, files))
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
            "`data_dir` with the corpus it was trained on")
    for role, info in source["files"].items():
        if saved[role].get("md5") != info["md5"]:
            raise DataError(
                f"{files[role]} changed since the run was trained on it (md5 {info['md5']}, "
                f"was {saved[role].get('md5')}; {info['bytes']} bytes, was "
                f"{saved[role].get('bytes')}): restore it, or pass `data_dir` with the corpus "
                "it was trained on")


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
    last = streams.size(0) - 1
    for i in range(start, last, bptt):
        n = min(bptt, last - i)
        yield streams[i : i + n], streams[i + 1 : i + 1 + n]


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
