"""rnnreg: correct, fast dropout for recurrent networks.

Zaremba et al. (2014) placements, Gal & Ghahramani (2016) variational masks, AWD-LSTM weight drop,
as drop-in ``torch.nn`` layers, plus a language-modeling toolkit built on them. The public API is
what this module re-exports; everything else is an implementation detail.
"""

from rnnreg import functional
from rnnreg.config import Config
from rnnreg.data import Corpus, DataError, Vocabulary
from rnnreg.dropout import EmbeddingDropout, LockedDropout, WeightDrop
from rnnreg.evaluate import Score, score_stream
from rnnreg.layers import GRU, LSTM, RNN, DropoutMasks
from rnnreg.model import LanguageModel
from rnnreg.presets import PRESETS, preset_config
from rnnreg.stack import StackedRNN
from rnnreg.strategies import PLACEMENTS, STRATEGIES, Strategy, strategy

# ``train`` stays in ``rnnreg.train``: re-exporting the function here would shadow the module.
from rnnreg.train import TrainingDiverged, load_model

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "PLACEMENTS",
    "PRESETS",
    "RNN",
    "STRATEGIES",
    "Config",
    "Corpus",
    "DataError",
    "DropoutMasks",
    "EmbeddingDropout",
    "LanguageModel",
    "LockedDropout",
    "Score",
    "StackedRNN",
    "Strategy",
    "TrainingDiverged",
    "Vocabulary",
    "WeightDrop",
    "functional",
    "load_model",
    "preset_config",
    "score_stream",
    "strategy",
]
