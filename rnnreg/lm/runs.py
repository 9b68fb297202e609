"""Reading a run back: its config, vocabulary and weights as live objects.

Everything a command needs to re-score, sample from or resume a run comes from its directory
alone (:mod:`rnnreg.lm.rundir`); no pickled Python objects are involved.
"""

from __future__ import annotations

import json
from pathlib import Path

from rnnreg.lm.config import Config
from rnnreg.lm.data import Vocabulary
from rnnreg.lm.distributed import resolve_device
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir import RunDir, RunDirError

__all__ = ["load_model", "read_config", "read_vocab"]


def read_config(run: RunDir) -> Config:
    return Config.from_dict(run.read_config()["config"])


def read_vocab(run: RunDir) -> Vocabulary:
    path = run.path / "vocab.json"
    if not path.exists():
        raise RunDirError(f"{run.path} has no vocab.json; was the run started?")
    return Vocabulary.from_json(json.loads(path.read_text(encoding="utf-8")))


def load_model(run_dir: str | Path, *, weights: str = "best",
               device: str = "auto") -> tuple[LanguageModel, Vocabulary, Config]:
    """Rebuild a trained model from its run directory: config + vocabulary + safetensors weights."""
    run = RunDir(run_dir)
    config = read_config(run)
    vocab = read_vocab(run)
    name = weights if run.has_checkpoint(weights) else "last"
    tree = run.load_checkpoint(name)
    model = LanguageModel(len(vocab), config)
    model.load_state_dict(tree["model"])
    model.to(resolve_device(device))
    model.eval()
    return model, vocab, config
