"""The recall corpus: deterministic, an ordinary text corpus, and its memory positions exact.

The oracle checks do not trust the generator's own bookkeeping: lookup tables learnt on the
training split predict each token of the test split from the single token j steps earlier. A
token that needs a memory of N steps is predicted perfectly by the table for j = N and at
chance by every table for j < N; no other token gains anything from looking further back
than one step.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.recall import RecallTask, recall_positions
from rnnreg.lm.corpus.sources import DataError
from rnnreg.lm.corpus.vocab import EOS, tokenize
from rnnreg.lm.evaluation import token_scores
from rnnreg.lm.model import LanguageModel
from rnnreg.study.memory import recall_scores

TASK = RecallTask(distances=(2, 3, 7, 12), symbols=6, fillers=5, segments=(3000, 50, 600),
                  seed=3)


def _tokens(task: RecallTask, split: str) -> list[str]:
    return tokenize("\n".join(task.lines()[split]) + "\n", "word")


def test_same_task_same_corpus_other_seed_other_corpus():
    assert TASK.lines() == RecallTask(**{**TASK.__dict__}).lines()
    other = RecallTask(distances=TASK.distances, symbols=6, fillers=5, segments=(3000, 50, 600),
                       seed=4)
    assert other.lines()["train"] != TASK.lines()["train"]
    counts = Counter(recall.distance for recall in TASK.recalls("train"))
    assert set(counts) == set(TASK.distances)  # every distance is drawn
    assert min(counts.values()) > 600


def test_positions_found_in_the_text_are_the_generators_own():
    for split in ("train", "valid", "test"):
        tokens = _tokens(TASK, split)
        found = recall_positions(tokens)
        assert found == TASK.recalls(split)
        for recall in found:
            assert tokens[recall.position] == recall.answer
            assert tokens[recall.position - recall.distance] == "k" + recall.answer[1:]


def _table(tokens: list[str], positions: list[int], offset: int) -> dict[str, str]:
    """For each token, the token most often seen ``offset`` steps after it, at ``positions``."""
    following: dict[str, Counter] = defaultdict(Counter)
    for position in positions:
        if position >= offset:
            following[tokens[position - offset]][tokens[position]] += 1
    return {token: counts.most_common(1)[0][0] for token, counts in following.items()}


def _accuracy(tokens: list[str], positions: list[int], table: dict[str, str],
              offset: int) -> float:
    hits = [table.get(tokens[p - offset]) == tokens[p] for p in positions if p >= offset]
    return sum(hits) / len(hits)


def _classes(tokens: list[str]) -> dict[object, list[int]]:
    """Positions of each distance's values, and of every other token ("other")."""
    recalls = recall_positions(tokens)
    classes: dict[object, list[int]] = defaultdict(list)
    for recall in recalls:
        classes[recall.distance].append(recall.position)
    listed = {recall.position for recall in recalls}
    classes["other"] = [p for p in range(len(tokens)) if p not in listed]
    return classes


def test_memory_positions_need_exactly_n_steps_and_the_others_need_none():
    # Oracles that know which kind of position they predict, and look at one token j back.
    train, test = _tokens(TASK, "train"), _tokens(TASK, "test")
    learnt, scored = _classes(train), _classes(test)
    longest, chance = max(TASK.distances), 1 / TASK.symbols
    for distance in TASK.distances:
        def accuracy(offset: int, distance: int = distance) -> float:
            table = _table(train, learnt[distance], offset)
            return _accuracy(test, scored[distance], table, offset)

        assert accuracy(distance) == 1.0
        for offset in range(1, distance):
            # Only the N-1 tokens before it in view: no better than guessing.
            assert accuracy(offset) < chance + 0.12, (distance, offset)

    def other(offset: int) -> float:
        return _accuracy(test, scored["other"], _table(train, learnt["other"], offset), offset)

    for offset in range(2, longest + 1):
        # Looking further back predicts no other token better than the previous token does.
        assert other(offset) <= other(1) + 0.02, offset
    assert {test[p] for p in scored["other"] if test[p - 1].startswith("v")} == {EOS}


