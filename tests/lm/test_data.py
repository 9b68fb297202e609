"""Tests for rnnreg.lm.corpus.sources, .vocab and .data: independent expectations, tiny corpora."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rnnreg.lm.corpus import sources
from rnnreg.lm.corpus.batches import Corpus, batchify, num_windows, shard_streams, windows
from rnnreg.lm.corpus.sources import (
    CorpusLocation,
    DataError,
    download_ptb,
    locate_corpus,
    read_text,
    split_files,
    verify_ptb,
)
from rnnreg.lm.corpus.vocab import EOS, UNK, Vocabulary, build_vocabulary, tokenize

REAL_PTB = Path(__file__).resolve().parents[3] / "shared" / "data" / "ptb"

TRAIN = "the cat sat\nthe dog sat\nthe <unk> ran\n"
VALID = "the cat ran\n"
TEST = "a dog sat\n"


def _md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


def _write_corpus(directory: Path, prefix: str = "", **texts: str) -> Path:
    """Write train/valid/test files (defaults above, overridable per split).

    Plain names by default: tiny files named ptb.* would fail the real PTB checksums.
    """
    directory.mkdir(parents=True, exist_ok=True)
    defaults = {"train": TRAIN, "valid": VALID, "test": TEST}
    for split, text in {**defaults, **texts}.items():
        (directory / f"{prefix}{split}.txt").write_text(text, encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- locations


def test_locate_corpus_prefers_argument_then_record_then_env_then_default(monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(sources.DATA_ENV, str(tmp_path / "env"))
    assert locate_corpus(tmp_path / "arg", tmp_path / "rec") == CorpusLocation(
        tmp_path / "arg", "argument")
    assert locate_corpus(None, tmp_path / "rec") == CorpusLocation(tmp_path / "rec", "recorded")
    assert locate_corpus(None) == CorpusLocation(tmp_path / "env", "environment")
    monkeypatch.delenv(sources.DATA_ENV)
    assert locate_corpus() == CorpusLocation(tmp_path / "cache" / "rnnreg" / "ptb", "default")


def test_ptb_is_fetched_only_where_no_corpus_is_named(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(sources, "download_ptb", lambda path, progress: fetched.append(path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(sources.DATA_ENV, str(tmp_path / "env"))
    for named in (locate_corpus(tmp_path / "arg"), locate_corpus(None, tmp_path / "rec"),
                  locate_corpus(None)):
        sources.ensure_ptb(named, progress=False)
    assert fetched == []
    monkeypatch.delenv(sources.DATA_ENV)
    sources.ensure_ptb(locate_corpus(), progress=False)
    assert fetched == [tmp_path / "cache" / "rnnreg" / "ptb"]


def test_default_data_dir_falls_back_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sources.default_data_dir() == tmp_path / ".cache" / "rnnreg" / "ptb"


def test_split_files_prefers_ptb_names_and_accepts_plain_names(tmp_path):
    _write_corpus(tmp_path)
    (tmp_path / "ptb.valid.txt").write_text(VALID)
    files = split_files(tmp_path)
    assert files == {
        "train": tmp_path / "train.txt",
        "valid": tmp_path / "ptb.valid.txt",
        "test": tmp_path / "test.txt",
    }


def test_split_files_missing_directory_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError) as err:
        split_files(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "rnnreg download ptb" in message and sources.DATA_ENV in message


def test_a_data_error_says_when_its_path_came_from_rnnreg_data(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as from_env:
        Corpus.load(None)
    assert str(from_env.value).startswith(f"data directory {tmp_path / 'nowhere'} does not")
    assert str(from_env.value).endswith(f"(the data path {tmp_path / 'nowhere'} came from the "
                                        "environment variable RNNREG_DATA: change or unset it)")
    with pytest.raises(DataError) as given:  # a path given in the call is not the variable's
        Corpus.load(tmp_path / "nowhere")
    assert "RNNREG_DATA: change" not in str(given.value)


def test_split_files_missing_split_names_expected_files(tmp_path):
    _write_corpus(tmp_path, prefix="ptb.")
    (tmp_path / "ptb.valid.txt").unlink()
    with pytest.raises(DataError) as err:
        split_files(tmp_path)
    message = str(err.value)
    assert "ptb.valid.txt" in message and "valid.txt" in message and str(tmp_path) in message
    assert "rnnreg download ptb" in message
    assert "train" not in message.split(" in ")[0]


# --------------------------------------------------------------------------- integrity


def test_md5sum_matches_hashlib(tmp_path):
    content = bytes(range(256)) * 5000  # over 1 MiB, so more than one read chunk
    (tmp_path / "f").write_bytes(content)
    assert sources.md5sum(tmp_path / "f") == _md5(content)


def test_verify_ptb_detects_corrupt_file(tmp_path):
    _write_corpus(tmp_path, prefix="ptb.")
    md5s = {f"ptb.{s}.txt": sources.md5sum(tmp_path / f"ptb.{s}.txt") for s in sources.SPLITS}
    verify_ptb(tmp_path, md5s=md5s)  # untouched files pass
    (tmp_path / "ptb.valid.txt").write_text("the cat sat down\n")
    with pytest.raises(DataError) as err:
        verify_ptb(tmp_path, md5s=md5s)
    message = str(err.value)
    assert "ptb.valid.txt" in message and "corrupt download" in message
    assert md5s["ptb.valid.txt"] in message and "delete" not in message
    assert f"rnnreg download ptb --data-dir {tmp_path}" in message


def test_verify_ptb_uses_module_constant_and_ignores_user_corpora(monkeypatch, tmp_path):
    _write_corpus(tmp_path)
    monkeypatch.setattr(sources, "PTB_MD5", {f"ptb.{s}.txt": "0" * 32 for s in sources.SPLITS})
    verify_ptb(tmp_path)  # train.txt etc. are the user's own corpus: not checked
    (tmp_path / "ptb.valid.txt").write_text(VALID)
    with pytest.raises(DataError, match="ptb.valid.txt"):
        verify_ptb(tmp_path)


def _source(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A file:// mirror of three tiny PTB files and their checksums."""
    source = _write_corpus(tmp_path / "mirror", prefix="ptb.")
    md5s = {f"ptb.{s}.txt": sources.md5sum(source / f"ptb.{s}.txt") for s in sources.SPLITS}
    return source.as_uri() + "/{name}", md5s


