"""Tests for the command line, called in-process through ``rnnreg.cli.main``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rnnreg.cli as cli
import rnnreg.lm.training.loop as train_module
from rnnreg.cli.flags import GROUPS, config_overrides, flag
from rnnreg.errors import reword
from rnnreg.lm.config import Config
from rnnreg.lm.corpus import sources
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import DataError
from rnnreg.lm.training.loop import train
from support import REPO_ROOT, write_corpus

TRAIN_FLAGS = ("--epochs", "1", "--hidden-size", "8", "--bptt", "5", "--no-progress")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exited:  # argparse's own errors (a bad choice) exit
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rnnreg: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, module_corpus) -> tuple[Path, dict]:
    """``rnnreg train --preset small`` shrunk to one epoch of an 8-unit model."""
    out = tmp_path_factory.mktemp("cli") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["train", "--preset", "small", "--data-dir", str(module_corpus),
                         "--out", str(out), *TRAIN_FLAGS])
    assert code == 0, stderr.getvalue()
    return out, _last_json(stdout.getvalue())


# --------------------------------------------------------------------------- entry point


@pytest.mark.slow
def test_module_entry_point_prints_help():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "rnnreg", "--help"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "score", "generate", "presets", "download"):
        assert command in result.stdout


def _train_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_every_config_field_is_a_train_flag_with_one_line_of_help(capsys, monkeypatch):
    lines = _train_help(capsys, monkeypatch).splitlines()
    for field in dataclasses.fields(Config):
        name = flag(field.name)
        # Another field the help names (in backquotes) is shown as its flag.
        help_text = reword(field.metadata["help"], lambda other, _: flag(other))
        assert help_text and field.metadata["group"] in GROUPS, field.name
        # The flag is listed, and its help is printed whole on one line (not wrapped).
        assert any(line.lstrip().startswith(name) for line in lines), name
        assert any(line.strip().endswith(help_text) for line in lines), (name, help_text)
    text = "\n".join(lines)
    assert "top one with --layer-sizes" in text and not re.search(r"`[a-z_]+`", text)
    # The strategy's rate p keeps the flag users know; no layer's dropout is meant.
    assert flag("strategy_p") == "--dropout" and not any("--strategy-p" in line for line in lines)
    args = cli._parser().parse_args(["train", "--dropout", "0.3"])
    assert config_overrides(args) == {"strategy_p": 0.3}


def test_value_names_in_the_help_are_the_ones_its_words_use(capsys, monkeypatch):
    text = _train_help(capsys, monkeypatch)
    for field in dataclasses.fields(Config):
        metavar = field.metadata["metavar"]
        if metavar is not None:
            # As a word of its own: "N hidden units", "(-R, R)", not inside --layer-sizes.
            assert re.search(rf"(?<![\w-]){metavar}(?!\w)|\(-{metavar}",
                             field.metadata["help"]), field.name
            assert f"{flag(field.name)} {metavar}" in text, field.name


def test_train_help_groups_the_flags_the_way_a_user_looks_for_them(capsys, monkeypatch):
    text = _train_help(capsys, monkeypatch)
    headings = [line[:-1] for line in text.splitlines() if line and line.endswith(":")
                and not line.startswith(" ")]
    assert headings == ["options", "starting configuration", *GROUPS.values()]
    usage = text.split("\n\n")[0]
    assert usage.count("\n") == 0, usage  # one usage line, not every flag again
    assert max(map(len, text.splitlines())) <= 80
    section = text[text.index("\nregularization:"):text.index("\noptimization:")]
    assert "--dropout P " in section and "--zoneout-hidden P " in section
    assert "--lr LR " in text[text.index("\noptimization:"):text.index("\nschedule:")]


def test_preset_abbreviated_is_the_preset(capsys):
    # argparse accepts --pres for --preset: it must count as naming a preset everywhere.
    code, _, err = _cli(capsys, "train", "--budget-minutes", "1", "--pres", "small")
    _assert_one_line_error(code, err, "drop --preset")


def test_presets_lists_the_paper_numbers(capsys):
    code, out, _ = _cli(capsys, "presets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.strip().splitlines() if line}
    assert {"small", "medium", "large"} <= set(lines)
    for name, valid, test in (("small", "120.7", "114.5"), ("medium", "86.2", "82.7"),
                              ("large", "82.2", "78.4")):
        assert valid in lines[name] and test in lines[name]
    assert "2x200" in lines["small"] and "2x650" in lines["medium"]
    assert "2x1500" in lines["large"]


# --------------------------------------------------------------------------- a trained run


@pytest.mark.slow
def test_train_prints_a_json_summary_and_applies_flags_over_the_preset(cli_run):
    out, summary = cli_run
    assert summary["event"] == "final" and summary["epochs_completed"] == 1
    assert summary["complete"] is True and summary["test_ppl"] > 1
    saved = Config.from_dict(json.loads((out / "config.json").read_text())["config"])
    assert (saved.hidden_size, saved.bptt, saved.epochs) == (8, 5, 1)
    # Everything else is the small preset.
    assert (saved.batch_size, saved.num_layers, saved.strategy, saved.lr_decay,
            saved.decay_after, saved.init_range) == (20, 2, "none", 0.5, 4, 0.1)


@pytest.mark.slow
def test_evaluate_reproduces_the_final_test_perplexity(cli_run, module_corpus, capsys):
    out, summary = cli_run
    code, stdout, _ = _cli(capsys, "evaluate", str(out), "--split", "test",
                           "--data-dir", str(module_corpus), "--json")
    assert code == 0
    result = _last_json(stdout)
    # One epoch: the best weights are the last ones, which the final evaluation used.
    assert result["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-6)
    assert result["tokens"] == Corpus.load(module_corpus).test.numel() - 1
    assert result["split"] == "test"

    code, stdout, _ = _cli(capsys, "evaluate", str(out), "--split", "valid",
                           "--data-dir", str(module_corpus), "--json")
    assert code == 0
    assert _last_json(stdout)["perplexity"] == pytest.approx(summary["valid_ppl"], rel=1e-6)


@pytest.mark.slow
def test_evaluate_an_ensemble_of_a_run_with_itself(cli_run, module_corpus, capsys):
    out, summary = cli_run
    code, stdout, _ = _cli(capsys, "evaluate", str(out), str(out), "--data-dir",
                           str(module_corpus), "--json")
    assert code == 0
    assert _last_json(stdout)["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-6)


@pytest.mark.slow
def test_score_a_file(cli_run, module_corpus, capsys, tmp_path):
    out, summary = cli_run
    code, stdout, _ = _cli(capsys, "score", str(out), str(module_corpus / "test.txt"), "--json")
    assert code == 0
    assert _last_json(stdout)["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-6)

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\na dog ran\n", encoding="utf-8")
    code, stdout, _ = _cli(capsys, "score", str(out), str(text), "--json")
    assert code == 0
    result = _last_json(stdout)
    assert result["tokens"] == 6 + 1 + 3 + 1 - 1  # words and <eos> of each line, less one
    assert result["perplexity"] > 1


@pytest.mark.slow
def test_generate_continues_the_prompt(cli_run, capsys):
    out, _ = cli_run
    args = ("generate", str(out), "--prompt", "the cat", "--words", "5", "--temperature", "0.8")
    code, stdout, _ = _cli(capsys, *args)
    assert code == 0
    text = stdout[:-1]  # print's own newline
    assert text.startswith("the cat ")
    rest = text[len("the cat "):]
    words = rest.split()
    assert len(words) + rest.count("\n") == 5  # each sampled <eos> is a line break
    vocab = set(json.loads((out / "vocab.json").read_text()))
    assert set(words) <= vocab
    # The same seed samples the same words.
    assert _cli(capsys, *args)[1] == stdout


@pytest.mark.slow
def test_resume_of_the_finished_run_prints_the_same_summary(cli_run, module_corpus, capsys):
    out, summary = cli_run
    code, stdout, _ = _cli(capsys, "train", "--resume", "--out", str(out), "--data-dir",
                           str(module_corpus), "--no-progress")
    assert code == 0
    again = _last_json(stdout)
    assert again["test_ppl"] == summary["test_ppl"]
    assert again["epochs_completed"] == 1


# --------------------------------------------------------------------------- errors


def test_missing_data_dir_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _cli(capsys, "train", "--data-dir", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "run"), *TRAIN_FLAGS)
    _assert_one_line_error(code, err, "nowhere", "does not exist", "download ptb")


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_corrected_retry(tmp_path, module_corpus, capsys):
    out = tmp_path / "run"
    code, _, _ = _cli(capsys, "train", "--data-dir", str(tmp_path / "nowhere"), "--out",
                      str(out), *TRAIN_FLAGS)
    assert code == 2
    code, _, err = _cli(capsys, "train", "--data-dir", str(module_corpus), "--out", str(out),
                        *TRAIN_FLAGS)
    assert code == 0, err


@pytest.mark.parametrize("flags,fragment", [
    (("--strategy", "bogus"), "strategy"),
    (("--strategy", "zaremba", "--dropout", "1.5"),
     "--dropout must be a probability in [0, 1], got 1.5"),
    (("--cell", "transformer"), "cell"),
    (("--hidden-size", "0"), "--hidden-size must be a positive integer, got 0"),
    (("--optimizer", "asgd", "--ema-decay", "0.5"),
     "use --optimizer sgd with --ema-decay, or 'asgd' without it"),
    (("--softmax", "adaptive", "--tie-weights"), "use --no-tie-weights or --softmax full"),
])
def test_invalid_config_flags_are_one_line_errors(flags, fragment, tmp_path, module_corpus,
                                                  capsys):
    code, _, err = _cli(capsys, "train", "--data-dir", str(module_corpus), "--out",
                        str(tmp_path / "run"), *TRAIN_FLAGS, *flags)
    _assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.fixture
def bare_user(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A new user's empty working directory and empty cache, with no $RNNREG_DATA set."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("RNNREG_DATA", raising=False)
    return work, cache


def test_a_start_without_a_corpus_leaves_no_folder(bare_user, capsys):
    work, cache = bare_user
    code, _, err = _cli(capsys, "train", "--no-download", *TRAIN_FLAGS)
    _assert_one_line_error(code, err, "does not exist", "download ptb")
    assert list(work.iterdir()) == [] and not cache.exists()


def test_a_start_without_network_leaves_no_folder(bare_user, capsys, monkeypatch):
    work, cache = bare_user
    cache.mkdir()  # the user's cache exists; rnnreg's folder in it does not
    # Nothing listens on port 9 (discard) of the loopback: the connection is refused at once.
    monkeypatch.setattr(sources, "PTB_URL", "http://127.0.0.1:9/{name}")
    code, _, err = _cli(capsys, "train", *TRAIN_FLAGS)
    downloading, error = err.strip().splitlines()  # the line that says what it fetches
    _assert_one_line_error(code, error, "could not download")
    assert list(work.iterdir()) == [] and list(cache.iterdir()) == []


@pytest.mark.parametrize("flags", [
    ("--hidden-size", "0"),                                # refused by the config
    ("--cell", "transformer"),                             # refused by argparse
    ("--softmax", "adaptive", "--adaptive-cutoffs", "5000"),  # refused by the model, after
])                                                         # the run directory was written
def test_a_start_with_a_bad_flag_leaves_no_folder(flags, bare_user, module_corpus, capsys):
    work, cache = bare_user
    (work / "runs" / "other").mkdir(parents=True)  # another run's folder stays
    code, _, err = _cli(capsys, "train", "--data-dir", str(module_corpus), *TRAIN_FLAGS, *flags)
    assert code == 2 and err.startswith("rnnreg: error: ")
    assert [p.relative_to(work) for p in work.rglob("*")] == [Path("runs"), Path("runs/other")]
    # The cache may keep the corpus's encoding (read before the model refused), nothing else.
    kept = [p.relative_to(cache) for p in cache.rglob("*") if p.is_file()]
    assert all(p.parent == Path("rnnreg/corpora") and p.suffix == ".safetensors" for p in kept)


@pytest.mark.slow
def test_resume_with_a_differing_flag_is_refused_naming_it(cli_run, capsys):
    out, _ = cli_run
    before = (out / "metrics.jsonl").read_bytes()
    code, _, err = _cli(capsys, "train", "--resume", "--out", str(out), "--hidden-size", "9",
                        "--no-progress")
    _assert_one_line_error(code, err, "--hidden-size: run has 8, command says 9")
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_scoring_unknown_words_reports_and_warns(cli_run, tmp_path, capsys):
    out, _ = cli_run
    text = tmp_path / "text.txt"
    text.write_text("the zebra sat on the mat\nzzzz qqqq\n", encoding="utf-8")
    code, stdout, err = _cli(capsys, "score", str(out), str(text))
    assert code == 0
    # 9 tokens after the first: zebra, zzzz, qqqq are <unk>.
    assert "over 9 tokens (33.3% <unk>)" in stdout and "best weights (epoch 1)" in stdout
    assert "warning: 3 of 9 tokens (33.3%)" in err
    assert "(most frequent: 'zebra' x1, 'zzzz' x1, 'qqqq' x1)" in err


@pytest.mark.slow
def test_scoring_unknown_words_without_unk_is_a_one_line_error(cli_run, tmp_path, capsys):
    out, _ = cli_run
    vocab = out.parent / "no-unk"
    import shutil
    shutil.copytree(out, vocab)
    words = [w for w in json.loads((vocab / "vocab.json").read_text()) if w != "<unk>"]
    (vocab / "vocab.json").write_text(json.dumps(words + ["<pad>"]))  # an older run's shape
    text = tmp_path / "text.txt"
    text.write_text("the zebra sat on the mat\n", encoding="utf-8")
    code, _, err = _cli(capsys, "score", str(vocab), str(text))
    _assert_one_line_error(code, err, "'zebra'", "<unk>")


@pytest.mark.slow
def test_ensemble_of_runs_with_different_vocabularies_is_refused(cli_run, module_corpus,
                                                                 tmp_path, capsys):
    out, _ = cli_run
    other_data = write_corpus(tmp_path / "other", phrases=("one two three", "four five six"))
    config = Config(hidden_size=8, batch_size=4, bptt=5, epochs=1, device="cpu",
                    checkpoint_minutes=0.0)
    train(config, tmp_path / "other-run", data_dir=other_data, progress=False, verbose=False)
    code, _, err = _cli(capsys, "evaluate", str(out), str(tmp_path / "other-run"),
                        "--data-dir", str(module_corpus))
    _assert_one_line_error(code, err, "different vocabulary")


@pytest.mark.slow
@pytest.mark.parametrize("args,fragment", [
    (("generate", "RUN", "--words", "0"), "--words"),
    (("generate", "RUN", "--temperature", "0"), "--temperature"),
    (("evaluate", "RUN", "--mc-samples", "-1"), "--mc-samples"),
])
def test_invalid_sampling_arguments_are_one_line_errors(args, fragment, cli_run, capsys):
    out, _ = cli_run
    args = tuple(str(out) if a == "RUN" else a for a in args)
    code, _, err = _cli(capsys, *args)
    _assert_one_line_error(code, err, fragment)


def test_evaluate_of_a_directory_that_is_no_run_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _cli(capsys, "evaluate", str(tmp_path))
    _assert_one_line_error(code, err, "config.json")


@pytest.mark.slow
def test_diverged_training_is_a_one_line_error(tmp_path, module_corpus, capsys, monkeypatch):
    original = train_module.summed_loss
    monkeypatch.setattr(train_module, "summed_loss",
                        lambda logits, targets: original(logits, targets) * float("nan"))
    code, _, err = _cli(capsys, "train", "--data-dir", str(module_corpus), "--out",
                        str(tmp_path / "run"), *TRAIN_FLAGS)
    _assert_one_line_error(code, err, "Lower --lr or --clip-norm")


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"),
                                 ValueError("an internal check failed")])
def test_a_bug_deep_in_the_library_keeps_its_traceback(bug, tmp_path, module_corpus, capsys,
                                                       monkeypatch):
    """Only user errors become the one-line error: an exception of any other type, a bare
    ValueError included, leaves main with its traceback (Python prints it)."""
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(Corpus, "load", broken)  # reached through train(), several calls deep
    with pytest.raises(type(bug), match=str(bug)) as raised:
        cli.main(["train", "--data-dir", str(module_corpus), "--out", str(tmp_path / "run"),
                  *TRAIN_FLAGS])
    assert raised.value is bug
    assert "rnnreg: error:" not in capsys.readouterr().err


def test_a_user_error_deep_in_the_library_is_one_line_with_flags(tmp_path, module_corpus,
                                                                 capsys, monkeypatch):
    """The same path raising a user error: one line, exit 2, its parameters as flags."""
    def refused(*args, **kwargs):
        raise DataError("no corpus: pass `data_dir`, or `download=False` to skip fetching it")

    monkeypatch.setattr(Corpus, "load", refused)
    code, _, err = _cli(capsys, "train", "--data-dir", str(module_corpus), "--out",
                        str(tmp_path / "run"), *TRAIN_FLAGS)
    _assert_one_line_error(code, err, "pass --data-dir, or --no-download to skip")



def test_an_engine_setting_from_the_environment_is_a_user_error(tmp_path, module_corpus, capsys,
                                                                 monkeypatch):
    """A mistyped RNNREG_ENGINE is the caller's input, not a bug: one line, exit 2."""
    monkeypatch.setenv("RNNREG_ENGINE", "tritno")
    code, _, err = _cli(capsys, "train", "--data-dir", str(module_corpus), "--out",
                        str(tmp_path / "run"), "--strategy", "variational", "--dropout", "0.3",
                        *TRAIN_FLAGS)
    _assert_one_line_error(code, err, "RNNREG_ENGINE='tritno' is not a loop engine")


