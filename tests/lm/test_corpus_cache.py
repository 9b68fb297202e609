"""The encoded-corpus cache (rnnreg.lm.corpus.cache): a hit gives the very tensors a fresh
encoding gives, a changed corpus misses, a damaged file is reported and replaced, and loading
a file runs no code.

The oracle for every load is the encoding written out here from its definition: the training
split's vocabulary (``build_vocabulary``) applied to each split's tokens (``tokenize``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from rnnreg.lm.corpus import batches, cache
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import SPLITS, corpus_cache_dir
from rnnreg.lm.corpus.vocab import Vocabulary, build_vocabulary, tokenize
from support import write_corpus


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def _cached_files() -> list[Path]:
    return sorted(corpus_cache_dir().glob("*.safetensors"))


def _expected(directory: Path) -> tuple[Vocabulary, dict[str, torch.Tensor]]:
    tokens = {split: tokenize((directory / f"{split}.txt").read_text(), "word")
              for split in SPLITS}
    vocab = build_vocabulary(tokens["train"])
    return vocab, {split: vocab.encode(toks) for split, toks in tokens.items()}


def _assert_encoded_as_expected(corpus: Corpus, directory: Path) -> None:
    vocab, ids = _expected(directory)
    assert corpus.vocab == vocab
    for split in SPLITS:
        got = getattr(corpus, split)
        assert got.dtype == torch.long and torch.equal(got, ids[split]), split


def _no_tokenizing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds the encoding")
    monkeypatch.setattr(batches, "tokenize", refuse)


def test_a_second_load_reads_the_cache_and_gives_the_same_corpus(tmp_path, monkeypatch):
    directory = write_corpus(tmp_path / "corpus")
    first = Corpus.load(directory)
    assert len(_cached_files()) == 1
    _no_tokenizing(monkeypatch)
    second = Corpus.load(directory)
    _assert_encoded_as_expected(second, directory)
    assert (second.source, second.notes) == (first.source, first.notes)
    # A copy elsewhere is the same corpus: the key is the files' content, not their place.
    copy = write_corpus(tmp_path / "copy")
    assert Corpus.load(copy).source["data_dir"] == str(copy.resolve())
    assert len(_cached_files()) == 1


def test_a_run_s_own_vocabulary_reads_the_cache_and_another_does_not(tmp_path, monkeypatch):
    directory = write_corpus(tmp_path / "corpus")
    own = Corpus.load(directory).vocab
    other = Vocabulary((*own.words, "zebra"))
    with monkeypatch.context() as patch:
        _no_tokenizing(patch)
        assert Corpus.load(directory, vocab=own).vocab == own
    reencoded = Corpus.load(directory, vocab=other)
    assert reencoded.vocab == other
    assert torch.equal(reencoded.train, other.encode(
        tokenize((directory / "train.txt").read_text(), "word")))
    assert len(_cached_files()) == 1  # an encoding under another vocabulary is not kept


def test_a_changed_corpus_misses_and_is_encoded_afresh(tmp_path):
    directory = write_corpus(tmp_path / "corpus")
    Corpus.load(directory)
    write_corpus(directory, seed=1)  # other phrases in another order: other MD5s
    _assert_encoded_as_expected(Corpus.load(directory), directory)
    assert len(_cached_files()) == 2
    # The reading settings are part of the key too.
    Corpus.load(directory, max_vocab=10)
    assert len(_cached_files()) == 3


@pytest.mark.parametrize("damage", ["truncated", "flipped", "pickle", "other corpus"])
def test_a_damaged_cache_file_is_reported_and_replaced(tmp_path, damage):
    directory = write_corpus(tmp_path / "corpus")
    other = write_corpus(tmp_path / "other", seed=3)
    first = Corpus.load(directory)
    [path] = _cached_files()
    good = path.read_bytes()
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "flipped":  # one id changed, the file still parses
        data = bytearray(good)
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "pickle":  # a pickle that would run code if it were ever unpickled
        path.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    else:  # a sound file, but another corpus's encoding
        Corpus.load(other)
        [other_path] = [p for p in _cached_files() if p != path]
        path.write_bytes(other_path.read_bytes())
    loaded = Corpus.load(directory)
    assert not marker.exists()
    _assert_encoded_as_expected(loaded, directory)
    assert loaded.notes[:-1] == first.notes and "cached encoding of this corpus was damaged" in (
        loaded.notes[-1])
    # Replaced by a sound encoding: it reads back, and the next load is clean.
    assert cache.read_encoded(path.stem).vocab == loaded.vocab
    assert Corpus.load(directory).notes == first.notes


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_a_cache_file_runs_no_code(tmp_path):
    """The reader is safetensors: a file carrying a pickle is data that fails its checks."""
    marker = tmp_path / "code-ran"
    key = "0" * 64
    cache.cache_path(key).parent.mkdir(parents=True)
    torch.save({"train": _RunsCode(str(marker))}, cache.cache_path(key))
    with pytest.raises(cache.DamagedCache):
        cache.read_encoded(key)
    assert not marker.exists()
    assert cache.read_encoded("1" * 64) is None  # no file: a plain miss


def test_a_cache_that_cannot_be_written_costs_a_note_not_the_load(tmp_path):
    directory = write_corpus(tmp_path / "corpus")
    corpus_cache_dir().parent.mkdir(parents=True)
    corpus_cache_dir().write_text("a file where the cache folder belongs")
    loaded = Corpus.load(directory)
    _assert_encoded_as_expected(loaded, directory)
    assert "could not be cached" in loaded.notes[-1]


def test_the_cache_file_holds_ids_and_words_only(tmp_path):
    directory = write_corpus(tmp_path / "corpus")
    corpus = Corpus.load(directory)
    [path] = _cached_files()
    tensors = safetensors.torch.load_file(path)
    assert sorted(tensors) == sorted(SPLITS)
    assert torch.equal(tensors["valid"], corpus.valid)