def test_download_ptb_fetches_and_verifies(tmp_path):
    url, md5s = _source(tmp_path)
    target = tmp_path / "new" / "dir"
    assert download_ptb(target, url_template=url, md5s=md5s, progress=False) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([*md5s, sources.DOWNLOAD_MARKER])
    assert (target / "ptb.train.txt").read_text() == TRAIN
    verify_ptb(target, md5s=md5s)


def test_download_ptb_skips_good_files_and_replaces_corrupt_ones(tmp_path):
    url, md5s = _source(tmp_path)
    target = _write_corpus(tmp_path / "data", prefix="ptb.")
    (target / "ptb.test.txt").write_text("corrupted\n")
    # A skipped file must not be fetched: remove it from the mirror so fetching would fail.
    (tmp_path / "mirror" / "ptb.train.txt").unlink()
    (tmp_path / "mirror" / "ptb.valid.txt").unlink()
    download_ptb(target, url_template=url, md5s=md5s, progress=False)
    assert (target / "ptb.test.txt").read_text() == TEST


def test_download_ptb_md5_mismatch_leaves_nothing_behind(tmp_path):
    url, md5s = _source(tmp_path)
    md5s["ptb.valid.txt"] = "0" * 32
    target = tmp_path / "data"
    with pytest.raises(DataError) as err:
        download_ptb(target, url_template=url, md5s=md5s, progress=False)
    message = str(err.value)
    assert url.format(name="ptb.valid.txt") in message
    assert "0" * 32 in message and _md5(VALID.encode()) in message
    # train came first and verified, but a half corpus is no corpus: it is removed again, the
    # corrupt valid left neither file nor temporary file, and the directory made for them went.
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / "mirror"]


def test_download_ptb_unreachable_url_raises_data_error(tmp_path):
    url, md5s = _source(tmp_path)
    (tmp_path / "mirror" / "ptb.train.txt").unlink()
    target = tmp_path / "data"
    target.mkdir()  # the user's directory: emptied of what the download wrote, not removed
    with pytest.raises(DataError, match="could not download .*ptb.train.txt"):
        download_ptb(target, url_template=url, md5s=md5s, progress=False)
    assert list(target.iterdir()) == []


