"""rnnreg: correct, fast dropout for recurrent networks.

Three parts, dependencies pointing one way (study -> lm -> nn):

- :mod:`rnnreg.nn`: dropout primitives, the regularized layers, the own recurrence and its loops.
- :mod:`rnnreg.lm`: the language-modeling toolkit (data, model, training, run directories,
  evaluation) built on the layers.
- :mod:`rnnreg.study`: grids of ordinary runs, their backends, report and figures.

``import rnnreg`` loads only the layers; the toolkit's names below resolve on first use, so a
user who wants an LSTM does not pay for the trainer, tqdm, safetensors or torch.distributed.
"""

from __future__ import annotations

import importlib

from rnnreg.errors import RnnregError
from rnnreg.nn import functional
from rnnreg.nn.dropout import EmbeddingDropout, LockedDropout, WeightDrop
from rnnreg.nn.layers import GRU, LSTM, RNN
from rnnreg.nn.masks import DropoutMasks
from rnnreg.nn.regularization import Regularization
from rnnreg.nn.stack import StackedRNN
from rnnreg.nn.strategies import PLACEMENTS, STRATEGIES, Strategy, strategy

__version__ = "0.1.0"

# Public name -> the module that defines it; loaded by __getattr__ on first access.
_LAZY = {
    "Config": "rnnreg.lm.config",
    "Corpus": "rnnreg.lm.corpus.batches",
    "DataError": "rnnreg.lm.corpus.sources",
    "Vocabulary": "rnnreg.lm.corpus.vocab",
    "LanguageModel": "rnnreg.lm.model",
    "PRESETS": "rnnreg.lm.presets",
    "preset_config": "rnnreg.lm.presets",
    "budget_config": "rnnreg.lm.presets",
    "AdaptiveSoftmax": "rnnreg.lm.adaptive",
    "Score": "rnnreg.lm.evaluation",
    "score_stream": "rnnreg.lm.evaluation",
    "TrainingDiverged": "rnnreg.lm.training.loop",
    "RunDirError": "rnnreg.lm.rundir.files",
    "WriteError": "rnnreg.lm.rundir.files",
    "load_model": "rnnreg.lm.evaluation",
    "DynamicSettings": "rnnreg.lm.dynamic",
    "gradient_statistics": "rnnreg.lm.dynamic",
    "score_dynamic": "rnnreg.lm.dynamic",
    "tune_dynamic": "rnnreg.lm.dynamic",
    "train": "rnnreg.lm.training.loop",
    "StudyGrid": "rnnreg.study.grid",
    "run_study": "rnnreg.study.grid",
}

__all__ = [
    "GRU",
    "LSTM",
    "PLACEMENTS",
    "RNN",
    "STRATEGIES",
    "RnnregError",
    "DropoutMasks",
    "EmbeddingDropout",
    "LockedDropout",
    "Regularization",
    "StackedRNN",
    "Strategy",
    "WeightDrop",
    "functional",
    "strategy",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once; later lookups bypass __getattr__
        return value
    raise AttributeError(f"module 'rnnreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
