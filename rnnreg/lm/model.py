"""The word (or character) language model: embedding -> rnnreg recurrent stack -> softmax.

Zaremba et al. (2014, section 4.1): dropout on the L+1 non-recurrent connections of an L-layer
LSTM, every weight initialised uniformly in [-r, r]. The softmax is the paper's full V-way one
(``decoder``, an ``nn.Linear``) or the adaptive softmax of Grave et al. (2017,
:mod:`rnnreg.lm.adaptive`); both give exact, normalized probabilities.

The recurrent stack applies every placement of the config's regularization, output dropout
included, and gives the last layer's output both before (TAR) and after (AR) that dropout, as
the activation penalties of AWD-LSTM need them (Merity et al. 2018, section 4.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from rnnreg.errors import RnnregError
from rnnreg.lm.adaptive import AdaptiveSoftmax
from rnnreg.lm.config import Config
from rnnreg.nn.functional import dropout_mask, embedding_dropout
from rnnreg.nn.layers import LAYERS
from rnnreg.nn.masks import DropoutMasks
from rnnreg.nn.regularization import Schedule
from rnnreg.nn.stack import StackedRNN

__all__ = ["LanguageModel", "ModelMasks", "ModelOutput", "count_parameters", "detach_state",
           "map_state"]


@dataclass(frozen=True)
class ModelMasks:
    """Every mask of one forward call; explicit so MC dropout can hold them over a stream."""

    words: Tensor | None      # (V,) whole-word keep mask on the embedding matrix
    rnn: DropoutMasks         # the recurrent stack's masks, its output's included


@dataclass(frozen=True)
class ModelOutput:
    # (T, B, V) scores whose softmax is the prediction: the full softmax's logits, the adaptive
    # softmax's exact log-probabilities; None when the adaptive softmax was given targets.
    logits: Tensor | None
    state: object             # the final recurrent state, to carry into the next window;
                              # per-layer tuple with layer_sizes (see rnnreg.nn.stack)
    hidden: Tensor            # (T, B, H) last layer's output before output dropout (TAR)
    dropped: Tensor           # the same after output dropout (AR)
    # (T, B) log p(target): what the adaptive softmax gives for targets, without the other words
    target_log_probs: Tensor | None = None

    @property
    def scores(self) -> Tensor:
        """What the loss reads: the logits, or the targets' log-probabilities (adaptive)."""
        return self.logits if self.target_log_probs is None else self.target_log_probs


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, config: Config) -> None:
        super().__init__()
        if vocab_size < 2:
            raise RnnregError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size = vocab_size
        regularization = config.regularization
        self.embedding_dropout = config.embedding_dropout
        self.embedding = nn.Embedding(vocab_size, config.embedding_dim)
        sizes = config.sizes
        if len(set(sizes)) > 1:
            # Per-layer sizes (AWD-LSTM's 1150, 1150, 400): one single-layer rnnreg layer each.
            self.rnn = StackedRNN(config.cell, config.embedding_dim, sizes,
                                  regularization=regularization)
        else:
            # Uniform sizes: one rnnreg layer, torch's parameter names and fused stack.
            self.rnn = LAYERS[config.cell](config.embedding_dim, sizes[0], len(sizes),
                                           regularization=regularization)
        if config.softmax == "adaptive":
            self.decoder = AdaptiveSoftmax(self.rnn.hidden_size, vocab_size,
                                           config.adaptive_cutoffs, config.adaptive_div_value)
        else:
            self.decoder = nn.Linear(self.rnn.hidden_size, vocab_size)
        self.init_uniform(config.init_range)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight  # Press & Wolf 2017

    def init_uniform(self, init_range: float) -> None:
        """Every weight, biases included, uniform in [-r, r] (Zaremba et al. 2014, sec. 4.1)."""
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -init_range, init_range)

    @property
    def adaptive(self) -> bool:
        return isinstance(self.decoder, AdaptiveSoftmax)

    @property
    def tied(self) -> bool:
        return getattr(self.decoder, "weight", None) is self.embedding.weight

    def sample_masks(self, steps: int, batch_size: int) -> ModelMasks:
        """Masks for one call; one per sequence (leading dim 1) when the strategy is variational."""
        words = None
        if self.embedding_dropout > 0:
            weight = self.embedding.weight
            words = dropout_mask((self.vocab_size,), self.embedding_dropout,
                                 device=weight.device, dtype=weight.dtype)
        return ModelMasks(words, self.rnn.sample_masks(steps, batch_size))

    def schedule(self, field: str) -> Schedule:
        """How often the mask in ``field`` of :class:`ModelMasks` or of its stack's
        :class:`~rnnreg.nn.masks.DropoutMasks` is drawn: the whole-word mask once per call
        (Gal & Ghahramani 2016, section 5), the stack's as its record says."""
        return Schedule.WINDOW if field == "words" else self.rnn.regularization.schedule(field)

    def forward(self, ids: Tensor, state=None, masks: ModelMasks | None = None,
                targets: Tensor | None = None) -> ModelOutput:
        """``ids (T, B)`` -> :class:`ModelOutput`; ``masks`` forces explicit masks in any mode.

        ``targets (T, B)`` let the adaptive softmax score only them (``target_log_probs``);
        the full softmax gives its logits either way (the loss is cross-entropy on them).
        """
        if ids.dim() != 2:
            raise RnnregError(f"ids must be (T, B), got shape {tuple(ids.shape)}")
        if masks is None:
            embedded = embedding_dropout(ids, self.embedding.weight, self.embedding_dropout,
                                         self.training)
            dropped, hidden, state = self.rnn.forward_with_hidden(embedded, state)
        else:
            embedded = F.embedding(ids, self.embedding.weight)
            if masks.words is not None:
                embedded = embedded * masks.words[ids].unsqueeze(-1)
            dropped, hidden, state = self.rnn.forward_with_hidden(embedded, state, masks.rnn)
        if not self.adaptive:
            return ModelOutput(self.decoder(dropped), state, hidden, dropped)
        if targets is None:
            return ModelOutput(self.decoder.log_probs(dropped), state, hidden, dropped)
        return ModelOutput(None, state, hidden, dropped,
                           self.decoder.target_log_probs(dropped, targets))


def detach_state(state):
    """Cut the graph at the window boundary: truncated BPTT carries values, not gradients.

    ``state`` is a tensor, a tuple ``(h, c)``, or a per-layer tuple of those (StackedRNN).
    """
    return map_state(state, lambda s: s.detach())


def map_state(state, fn):
    """Apply ``fn`` to every tensor of a recurrent state, keeping its nesting; None stays None."""
    return tree_map_only(torch.Tensor, fn, state)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