# --------------------------------------------------------------------------- text


def test_tokenize_words_ends_every_line_with_eos():
    text = "a b  c\n\nd\t e\n"
    assert tokenize(text, "word") == ["a", "b", "c", EOS, EOS, "d", "e", EOS]
    assert tokenize("x", "word") == ["x", EOS]  # no trailing newline: same as with one
    assert tokenize("", "word") == []


def test_tokenize_chars_marks_word_boundaries_with_underscore():
    assert tokenize(" ab c \nd_e\n", "char") == ["a", "b", "_", "c", EOS, "d", "_", "e", EOS]


def test_tokenize_rejects_unknown_level():
    with pytest.raises(DataError, match="'word', 'char'"):
        tokenize("a", "byte")


def test_read_text_reports_byte_offset_of_bad_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf" + "\xe9 x".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_text(path)
    assert str(path) in str(err.value) and "byte offset 3" in str(err.value)


def test_read_text_drops_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_text(path) == "hello\n"


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_orders_by_frequency_then_alphabet():
    tokens = "b c a c b c d".split()
    vocab = Vocabulary.from_tokens(tokens)
    assert vocab.words == ("c", "b", "a", "d")
    assert Vocabulary.from_tokens(reversed(tokens)) == vocab  # order of appearance is irrelevant
    assert len(vocab) == 4 and "a" in vocab and "z" not in vocab
    assert vocab.index("a") == 2


def test_vocabulary_encode_decode_and_unk():
    vocab = Vocabulary(("the", UNK, "cat"))
    assert vocab.unk_id == 1
    ids = vocab.encode(["the", "dog", "cat"])
    assert ids.dtype == torch.long and ids.tolist() == [0, 1, 2]
    assert vocab.decode(ids) == ["the", UNK, "cat"]
    assert vocab.decode([2, 0]) == ["cat", "the"]


def test_vocabulary_without_unk_rejects_unknown_words():
    vocab = Vocabulary(("the", "cat"))
    assert vocab.unk_id is None
    unknown = [f"w{i}" for i in range(12)]
    with pytest.raises(DataError) as err:
        vocab.encode(["the", *unknown, "w0"])
    message = str(err.value)
    assert "13 tokens (12 distinct words)" in message
    assert "'w9'" in message and "'w10'" not in message  # at most ten named
    assert "<unk>" in message and "training split" in message


def test_vocabulary_rejects_empty_duplicates_and_foreign_ids():
    with pytest.raises(DataError, match="empty"):
        Vocabulary(())
    with pytest.raises(DataError, match="more than once.*a"):
        Vocabulary(("a", "b", "a"))
    with pytest.raises(DataError, match="not in the vocabulary"):
        Vocabulary(("a",)).index("b")
    with pytest.raises(DataError, match="outside the vocabulary"):
        Vocabulary(("a",)).decode([-1])


def test_vocabulary_json_round_trip():
    vocab = Vocabulary.from_tokens("x y y z".split() + [EOS])
    restored = Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored == vocab and restored.index("y") == vocab.index("y")
    with pytest.raises(DataError, match="list of strings"):
        Vocabulary.from_json({"words": ["a"]})


# --------------------------------------------------------------------------- corpus


def test_corpus_builds_vocab_from_train_only(tmp_path):
    corpus = Corpus.load(_write_corpus(tmp_path))
    # "a" appears only in test, so it maps to <unk>; it never enters the vocabulary.
    assert "a" not in corpus.vocab
    assert corpus.vocab.words[:3] == (EOS, "the", "sat")  # EOS and "the" tie; "<" sorts first
    assert corpus.vocab.decode(corpus.test) == [UNK, "dog", "sat", EOS]
    assert corpus.train.numel() == 12 and corpus.split("valid") is corpus.valid
    with pytest.raises(DataError, match="unknown split 'dev'"):
        corpus.split("dev")


def test_corpus_uses_given_vocab(tmp_path):
    vocab = Vocabulary(("dog", "cat", "the", "sat", "ran", "a", EOS, UNK))
    corpus = Corpus.load(_write_corpus(tmp_path), vocab=vocab)
    assert corpus.vocab is vocab
    assert corpus.valid.tolist() == [2, 1, 4, 6]


