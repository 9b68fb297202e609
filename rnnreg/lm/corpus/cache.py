"""The encoded corpus, kept between commands so that a corpus is tokenized once.

Starting, resuming, evaluating and reporting on a run all need the same encoded splits; on PTB
tokenizing and encoding them costs seconds every time. :class:`rnnreg.lm.corpus.batches.Corpus`
therefore keeps what it encoded in the per-user cache
(:func:`rnnreg.lm.corpus.sources.corpus_cache_dir`), one safetensors file per corpus, named by
a key over everything the encoding depends on: the MD5 of every file (which
:class:`~rnnreg.lm.corpus.batches.Corpus` computes anyway, to record where a run's corpus came
from), the tokenization level, the one-file cut and the vocabulary's limits.

Nothing in the file is trusted: safetensors holds tensors and strings only (loading it runs no
code, unlike a pickle), the file repeats its own key, and a SHA-256 digest over its key,
vocabulary and ids must match before a hit is used. A file that fails any check is reported
and replaced by a fresh encoding; a cache that cannot be written costs speed, never a run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from rnnreg.lm.corpus.sources import DataError, corpus_cache_dir
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.rundir.files import atomic_write_bytes, writing

__all__ = ["DamagedCache", "Encoded", "cache_key", "cache_path", "read_encoded", "write_encoded"]

FORMAT = "rnnreg-encoded-corpus-1"


@dataclass(frozen=True, eq=False)
class Encoded:
    """A corpus's vocabulary (built from its training split) and its splits' ids under it."""

    vocab: Vocabulary
    splits: dict[str, Tensor]


class DamagedCache(Exception):
    """A cache file that exists but fails a check; the message says which."""


def cache_key(files: Mapping[str, Mapping], *, level: str, max_vocab: int | None,
              min_count: int, split_fractions: Sequence[float] | None) -> str:
    """The key of an encoding: every input that changes it, hashed (``files`` maps each role to
    its record with ``md5``; ``split_fractions`` only for a one-file corpus)."""
    inputs = {"format": FORMAT, "level": level, "max_vocab": max_vocab, "min_count": min_count,
              "split_fractions": None if split_fractions is None else list(split_fractions),
              "md5": {role: info["md5"] for role, info in sorted(files.items())}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_path(key: str) -> Path:
    return corpus_cache_dir() / f"{key}.safetensors"


def _digest(key: str, words: str, splits: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256(key.encode())
    digest.update(words.encode("utf-8"))
    for name in sorted(splits):
        digest.update(name.encode())
        digest.update(splits[name].numpy().tobytes())
    return digest.hexdigest()


def write_encoded(key: str, encoded: Encoded) -> Path:
    """Store ``encoded`` under ``key``, atomically (a reader sees the old file or the new one).

    Raises :class:`rnnreg.lm.rundir.files.WriteError` when the cache cannot be written.
    """
    words = json.dumps(list(encoded.vocab.words))
    splits = {name: ids.contiguous() for name, ids in encoded.splits.items()}
    metadata = {"format": FORMAT, "key": key, "words": words,
                "digest": _digest(key, words, splits)}
    path = cache_path(key)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors.torch.save(splits, metadata=metadata))
    return path


def read_encoded(key: str) -> Encoded | None:
    """The encoding stored under ``key``; None when there is none.

    Raises :class:`DamagedCache` for a file that is there but unreadable or fails a check.
    """
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as stored:
            metadata = stored.metadata() or {}
            splits = {name: stored.get_tensor(name) for name in stored.keys()}
    except (OSError, safetensors.SafetensorError) as error:
        raise DamagedCache(f"unreadable: {error}") from error
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        raise DamagedCache("it is not this corpus's encoding")
    words = metadata.get("words", "")
    if metadata.get("digest") != _digest(key, words, splits):
        raise DamagedCache("its contents do not match their digest")
    try:
        vocab = Vocabulary(json.loads(words))
    except (ValueError, TypeError, DataError) as error:
        raise DamagedCache(f"its vocabulary is unreadable: {error}") from error
    if not {"train", "valid"} <= set(splits) <= {"train", "valid", "test"} or any(
            ids.dtype != torch.long or ids.dim() != 1 or ids.numel() == 0
            or int(ids.min()) < 0 or int(ids.max()) >= len(vocab) for ids in splits.values()):
        raise DamagedCache("its splits are not ids of its vocabulary")
    return Encoded(vocab, splits)
