"""Tests for the training loop: learning, metrics, run directory, determinism and exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import rnnreg.lm.training.loop as train_module
from rnnreg import cli
from rnnreg.cli.flags import worded
from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.evaluation import load_model
from rnnreg.lm.presets import preset_config
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training import console
from rnnreg.lm.training.loop import TrainingDiverged, train
from rnnreg.lm.training.resume import resumed_config
from support import TEST_THREADS, write_corpus
from support.steps import train_killed


def _quiet_train(config: Config, out: Path, data_dir: Path, **kwargs) -> dict:
    return train(config, out, data_dir=data_dir, progress=False, verbose=False, **kwargs)


def _weights(out: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_tree(Path(out) / "checkpoints" / f"{name}.safetensors")["model"]


def _epochs(out: Path) -> list[dict]:
    return [r for r in RunDir(out).read_metrics() if r.get("event") == "epoch"]


def _finals(out: Path) -> list[dict]:
    return [r for r in RunDir(out).read_metrics() if r.get("event") == "final"]


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# The paper's small recipe (plain SGD at lr 1 on the loss summed over the unrolled steps,
# clipping at 5, the decay schedule, 2 layers) scaled down to the tiny corpus. A 16-unit model
# starts learning within a few hundred steps only from a wider initialisation than 0.1.
RECIPE = preset_config("small").replace(
    hidden_size=16, batch_size=4, bptt=5, epochs=3, init_range=0.3, eval_bptt=50,
    checkpoint_minutes=0.0, seed=3, device="cpu")


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, module_corpus):
    out = tmp_path_factory.mktemp("runs") / "recipe"
    summary = _quiet_train(RECIPE, out, module_corpus)
    return out, summary


# --------------------------------------------------------------------------- one run


@pytest.mark.slow
def test_paper_recipe_lowers_train_and_valid_perplexity(recipe_run):
    out, summary = recipe_run
    epochs = _epochs(out)
    train_ppl = [r["train_ppl"] for r in epochs]
    valid_ppl = [r["valid_ppl"] for r in epochs]
    assert train_ppl == sorted(train_ppl, reverse=True) and len(set(train_ppl)) == 3
    assert valid_ppl == sorted(valid_ppl, reverse=True) and len(set(valid_ppl)) == 3
    # The unigram perplexity of the corpus is about 17; the phrases are nearly deterministic.
    assert valid_ppl[-1] < 4 and summary["test_ppl"] < 4
    assert summary["valid_ppl"] == pytest.approx(valid_ppl[-1], rel=1e-9)
    assert summary["best_valid_ppl"] == pytest.approx(min(valid_ppl), rel=1e-9)


@pytest.mark.slow
def test_metrics_have_one_record_per_epoch_and_a_final_record(recipe_run):
    out, summary = recipe_run
    epochs = _epochs(out)
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for record in epochs:
        for key in ("lr", "train_ppl", "valid_ppl", "tokens_per_s"):
            assert isinstance(record[key], float) and math.isfinite(record[key]), key
        assert record["tokens_per_s"] > 0
        assert record["lr"] == RECIPE.lr_at(record["epoch"])
    # 2044 tokens in 4 streams of 511 rows: 510 targets per stream, ceil(510 / 5) windows.
    assert [r["step"] for r in epochs] == [102, 204, 306]
    finals = _finals(out)
    assert finals == [summary]
    assert summary["complete"] is True and summary["epochs_completed"] == 3
    assert math.isfinite(summary["test_ppl"])


@pytest.mark.slow
def test_final_test_perplexity_is_the_last_weights_on_the_whole_test_split(recipe_run,
                                                                            module_corpus):
    out, summary = recipe_run
    model, vocab, config = load_model(out, weights="last", device="cpu")
    ids = Corpus.load(module_corpus, config.level, vocab).test
    with torch.no_grad():
        logits = model(ids[:-1].view(-1, 1)).logits[:, 0].double()
    nll = -float(torch.log_softmax(logits, -1).gather(1, ids[1:].view(-1, 1)).sum())
    assert summary["test_ppl"] == pytest.approx(math.exp(nll / (ids.numel() - 1)), rel=1e-5)


@pytest.mark.slow
def test_run_directory_holds_config_vocab_checkpoints_and_tensorboard(recipe_run,
                                                                      module_corpus):
    out, _ = recipe_run
    saved = json.loads((out / "config.json").read_text())
    assert Config.from_dict(saved["config"]) == RECIPE
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == list(Corpus.load(module_corpus).vocab.words)
    assert (out / "checkpoints" / "last.safetensors").is_file()
    assert (out / "checkpoints" / "best.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    last = load_tree(out / "checkpoints" / "last.safetensors")
    assert last["progress"]["finished"] is True and last["progress"]["step"] == 306
    # Valid perplexity fell every epoch, so the best weights are the final ones.
    _assert_same_weights(_weights(out, "best"), last["model"])


@pytest.mark.slow
def test_same_seed_gives_identical_weights(recipe_run, module_corpus, tmp_path):
    out, _ = recipe_run
    _quiet_train(RECIPE, tmp_path / "again", module_corpus)
    _assert_same_weights(_weights(tmp_path / "again"), _weights(out))
    assert [r["valid_ppl"] for r in _epochs(tmp_path / "again")] == [
        r["valid_ppl"] for r in _epochs(out)]


@pytest.mark.slow
def test_different_seed_gives_different_weights(recipe_run, module_corpus, tmp_path):
    out, _ = recipe_run
    _quiet_train(RECIPE.replace(seed=4, epochs=1), tmp_path / "other", module_corpus)
    other, ours = _weights(tmp_path / "other"), _weights(out)
    assert not torch.equal(other["decoder.weight"], ours["decoder.weight"])


@pytest.mark.slow
def test_training_into_an_existing_run_without_resume_is_refused(recipe_run, module_corpus):
    out, _ = recipe_run
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run.*pass resume=True"):
        _quiet_train(RECIPE, out, module_corpus)
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_resuming_a_finished_run_returns_the_same_summary(recipe_run, module_corpus):
    out, summary = recipe_run
    weights = _weights(out)
    again = _quiet_train(RECIPE, out, module_corpus, resume=True)
    timing = {"test_seconds"}
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in summary.items() if k not in timing}
    _assert_same_weights(_weights(out), weights)
    assert len(_epochs(out)) == 3 and len(_finals(out)) == 1


@pytest.mark.slow
def test_resume_of_an_empty_out_trains_from_scratch(recipe_run, module_corpus, tmp_path,
                                                    capsys):
    out, _ = recipe_run
    train(RECIPE, tmp_path / "new", data_dir=module_corpus, resume=True, progress=False)
    assert "yet: starting a new one" in capsys.readouterr().out
    _assert_same_weights(_weights(tmp_path / "new"), _weights(out))


def test_resume_without_a_config_of_a_missing_run_is_refused(tmp_path, module_corpus):
    with pytest.raises(RunDirError, match="nothing to resume"):
        _quiet_train(None, tmp_path / "never", module_corpus, resume=True)
    assert not (tmp_path / "never").exists()  # a failed start leaves nothing behind


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_each(recipe_run, module_corpus):
    out, _ = recipe_run
    changed = RECIPE.replace(hidden_size=17, bptt=6, epochs=2)
    with pytest.raises(ValueError) as refused:
        _quiet_train(changed, out, module_corpus, resume=True)
    message = str(refused.value)
    assert "hidden_size: run has 16, command says 17" in message
    assert "bptt: run has 5, command says 6" in message
    assert "epochs: run has 3, command says 2 (it may only be raised)" in message
    assert "--" not in message  # flags are the command line's words, not a Python caller's
    assert "\n" not in message


def test_a_resume_names_the_strategy_rate_by_its_field_and_the_cli_by_its_flag():
    saved = Config(strategy="zaremba", strategy_p=0.3)
    with pytest.raises(RnnregError, match="strategy_p: run has 0.3, command says 0.5") as refused:
        resumed_config(saved, saved.replace(strategy_p=0.5))
    on_the_command_line = worded(refused.value, cli._parser().commands["train"])
    assert "--dropout: run has 0.3, command says 0.5" in on_the_command_line
    assert resumed_config(saved, saved.replace(epochs=20)) == saved.replace(epochs=20)


@pytest.mark.slow
def test_raising_epochs_extends_a_finished_run_as_if_uninterrupted(tmp_path, module_corpus):
    _quiet_train(RECIPE.replace(epochs=2), tmp_path / "two", module_corpus)
    _quiet_train(RECIPE.replace(epochs=1), tmp_path / "grown", module_corpus)
    summary = _quiet_train(RECIPE.replace(epochs=2), tmp_path / "grown", module_corpus,
                           resume=True)
    assert summary["epochs_completed"] == 2 and summary["complete"] is True
    _assert_same_weights(_weights(tmp_path / "grown"), _weights(tmp_path / "two"))
    assert [r["valid_ppl"] for r in _epochs(tmp_path / "grown")] == [
        r["valid_ppl"] for r in _epochs(tmp_path / "two")]
    assert len(_finals(tmp_path / "grown")) == 1
    saved = json.loads((tmp_path / "grown" / "config.json").read_text())["config"]
    assert saved["epochs"] == 2


def test_a_resume_may_change_how_the_run_is_saved_and_logged_and_records_it(tmp_path,
                                                                           module_corpus):
    """Checkpoint cadence, logging and a longer run are not the run's identity: a resume takes
    them, training exactly as without them (oracle: an uninterrupted run), and the run records
    from which step on they hold; a setting of the model is still refused."""
    _quiet_train(RECIPE.replace(epochs=2), tmp_path / "two", module_corpus)
    out = tmp_path / "run"
    _quiet_train(RECIPE.replace(epochs=1), out, module_corpus)
    (checkpointed,) = _epochs(out)
    with pytest.raises(ValueError, match="hidden_size: run has 16, command says 17"):
        _quiet_train(RECIPE.replace(epochs=2, hidden_size=17, log_every=3), out, module_corpus,
                     resume=True)
    operational = dict(checkpoint_minutes=1.0, checkpoint_steps=7, log_every=3)
    _quiet_train(RECIPE.replace(epochs=2, **operational), out, module_corpus, resume=True)
    _assert_same_weights(_weights(out), _weights(tmp_path / "two"))
    assert [r["valid_ppl"] for r in _epochs(out)] == [
        r["valid_ppl"] for r in _epochs(tmp_path / "two")]
    assert RunDir(out).read_config() == RECIPE.replace(epochs=2, **operational)
    settings = [r for r in RunDir(out).read_metrics() if r["event"] == "settings"]
    assert settings == [{"event": "settings", "epoch": 2, "step": checkpointed["step"],
                         "changed": {"epochs": {"from": 1, "to": 2},
                                     "checkpoint_minutes": {"from": 0.0, "to": 1.0},
                                     "checkpoint_steps": {"from": 0, "to": 7},
                                     "log_every": {"from": 0, "to": 3}}}]
    steps = [r["step"] for r in RunDir(out).read_metrics() if r["event"] == "step"]
    resumed = [step for step in steps if step > checkpointed["step"]]
    assert resumed and all(step % 3 == 0 for step in resumed)


# --------------------------------------------------------------------------- schedule


@pytest.mark.slow
def test_learning_rate_follows_lr_at(tmp_path, tiny_corpus, monkeypatch):
    config = RECIPE.replace(batch_size=10, bptt=10, decay_after=1, lr_decay=0.5)
    assert [config.lr_at(e) for e in (1, 2, 3)] == [1.0, 0.5, 0.25]
    used: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        used.extend(group["lr"] for group in self.param_groups)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    _quiet_train(config, tmp_path / "run", tiny_corpus)
    assert [r["lr"] for r in _epochs(tmp_path / "run")] == [1.0, 0.5, 0.25]
    per_epoch = len(used) // 3
    assert len(used) == 3 * per_epoch == 3 * 21
    assert used == [1.0] * per_epoch + [0.5] * per_epoch + [0.25] * per_epoch


# --------------------------------------------------------------------------- exact resume



RESUMABLE = RECIPE.replace(batch_size=10, bptt=10, epochs=2, checkpoint_steps=3,
                           strategy="zaremba", strategy_p=0.3, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    RESUMABLE,
    RESUMABLE.replace(strategy="variational", variable_bptt=True, seed=8),
], ids=["zaremba", "variational-variable-bptt"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(config, tmp_path, tiny_corpus):
    reference = tmp_path / "reference"
    _quiet_train(config, reference, tiny_corpus)
    assert len(_epochs(reference)) == 2
    steps_per_epoch = _epochs(reference)[0]["step"]
    assert steps_per_epoch >= 15  # so step 8 is mid-epoch

    killed = tmp_path / "killed"
    train_killed(config, killed, tiny_corpus, at=8, threads=TEST_THREADS)
    checkpoint = load_tree(killed / "checkpoints" / "last.safetensors")
    assert checkpoint["progress"]["step"] == 6      # the mid-epoch checkpoint before the kill
    assert checkpoint["progress"]["epoch"] == 1 and checkpoint["progress"]["position"] > 0
    assert not _finals(killed)

    summary = _quiet_train(config, killed, tiny_corpus, resume=True)
    _assert_same_weights(_weights(killed), _weights(reference))
    resumed, uninterrupted = _epochs(killed), _epochs(reference)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for key in ("valid_ppl", "train_ppl", "step", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key
    assert summary["test_ppl"] == _finals(reference)[0]["test_ppl"]


@pytest.mark.slow
def test_interrupt_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, tiny_corpus):
    config = RESUMABLE.replace(checkpoint_steps=0, epochs=1)
    _quiet_train(config, tmp_path / "reference", tiny_corpus)

    def interrupt(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="resume=True"):
        _quiet_train(config, tmp_path / "run", tiny_corpus, on_step=interrupt)
    assert load_tree(tmp_path / "run" / "checkpoints" / "last.safetensors")[
        "progress"]["step"] == 5
    _quiet_train(config, tmp_path / "run", tiny_corpus, resume=True)
    _assert_same_weights(_weights(tmp_path / "run"), _weights(tmp_path / "reference"))


# --------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path, tiny_corpus,
                                                            monkeypatch):
    config = RECIPE.replace(batch_size=10, bptt=10, checkpoint_steps=1, epochs=1)
    calls = 0
    original = train_module.summed_loss

    def poisoned(logits, targets):
        nonlocal calls
        calls += 1
        loss = original(logits, targets)
        return loss * float("nan") if calls >= 5 else loss

    monkeypatch.setattr(train_module, "summed_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"nan.*step 5") as raised:
        _quiet_train(config, out, tiny_corpus)
    assert "checkpoint" in str(raised.value)
    checkpoint = load_tree(out / "checkpoints" / "last.safetensors")
    assert checkpoint["progress"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())

    # The checkpoint is a good one: without the poison, the run resumes and finishes.
    monkeypatch.setattr(train_module, "summed_loss", original)
    summary = _quiet_train(config, out, tiny_corpus, resume=True)
    assert summary["complete"] is True and math.isfinite(summary["test_ppl"])


@pytest.mark.slow
def test_huge_learning_rate_diverges_with_a_clear_message(tmp_path, tiny_corpus):
    config = RECIPE.replace(batch_size=10, bptt=10, lr=1e30, clip_norm=1e30, epochs=1)
    diverged = r"(loss|perplexity|gradient norm) became (nan|inf).*Lower lr or clip_norm"
    with pytest.raises(TrainingDiverged, match=diverged):
        _quiet_train(config, tmp_path / "run", tiny_corpus)


@pytest.mark.slow
def test_time_budget_stops_early_and_marks_the_run_incomplete(tmp_path, tiny_corpus):
    config = RECIPE.replace(max_train_minutes=1e-7)
    summary = _quiet_train(config, tmp_path / "run", tiny_corpus)
    assert summary["complete"] is False
    assert summary["epochs_completed"] == 0
    assert math.isfinite(summary["test_ppl"])
    assert _finals(tmp_path / "run") == [summary]
    assert not _epochs(tmp_path / "run")
    progress = load_tree(tmp_path / "run" / "checkpoints" / "last.safetensors")["progress"]
    assert progress["step"] < 102


@pytest.mark.slow
def test_words_training_never_saw_are_unk_and_their_share_is_reported(tmp_path, capsys):
    data = write_corpus(tmp_path / "corpus")
    (data / "valid.txt").write_text("the zebra sat\n", encoding="utf-8")
    train(RECIPE.replace(epochs=1), tmp_path / "run", data_dir=data, progress=False)
    # "the zebra sat <eos>": one token in four was never seen in training.
    assert "<unk> share: train 0.0%, valid 25.0%, test 0.0%" in capsys.readouterr().out


# --------------------------------------------------------------------------- progress


def _recorded_losses(monkeypatch) -> list[torch.Tensor]:
    """Each window's loss as the loop computed it, kept on its device (reading it here would
    be a host read of its own)."""
    losses, original = [], train_module.summed_loss

    def recording(scores, targets):
        loss = original(scores, targets)
        losses.append(loss.detach().clone())
        return loss

    monkeypatch.setattr(train_module, "summed_loss", recording)
    return losses


def _count_host_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value into Python from now on, by name."""
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


