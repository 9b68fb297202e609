"""How people run jobs: the same command to launch and to resume, runs that remember their
corpus, one text file as a corpus, PTB fetched when nothing is given, stops that say how to go
on, curves during an epoch, strict JSON. Through the command line, on corpora written here."""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import rnnreg.cli as cli
from rnnreg.lm.config import Config
from rnnreg.lm.corpus import sources
from rnnreg.lm.corpus.vocab import tokenize
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.layout import RunDir
from support import REPO_ROOT, SCRIPT_PATH, TEST_THREADS, assert_strict_json, write_corpus
from support.steps import AfterStep, signal_self

# A run small enough for the suite that still trains several windows per epoch with dropout,
# checkpoints every three steps and writes a step record every three windows.
FLAGS = ("--epochs", "2", "--hidden-size", "16", "--batch-size", "10", "--bptt", "10",
         "--init-range", "0.3", "--strategy", "zaremba", "--dropout", "0.3", "--seed", "7",
         "--device", "cpu", "--checkpoint-minutes", "0", "--checkpoint-steps", "3",
         "--log-every", "3", "--eval-bptt", "50", "--no-progress")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tree(Path(out) / "checkpoints" / "last.safetensors")["model"]


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def _records(out: Path, event: str) -> list[dict]:
    return [r for r in RunDir(out).read_metrics() if r.get("event") == event]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one command line

KILLED_CLI = textwrap.dedent("""
    import json, signal, sys

    import torch

    torch.set_num_threads(int(sys.argv[2]))
    import rnnreg.cli
    from support.steps import AfterStep, signal_self

    AfterStep(int(sys.argv[3]), signal_self(signal.SIGKILL))
    rnnreg.cli.main(json.loads(sys.argv[1]))
""")


