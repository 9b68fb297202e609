"""Helpers shared by the tests of every folder: where the repository is, the thread count the
suite and its subprocesses use, a tiny learnable corpus on disk, and a strict JSON check.

``tests/`` is on pytest's ``pythonpath`` (pyproject.toml), so a test imports these as
``from support import ...``; a subprocess a test starts gets the same view from
:data:`SCRIPT_PATH`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# PYTHONPATH for a subprocess that imports rnnreg from this checkout and these helpers.
SCRIPT_PATH = os.pathsep.join((str(REPO_ROOT), str(REPO_ROOT / "tests")))

# The models under test are tiny: one intra-op thread is several times faster than two on a
# shared machine, and it keeps results identical between this process and the subprocesses
# that the resume tests start (they set the same count).
TEST_THREADS = 1

# Short phrases over a small vocabulary: inside a phrase the next word is (nearly) determined,
# so a model that learns anything at all drops far below the unigram perplexity.
PHRASES = (
    "the cat sat on the mat",
    "the dog ran to the park",
    "a bird flew over the tree",
    "my friend ate a red apple",
    "the cat ate the fish",
    "a dog sat under the tree",
)


def write_corpus(directory: Path, *, train_lines: int = 300, valid_lines: int = 40,
                 test_lines: int = 40, seed: int = 0,
                 phrases: tuple[str, ...] = PHRASES) -> Path:
    """Write train/valid/test .txt files of randomly ordered phrases, one per line."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train_lines), ("valid", valid_lines), ("test", test_lines)):
        text = "".join(rng.choice(phrases) + "\n" for _ in range(lines))
        (directory / f"{split}.txt").write_text(text, encoding="utf-8")
    return directory


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON (jq and JSON.parse reject it)")


def assert_strict_json(directory: Path) -> int:
    """Parse every .json and .jsonl file under ``directory`` as strict JSON; return how many.

    Python's json module reads and writes NaN and Infinity, which no other JSON reader accepts,
    so the check refuses them explicitly.
    """
    import json

    checked = 0
    for path in sorted(Path(directory).rglob("*.json*")):
        if path.suffix not in (".json", ".jsonl"):
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in filter(str.strip, lines):
            json.loads(line, parse_constant=_no_constants)
        checked += 1
    return checked