def test_corpus_char_level(tmp_path):
    corpus = Corpus.load(_write_corpus(tmp_path, train="ab a\n", valid="b\n", test="ba\n"), "char")
    assert corpus.level == "char"
    assert corpus.vocab.decode(corpus.train) == ["a", "b", "_", "a", EOS]


def test_raw_text_gets_an_unk_for_words_training_never_saw(tmp_path):
    directory = _write_corpus(tmp_path, train="the cat\nthe cat\n", valid="the dog ran\n",
                              test="a cat\n")
    corpus = Corpus.load(directory)
    assert UNK in corpus.vocab
    assert corpus.vocab.decode(corpus.valid) == ["the", UNK, UNK, EOS]
    # Each split's share of <unk>, counted from the text: 0 of 6, 2 of 4, 1 of 3.
    assert corpus.unknown_share() == {"train": (0, 6), "valid": (2, 4), "test": (1, 3)}
    assert corpus.describe_unknown() == f"{UNK} share: train 0.0%, valid 50.0%, test 33.3%"


def test_a_corpus_with_unk_keeps_its_vocabulary_exactly(tmp_path):
    directory = _write_corpus(tmp_path)
    assert Corpus.load(directory).vocab == Vocabulary.from_tokens(
        tokenize((directory / "train.txt").read_text(), "word"))


def test_min_count_and_max_vocab_fold_rare_words_into_unk():
    tokens = "a a a b b c d".split() + [EOS] * 2
    # c and d fold into <unk> (count 2); ties of 2 sort by name, "<" before "b".
    assert build_vocabulary(tokens, min_count=2).words == ("a", EOS, UNK, "b")
    # max_vocab counts <eos> and <unk>: room for two words, a and b.
    assert build_vocabulary(tokens, max_vocab=4).words == ("a", EOS, UNK, "b")
    assert build_vocabulary(tokens, max_vocab=3).words == (UNK, "a", EOS)  # b, c, d: 4
    with pytest.raises(DataError, match="max_vocab=2 leaves no room"):
        build_vocabulary(tokens, max_vocab=2)


def test_one_text_file_is_cut_into_contiguous_parts_by_the_fractions(tmp_path):
    text = "".join(f"line {i} has words\n" for i in range(200))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    for given in (tmp_path, tmp_path / "input.txt"):
        for level in ("word", "char"):
            corpus = Corpus.load(given, level, split_fractions=(0.8, 0.1, 0.1))
            tokens = tokenize(text, level)
            parts = [corpus.vocab.decode(getattr(corpus, s)) for s in sources.SPLITS]
            assert [len(p) for p in parts] == [round(len(tokens) * 0.8),
                                               round(len(tokens) * 0.9) - round(
                                                   len(tokens) * 0.8),
                                               len(tokens) - round(len(tokens) * 0.9)]
            # Contiguous and disjoint: read in order they are the file, <unk> where unseen.
            joined = [t for part in parts for t in part]
            assert len(joined) == len(tokens)
            assert all(a == b or a == UNK for a, b in zip(joined, tokens))
            assert corpus.source["files"]["text"]["md5"] == sources.md5sum(tmp_path / "input.txt")
            assert corpus.source["split_fractions"] == [0.8, 0.1, 0.1]
            assert any("input.txt: one text file, cut" in note for note in corpus.notes)


def test_a_directory_without_test_loads_with_a_note(tmp_path):
    directory = _write_corpus(tmp_path)
    (directory / "test.txt").unlink()
    corpus = Corpus.load(directory)
    assert corpus.test is None and "no test split" in " ".join(corpus.notes)
    with pytest.raises(DataError, match="no test split"):
        corpus.split("test")


def test_ptb_named_files_outside_a_download_are_a_custom_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = _write_corpus(tmp_path / "mine", prefix="ptb.")
    corpus = Corpus.load(directory)  # no MD5 error: rnnreg did not download these
    assert any("custom corpus" in note for note in corpus.notes)
    (directory / sources.DOWNLOAD_MARKER).write_text("")
    with pytest.raises(DataError, match="corrupt download"):
        Corpus.load(directory)