@pytest.mark.slow
def test_the_same_command_launches_and_after_kill_9_resumes_bit_for_bit(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    command = ["train", "--data-dir", str(corpus), "--resume", *FLAGS]

    code, stdout, _ = _cli(capsys, *command, "--out", str(tmp_path / "reference"))
    assert code == 0 and "yet: starting a new one" in stdout
    steps_per_epoch = _records(tmp_path / "reference", "epoch")[0]["step"]
    assert steps_per_epoch >= 15  # so the kill at step 8 is mid-epoch

    killed = [*command, "--out", str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": SCRIPT_PATH, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-c", KILLED_CLI, json.dumps(killed),
                             str(TEST_THREADS), "8"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "yet: starting a new one" in result.stdout
    assert load_tree(tmp_path / "killed" / "checkpoints" / "last.safetensors")[
        "progress"]["step"] == 6

    code, stdout, err = _cli(capsys, *killed)  # the identical command line, rerun
    assert code == 0, err
    assert f"resuming {(tmp_path / 'killed').resolve()} in epoch 1" in stdout
    # --no-progress: no bar, so each step record is also a line (a job's log is not empty).
    assert "step      9  epoch 0.4" in stdout
    _assert_same_weights(_weights(tmp_path / "killed"), _weights(tmp_path / "reference"))
    # The step records continue where the checkpoint was: none twice, none lost.
    timing = {"tokens_per_s", "train_seconds"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in
             _records(tmp_path / "killed", "step")]
    assert strip == [{k: v for k, v in r.items() if k not in timing}
                     for r in _records(tmp_path / "reference", "step")]
    assert [r["step"] for r in _records(tmp_path / "killed", "step")] == list(
        range(3, 2 * steps_per_epoch + 1, 3))
    assert _last_json(stdout)["test_ppl"] == _records(tmp_path / "reference", "final")[0][
        "test_ppl"]
    assert assert_strict_json(tmp_path / "killed") >= 3


@pytest.mark.slow
def test_a_rerun_with_the_preset_and_a_differing_flag_is_refused(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    command = ["train", "--preset", "small", "--data-dir", str(corpus), "--out", str(out),
               *FLAGS, "--epochs", "1"]
    assert _cli(capsys, *command)[0] == 0
    assert _cli(capsys, *command, "--resume")[0] == 0  # equal flags: fine
    code, _, err = _cli(capsys, *command, "--resume", "--bptt", "7", "--lr", "0.5")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--bptt: run has 10, command says 7" in err and "--lr: run has 1.0, command " \
        "says 0.5" in err


@pytest.mark.slow
@pytest.mark.parametrize("out", [None, "elsewhere/run"], ids=["default_out", "out"])
def test_the_same_command_without_resume_continues_its_run(out, tmp_path, capsys,
                                                           monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    command = ["train", "--data-dir", str(corpus), *FLAGS, *(("--out", out) if out else ())]
    run = (tmp_path / (out or "runs/small")).resolve()  # without --out: named after the preset
    with monkeypatch.context() as patched:  # Ctrl-C after step 5, for this command only
        AfterStep(5, signal_self(signal.SIGINT), patched.setattr)
        assert _cli(capsys, *command)[0] == 130
    assert load_tree(run / "checkpoints" / "last.safetensors")["progress"]["step"] == 5

    code, stdout, err = _cli(capsys, *command)  # the very same command, once more
    assert code == 0, err
    assert f"resuming {run} in epoch 1" in stdout
    summary = _last_json(stdout)
    assert summary["epochs_completed"] == 2 and summary["complete"] is True
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # no second run beside it

    # And again: the run is finished; the command says so and scores it again.
    code, stdout, err = _cli(capsys, *command)
    assert code == 0, err
    assert f"{run} holds a finished run (after epoch 2)" in stdout
    assert _last_json(stdout)["test_ppl"] == summary["test_ppl"]
    if out is None:  # --resume alone continues the preset's run with its own settings
        code, stdout, err = _cli(capsys, "train", "--resume", "--no-progress")
        assert code == 0 and f"{run} holds a finished run" in stdout, err

    # Other settings into the same directory are refused, naming them; the run is untouched.
    before = (run / "metrics.jsonl").read_bytes()
    code, _, err = _cli(capsys, *command, "--hidden-size", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--hidden-size: run has 16, command says 8" in err and "another --out" in err
    assert (run / "metrics.jsonl").read_bytes() == before


# --------------------------------------------------------------------------- stops


@pytest.mark.slow
def test_ctrl_c_prints_what_was_saved_and_the_command_that_resumes(tmp_path, capsys,
                                                                   monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patched:  # Ctrl-C after step 5, for this command only
        AfterStep(5, signal_self(signal.SIGINT), patched.setattr)
        code, stdout, err = _cli(capsys, "train", "--data-dir", str(corpus), *FLAGS)
    assert code == 130
    run = (tmp_path / "runs" / "small").resolve()  # the default: named after the preset
    assert f"run directory {run}" in stdout
    saved, command = err.strip().splitlines()[-2:]
    assert saved == f"rnnreg: stopped: saved in epoch 1, row 50 of 203 (step 5) in {run}; " \
                    "continue with --resume"
    assert command.startswith("rnnreg train ") and command.endswith(f"--out {run} --resume")
    assert (run / "plots" / "learning_curve.png").is_file()

    code, stdout, err = _cli(capsys, *shlex.split(command)[1:])  # exactly as printed
    assert code == 0, err
    assert _last_json(stdout)["epochs_completed"] == 2
    assert f"run directory {run}" in stdout


@pytest.mark.slow
def test_a_run_stopped_before_its_first_epoch_writes_strict_json(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, "train", "--data-dir", str(corpus), "--out", str(out),
                             *FLAGS, "--max-train-minutes", "1e-7")
    assert code == 0, err
    summary = _last_json(stdout)
    assert summary["complete"] is False and summary["best_valid_ppl"] is None
    assert "time budget of 1e-07 min reached: saved in epoch 1" in stdout
    assert err.strip().splitlines()[-1].endswith(
        f"--out {out.resolve()} --max-train-minutes 2e-07 --resume")
    assert assert_strict_json(out) >= 3
    assert (out / "plots" / "learning_curve.png").is_file()
    # No best weights yet: evaluate says it scores the last ones, and where they stand.
    code, stdout, _ = _cli(capsys, "evaluate", str(out), "--split", "valid")
    assert code == 0
    assert "last weights (in epoch 1, row 10) (no best weights yet: no epoch finished)" in stdout


# --------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run trained with --data-dir, on a corpus directory this module may edit."""
    root = tmp_path_factory.mktemp("remember")
    corpus = write_corpus(root / "corpus")
    out = root / "run"
    assert cli.main(["train", "--data-dir", str(corpus), "--out", str(out), *FLAGS,
                     "--epochs", "1"]) == 0
    return out, corpus


@pytest.mark.slow
def test_evaluate_defaults_to_the_recorded_corpus_and_says_what_it_scored(trained, capsys):
    out, corpus = trained
    saved = json.loads((out / "config.json").read_text())["corpus"]
    assert saved["data_dir"] == str(corpus.resolve())
    assert saved["files"]["valid"] == {"name": "valid.txt",
                                       "bytes": (corpus / "valid.txt").stat().st_size,
                                       "md5": sources.md5sum(corpus / "valid.txt")}
    given = _last_json(_cli(capsys, "evaluate", str(out), "--data-dir", str(corpus),
                            "--json")[1])
    code, stdout, _ = _cli(capsys, "evaluate", str(out), "--json")
    assert code == 0 and _last_json(stdout)["perplexity"] == given["perplexity"]
    assert _last_json(stdout)["weights"] == ["best weights (epoch 1)"]
    final = _records(out, "final")[0]
    code, stdout, _ = _cli(capsys, "evaluate", str(out))
    line = stdout.strip()
    assert line.startswith(f"test perplexity {final['test_ppl']:.2f} over ")
    assert "tokens (0.0% <unk>) in" in line and f"best weights (epoch 1) of {out}" in line


@pytest.mark.slow
def test_an_edited_split_file_is_named_by_evaluate_and_resume(trained, capsys):
    out, corpus = trained
    original = (corpus / "test.txt").read_text()
    (corpus / "test.txt").write_text(original + "the cat sat\n")
    try:
        code, _, err = _cli(capsys, "evaluate", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"{corpus / 'test.txt'} changed since the run was trained" in err
        code, _, err = _cli(capsys, "train", "--resume", "--out", str(out), "--no-progress")
        assert code == 2 and "test.txt changed since the run was trained" in err
    finally:
        (corpus / "test.txt").write_text(original)


@pytest.mark.slow
def test_one_text_file_at_char_level_trains_evaluates_and_resumes(tmp_path, capsys,
                                                                  monkeypatch):
    text = "".join(f"{line}\n" for line in ("first citizen speak", "we are all resolved",
                                            "you are all resolved rather to die") * 20)
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "input.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    flags = ("--data-dir", str(tmp_path / "shakespeare"), "--out", str(out), "--level", "char",
             "--split-fractions", "0.8,0.1,0.1", *FLAGS)
    with monkeypatch.context() as patched:  # Ctrl-C after step 4, for this command only
        AfterStep(4, signal_self(signal.SIGINT), patched.setattr)
        code, stdout, _ = _cli(capsys, "train", *flags)
    assert code == 130
    assert "input.txt: one text file, cut into contiguous train/valid/test parts by " \
           "0.8/0.1/0.1" in stdout
    code, stdout, err = _cli(capsys, "train", "--resume", "--out", str(out), "--no-progress")
    assert code == 0, err
    summary = _last_json(stdout)
    saved = json.loads((out / "config.json").read_text())
    assert saved["corpus"]["split_fractions"] == [0.8, 0.1, 0.1]
    assert saved["corpus"]["files"]["text"]["md5"] == sources.md5sum(
        tmp_path / "shakespeare" / "input.txt")
    code, stdout, _ = _cli(capsys, "evaluate", str(out), "--weights", "last", "--json")
    assert code == 0
    result = _last_json(stdout)
    assert result["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-6)
    tokens = len(tokenize(text, "char"))
    assert result["tokens"] == tokens - round(tokens * 0.9) - 1


@pytest.mark.slow
def test_a_directory_without_a_test_file_trains_and_skips_the_test_score(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "test.txt").unlink()
    code, stdout, err = _cli(capsys, "train", "--data-dir", str(corpus), "--out",
                             str(tmp_path / "run"), *FLAGS, "--epochs", "1")
    assert code == 0, err
    assert "no test split" in stdout and "test score skipped" in stdout
    summary = _last_json(stdout)
    assert summary["test_ppl"] is None and summary["valid_ppl"] > 1


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = _cli(capsys, "train", "--data-dir", str(tmp_path / "nowhere"), "--out",
                      str(out), *FLAGS)
    assert code == 2 and not out.exists()


# --------------------------------------------------------------------------- PTB by download


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A loopback HTTP server with three tiny ptb.*.txt files; the module constants point at it.

    The cache ($XDG_CACHE_HOME) is a fresh directory and $RNNREG_DATA is unset, so "nothing is
    given" holds; no test touches the internet.
    """
    served = write_corpus(tmp_path / "served")
    for split in sources.SPLITS:
        (served / f"{split}.txt").rename(served / f"ptb.{split}.txt")
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(sources, "PTB_URL", f"http://127.0.0.1:{server.server_port}/{{name}}")
    monkeypatch.setattr(sources, "PTB_MD5", {
        f"ptb.{s}.txt": sources.md5sum(served / f"ptb.{s}.txt") for s in sources.SPLITS})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(sources.DATA_ENV, raising=False)
    yield tmp_path / "cache" / "rnnreg" / "ptb"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.mark.slow
def test_nothing_given_downloads_ptb_and_trains(mirror, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "--no-download", "--out", str(out), *FLAGS)
    assert code == 2 and "does not exist" in err and "download ptb" in err
    assert not mirror.exists() and not out.exists()

    code, stdout, err = _cli(capsys, "train", "--out", str(out), *FLAGS, "--epochs", "1")
    assert code == 0, err
    assert "downloading Penn Treebank" in err
    assert sorted(p.name for p in mirror.iterdir()) == sorted(
        [*sources.PTB_MD5, sources.DOWNLOAD_MARKER])
    corpus = json.loads((out / "config.json").read_text())["corpus"]
    assert corpus["data_dir"] == str(mirror.resolve())
    assert corpus["files"]["train"]["md5"] == sources.PTB_MD5["ptb.train.txt"]


@pytest.mark.slow
def test_a_download_with_a_wrong_md5_leaves_no_half_written_corpus(mirror, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setitem(sources.PTB_MD5, "ptb.test.txt", "0" * 32)
    code, _, err = _cli(capsys, "train", "--out", str(tmp_path / "run"), *FLAGS)
    assert code == 2 and len(err.strip().splitlines()) == 2  # the announcement, the error
    assert "ptb.test.txt is corrupt" in err and "nothing was saved" in err
    assert not mirror.exists()  # train and valid were removed again, and the folder made
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- curves


@pytest.mark.slow
def test_step_records_reach_metrics_tensorboard_and_the_plot(trained, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    steps = _records(out, "step")
    per_epoch = _records(out, "epoch")[0]["step"]
    assert [r["step"] for r in steps] == list(range(3, per_epoch + 1, 3))
    for record in steps:
        assert record["train_ppl"] > 1 and record["tokens_per_s"] > 0
        assert record["lr"] == 1.0 and 0 < record["epochs_done"] <= 1
        assert record["train_loss"] == pytest.approx(math.log(record["train_ppl"]))
    events = EventAccumulator(str(out / "tensorboard" / "steps"))  # x = global step there
    events.Reload()
    logged = events.Scalars("step/train_ppl")
    assert [e.step for e in logged] == [r["step"] for r in steps]
    assert (out / "plots" / "learning_curve.png").is_file()
    code, stdout, _ = _cli(capsys, "plot", str(out), "--out", str(tmp_path / "curve.png"))
    assert code == 0 and (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- help


def _train_parser():
    commands = next(a for a in cli._parser()._actions if hasattr(a, "choices")
                    and isinstance(a.choices, dict))
    return commands.choices["train"]


def test_every_train_flag_has_help_its_choices_and_at_most_one_default(capsys):
    choices = {"level": ("word", "char"), "cell": ("lstm", "gru", "rnn"),
               "optimizer": ("sgd", "asgd"), "lr_schedule": ("step", "cosine"),
               "precision": ("float32", "bfloat16")}
    fields = {f.name for f in __import__("dataclasses").fields(Config)}
    for action in _train_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "\n" not in action.help, action.dest
        if action.dest in choices:
            assert tuple(action.choices) == choices[action.dest]
        if action.dest in fields:
            assert "default" not in action.help, action.dest  # the preset's, said once above
        assert action.help.count("default") <= 1, action.dest
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "{lstm,gru,rnn}" in text and "(default: small)" in text
    assert text.count("(default:") == len([a for a in _train_parser()._actions
                                           if a.help and "(default:" in a.help])


@pytest.mark.parametrize("args,fragment", [
    (("train", "--preset", "nosuch"), "choose from"),
    (("train", "--cell", "transformer"), "'lstm', 'gru', 'rnn'"),
    (("train", "--embedding-size", "wide"), "--embedding-size"),
])
def test_a_bad_choice_is_one_line_not_the_usage(args, fragment, capsys):
    code, _, err = _cli(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err and "usage" not in err


def test_optional_fields_take_none(tmp_path):
    parsed = _train_parser().parse_args(["--embedding-size", "none", "--max-vocab", "50"])
    assert parsed.embedding_size is None and parsed.max_vocab == 50
