"""Tests for benchmarks/device_check.py, the one-call GPU check: its stage limits, its
concurrent training rows and their labels, its result files, its interrupt handling, and
(slow) the whole CPU rehearsal, ``device_check.sh OUTDIR --quick``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from support import REPO_ROOT, write_corpus

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import device_check  # noqa: E402  (a script, not a package)
import perf_model  # noqa: E402

OUTPUTS = ["cuda-other.xml", "cuda-triton.xml", "kernels.md", "layers.md", "logs.tar.gz",
           "runs.tar.gz", "summary.md", "training.md"]
# A stopped run saves a checkpoint and draws its learning curve: seconds on a loaded CPU.
GRACE = 8.0
ROWS = ("medium", "large", "variational-medium", "variational-large", "study-medium")


def _check(tmp_path: Path, **changes) -> device_check.Check:
    (tmp_path / "out").mkdir(exist_ok=True)
    profile = dataclasses.replace(device_check.QUICK, **{"grace": 1.0, "reserve": 0.0,
                                                          **changes})
    return device_check.Check(tmp_path / "out", profile, quick=True)


@pytest.fixture
def check(tmp_path):
    made = _check(tmp_path)
    yield made
    device_check.shutil.rmtree(made.work, ignore_errors=True)


def _row(name: str, preset: str, *flags: str, limit: float | None = None,
         **study) -> device_check.Row:
    return device_check.Row(name, preset, (*device_check.TINY, *flags), limit=limit, **study)


def _table(summary: str) -> dict[str, list[str]]:
    """The stage table of a summary (up to the first blank line after it): name -> cells."""
    body = summary.split("| stage |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in body]
    return {cells[0]: cells[1:] for cells in rows}


@pytest.mark.slow  # starts a process and waits for its limit
def test_a_stage_past_its_limit_is_stopped_and_the_rest_still_runs(check):
    started = time.monotonic()
    slow = check.run("layers", [sys.executable, "-c", "import time; time.sleep(60)"], limit=3)
    assert slow.status == "timed out (stopped)"
    stubborn = check.run("profile", [sys.executable, "-c", (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")],
        limit=3)
    assert stubborn.status == "timed out (killed)"
    assert time.monotonic() - started < 15
    failed = check.run("deps", [sys.executable, "-c", "raise SystemExit(3)"])
    assert failed.status == "failed (exit 3)"
    assert [s.name for s in check.stages] == ["layers", "profile", "deps"]
    summary = (check.out / "summary.md").read_text()  # published after every stage
    assert "| profile | timed out (killed) |" in summary


@pytest.mark.slow
def test_a_stage_leaves_no_process_of_its_group_behind(check, tmp_path):
    """A leader that exits while a child it started keeps running: the child goes too."""
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid))")
    stage = check.run("deps", [sys.executable, "-c", script, str(pid_file)], limit=20)
    assert stage.status == "ok" and stage.seconds < 10
    child = int(pid_file.read_text())
    assert _gone(lambda: _processes(0, child))


def test_no_stage_starts_past_the_budget(tmp_path):
    check = _check(tmp_path, budget=2.0)
    stage = check.run("layers", [sys.executable, "-c", "print('never')"])
    assert stage.status == "skipped" and "no time left" in stage.result
    assert not (check.logs / "layers.log").exists()  # the command never started
    check.training(tmp_path)
    assert [(s.name, s.status) for s in check.stages[1:]] == [(r, "skipped") for r in ROWS]
    assert not check.row_commands and not list(check.logs.iterdir())
    device_check.shutil.rmtree(check.work, ignore_errors=True)


def test_rows_without_a_core_per_process_are_skipped_on_a_gpu(tmp_path, monkeypatch):
    check = _check(tmp_path, device="cuda", rows=device_check.PAPER_ROWS)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    # 4 single runs fit; the study needs 5 runs and its parent: 10 processes > 8 cores.
    assert [r.name for r in check._rows_that_fit()] == list(ROWS[:4])
    skipped = check.stages[-1]
    assert (skipped.name, skipped.status) == ("study-medium", "skipped")
    assert "6 more processes than the 8 CPU cores" in skipped.result
    monkeypatch.setattr(os, "cpu_count", lambda: 10)
    assert [r.name for r in check._rows_that_fit()] == list(ROWS)
    device_check.shutil.rmtree(check.work, ignore_errors=True)


def test_row_commands_drive_the_cli_with_a_training_budget():
    row = device_check.Row("s", "medium", ("--epochs", "3"),
                           strategies=("none", "zaremba", "variational"), rates=(0.25, 0.5))
    assert (row.runs, row.processes) == (5, 6)  # none has no rate to vary
    command = row.command(Path("ptb"), Path("out"), "cuda", 0.0)
    assert command[1:4] == ["-m", "rnnreg", "compare"]
    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    assert flag(command, "--strategies") == "none,zaremba,variational"
    assert flag(command, "--jobs") == "5" and flag(command, "--rates") == "0.25,0.5"
    assert command[-2:] == ["--epochs", "3"]
    # 0 would mean "no limit" to the trainer: the smallest budget is never written as 0.00.
    assert float(flag(command, "--max-train-minutes")) > 0
    single = device_check.Row("m", "medium").command(Path("ptb"), Path("out"), "cuda", 2.5)
    assert single[3] == "train" and flag(single, "--max-train-minutes") == "2.50"


def _write_run(directory: Path, epochs: int, planned: int, final: dict | None,
               steps: tuple[float, ...] = ()) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"config": {"epochs": planned}}))
    records = [{"event": "epoch", "epoch": e, "valid_ppl": 100.0 - e, "tokens_per_s": 5e4}
               for e in range(1, epochs + 1)]
    records += [{"event": "step", "epochs_done": done, "tokens_per_s": 4e4} for done in steps]
    if final is not None:
        records.append({"event": "final", **final})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "last.safetensors").write_bytes(b"weights")
    return directory


def test_run_results_are_labelled_complete_partial_or_unfinished(tmp_path):
    base = {"valid_ppl": 90.0, "test_ppl": 87.5, "train_seconds": 240.0}
    done = _write_run(tmp_path / "a", 3, 3, {"complete": True, "epochs_completed": 3, **base})
    assert device_check._run_result(done, 4.0).line() == (
        "complete: 3 of 3 epochs, valid 90.00, test 87.50, 50,000 tok/s")
    cut = _write_run(tmp_path / "b", 2, 39, {"complete": False, "epochs_completed": 2, **base},
                     steps=(2.25, 2.4))
    assert device_check._run_result(cut, 4.0).line() == (
        "PARTIAL (training budget 4.00 min): 2.40 of 39 epochs, valid 90.00, test 87.50, "
        "40,000 tok/s")
    killed = _write_run(tmp_path / "c", 2, 39, None)
    assert device_check._run_result(killed, 4.0, stopped=True).line() == (
        "PARTIAL (stopped at the row's time limit): 2.00 of 39 epochs, valid 98.00, "
        "no test score, 50,000 tok/s")
    crashed = device_check._run_result(killed, 4.0, stopped=False)
    assert crashed.label == "unfinished" and "see logs/" in crashed.why
    early = _write_run(tmp_path / "d", 0, 39, None, steps=(0.1,))
    assert device_check._run_result(early, 4.0, stopped=True).line() == (
        "PARTIAL (stopped at the row's time limit): 0.10 of 39 epochs, valid -, "
        "no test score, 40,000 tok/s")
    assert device_check._run_result(tmp_path / "none", 4.0).label == "no metrics"


def test_a_line_cut_by_sigkill_does_not_hide_the_rest(tmp_path):
    run = _write_run(tmp_path / "a", 1, 39, None)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"event": "step", "epochs_d')
    assert device_check._run_result(run, 1.0, stopped=True).epochs == "1.00 of 39"


def test_run_and_study_directories_are_packed_without_checkpoints(tmp_path):
    run = _write_run(tmp_path / "runs" / "medium", 1, 1, None)
    study = _write_run(tmp_path / "runs" / "study" / "runs" / "lstm-none-p0-s1", 1, 1, None)
    data = device_check._tar({run: "medium", study.parents[1]: "study"}, skip="checkpoints")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert {"medium/metrics.jsonl", "medium/config.json",
            "study/runs/lstm-none-p0-s1/metrics.jsonl"} <= set(names)
    assert not [n for n in names if "checkpoints" in n]


def test_junit_counts_are_summarised(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped type="pytest.xfail" message="y"/></testcase>'
        '<testcase name="d"><skipped type="pytest.skip" message="z"/></testcase>'
        '</testsuite></testsuites>')
    assert device_check._junit(xml).startswith(
        "4 tests: 1 passed, 1 failed, 0 errors, 1 skipped, 1 xfailed")
    assert device_check._junit(tmp_path / "missing.xml") == "no JUnit file written"


LAYERS_TABLE = (
    "*caption*\n\n| shape | strategy | engine | tokens/s | ms/iter | vs nn.LSTM(dropout) | "
    "vs hand-rolled Zaremba |\n|---|---|---|---:|---:|---:|---:|\n"
    "| small | zaremba | fused | 9 | 1.0 | 1.01x | 0.99x |\n"
    "| small | variational | triton | 9 | 1.0 | 0.42x | 0.40x |\n"
    "| medium | variational | own loop | 9 | 1.0 | 0.55x | 0.50x |\n")


def test_headlines_read_the_tables_by_their_header_and_name_the_engine(tmp_path):
    table = tmp_path / "layers.md"
    table.write_text(LAYERS_TABLE)
    assert device_check._headline("layers", table) == (
        "zaremba vs nn.LSTM(dropout): small 1.01x (fused); "
        "variational vs nn.LSTM(dropout): small 0.42x (triton), medium 0.55x (own loop)")
    assert device_check._headline("layers", tmp_path / "none.md") == "no table (see logs/)"


def test_the_summary_records_command_commit_device_rows_and_whole_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNREG_COMMIT", "0123abc")
    check = _check(tmp_path)
    check.command = "bash benchmarks/device_check.sh out --budget 300"
    check.machine = {"device": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8,
                     "cpus": 16, "torch": "2.13.0", "torch_cuda": "12.8", "cudnn": 91000,
                     "python": "3.12.1"}
    (check.out / "layers.md").write_text(LAYERS_TABLE)
    base = {"valid_ppl": 90.0, "test_ppl": 87.5, "train_seconds": 1.0}
    done = _write_run(tmp_path / "a", 3, 3, {"complete": True, "epochs_completed": 3, **base})
    cut = _write_run(tmp_path / "b", 1, 39, None)
    check.row_commands = {"medium": "python3 -m rnnreg train --preset medium",
                          "large": "python3 -m rnnreg train --preset large"}
    check.row_results = {"medium": [("", device_check._run_result(done, 2.0))],
                         "large": [("", device_check._run_result(cut, 2.0, stopped=True))]}
    check.record(device_check.Stage("large", "timed out (stopped)", 61.0, "PARTIAL", began=9.5))
    summary = (check.out / "summary.md").read_text()
    assert "- command: `bash benchmarks/device_check.sh out --budget 300`" in summary
    assert "- commit: 0123abc (from RNNREG_COMMIT)" in summary
    assert "- machine: NVIDIA H200, capability 9.0, 139.8 GiB, 16 CPU cores; torch 2.13.0 " \
           "(CUDA 12.8, cuDNN 91000), Python 3.12.1" in summary
    assert _table(summary)["large"] == ["timed out (stopped)", "10", "61.0", "PARTIAL"]
    assert LAYERS_TABLE.strip() in summary  # every column as the benchmark printed it
    training = (check.out / "training.md").read_text()
    assert training.strip() in summary
    assert "| medium |  | complete | 3 of 3 | 90.00 | 87.50 | 50,000 |" in training
    assert "| large |  | PARTIAL | 1.00 of 39 | 99.00 | - | 50,000 |" in training
    assert "- large: `python3 -m rnnreg train --preset large`" in training
    device_check.shutil.rmtree(check.work, ignore_errors=True)


def _overlap(first: device_check.Stage, second: device_check.Stage) -> bool:
    return max(first.began, second.began) < min(first.began + first.seconds,
                                                 second.began + second.seconds)


@pytest.mark.slow  # trains three tiny rows at once
def test_rows_train_at_once_each_to_its_own_limit_and_a_failed_row_stops_no_other(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rows = (_row("done", "medium", "--epochs", "1"),
            # Far more than its limit allows, and a budget far beyond it (overhead 0.2): the
            # check's SIGTERM ends it. A step record per window, so its metrics exist early.
            _row("cut", "large", "--epochs", "500", "--log-every", "1", limit=20.0),
            _row("broken", "medium", "--hidden-size", "0"))
    check = _check(tmp_path, rows=rows, budget=120.0, row_limit=60.0, row_minimum=5.0,
                   startup=0.0, overhead=0.2, grace=GRACE, train_cap_minutes=0.0)
    check.training(corpus)
    stages = {s.name: s for s in check.stages}
    assert stages["broken"].status.startswith("failed")
    assert stages["broken"].result == "no metrics written (see logs/)"
    assert stages["done"].status == "ok" and stages["done"].result.startswith(
        "complete: 1 of 1 epochs, valid ")
    assert stages["cut"].status == "timed out (stopped)"
    assert stages["cut"].result.startswith("PARTIAL (stopped at the row's time limit): ")
    assert "no test score" in stages["cut"].result
    assert 20.0 - GRACE <= stages["cut"].seconds < 25.0  # its own limit, not the others' 60 s
    # They overlapped in time: by the check's clock, and by the files the runs wrote (each
    # run's config.json is written as it starts, its metrics.jsonl until it stops).
    assert _overlap(stages["done"], stages["cut"])
    assert _overlap(stages["broken"], stages["cut"])
    done, cut = check.runs / "done", check.runs / "cut"
    assert (cut / "config.json").stat().st_mtime < (done / "metrics.jsonl").stat().st_mtime
    assert (done / "config.json").stat().st_mtime < (cut / "metrics.jsonl").stat().st_mtime
    assert "--hidden-size" in (check.logs / "broken.log").read_text()  # why it failed
    training = (check.out / "training.md").read_text()
    assert "| cut |  | PARTIAL |" in training and "| done |  | complete | 1 of 1 |" in training
    with tarfile.open(check.out / "runs.tar.gz") as tar:
        assert {"done/metrics.jsonl", "cut/metrics.jsonl"} <= set(tar.getnames())
    device_check.shutil.rmtree(check.work, ignore_errors=True)


@pytest.mark.slow  # trains two tiny rows until the check's budget stops them
def test_the_rows_end_within_the_checks_budget(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rows = (_row("a", "medium", "--epochs", "500", "--log-every", "1"),
            _row("b", "variational-medium", "--epochs", "500", "--log-every", "1"))
    check = _check(tmp_path, rows=rows, budget=25.0, row_limit=300.0, row_minimum=5.0,
                   startup=0.0, overhead=0.2, grace=GRACE, train_cap_minutes=0.0)
    check.training(corpus)
    elapsed = time.monotonic() - check.started
    assert elapsed <= 25.0 + 2.0  # the budget, and a poll or two
    for stage in check.stages:
        assert stage.status == "timed out (stopped)", stage
        assert stage.result.startswith("PARTIAL (stopped at the row's time limit)")
    device_check.shutil.rmtree(check.work, ignore_errors=True)


def _processes(field: int, value: int) -> list[int]:
    """Live processes (zombies left out) whose ``field`` is ``value``: 0 the pid, 1 the
    parent's pid, 2 the process group (Linux /proc: "pid (comm) state ppid pgrp ...")."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
        ids = (int(text.split(" ", 1)[0]), int(ppid), int(pgrp))
        if state != "Z" and ids[field] == value:
            found.append(ids[0])
    return found


