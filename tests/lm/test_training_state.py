"""Tests for the training state a checkpoint holds, and for the one reader of metrics records."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnreg.errors import RnnregError
from rnnreg.lm.config import Config
from rnnreg.lm.distributed import World
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import of_events, read_records
from rnnreg.lm.training.asgd import NTASGD
from rnnreg.lm.training.state import Progress, TrainingState


def _trained_lstm(seed: int) -> tuple[torch.nn.LSTM, NTASGD]:
    """An LSTM after one ASGD step, so the optimizer holds per-parameter state."""
    torch.manual_seed(seed)
    model = torch.nn.LSTM(3, 4)
    optim = NTASGD(model, Config(optimizer="asgd"), averaging=True)
    model(torch.randn(5, 2, 3))[0].sum().backward()
    optim.optimizer.step()
    return model, optim


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand()


def test_a_whole_state_restores_weights_optimizer_hidden_and_generators(tmp_path: Path):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    model, optim = _trained_lstm(0)
    progress = Progress(epoch=2, position=15, step=40, valid_history=[9.5, 8.25],
                        averaging=True)
    hidden = (torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    TrainingState.capture(model, optim, progress, hidden, World()).save(run, "last")
    expected = _draws()  # what the generators give next, from the saved states on

    fresh, fresh_optim = _trained_lstm(1)
    state = TrainingState.load(run, "last")
    assert state.resumable and state.progress == progress
    restored = state.restore_into(fresh, fresh_optim, World(), torch.device("cpu"))
    assert _draws() == expected
    assert all(torch.equal(a, b) for a, b in zip(restored, hidden))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    saved = optim.optimizer.state_dict()["state"]
    loaded = fresh_optim.optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["ax"], loaded[i]["ax"]) for i in saved)


def test_the_file_holds_the_entries_in_their_order(tmp_path: Path):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    model, optim = _trained_lstm(0)
    TrainingState.capture(model, optim, Progress(), None, World()).save(run, "last")
    tree = load_tree(run.checkpoint_path("last"))
    assert list(tree) == ["model", "optimizer", "progress", "hidden", "rng", "ema"]
    assert list(tree["progress"]) == [f for f in Progress.__dataclass_fields__]
    assert tree["hidden"] is None and tree["ema"] is None and len(tree["rng"]) == 1


def test_a_weights_only_state_is_not_resumable(tmp_path: Path):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    model, optim = _trained_lstm(0)
    TrainingState(model=model.state_dict()).save(run, "best")
    assert list(load_tree(run.checkpoint_path("best"))) == ["model"]
    best = TrainingState.load(run, "best")
    assert not best.resumable and best.ema_weights is None and best.ema_updates == 0
    with pytest.raises(RnnregError, match="weights-only"):
        best.restore_into(model, optim, World(), torch.device("cpu"))


def test_a_state_that_lacks_an_entry_is_refused_by_name(tmp_path: Path):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    run.save_checkpoint("last", {"model": {}, "progress": {"epoch": 1}})
    with pytest.raises(RunDirError, match="lacks an entry.*'optimizer'"):
        TrainingState.load(run, "last")
    run.save_checkpoint("last", {"model": {}, "optimizer": {}, "progress": {"epochs": 1},
                                 "hidden": None, "rng": [], "ema": None})
    with pytest.raises(RunDirError, match="wrong form"):
        TrainingState.load(run, "last")


def test_read_records_filters_by_event_and_skips_a_torn_last_line(tmp_path: Path):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    records = [{"event": "step", "step": 1}, {"event": "epoch", "epoch": 1},
               {"event": "settings", "step": 1}, {"event": "final", "valid_ppl": 3.0}]
    for record in records:
        run.append_metrics(record)
    with open(run.metrics_path, "ab") as f:
        f.write(b'{"event": "step", "st')  # a kill mid-append
    assert read_records(run) == records
    assert read_records(run.path, "final") == [records[3]]
    assert read_records(str(run.path), "epoch", "step") == records[:2]
    assert of_events(records, "settings") == [records[2]]
    assert read_records(tmp_path / "empty") == []
