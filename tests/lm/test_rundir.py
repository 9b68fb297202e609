"""Tests for run directories: lossless no-pickle checkpoints, atomic writes, metrics, locking."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.rundir.checkpoint import load_tree, save_tree
from rnnreg.lm.rundir.files import RunDirError, WriteError, atomic_write_text
from rnnreg.lm.rundir.layout import RunDir, RunLockedError
from rnnreg.lm.rundir.provenance import describe_machine, git_commit

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tied_model() -> torch.nn.Module:
    """A tiny LM whose decoder shares its weight with the embedding, as in weight tying."""
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(5, 3),
            "rnn": torch.nn.LSTM(3, 3),
            "decoder": torch.nn.Linear(3, 5),
        }
    )
    model["decoder"].weight = model["embed"].weight
    return model


def _trained_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum after one step, so its state dict has int keys and momentum buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out, _ = model["rnn"](model["embed"](torch.tensor([[1], [2]])))
    model["decoder"](out).sum().backward()
    opt.step()
    return opt


def _assert_same(loaded: object, saved: object) -> None:
    """Exact equality including container and scalar types, which `==` alone glosses over.

    Dict subclasses (a state dict is an OrderedDict) are expected back as plain dicts.
    """
    a, b = loaded, saved
    assert type(a) is (dict if isinstance(b, dict) else type(b)), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b]
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_tree_round_trip_is_exact(tmp_path: Path) -> None:
    model = _tied_model()
    opt = _trained_optimizer(model)
    tree = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.default_rng(1).bit_generator.state,
        "shapes": ([1, 2], (3, 4)),
        "numbers": [1, 1.0, -0.0, float("inf"), True, 2**70],
        "nothing": None,
        "empties": {"d": {}, "l": [], "t": (), "nested": [{}, [()]]},
        "odd/key~": torch.tensor(7, dtype=torch.int64),
        "dtypes": [torch.ones(2, dtype=dt) for dt in (torch.bool, torch.float64, torch.bfloat16)],
    }
    path = tmp_path / "tree.safetensors"
    save_tree(path, tree)
    loaded = load_tree(path)
    _assert_same(loaded, tree)
    _tied_model().load_state_dict(loaded["model"])


def test_optimizer_state_restores_into_fresh_optimizer(tmp_path: Path) -> None:
    model = _tied_model()
    opt = _trained_optimizer(model)
    save_tree(tmp_path / "ckpt.safetensors", {"optimizer": opt.state_dict()})

    fresh = torch.optim.SGD(model.parameters(), lr=0.5)
    fresh.load_state_dict(load_tree(tmp_path / "ckpt.safetensors")["optimizer"])
    _assert_same(fresh.state_dict(), opt.state_dict())


def test_tied_tensors_become_named_entries_without_pickle(tmp_path: Path) -> None:
    model = _tied_model()
    opt = _trained_optimizer(model)
    path = tmp_path / "ckpt.safetensors"
    save_tree(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})

    # Plain safetensors can read it: the file is a header plus raw tensor bytes, no pickle.
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "rnnreg-tree/1"
    assert {"model/rnn.weight_ih_l0", "model/embed.weight", "model/decoder.weight"} <= keys
    assert "optimizer/state/0/momentum_buffer" in keys
    assert not path.read_bytes().startswith((b"PK", b"\x80"))  # neither torch.save zip nor pickle


def test_dict_key_collision_and_unsupported_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two tensors"):
        save_tree(tmp_path / "a.safetensors", {1: torch.zeros(1), "1": torch.zeros(1)})
    with pytest.raises(TypeError, match="ndarray"):
        save_tree(tmp_path / "b.safetensors", {"x": np.zeros(2)})
    with pytest.raises(TypeError, match="key"):
        save_tree(tmp_path / "c.safetensors", {(1, 2): 3})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_raises_rundirerror(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_tree(path, {"w": torch.randn(64)})
    data = path.read_bytes()
    damaged = {"truncate": data[:-16], "garbage": os.urandom(200), "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(RunDirError, match=r"ckpt\.safetensors.*(earlier checkpoint|rerun)"):
        load_tree(path)


def test_foreign_safetensors_file_is_not_an_rnnreg_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(RunDirError, match="not an rnnreg checkpoint"):
        load_tree(path)


def test_crash_during_save_keeps_old_checkpoint_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    run.save_checkpoint("last", {"step": 1, "w": torch.ones(3)})

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(WriteError, match="last.safetensors: simulated crash"):
        run.save_checkpoint("last", {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()

    old = run.load_checkpoint("last")
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in run.checkpoint_dir.iterdir()] == ["last.safetensors"]


def test_atomic_write_text_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old contents that are longer\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_run_dir_layout_config_and_checkpoints(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert not run.path.exists()  # constructing touches nothing
    assert not run.exists()
    with pytest.raises(RunDirError, match="not a run directory"):
        run.read_config()

    run.create(exist_ok=False)
    assert run.checkpoint_dir.is_dir() and run.tensorboard_dir.is_dir()
    assert not run.plots_dir.exists()  # made by whatever draws into it, never empty
    run.write_config(Config(lr=20.0), corpus={"data_dir": "c"}, processes=1)
    assert run.exists()
    assert run.read_config() == Config(lr=20.0)
    assert run.read_corpus() == {"data_dir": "c"}
    assert run.config_path.read_text().startswith('{\n  "config": {\n    "activation_reg"')
    run.replace_config(Config(lr=20.0, epochs=20))  # a resume's raised budget keeps the record
    assert run.read_config() == Config(lr=20.0, epochs=20)
    assert run.read_record() == {"corpus": {"data_dir": "c"}, "processes": 1}
    assert run.read_corpus() == {"data_dir": "c"}
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir(run.path).create(exist_ok=False)
    RunDir(run.path).create(exist_ok=True)

    assert run.checkpoint_path("best") == run.path / "checkpoints" / "best.safetensors"
    assert not run.has_checkpoint("best")
    with pytest.raises(RunDirError, match="no checkpoint 'best'"):
        run.load_checkpoint("best")
    run.save_checkpoint("best", {"epoch": 3})
    assert run.has_checkpoint("best")
    assert run.load_checkpoint("best") == {"epoch": 3}
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        run.checkpoint_path("../escape")


def test_run_dir_vocabulary_round_trips(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    with pytest.raises(RunDirError, match="no vocab.json"):
        run.read_vocab()
    vocab = Vocabulary(("<eos>", "the", "cat"))
    run.write_vocab(vocab)
    assert run.vocab_path == run.path / "vocab.json"
    assert json.loads(run.vocab_path.read_text()) == ["<eos>", "the", "cat"]
    assert run.read_vocab().words == vocab.words


def test_remove_unstarted_removes_only_a_run_that_never_trained(tmp_path: Path) -> None:
    unstarted = RunDir(tmp_path / "unstarted").create(exist_ok=False)
    unstarted.write_config(Config())
    unstarted.write_vocab(Vocabulary(["<unk>", "<eos>", "a"]))
    with unstarted.lock():
        assert unstarted.remove_unstarted()
    assert list(unstarted.path.iterdir()) == []  # the directory itself is the caller's

    trained = RunDir(tmp_path / "trained").create(exist_ok=False)
    trained.write_config(Config())
    trained.append_metrics({"step": 1, "loss": 1.0})
    with trained.lock():
        assert not trained.remove_unstarted()
    assert sorted(p.name for p in trained.path.iterdir()) == [
        ".lock", "checkpoints", "config.json", "metrics.jsonl", "tensorboard"]

    foreign = RunDir(tmp_path / "foreign").create(exist_ok=False)
    (foreign.path / "notes.txt").write_text("mine")
    assert not foreign.remove_unstarted()
    assert (foreign.path / "notes.txt").exists()


def test_metrics_tolerate_torn_last_line_only(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create(exist_ok=True)
    assert run.read_metrics() == []
    for step in range(3):
        run.append_metrics({"step": step, "loss": 1.0 / (step + 1)})
    with open(run.metrics_path, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a crash mid-append
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]

    # The next append must not glue onto the torn fragment.
    run.append_metrics({"step": 4, "loss": float("nan")})
    records = run.read_metrics()
    assert [r["step"] for r in records] == [0, 1, 2, 4]

    run.metrics_path.write_bytes(b'{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunDirError, match="line 2"):
        run.read_metrics()


def test_append_completes_a_record_that_lost_only_its_newline(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create(exist_ok=True)
    run.metrics_path.write_bytes(b'{"step": 0}\n{"step": 1}')
    run.append_metrics({"step": 2})
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]


def test_truncate_metrics_keeps_matching_records(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create(exist_ok=True)
    for step in range(5):
        run.append_metrics({"step": step})
    with open(run.metrics_path, "ab") as f:
        f.write(b'{"st')
    assert run.truncate_metrics(lambda r: r["step"] <= 2) == 2
    assert run.read_metrics() == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert run.metrics_path.read_bytes().endswith(b"}\n")


def test_second_lock_is_refused_until_released(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with run.lock():
        info = json.loads((run.path / ".lock.holder").read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on .*another out$"):
            with RunDir(tmp_path / "run").lock():
                pass
    with RunDir(tmp_path / "run").lock():
        pass


_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from rnnreg.lm.rundir.layout import RunDir
with RunDir(sys.argv[2]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_lock_of_killed_process_is_recovered(tmp_path: Path) -> None:
    run_path = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(REPO_ROOT), str(run_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {child.pid} "):
            with RunDir(run_path).lock():
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert (run_path / ".lock").exists()  # the killed holder leaves its file behind...
    with RunDir(run_path).lock():  # ...but the OS released its lock
        pass


def test_git_commit_is_none_outside_a_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stop git from finding a repository in a directory above tmp_path.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_commit(tmp_path) is None


def test_describe_machine_is_json_ready() -> None:
    info = describe_machine()
    assert info["torch"] == torch.__version__
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1
    json.dumps(info)
