"""Tokens and vocabulary: text -> tokens -> :class:`Vocabulary` -> 1-D LongTensor of ids.

Words (or characters) get ids by descending frequency in the training split, with ``<eos>``
ending every line and ``<unk>`` standing for the words a vocabulary leaves out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rnnreg.errors import RnnregError
from rnnreg.lm.config import LEVELS
from rnnreg.lm.corpus.sources import DataError

__all__ = ["EOS", "SPACE", "UNK", "Vocabulary", "build_vocabulary", "check_level", "tokenize"]

EOS = "<eos>"
UNK = "<unk>"
# Char-level streams need a visible word boundary; "_" is the convention of the common
# character-level PTB files.
SPACE = "_"


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
    check_level(level)
    tokens: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if level == "word":
            tokens.extend(words)
        else:
            tokens.extend(SPACE.join(words))
        tokens.append(EOS)
    return tokens


def check_level(level: str) -> None:
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
            raise RnnregError(f"decode needs a 1-D sequence of ids, got shape {tuple(ids.shape)}")
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
            raise DataError(f"`max_vocab={max_vocab}` leaves no room for words besides "
                            f"{EOS} and {UNK}: use at least 3")
        head = [w for w in kept if w != EOS][:max_vocab - 2]
        kept = [w for w in kept if w == EOS or w in set(head)]
    kept_set = set(kept)
    folded += sum(n for w, n in counts.items() if w not in kept_set)
    final = {w: counts[w] for w in kept}
    final[UNK] = folded
    return Vocabulary(tuple(sorted(final, key=lambda word: (-final[word], word))))