@pytest.mark.slow
def test_windows_between_log_points_read_nothing_and_the_sums_are_per_window_reads(
        tmp_path, tiny_corpus, monkeypatch):
    config = RECIPE.replace(epochs=2, log_every=4)
    losses = _recorded_losses(monkeypatch)
    reads = _count_host_reads(monkeypatch)
    at_step: list[int] = []
    _quiet_train(config, tmp_path / "run", tiny_corpus, on_step=lambda step: at_step.append(
        len(reads)))
    monkeypatch.undo()
    rows = _epochs(tmp_path / "run")[0]["step"]  # windows per epoch
    # From the end of one window's step to the end of the next: only log points and the
    # epoch's last window (where the loop reads the windows' losses) read anything, and the
    # first window of an epoch, whose interval holds the previous epoch's validation.
    for step in range(2, len(at_step) + 1):
        if step % config.log_every and step % rows and (step - 1) % rows:
            assert at_step[step - 1] == at_step[step - 2], f"window {step} read the device"
    assert at_step[3] > at_step[2]  # the reads at log points are counted (the check can fail)

    # The oracle: each window's loss read on its own, times its columns, summed in float64 in
    # window order, as a per-window read would sum them.
    nlls = [float(loss) * config.batch_size for loss in losses]
    tokens = config.bptt * config.batch_size
    records = [r for r in RunDir(tmp_path / "run").read_metrics() if r.get("event") == "step"]
    assert [r["step"] for r in records] == list(range(4, len(at_step) + 1, 4))
    previous = 0
    for record in records:
        total = 0.0
        for nll in nlls[previous:record["step"]]:
            total += nll
        assert record["train_loss"] == total / (tokens * (record["step"] - previous))
        previous = record["step"]
    for epoch in _epochs(tmp_path / "run"):
        total = 0.0
        for nll in nlls[epoch["step"] - rows:epoch["step"]]:
            total += nll
        assert epoch["train_ppl"] == math.exp(total / (tokens * rows))


