"""rnnreg: correct, fast dropout for recurrent networks.

Zaremba et al. (2014) placements, Gal & Ghahramani (2016) variational masks, AWD-LSTM weight drop.

The public API is what this module re-exports; everything else is an implementation detail.
"""

from rnnreg import functional
from rnnreg.dropout import EmbeddingDropout, LockedDropout, WeightDrop
from rnnreg.layers import GRU, LSTM, RNN, DropoutMasks
from rnnreg.strategies import PLACEMENTS, STRATEGIES, Strategy, strategy

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "PLACEMENTS",
    "RNN",
    "STRATEGIES",
    "DropoutMasks",
    "EmbeddingDropout",
    "LockedDropout",
    "Strategy",
    "WeightDrop",
    "functional",
    "strategy",
]