def test_written_files_are_an_ordinary_corpus_and_are_checked(tmp_path):
    directory = TASK.write(tmp_path / "recall")
    corpus = Corpus.load(directory, "word")
    assert corpus.vocab.decode(corpus.test) == _tokens(TASK, "test")
    assert TASK.write(directory) == directory  # same task: kept as it is
    (directory / "test.txt").unlink()  # a study keeps recall.json only: rewritten from it
    assert TASK.write(directory) == directory
    assert Corpus.load(directory, "word").vocab.decode(corpus.test) == _tokens(TASK, "test")
    with pytest.raises(DataError, match="other settings"):
        RecallTask(seed=9).write(directory)
    (directory / "test.txt").write_text("k1 ? v1\n", encoding="utf-8")
    with pytest.raises(DataError, match="differs from the corpus"):
        TASK.write(directory)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine\n", encoding="utf-8")
    with pytest.raises(DataError, match="not empty"):
        TASK.write(tmp_path / "busy")


@pytest.mark.parametrize("bad, message", [
    (dict(distances=(1, 4)), ">= 2"), (dict(distances=(4, 4)), "distinct"),
    (dict(symbols=1), "at least 2"), (dict(segments=(10, 10)), "one count per split"),
])
def test_bad_tasks_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        RecallTask(**bad)


def test_token_scores_agree_with_a_plain_forward_and_feed_recall_scores(tmp_path):
    directory = RecallTask(distances=(2, 4), symbols=3, fillers=2, segments=(40, 5, 30),
                           seed=1).write(tmp_path / "recall")
    corpus = Corpus.load(directory, "word")
    config = Config(hidden_size=8, num_layers=1, strategy="zaremba", strategy_p=0.5)
    torch.manual_seed(0)
    model = LanguageModel(len(corpus.vocab), config)
    ids = corpus.test
    scores = token_scores(model, ids, bptt=7)  # windows of 7 carry the state across
    model.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids[:-1].unsqueeze(1)).logits[:, 0], -1)
    expected = log_probs.gather(1, ids[1:].unsqueeze(1))[:, 0]
    torch.testing.assert_close(scores.log_probs, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.correct, log_probs.argmax(-1) == ids[1:])
    assert model.training is False  # left as it was found


def test_recall_scores_of_a_trained_run(tmp_path):
    from rnnreg.lm.training.loop import train

    directory = RecallTask(distances=(2, 4), symbols=3, fillers=2, segments=(60, 10, 40),
                           seed=2).write(tmp_path / "recall")
    config = Config(hidden_size=8, num_layers=1, bptt=10, batch_size=4, epochs=1,
                    strategy="none", strategy_p=0.0, device="cpu", checkpoint_minutes=0)
    train(config, tmp_path / "run", data_dir=directory, progress=False, verbose=False)
    scores = recall_scores(tmp_path / "run", directory)
    recalls = recall_positions(_tokens(RecallTask(distances=(2, 4), symbols=3, fillers=2,
                                                  segments=(60, 10, 40), seed=2), "test"))
    assert set(scores) == {2, 4}
    for distance, score in scores.items():
        assert score.tokens == sum(r.distance == distance for r in recalls)
        assert 0.0 <= score.accuracy <= 1.0 and score.perplexity >= 1.0


def test_eval_tokens_scores_the_first_tokens_of_valid_and_test(tmp_path):
    """A run scored on a slice records exactly the slice's perplexity, not the split's."""
    from rnnreg.lm.evaluation import load_model, score_stream
    from rnnreg.lm.training.loop import train

    directory = TASK.write(tmp_path / "recall")
    config = Config(hidden_size=8, num_layers=1, bptt=10, batch_size=4, epochs=1,
                    train_tokens=600, eval_tokens=150, strategy="none", strategy_p=0.0,
                    device="cpu", checkpoint_minutes=0)
    final = train(config, tmp_path / "run", data_dir=directory, progress=False, verbose=False)
    model, vocab, _ = load_model(tmp_path / "run", weights="last", device="cpu")
    corpus = Corpus.load(directory, "word", vocab)
    for split in ("valid", "test"):
        ids = corpus.split(split)
        sliced = score_stream(model, ids[:150], bptt=config.eval_bptt)
        assert sliced.tokens == 149
        assert final[f"{split}_ppl"] == pytest.approx(sliced.perplexity, rel=1e-5)
        assert final[f"{split}_ppl"] != pytest.approx(
            score_stream(model, ids, bptt=config.eval_bptt).perplexity, rel=1e-3)
    with pytest.raises(ValueError, match="eval_tokens"):
        Config(eval_tokens=1)
