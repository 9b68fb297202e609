"""rnnreg.nn: dropout for recurrent networks as ordinary ``torch.nn`` modules.

The regularized layers (:class:`LSTM`, :class:`GRU`, :class:`RNN`, :class:`StackedRNN`), the
dropout primitives (:mod:`rnnreg.nn.functional`, :class:`LockedDropout`,
:class:`EmbeddingDropout`, :class:`WeightDrop`), the named strategies, and the own recurrence
that runs masks acting inside the time loop. Nothing here knows about language models.
"""

from rnnreg.nn import functional
from rnnreg.nn.dropout import EmbeddingDropout, LockedDropout, WeightDrop
from rnnreg.nn.layers import GRU, LSTM, RNN, DropoutMasks
from rnnreg.nn.stack import StackedRNN
from rnnreg.nn.strategies import PLACEMENTS, STRATEGIES, Strategy, strategy

__all__ = ["GRU", "LSTM", "PLACEMENTS", "RNN", "STRATEGIES", "DropoutMasks", "EmbeddingDropout",
           "LockedDropout", "StackedRNN", "Strategy", "WeightDrop", "functional", "strategy"]