@pytest.mark.slow
def test_the_progress_bar_counts_tokens_and_shows_the_step_records(tmp_path, tiny_corpus,
                                                                   monkeypatch):
    config = RECIPE.replace(epochs=2, log_every=5)
    shown, original = [], console.show_window

    def spy(bar, tokens, record):
        original(bar, tokens, record)
        shown.append((bar.n, bar.total, bar.postfix, str(bar)))

    monkeypatch.setattr(console, "show_window", spy)
    train(config, tmp_path / "run", data_dir=tiny_corpus, progress=True, verbose=False)
    windows = _epochs(tmp_path / "run")[0]["step"]  # per epoch, each of bptt whole rows
    per_window = config.bptt * config.batch_size
    for step, (n, total, _, _) in enumerate(shown, start=1):
        assert total == windows * per_window and n == ((step - 1) % windows + 1) * per_window
    records = [r for r in RunDir(tmp_path / "run").read_metrics() if r.get("event") == "step"]
    assert records
    for record in records:
        _, _, postfix, line = shown[record["step"] - 1]
        # The same perplexity and speed metrics.jsonl holds for the window just logged.
        assert postfix == console.window_postfix(record)
        assert f"train ppl {record['train_ppl']:.1f}, " in line
        assert f"{record['tokens_per_s']:,.0f} tok/s" in line and " tokens [" in line
        later = shown[record["step"]:record["step"] + config.log_every - 1]
        assert all(shown_postfix == postfix for _, _, shown_postfix, _ in later)
    assert shown[0][2] is None  # nothing to show before the first record


