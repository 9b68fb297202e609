"""The word (or character) language model: embedding -> rnnreg recurrent stack -> decoder.

Zaremba et al. (2014, section 4.1): dropout on the L+1 non-recurrent connections of an L-layer
LSTM, every weight initialised uniformly in [-r, r]. The output dropout is applied here rather
than inside the layer so the activation penalties of AWD-LSTM (Merity et al. 2018, section 4.6)
can see the last layer's output both before (TAR) and after (AR) it is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from rnnreg.lm.config import Config
from rnnreg.nn.functional import dropout, dropout_mask, embedding_dropout
from rnnreg.nn.layers import GRU, LSTM, RNN, DropoutMasks
from rnnreg.nn.stack import StackedRNN

__all__ = ["LanguageModel", "ModelMasks", "ModelOutput"]

_LAYERS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


@dataclass(frozen=True)
class ModelMasks:
    """Every mask of one forward call; explicit so MC dropout can hold them over a stream."""

    words: Tensor | None      # (V,) whole-word keep mask on the embedding matrix
    rnn: DropoutMasks         # the recurrent stack's masks (input, between, recurrent, weight)
    output: Tensor | None     # (T|1, B, H) on the last layer's output


@dataclass(frozen=True)
class ModelOutput:
    logits: Tensor            # (T, B, V)
    state: object             # the final recurrent state, to carry into the next window;
                              # per-layer tuple with layer_sizes (see rnnreg.nn.stack)
    hidden: Tensor            # (T, B, H) last layer's output before output dropout (TAR)
    dropped: Tensor           # the same after output dropout (AR)


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, config: Config) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size = vocab_size
        settings = config.layer_dropout()
        self.output_dropout = float(settings.pop("output_dropout"))
        self.variational = bool(settings["variational"])
        self.embedding_dropout = config.embedding_dropout
        self.embedding = nn.Embedding(vocab_size, config.embedding_dim)
        sizes = config.sizes
        if len(set(sizes)) > 1:
            # Per-layer sizes (AWD-LSTM's 1150, 1150, 400): one single-layer rnnreg layer each.
            self.rnn = StackedRNN(config.cell, config.embedding_dim, sizes, **settings)
        else:
            # Uniform sizes: one rnnreg layer, torch's parameter names and fused stack.
            self.rnn = _LAYERS[config.cell](config.embedding_dim, sizes[0], len(sizes),
                                            **settings)
        self.decoder = nn.Linear(self.rnn.hidden_size, vocab_size)
        self.init_uniform(config.init_range)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight  # Press & Wolf 2017

    def init_uniform(self, init_range: float) -> None:
        """Every weight, biases included, uniform in [-r, r] (Zaremba et al. 2014, sec. 4.1)."""
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -init_range, init_range)

    @property
    def tied(self) -> bool:
        return self.decoder.weight is self.embedding.weight

    def sample_masks(self, steps: int, batch_size: int) -> ModelMasks:
        """Masks for one call; one per sequence (leading dim 1) when the strategy is variational."""
        weight = self.embedding.weight
        t = 1 if self.variational else steps
        words = None
        if self.embedding_dropout > 0:
            words = dropout_mask((self.vocab_size,), self.embedding_dropout,
                                 device=weight.device, dtype=weight.dtype)
        output = None
        if self.output_dropout > 0:
            output = dropout_mask((t, batch_size, self.rnn.hidden_size), self.output_dropout,
                                  device=weight.device, dtype=weight.dtype)
        return ModelMasks(words, self.rnn.sample_masks(steps, batch_size), output)

    def forward(self, ids: Tensor, state=None, masks: ModelMasks | None = None) -> ModelOutput:
        """``ids (T, B)`` -> logits ``(T, B, V)``; ``masks`` forces explicit masks in any mode."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (T, B), got shape {tuple(ids.shape)}")
        if masks is None:
            return self._forward_sampled(ids, state)
        embedded = F.embedding(ids, self.embedding.weight)
        if masks.words is not None:
            embedded = embedded * masks.words[ids].unsqueeze(-1)
        hidden, state = self.rnn.forward_with_masks(embedded, state, masks.rnn)
        dropped = hidden if masks.output is None else hidden * masks.output
        return ModelOutput(self.decoder(dropped), state, hidden, dropped)

    def _forward_sampled(self, ids: Tensor, state) -> ModelOutput:
        embedded = embedding_dropout(ids, self.embedding.weight, self.embedding_dropout,
                                     self.training)
        hidden, state = self.rnn(embedded, state)
        dropped = hidden
        if self.training and self.output_dropout > 0:
            if self.variational:
                dropped = hidden * dropout_mask((1, *hidden.shape[1:]), self.output_dropout,
                                                device=hidden.device, dtype=hidden.dtype)
            else:
                dropped = dropout(hidden, self.output_dropout)
        return ModelOutput(self.decoder(dropped), state, hidden, dropped)


def detach_state(state):
    """Cut the graph at the window boundary: truncated BPTT carries values, not gradients.

    ``state`` is a tensor, a tuple ``(h, c)``, or a per-layer tuple of those (StackedRNN).
    """
    return map_state(state, lambda s: s.detach())


def map_state(state, fn):
    """Apply ``fn`` to every tensor of a recurrent state, keeping its nesting; None stays None."""
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(map_state(s, fn) for s in state)
    return fn(state)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
