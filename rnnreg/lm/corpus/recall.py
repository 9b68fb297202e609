"""A synthetic recall corpus: tokens that only a memory of exactly N steps can predict.

Per-step dropout on the recurrent connection multiplies what the network carries from one step
to the next by a fresh random mask at every step, so information that must survive N steps is
damaged N times (Gal & Ghahramani 2016, section 1; Zaremba et al. 2014, section 3). Natural
text mixes short and long dependencies and cannot say which tokens need which; this corpus can.

Each line is one segment ``kA w.. w.. ? vA``: a key ``kA`` (one of ``symbols``), ``N - 2``
filler words drawn uniformly (they carry nothing), the cue ``?``, and the value ``vA`` that
answers the key, N tokens after it. N is drawn per segment from ``distances``, so one corpus
(and one training run) gives accuracy against N. Keys and fillers are uniform, so a value is
predictable from the key N tokens back and from nothing in the N - 1 tokens before it.

The files are ordinary ``train.txt``/``valid.txt``/``test.txt`` word corpora, trained by the
same trainer as any text. :func:`recall_positions` finds the value positions in a token stream
as the trainer tokenizes it (every line ends with ``<eos>``), so evaluation needs only the text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rnnreg.lm.corpus.sources import SPLITS, DataError, PathArg, md5sum
from rnnreg.lm.corpus.vocab import EOS
from rnnreg.nn.functional import check_positive_int

__all__ = ["CUE", "SPEC_FILE", "Recall", "RecallTask", "recall_positions"]

CUE = "?"
SPEC_FILE = "recall.json"  # beside the split files: the task that wrote them, and their MD5s
_KEY, _VALUE, _FILLER = "k", "v", "w"


@dataclass(frozen=True)
class Recall:
    """One token that needs memory: ``position`` in the stream, ``distance`` N back to its key."""

    position: int
    distance: int
    answer: str


@dataclass(frozen=True)
class RecallTask:
    """The corpus's parameters; the same task and seed always write the same files."""

    distances: tuple[int, ...] = (2, 5, 10, 20, 40)
    symbols: int = 8
    fillers: int = 16
    segments: tuple[int, int, int] = (4000, 500, 500)  # train, valid, test
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "distances", tuple(self.distances))
        object.__setattr__(self, "segments", tuple(self.segments))
        if not self.distances or len(set(self.distances)) != len(self.distances):
            raise ValueError(f"distances must be distinct, got {list(self.distances)}")
        for distance in self.distances:
            # Two is the least: the key, then the cue one step before the value.
            if isinstance(distance, bool) or not isinstance(distance, int) or distance < 2:
                raise ValueError(f"every distance must be an integer >= 2, got {distance!r}")
        if len(self.segments) != len(SPLITS):
            raise ValueError(f"segments gives one count per split ({', '.join(SPLITS)}), "
                             f"got {list(self.segments)}")
        for name, value in (("symbols", self.symbols), ("fillers", self.fillers),
                            *zip(SPLITS, self.segments)):
            check_positive_int(name, value)
        if self.symbols < 2:
            raise ValueError(f"symbols must be at least 2 (one is always guessable), "
                             f"got {self.symbols}")

    def lines(self) -> dict[str, list[str]]:
        """The text lines of every split, one segment per line; deterministic for the seed."""
        rng = random.Random(self.seed)
        return {split: [self._segment(rng) for _ in range(count)]
                for split, count in zip(SPLITS, self.segments)}

    def _segment(self, rng: random.Random) -> str:
        distance = self.distances[rng.randrange(len(self.distances))]
        key = rng.randrange(self.symbols)
        fillers = [f"{_FILLER}{rng.randrange(self.fillers)}" for _ in range(distance - 2)]
        return " ".join((f"{_KEY}{key}", *fillers, CUE, f"{_VALUE}{key}"))

    def recalls(self, split: str) -> list[Recall]:
        """The positions that need memory in ``split``'s token stream, from the generator's
        own bookkeeping (not by parsing): what :func:`recall_positions` must find."""
        found, start = [], 0
        for line in self.lines()[split]:
            words = line.split()
            distance = len(words) - 1
            found.append(Recall(start + distance, distance, words[-1]))
            start += len(words) + 1  # the line's <eos>
        return found

    def write(self, directory: PathArg) -> Path:
        """Write the three split files and ``recall.json`` into ``directory``; return it.

        An existing directory written by the same task is kept after its files' MD5s are
        checked, and split files missing from it are written again (a study keeps only
        ``recall.json``: the corpus is regenerated from it and checked against its MD5s); one
        written by another task, or with altered files, is an error (nothing is overwritten).
        """
        directory = Path(directory)
        spec = directory / SPEC_FILE
        if spec.is_file():
            self._check_existing(directory, spec)
            return directory
        if directory.is_dir() and any(directory.iterdir()):
            raise DataError(f"{directory} is not empty and holds no {SPEC_FILE}: write the "
                            "recall corpus into a new directory")
        directory.mkdir(parents=True, exist_ok=True)
        for split, lines in self.lines().items():
            (directory / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        record = {"task": asdict(self),
                  "md5": {split: md5sum(directory / f"{split}.txt") for split in SPLITS}}
        spec.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return directory

    def _check_existing(self, directory: Path, spec: Path) -> None:
        record = json.loads(spec.read_text(encoding="utf-8"))
        if RecallTask(**record["task"]) != self:
            raise DataError(f"{directory} holds a recall corpus of other settings "
                            f"({record['task']}); use another directory")
        lines = self.lines()
        for split, expected in record["md5"].items():
            path = directory / f"{split}.txt"
            if not path.exists():
                path.write_text("\n".join(lines[split]) + "\n", encoding="utf-8")
            if md5sum(path) != expected:
                raise DataError(f"{path} differs from the corpus {SPEC_FILE} recorded (changed "
                                "since it was written, or another Python's random numbers); "
                                "delete the directory to write it again")


def recall_positions(tokens: Sequence[str]) -> list[Recall]:
    """Every value token of a recall stream: its position, and N, the distance to its key.

    A value is a ``v..`` token right after the cue; its key is the nearest ``k..`` before it.
    """
    found, last_key = [], None
    for position, token in enumerate(tokens):
        if token.startswith(_KEY) and token[1:].isdigit():
            last_key = position
        elif (token.startswith(_VALUE) and token[1:].isdigit() and position > 0
              and tokens[position - 1] == CUE and last_key is not None):
            found.append(Recall(position, position - last_key, token))
        elif token == EOS:
            last_key = None
    return found
