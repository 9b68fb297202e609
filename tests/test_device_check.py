"""Tests for benchmarks/device_check.py, the one-call GPU check: its stage limits, its result
files and labels, and (slow) the whole CPU rehearsal, ``device_check.sh OUTDIR --quick``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import device_check  # noqa: E402  (a script, not a package)

OUTPUTS = ["cuda-tests.xml", "launch-bound.md", "layers.md", "logs.tar.gz", "runs.tar.gz",
           "summary.md", "train-speed.md"]


def _check(tmp_path: Path, **changes) -> device_check.Check:
    profile = dataclasses.replace(device_check.QUICK, grace=1.0, reserve=0.0, **changes)
    return device_check.Check(tmp_path / "out", profile, quick=True)


@pytest.fixture
def check(tmp_path):
    (tmp_path / "out").mkdir()
    made = _check(tmp_path)
    yield made
    device_check.shutil.rmtree(made.work, ignore_errors=True)


@pytest.mark.slow  # starts a process and waits for its limit
def test_a_stage_past_its_limit_is_stopped_and_the_rest_still_runs(check):
    started = time.monotonic()
    slow = check.run("layers", [sys.executable, "-c", "import time; time.sleep(60)"], limit=3)
    assert slow.status == "timed out (stopped)"
    stubborn = check.run("train-speed", [sys.executable, "-c", (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")],
        limit=3)
    assert stubborn.status == "timed out (killed)"
    assert time.monotonic() - started < 15
    failed = check.run("deps", [sys.executable, "-c", "raise SystemExit(3)"])
    assert failed.status == "failed (exit 3)"
    assert [s.name for s in check.stages] == ["layers", "train-speed", "deps"]
    summary = (check.out / "summary.md").read_text()  # published after every stage
    assert "| train-speed | timed out (killed) |" in summary


def test_no_stage_starts_past_the_budget(tmp_path):
    (tmp_path / "out").mkdir()
    check = _check(tmp_path, budget=2.0)
    stage = check.run("layers", [sys.executable, "-c", "print('never')"])
    assert stage.status == "skipped" and "no time left" in stage.result
    assert not (check.logs / "layers.log").exists()  # the command never started
    device_check.shutil.rmtree(check.work, ignore_errors=True)


def _write_run(directory: Path, epochs: int, planned: int, final: dict | None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"config": {"epochs": planned}}))
    records = [{"event": "epoch", "epoch": e, "valid_ppl": 100.0 - e, "tokens_per_s": 5e4}
               for e in range(1, epochs + 1)]
    if final is not None:
        records.append({"event": "final", **final})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "last.safetensors").write_bytes(b"weights")
    return directory


def test_run_results_are_labelled_complete_or_partial(tmp_path):
    base = {"valid_ppl": 90.0, "test_ppl": 87.5, "train_seconds": 240.0}
    done = _write_run(tmp_path / "a", 3, 3, {"complete": True, "epochs_completed": 3, **base})
    assert device_check._run_result(done, 4.0).startswith("complete: 3 of 3 epochs")
    cut = _write_run(tmp_path / "b", 2, 39, {"complete": False, "epochs_completed": 2, **base})
    assert device_check._run_result(cut, 4.0).startswith(
        "partial (training budget 4.00 min): 2 of 39 epochs, valid 90.00, test 87.50")
    killed = _write_run(tmp_path / "c", 2, 39, None)
    assert device_check._run_result(killed, 4.0).startswith(
        "partial: stopped by the stage limit after 2 of 39 epochs, best valid 98.00")


def test_run_directories_are_packed_without_checkpoints(tmp_path):
    run = _write_run(tmp_path / "runs" / "medium", 1, 1, None)
    data = device_check._tar({run: "medium"}, skip="checkpoints")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert "medium/metrics.jsonl" in names and "medium/config.json" in names
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


def test_headlines_read_the_tables_by_their_header(tmp_path):
    table = tmp_path / "layers.md"
    table.write_text(
        "*caption*\n\n| shape | strategy | engine | tokens/s | ms/iter | vs nn.LSTM(dropout) | "
        "vs hand-rolled Zaremba |\n|---|---|---|---:|---:|---:|---:|\n"
        "| small | zaremba | fused | 9 | 1.0 | 1.01x | 0.99x |\n"
        "| small | variational | own loop | 9 | 1.0 | 0.42x | 0.40x |\n"
        "| medium | variational | own loop | 9 | 1.0 | 0.55x | 0.50x |\n")
    assert device_check._headline("layers", table) == (
        "zaremba vs nn.LSTM(dropout): small 1.01x; "
        "variational vs nn.LSTM(dropout): small 0.42x, medium 0.55x")
    assert device_check._headline("layers", tmp_path / "none.md") == "no table (see logs/)"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RNNREG_REHEARSAL") != "1", reason=(
    "the whole CPU rehearsal is far longer than the suite's other tests; "
    "RNNREG_REHEARSAL=1 runs it"))
def test_quick_rehearsal_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RNNREG_DATA", None)
    script = REPO_ROOT / "benchmarks" / "device_check.sh"  # run from elsewhere: it cds itself
    result = subprocess.run(["bash", str(script), str(out), "--quick"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())
    summary = (out / "summary.md").read_text()
    for stage in ("deps", "install", "machine", "cuda-tests", "layers",
                  "launch-bound", "train-speed", "medium", "variational-medium"):
        assert f"| {stage} | ok |" in summary, stage
    assert "| medium | ok |" in summary and "complete: 2 of 2 epochs" in summary
    assert "partial (training budget" in summary  # variational-medium: 500 epochs planned
    suite = ET.parse(out / "cuda-tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 40 and suite.get("failures") == suite.get("errors") == "0"
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert {"medium/metrics.jsonl", "variational-medium/metrics.jsonl"} <= set(names)
    assert not [n for n in names if "checkpoints" in n]
    assert result.stdout.rstrip().endswith(summary.split("\n## ")[0].rstrip().splitlines()[-1])