@pytest.mark.parametrize("name", ["small", "awd", "variational", "variational_batch", "zoneout"])
def test_the_own_loop_is_set_up_exactly_for_models_that_run_it(name, monkeypatch):
    """The set-up asks for the own loop's engine iff a training step or an evaluation of the
    model then runs it (oracle: the engine requests the recurrence itself makes). The AWD
    preset's weight drop keeps torch's fused kernel, so it needs no C++ build."""
    from rnnreg.lm.model import LanguageModel
    from rnnreg.nn import loops

    requests = []
    choose = loops.choose
    monkeypatch.setattr(loops, "choose",
                        lambda *args, **kwargs: requests.append(args) or choose(*args, **kwargs))
    monkeypatch.setenv(loops.VARIABLE, "python")
    config = preset_config(name) if name in ("small", "awd") else RECIPE.replace(
        strategy=name, strategy_p=0.5)
    config = config.replace(hidden_size=8, device="cpu", **(
        {"layer_sizes": (12, 8), "num_layers": 2} if config.layer_sizes else {}))
    model = LanguageModel(20, config)
    train_module._build_loops(model)
    at_set_up, requests[:] = len(requests), []
    ids = torch.randint(20, (6, 2))
    model.train()
    model(ids).logits.sum().backward()
    model.eval()
    with torch.no_grad():
        model(ids)
    assert bool(at_set_up) == bool(requests)
    assert name != "awd" or not requests