def _gone(find, seconds: float = 5.0) -> bool:
    """Whether ``find()`` comes back empty within ``seconds`` (a SIGKILL takes a moment)."""
    deadline = time.monotonic() + seconds
    while find() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not find()


@pytest.mark.slow  # runs the check until a stage starts, then stops it with SIGTERM
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_running_stage_group_and_still_writes_results(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    check = subprocess.Popen([sys.executable, str(REPO_ROOT / "benchmarks" / "device_check.py"),
                              str(out), "--quick"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline, stage = time.monotonic() + 60, []
    while not stage and time.monotonic() < deadline:
        stage = [p for p in _processes(1, check.pid)
                 if b"-m\0pytest\0" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.1)
    assert stage, "the cuda-triton stage never started"
    check.send_signal(signal.SIGTERM)
    output, _ = check.communicate(timeout=30)
    assert check.returncode == 130, output
    assert "interrupted" in output
    assert _gone(lambda: _processes(2, stage[0]))  # its whole group is gone
    summary = (out / "summary.md").read_text()
    assert _table(summary)["cuda-triton"][0] == "interrupted"
    # The speed tables and the kernel profile come before the tests.
    assert list(_table(summary)) == ["deps", "install", "machine", "layers", "profile",
                                     "cuda-triton"]
    names = {p.name for p in out.iterdir()}
    assert {"logs.tar.gz", "summary.md", "layers.md", "kernels.md"} <= names
    assert names <= {"logs.tar.gz", "summary.md", "layers.md", "kernels.md", "cuda-triton.xml"}


STOPPED_ROWS = """
import signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import device_check
check = device_check.Check(Path(sys.argv[2]), device_check.QUICK, quick=True)
signal.signal(signal.SIGTERM, device_check._interrupt_once)
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
rows = [check.start(name, sleeper, 100) for name in ("medium", "large")]
print(*(row.process.pid for row in rows), flush=True)
try:
    check.supervise(rows)
except KeyboardInterrupt:
    sys.exit(130)
finally:
    device_check.shutil.rmtree(check.work)
"""


@pytest.mark.slow  # starts rows, then stops the check that runs them with SIGTERM
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_every_running_row_and_records_it(tmp_path):
    (tmp_path / "out").mkdir()
    check = subprocess.Popen([sys.executable, "-c", STOPPED_ROWS, str(REPO_ROOT / "benchmarks"),
                              str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    groups = [int(pid) for pid in check.stdout.readline().split()]
    assert len(groups) == 2 and all(_processes(2, group) for group in groups)
    check.send_signal(signal.SIGTERM)
    assert check.wait(timeout=30) == 130
    assert all(_gone(lambda group=group: _processes(2, group)) for group in groups)
    table = _table((tmp_path / "out" / "summary.md").read_text())
    assert table["medium"][0] == table["large"][0] == "interrupted"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RNNREG_REHEARSAL") != "1", reason=(
    "the whole CPU rehearsal is far longer than the suite's other tests; "
    "RNNREG_REHEARSAL=1 runs it"))
def test_quick_rehearsal_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RNNREG_DATA", None)
    script = REPO_ROOT / "benchmarks" / "device_check.sh"  # run from elsewhere: it cds itself
    started = time.monotonic()
    result = subprocess.run(["bash", str(script), str(out), "--quick"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert time.monotonic() - started < device_check.QUICK.budget + 5
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())
    summary = (out / "summary.md").read_text()
    table = _table(summary)
    stages = ("deps", "install", "machine", "layers", "profile", "cuda-triton", "cuda-other")
    assert list(table)[:len(stages)] == list(stages)  # in this order, the rows after them
    for stage in (*stages, *ROWS):
        assert table[stage][0] == "ok", (stage, table.get(stage))
    # The rows ran at once: each started before any other ended.
    spans = [(float(table[r][1]), float(table[r][1]) + float(table[r][2])) for r in ROWS]
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    assert table["medium"][3].startswith("complete: 1 of 1 epochs")
    assert table["large"][3].startswith("PARTIAL (training budget")  # 500 epochs planned
    assert re.match(r"2 of 2 runs started: 2 PARTIAL; lowest valid", table["study-medium"][3])
    for name, least in (("cuda-triton", 1), ("cuda-other", 40)):
        suite = ET.parse(out / f"{name}.xml").getroot().find("testsuite")
        assert int(suite.get("tests")) >= least
        assert suite.get("failures") == suite.get("errors") == "0"
    assert "| tiny | rnnreg variational (own loop) |" in (out / "kernels.md").read_text()
    assert table["layers"][3].startswith("vs nn.LSTM(dropout): tiny float32 Python loop ")
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"{row}/metrics.jsonl" for row in ROWS[:4]} <= set(names)
    assert {"study-medium/report.md", "study-medium/runs/lstm-zaremba-p0.5-s1/metrics.jsonl"} \
        <= set(names)
    assert not [n for n in names if "checkpoints" in n]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {f"logs/{row}.log" for row in ROWS} <= set(tar.getnames())
    assert result.stdout.rstrip().endswith(summary.split("\n## ")[0].rstrip().splitlines()[-1])


# --- the pytest stages' limits, the GPU tables' headlines ----------------------------------------

SLOW_TESTS = """
import time

def test_quick():
    pass

def test_stuck():
    time.sleep(60)

def test_after():
    pass
"""


def _pytest(tmp_path: Path, *options: str) -> list[str]:
    (tmp_path / "test_sleepy.py").write_text(SLOW_TESTS)
    return [sys.executable, "-m", "pytest", str(tmp_path / "test_sleepy.py"), "-q",
            "-p", "no:cacheprovider", "-p", "pytest_limits", *options]


def _suite(xml: Path) -> dict[str, str]:
    suite = ET.parse(xml).getroot().find("testsuite")
    return {case.get("name"): ("failed" if case.find("failure") is not None else "passed")
            for case in suite.iter("testcase") if case.get("name")}


@pytest.mark.slow  # two pytest processes, a few seconds each
def test_a_stuck_test_fails_alone_and_the_session_limit_still_writes_junit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "benchmarks")}
    xml = tmp_path / "per-test.xml"
    started = time.monotonic()
    run = subprocess.run(_pytest(tmp_path, "--limit-per-test=2", f"--junitxml={xml}"),
                         env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30, run.stdout
    assert _suite(xml) == {"test_quick": "passed", "test_stuck": "failed", "test_after": "passed"}
    assert "over its time limit (2 s, call)" in run.stdout
    xml = tmp_path / "session.xml"
    run = subprocess.run(_pytest(tmp_path, "--limit-session=1", f"--junitxml={xml}"),
                         env=env, capture_output=True, text=True, timeout=60)
    # The session limit cuts the stuck test (the per-test limit falls to what is left) and
    # starts nothing after it; the report is still written, and says so.
    assert _suite(xml) == {"test_quick": "passed", "test_stuck": "failed"}
    log = tmp_path / "session.log"
    log.write_text(run.stdout)
    assert device_check._stopped(log).startswith(
        "; stopped: limits: session limit of 1 s reached after 2 of 3 tests")


@pytest.mark.slow  # a pytest stage held to its limit
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_a_pytest_stage_past_its_limit_gets_sigint_and_still_writes_junit(tmp_path, inherited):
    # "ignored": the check itself started as a shell without job control starts a background
    # command, with SIGINT ignored, which its children inherit.
    previous = signal.getsignal(signal.SIGINT)
    if inherited == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stage_past_its_limit(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stage_past_its_limit(tmp_path):
    check = _check(tmp_path, grace=GRACE)  # writing the report takes a moment on a busy CPU
    xml = tmp_path / "cut.xml"
    stage = check.run("cuda-triton", _pytest(tmp_path, f"--junitxml={xml}"), limit=GRACE + 6,
                      stop_signal=signal.SIGINT)
    assert stage.status == "timed out (stopped)"  # SIGINT was enough: no SIGKILL
    assert _suite(xml)["test_quick"] == "passed"
    # The interrupted test is no testcase of the report; the one that ran is.
    assert device_check._junit(xml).startswith("1 tests: 1 passed, 0 failed")
    assert device_check._stopped(check.logs / "cuda-triton.log") == (
        "; stopped by SIGINT at the stage's limit")
    device_check.shutil.rmtree(check.work, ignore_errors=True)


def test_the_lease_profile_fits_a_rerun_and_the_tables_come_before_the_tests():
    assert device_check.FULL.budget <= 300
    assert device_check.FULL.shapes == "medium,large"
    stages = list(device_check.FULL.limits)
    assert stages.index("layers") < stages.index("profile") < stages.index("cuda-triton") \
        < stages.index("cuda-other")


GPU_LAYERS = (
    "\n| precision | cuda.matmul.fp32_precision | cudnn.rnn.fp32_precision |\n|---|---|---|\n"
    "| fp32 | none | tf32 |\n\n*caption*\n\n"
    "| shape | strategy | precision | row | engine | ms/iter | vs nn.LSTM(dropout) | "
    "vs Python loop | PREDICTED ms/iter | measured / predicted |\n"
    "|---|---|---|---|---|---:|---:|---:|---:|---:|\n"
    "| medium | variational | fp32 | nn.LSTM(dropout) | cuDNN | 1.50 | 1.00x | 9.00x | 1.04 "
    "| 1.44 |\n"
    "| medium | variational | fp32 | fused Triton step | - | not available (no fused step) | - "
    "| - | 0.64 | - |\n"
    "| medium | variational | fp32 | two-kernel Triton step | Triton loop with CUDA graphs | "
    "2.50 | 0.60x | 5.40x | 0.96 | 2.60 |\n")


def test_the_gpu_headline_reads_the_engines_table_not_the_precision_table(tmp_path):
    table = tmp_path / "layers.md"
    table.write_text(GPU_LAYERS)
    assert device_check._headline("layers", table) == (
        "vs nn.LSTM(dropout): medium fp32 variational fused Triton step not available "
        "(no fused step) (predicted 0.64 ms, measured not available (no fused step) ms); "
        "medium fp32 variational two-kernel Triton step 0.60x (predicted 0.96 ms, "
        "measured 2.50 ms)")
    kernels = tmp_path / "kernels.md"
    kernels.write_text(
        "| shape | model | ms/iter | us/step/layer | ops/iter | ops/step/layer | busy |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
        "| medium | nn.LSTM(dropout) (cuDNN on GPU) | 1.5 | 21 | 300 | 4.3 | 90% |\n"
        "| medium | rnnreg variational (own loop) | 2.5 | 36 | 320 | 4.6 | 80% |\n\n"
        "| shape | CUDA kernel | calls | calls/step/layer | us | us/call | share |\n"
        "|---|---|---:|---:|---:|---:|---:|\n| medium | `gemm` | 140 | 2.00 | 900 | 6.4 | 60% |\n")
    assert device_check._headline("profile", kernels) == (
        "medium ms/iter cuDNN 1.5, own loop 2.5 (4.6 ops/step/layer, busy 80%) "
        "(kernel times: kernels.md)")


# --- the performance model and the precision record ----------------------------------------------

def test_docs_hold_the_performance_models_output():
    text = (REPO_ROOT / "docs" / "engines.md").read_text()
    block = text.split("<!-- perf_model.py: begin -->\n", 1)[1].split(
        "<!-- perf_model.py: end -->", 1)[0]
    assert block == perf_model.document()
    assert "PREDICTED" in block and "not measured" in block


def test_the_model_follows_its_own_arithmetic():
    """Independent of the table: hand-computed figures at the medium shape, and how the
    predictions move with the engine, the precision and the device."""
    medium = perf_model.SHAPES["medium"]
    b, h = 20, 650
    split = perf_model.step("split", medium, "fp32")
    # The two products read W_hh (4H x H float32) once each, and 2 * 2 * B * 4H * H FLOPs.
    assert split.flops == 2 * 2 * b * 4 * h * h
    assert split.bytes > 2 * 4 * h * h * 4
    assert split.launches == 4
    fused = perf_model.step("fused", medium, "fp32")
    assert fused.launches == 2 and fused.flops == split.flops
    # rec and d_gates stay inside the fused kernels: 2 x (write + read) of B x 4H fewer.
    assert split.bytes - fused.bytes == 2 * 2 * b * 4 * h * 4
    assert perf_model.step("split", medium, "bf16").bytes == split.bytes / 2
    # The Python loop is bound by the host: one eager op costs the assumed host time.
    python = perf_model.step("python", medium, "fp32")
    assert python.us == python.launches * perf_model.ASSUMED.eager_op_host_us
    zoned = perf_model.step("python", medium, "fp32", zoneout=True)
    assert zoned.launches == python.launches + 2 * perf_model.PYTHON_OPS["zoneout"]
    # The large shape's products are bound by bandwidth: the H200's is faster by its ratio.
    large = perf_model.SHAPES["large"]
    h100, h200 = (perf_model.step("fused", large, "fp32", device=d).us
                  - 2 * perf_model.ASSUMED.graph_gap_us for d in (perf_model.H100, perf_model.H200))
    assert h100 / h200 == pytest.approx(4.8 / 3.35, rel=0.05)
    rows = perf_model.rows()
    assert len(rows) == len(perf_model.SHAPES) * len(perf_model.PRECISIONS) * 4
    assert all(r["vs_cudnn"] == 1.0 for r in rows if r["engine"] == "cudnn")


def test_the_layers_shapes_are_the_models():
    layers = pytest.importorskip("layers")
    for name, shape in perf_model.SHAPES.items():
        assert dataclasses.astuple(layers.SHAPES[name]) == dataclasses.astuple(shape)


@pytest.fixture
def restored_precision():
    """torch's float32 precision settings put back after the test (new API values)."""
    import torch

    backends = torch.backends
    saved = (backends.cuda.matmul.fp32_precision, backends.cudnn.rnn.fp32_precision)
    yield backends
    backends.cuda.matmul.fp32_precision, backends.cudnn.rnn.fp32_precision = saved


def test_precision_settings_are_read_under_the_new_tf32_api_without_raising(
        restored_precision):
    layers = pytest.importorskip("layers")
    backends = restored_precision
    backends.cuda.matmul.fp32_precision = "tf32"  # the API torch's docs advise
    with pytest.raises(RuntimeError):
        backends.cuda.matmul.allow_tf32  # noqa: B018  (the legacy getter refuses the mix)
    settings = layers.precision_settings()
    assert settings["cuda.matmul.fp32_precision"] == "tf32"
    assert settings["cuda.matmul.allow_tf32"].startswith("n/a")
    with layers.precision_mode("fp32-ieee"):
        assert layers.precision_settings()["cudnn.rnn.fp32_precision"] == "ieee"
    assert backends.cudnn.rnn.fp32_precision == "tf32"  # put back after the block


def test_the_gpu_rows_select_step_kinds_the_triton_engine_knows():
    layers = pytest.importorskip("layers")
    engine = pytest.importorskip("rnnreg.nn.loops.triton")
    assert layers.STEP_VARIABLE == engine.STEP_VARIABLE
    chosen = {env[layers.STEP_VARIABLE] for _, _, env in layers.GPU_ROWS
              if layers.STEP_VARIABLE in env}
    assert chosen == set(engine.STEP_KINDS)  # both steps measured, each one the engine accepts
    for kind in chosen:
        assert engine.step_kind({engine.STEP_VARIABLE: kind}) == kind


def test_a_row_that_cannot_run_says_why():
    layers = pytest.importorskip("layers")
    cells = layers.gpu_row_cells({"shape": "medium", "strategy": "zoneout", "precision": "bf16",
                                  "row": "fused Triton step", "engine": "",
                                  "status": "failed: OutOfMemoryError: CUDA out of memory",
                                  "predicted": 0.44})
    assert cells[5] == "failed: OutOfMemoryError: CUDA out of memory" and cells[8] == "0.44"


@pytest.mark.slow  # two pytest stages, the first cut by its session limit
def test_the_cuda_test_stages_report_a_session_limit_and_write_both_reports(tmp_path,
                                                                           monkeypatch):
    tests = tmp_path / "test_marked.py"
    tests.write_text("import pytest\npytestmark = pytest.mark.cuda\n" + SLOW_TESTS
                     + "\ndef test_other():\n    pass\n")
    monkeypatch.setattr(device_check, "cuda_test_files", lambda: [str(tests)])
    monkeypatch.setattr(device_check, "TRITON_TESTS", "quick or stuck or after")
    check = _check(tmp_path, grace=2.0, limits={
        **device_check.QUICK.limits, "cuda-triton": 14.0, "cuda-other": 20.0})
    check.cuda_tests()
    triton, other = check.stages
    assert triton.status == "timed out (session limit)", triton
    assert "stopped: limits: session limit of 7 s reached after 2 of 3 tests" in triton.result
    assert _suite(check.out / "cuda-triton.xml") == {"test_quick": "passed",
                                                     "test_stuck": "failed"}
    assert other.status == "ok" and other.result.startswith("1 tests: 1 passed")
    assert _suite(check.out / "cuda-other.xml") == {"test_other": "passed"}
    device_check.shutil.rmtree(check.work, ignore_errors=True)
