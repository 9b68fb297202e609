"""Reading a run back: its config, vocabulary and weights as live objects.

Everything a command needs to re-score, sample from or resume a run comes from its directory
alone (:mod:`rnnreg.lm.rundir.layout`); no pickled Python objects are involved.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.vocab import Vocabulary
from rnnreg.lm.distributed import resolve_device
from rnnreg.lm.model import LanguageModel
from rnnreg.lm.rundir.layout import RunDir, RunDirError

__all__ = ["EXTENDABLE", "load_model", "read_config", "read_corpus", "read_vocab",
           "resumed_config", "weights_description"]

# The fields a resume may raise to extend a run; every other field must equal the saved one.
EXTENDABLE = ("epochs", "max_train_minutes")


def read_config(run: RunDir) -> Config:
    return Config.from_dict(run.read_config()["config"])


def read_corpus(run: RunDir) -> dict | None:
    """The corpus a run was trained on (path, files' sizes and MD5s); None for older runs."""
    return run.read_config().get("corpus")


def resumed_config(saved: Config, wanted: Config) -> Config:
    """The config a resume continues with: ``saved``, with ``epochs``/``max_train_minutes``
    raised to ``wanted``'s.

    Rerunning the command that started a run (with ``--resume``) must be accepted, so equal
    settings are fine; a setting that differs would train a different model under the old
    name, so it is refused, every difference named in one line.
    """
    differences = []
    for field in dataclasses.fields(Config):
        name = field.name
        have, want = getattr(saved, name), getattr(wanted, name)
        if have == want or (name in EXTENDABLE and _raised(name, have, want)):
            continue
        flag = "--" + name.replace("_", "-")
        note = " (it may only be raised)" if name in EXTENDABLE else ""
        differences.append(f"{flag}: run has {_shown(have)}, command says {_shown(want)}{note}")
    if differences:
        raise ValueError("the run was started with other settings: " + "; ".join(differences)
                         + " (a resumed run keeps them; use another --out for a new run)")
    return saved.replace(**{name: getattr(wanted, name) for name in EXTENDABLE})


def _raised(name: str, have: float, want: float) -> bool:
    if name == "max_train_minutes":  # 0 is no limit: the highest of all
        return want == 0 or (have != 0 and want > have)
    return want > have


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


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
    tree = run.load_checkpoint(_available(run, weights))
    model = LanguageModel(len(vocab), config)
    model.load_state_dict(tree["model"])
    model.to(resolve_device(device))
    model.eval()
    return model, vocab, config


def _available(run: RunDir, weights: str) -> str:
    # A run stopped before its first epoch ended has no best weights yet: the last ones are
    # all there is (weights_description says so wherever they are scored).
    return weights if run.has_checkpoint(weights) or weights != "best" else "last"


def weights_description(run_dir: str | Path, weights: str = "best") -> str:
    """Which weights ``load_model(run_dir, weights=...)`` scores, in words: name and epoch."""
    run = RunDir(run_dir)
    name = _available(run, weights)
    if name == "best":
        epochs = [r for r in run.read_metrics()
                  if r.get("event") == "epoch" and r.get("valid_ppl") is not None]
        best = min(epochs, key=lambda r: r["valid_ppl"]) if epochs else None
        return "best weights" + (f" (epoch {best['epoch']})" if best else "")
    missing = " (no best weights yet: no epoch finished)" if name != weights else ""
    return f"last weights ({where(run.load_checkpoint('last')['progress'])}){missing}"


def where(progress: dict) -> str:
    """Where a checkpoint's progress stands: "after epoch 3", or "in epoch 4, row 120"."""
    if progress["position"] == 0:
        return f"after epoch {progress['epoch'] - 1}"
    return f"in epoch {progress['epoch']}, row {progress['position']}"
