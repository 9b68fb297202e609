"""Committed records name no folder of the machine that made them (tools/redact_paths.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("redact_paths",
                                               REPO_ROOT / "tools" / "redact_paths.py")
redact_paths = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(redact_paths)


def test_no_committed_record_names_a_machine_path():
    found = redact_paths.offending(REPO_ROOT / "results")
    assert not found, "run `python tools/redact_paths.py results`:\n" + "\n".join(
        f"{path.relative_to(REPO_ROOT)}:{number}: {line[:120]}" for path, number, line in found)


@pytest.mark.parametrize("before, after", [
    ('"data_dir": "/work/shared/data/ptb"', '"data_dir": "../shared/data/ptb"'),
    ("cd /work/main && git log", "cd . && git log"),
    ("PYTHONPATH=/work/wt-study python", "PYTHONPATH=. python"),
    ("run directory /work/main/runs/small", "run directory runs/small"),
    ("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/torch/nn/rnn.py:12",
     "<site-packages>/torch/nn/rnn.py:12"),
    ("--out /tmp/study/runs", "--out $TMPDIR/study/runs"),
    ("/home/ana/corpora/text.txt", "~/corpora/text.txt"),
    ("/work/runs/budget/log", "runs/budget/log"),
    ("(Triggered internally at /__w/pytorch/pytorch/aten/RNN.cpp)",
     "(Triggered internally at /__w/pytorch/pytorch/aten/RNN.cpp)"),
])
def test_each_rule_rewrites_its_folder(before, after):
    assert redact_paths.redact(before) == after
    assert not redact_paths.MACHINE_PATH.search(after)


def test_check_finds_what_redaction_removes(tmp_path):
    record = tmp_path / "run" / "config.json"
    record.parent.mkdir()
    record.write_text('{"corpus": {"data_dir": "/work/shared/data/ptb"}}\n')
    (tmp_path / "figure.png").write_bytes(b"/work/ in a binary file is not read")
    assert redact_paths.main([str(tmp_path), "--check"]) == 1
    assert redact_paths.main([str(tmp_path)]) == 0
    assert redact_paths.main([str(tmp_path), "--check"]) == 0
    assert record.read_text() == '{"corpus": {"data_dir": "../shared/data/ptb"}}\n'
