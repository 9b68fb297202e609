"""The training objective: the paper's summed cross-entropy plus AWD-LSTM's activation penalties."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rnnreg.lm.config import Config
from rnnreg.lm.model import ModelOutput

__all__ = ["activation_penalties", "summed_loss"]


def summed_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy summed over the unrolled steps and averaged over the batch (sec. 4.1).

    Zaremba et al. minimise the average negative log probability per word *summed over the
    num_steps unrolled steps*; with plain SGD at lr=1 this scaling is part of the recipe.
    ``scores`` are logits ``(T, B, V)`` (the full softmax), or the targets' log-probabilities
    ``(T, B)`` that the adaptive softmax computes without the rest of the distribution
    (:attr:`rnnreg.lm.model.ModelOutput.scores` gives whichever the model has).
    """
    if scores.shape == targets.shape:
        return -scores.sum() / targets.size(1)
    total = F.cross_entropy(scores.reshape(-1, scores.size(-1)), targets.reshape(-1),
                            reduction="sum")
    return total / targets.size(1)


def activation_penalties(out: ModelOutput, config: Config, steps: int) -> Tensor | float:
    """AR and TAR (Merity et al. 2018, eqs. 3-4), scaled like the summed loss per step.

    AR penalises the dropped output of the last layer, TAR the change of its undropped output
    between steps; both are means, multiplied by the window length so they keep their weight
    against a loss that is a sum over steps.
    """
    penalty = 0.0
    if config.activation_reg:
        penalty = penalty + config.activation_reg * out.dropped.pow(2).mean() * steps
    if config.temporal_activation_reg and out.hidden.size(0) > 1:
        diff = out.hidden[1:] - out.hidden[:-1]
        penalty = penalty + config.temporal_activation_reg * diff.pow(2).mean() * steps
    return penalty