def test_a_recorded_corpus_that_changed_is_refused_naming_the_file(tmp_path):
    directory = _write_corpus(tmp_path)
    recorded = Corpus.load(directory).source
    Corpus.load(directory, recorded=recorded)  # unchanged: fine
    (directory / "valid.txt").write_text("the dog sat\n")
    with pytest.raises(DataError, match=r"valid.txt changed since the run was trained"):
        Corpus.load(directory, recorded=recorded)


def test_corpus_rejects_empty_split(tmp_path):
    directory = _write_corpus(tmp_path, valid="\n  \n")
    with pytest.raises(DataError) as err:
        Corpus.load(directory)
    assert "split 'valid'" in str(err.value) and "is empty" in str(err.value)
    assert str(directory / "valid.txt") in str(err.value)


def test_corpus_rejects_non_utf8_split(tmp_path):
    directory = _write_corpus(tmp_path)
    (directory / "test.txt").write_bytes(b"ok \xff\n")
    with pytest.raises(DataError, match=r"test.txt is not valid UTF-8 \(byte offset 3\)"):
        Corpus.load(directory)


def test_corpus_resolves_directory_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.DATA_ENV, str(_write_corpus(tmp_path)))
    assert Corpus.load(None).valid.numel() == 4


def test_real_ptb_counts():
    if not REAL_PTB.is_dir():
        pytest.skip(f"real PTB not found at {REAL_PTB}")
    corpus = Corpus.load(REAL_PTB)
    assert len(corpus.vocab) == 10000
    assert corpus.vocab.unk_id is not None
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (
        929589,
        73760,
        82430,
    )


# --------------------------------------------------------------------------- batches


def test_batchify_columns_are_contiguous_chunks_and_remainder_dropped():
    ids = torch.arange(26)  # a..z
    streams = batchify(ids, 4)
    assert streams.shape == (6, 4) and streams.is_contiguous()
    for b in range(4):
        assert streams[:, b].tolist() == list(range(6 * b, 6 * b + 6))
    assert 24 not in streams and 25 not in streams


def test_batchify_rejects_bad_sizes():
    with pytest.raises(ValueError):
        batchify(torch.arange(10), 0)
    with pytest.raises(DataError, match="too small for batch size 6"):
        batchify(torch.arange(11), 6)
    assert batchify(torch.arange(12), 6).shape == (2, 6)


@pytest.mark.parametrize("steps, bptt", [(11, 3), (10, 3), (2, 5), (7, 1), (9, 8)])
def test_windows_cover_every_target_once(steps, bptt):
    streams = batchify(torch.arange(steps * 2), 2)
    seen = []
    pairs = list(windows(streams, bptt))
    assert len(pairs) == num_windows(streams, bptt)
    for inputs, targets in pairs:
        assert inputs.shape == targets.shape and inputs.size(0) <= bptt
        # In each column the target is the corpus token right after the input token.
        assert torch.equal(targets, inputs + 1)
        seen.extend(targets[:, 0].tolist())
    assert seen == list(range(1, steps))


def test_windows_start_resumes_at_a_window_boundary():
    streams = batchify(torch.arange(40), 2)  # T = 20
    all_windows = list(windows(streams, 6))
    resumed = list(windows(streams, 6, start=2 * 6))
    assert len(resumed) == len(all_windows) - 2
    for (x, y), (rx, ry) in zip(all_windows[2:], resumed, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert list(windows(streams, 6, start=19)) == []


def test_windows_reject_bad_bptt_immediately():
    with pytest.raises(ValueError):
        windows(torch.zeros(5, 2), 0)
    with pytest.raises(ValueError):
        num_windows(torch.zeros(5, 2), 0)


def test_shard_streams_splits_columns_into_contiguous_blocks():
    streams = batchify(torch.arange(48), 6)
    shards = [shard_streams(streams, rank, 3) for rank in range(3)]
    assert all(shard.shape == (8, 2) and shard.is_contiguous() for shard in shards)
    assert torch.equal(torch.cat(shards, dim=1), streams)
    assert shards[1][:, 0].tolist() == list(range(16, 24))
    with pytest.raises(ValueError, match="not divisible by world size 4"):
        shard_streams(streams, 0, 4)
    with pytest.raises(ValueError):
        shard_streams(streams, 3, 3)