# --------------------------------------------------------------------------- download


def test_download_ptb_calls_the_downloader(tmp_path, capsys, monkeypatch):
    calls: list[Path] = []

    def fake_download(directory, **options):
        calls.append(Path(directory))
        return Path(directory)

    monkeypatch.setattr(cli, "download_ptb", fake_download)
    code, out, _ = _cli(capsys, "download", "ptb", "--data-dir", str(tmp_path / "ptb"))
    assert code == 0
    assert calls == [tmp_path / "ptb"]
    assert str(tmp_path / "ptb") in out

    monkeypatch.setenv("RNNREG_DATA", str(tmp_path / "from-env"))
    code, _, _ = _cli(capsys, "download", "ptb")
    assert code == 0 and calls[-1] == tmp_path / "from-env"


def test_download_failure_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    def failing_download(directory, **options):
        raise DataError("could not download ptb.train.txt (offline): check the network")

    monkeypatch.setattr(cli, "download_ptb", failing_download)
    code, _, err = _cli(capsys, "download", "ptb", "--data-dir", str(tmp_path))
    _assert_one_line_error(code, err, "could not download")


def test_unknown_corpus_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["download", "wikitext"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_dropout_with_the_default_strategy_none_is_refused_with_the_fix(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--dropout", "0.5", "--out", str(out), "--no-download",
                        "--no-progress")
    _assert_one_line_error(code, err, "--dropout 0.5 has no effect with strategy none (the "
                           "small preset's)", "--strategy NAME", "zaremba", "variational")
    assert not out.exists()


def test_strategy_none_on_a_preset_with_a_rate_trains_without_dropout(capsys, tmp_path,
                                                                     monkeypatch):
    """``--preset medium --strategy none`` is medium's baseline, not an error."""
    trained = []
    monkeypatch.setattr(cli.training, "train", lambda config, *a, **k: trained.append(config)
                        or {})
    code, _, err = _cli(capsys, "train", "--preset", "medium", "--strategy", "none",
                        "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert (trained[0].strategy, trained[0].strategy_p) == ("none", 0.0)
    code, _, err = _cli(capsys, "train", "--preset", "medium", "--strategy", "none",
                        "--dropout", "0.3", "--out", str(tmp_path / "run"))
    _assert_one_line_error(code, err, "--dropout 0.3 has no effect with strategy none,")


def test_a_misspelled_flag_gets_the_closest_flag_of_its_command(capsys):
    code, _, err = _cli(capsys, "train", "--hiden-size", "8", "--no-progress")
    _assert_one_line_error(code, err, "unrecognized arguments: --hiden-size 8 (did you mean "
                           "--hidden-size?)", "rnnreg train --help")
    code, _, err = _cli(capsys, "score", "RUN", "FILE", "--jsn")
    _assert_one_line_error(code, err, "(did you mean --json?)")
    code, _, err = _cli(capsys, "train", "--frobnicate")
    _assert_one_line_error(code, err, "unrecognized arguments: --frobnicate (see")


def test_the_unknown_words_warning_names_the_most_frequent_with_counts():
    from rnnreg.cli.scoring import _most_frequent_unknown
    from rnnreg.lm.corpus.vocab import Vocabulary

    vocab = Vocabulary(("<eos>", "<unk>", "the", "cat"))
    tokens = "the gnu cat gnu yak gnu yak a b c d the".split()
    assert _most_frequent_unknown(tokens, vocab, shown=3) == (
        "most frequent: 'gnu' x3, 'yak' x2, 'a' x1 and 3 more words")
    assert _most_frequent_unknown(["the", "<unk>"], vocab) == "<unk> itself in the text"


def test_a_data_error_of_a_new_run_comes_alone_and_names_rnnreg_data(capsys, tmp_path,
                                                                     monkeypatch):
    """Nothing says a new run is starting before its data has been read."""
    monkeypatch.setenv("RNNREG_DATA", str(tmp_path / "no-corpus"))
    code, out, err = _cli(capsys, "train", "--out", str(tmp_path / "run"), "--no-progress")
    _assert_one_line_error(code, err, f"data directory {tmp_path / 'no-corpus'} does not exist",
                           "came from the environment variable RNNREG_DATA",
                           "pass --data-dir")  # the wrapped message's parameter, as a flag
    assert out == "" and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_answered_with_the_commands_that_continue_from_best(
        cli_run, tmp_path, capsys):
    import shlex
    import shutil

    out, summary = cli_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    last = run / "checkpoints" / "last.safetensors"
    damaged = last.read_bytes()[:1000]
    last.unlink()  # a new file: `best` may be a hard link to the old one
    last.write_bytes(damaged)
    code, _, err = _cli(capsys, "train", "--out", str(run), "--resume", "--no-progress")
    _assert_one_line_error(code, err, "truncated or corrupt", "after epoch 1")
    commands = err.strip().split(": ")[-1].split(" && ")
    assert [c.split()[0] for c in commands] == ["mv", "cp", "rnnreg"]
    for command in commands[:2]:
        subprocess.run(shlex.split(command), check=True)
    code, stdout, err = _cli(capsys, *shlex.split(commands[2])[1:], "--no-progress")
    assert code == 0, err
    assert _last_json(stdout)["test_ppl"] == pytest.approx(summary["test_ppl"])
    assert (run / "checkpoints" / "last.safetensors.damaged").read_bytes() == damaged


@pytest.mark.slow
def test_resume_with_other_checkpoint_and_logging_flags_is_accepted_and_recorded(cli_run,
                                                                                 tmp_path,
                                                                                 capsys):
    import shutil

    out, summary = cli_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    code, stdout, err = _cli(capsys, "train", "--out", str(run), "--resume", "--checkpoint-steps",
                             "4", "--log-every", "2", "--no-progress")
    assert code == 0, err
    assert _last_json(stdout)["test_ppl"] == pytest.approx(summary["test_ppl"])
    saved = Config.from_dict(json.loads((run / "config.json").read_text())["config"])
    assert (saved.checkpoint_steps, saved.log_every) == (4, 2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "final"
    assert [r["changed"] for r in records if r["event"] == "settings"] == [
        {"checkpoint_steps": {"from": 0, "to": 4}, "log_every": {"from": 0, "to": 2}}]
