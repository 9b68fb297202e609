"""rnnreg.nn: dropout for recurrent networks as ordinary ``torch.nn`` modules.

The regularized layers (:class:`LSTM`, :class:`GRU`, :class:`RNN`, :class:`StackedRNN`), the
record of their regularization (:class:`Regularization`), the dropout primitives
(:mod:`rnnreg.nn.functional`, :class:`LockedDropout`, :class:`EmbeddingDropout`,
:class:`WeightDrop`, :class:`DropoutMasks`), the named strategies, and
the own recurrence that runs masks acting inside the time loop. :func:`engine_for` names the
engine a layer's recurrence runs on: :data:`FUSED` (torch's kernel) or one of the own loop's
:data:`CPP_LOOP`, :data:`TRITON_GRAPHS`, :data:`TRITON_LOOP`, :data:`PYTHON_LOOP`. Nothing here
knows about language models.
"""

import torch

from rnnreg.nn import functional
from rnnreg.nn.dropout import EmbeddingDropout, LockedDropout, WeightDrop
from rnnreg.nn.engines import FUSED, engine_for
from rnnreg.nn.layers import GRU, LSTM, RNN
from rnnreg.nn.loops import CPP_LOOP, PYTHON_LOOP, TRITON_GRAPHS, TRITON_LOOP
from rnnreg.nn.masks import DropoutMasks
from rnnreg.nn.regularization import Regularization, Schedule
from rnnreg.nn.stack import StackedRNN
from rnnreg.nn.strategies import PLACEMENTS, STRATEGIES, Strategy, strategy

# A whole model saved with torch.save loads with torch.load's default weights_only=True only if
# the unpickler knows every class in it. These modules hold only numbers, bools, strings,
# tuples and tensors, so allowing them is as safe as allowing torch.nn.LSTM: any script that can
# load a model holding nn.LSTM can load the same model holding rnnreg.LSTM. torch's own classes
# stay the caller's choice, as for any model: StackedRNN holds an nn.ModuleList, WeightDrop the
# module it wraps.
torch.serialization.add_safe_globals([GRU, LSTM, RNN, StackedRNN, LockedDropout, EmbeddingDropout,
                                      WeightDrop, Regularization])

__all__ = ["CPP_LOOP", "FUSED", "GRU", "LSTM", "PLACEMENTS", "PYTHON_LOOP", "RNN", "STRATEGIES",
           "TRITON_GRAPHS", "TRITON_LOOP", "DropoutMasks", "EmbeddingDropout", "LockedDropout",
           "Regularization", "Schedule", "StackedRNN", "Strategy", "WeightDrop", "engine_for",
           "functional", "strategy"]
