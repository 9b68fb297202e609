"""Weight averaging over the tail of a run: an exponential moving average (EMA) of the iterates.

Polyak & Juditsky (1992) average the iterates of SGD; NT-ASGD (:mod:`rnnreg.lm.training.asgd`)
is that uniform average, triggered by a validation stall. The EMA here is its exponential form,
for runs with a fixed length or a time budget: from the step at which the fraction
``Config.ema_start`` of the run is done (by epochs or by the time budget, whichever binds, as
the cosine schedule counts it), the average starts as a copy of the weights and then follows

    average <- decay * average + (1 - decay) * weights          after every optimizer step,

so it weights the last ``1 / (1 - decay)`` steps or so. Chosen over SWA's uniform average
(Izmailov et al. 2018) because under a time budget the number of steps left is not known in
advance: an EMA's window is set by ``decay`` alone, while a uniform average from a start point
would weigh the early, higher-learning-rate part of the tail as much as the end. Whether it
improves on the annealed iterates of the budget recipes is a question for measured sweeps.

Once started, the average is what the run evaluates and keeps: the epochs' validation scores,
the ``best`` checkpoint and the final valid and test scores use it; ``last`` holds the iterates
(to train on) and the average beside them (``ema``), both restored exactly on resume.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnreg.errors import RnnregError

__all__ = ["WeightEMA", "averaged_state"]


class WeightEMA:
    """The moving average of ``model``'s parameters, by name (tied weights once); ``weights``
    is None until it starts."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.params = dict(model.named_parameters())
        self.decay = decay
        self.weights: dict[str, Tensor] | None = None
        self.updates = 0  # optimizer steps averaged, the starting copy included

    @property
    def started(self) -> bool:
        return self.weights is not None

    @torch.no_grad()
    def update(self) -> None:
        """Take in the weights after a step: the first call copies them, later ones average."""
        if self.weights is None:
            self.weights = {name: p.detach().clone() for name, p in self.params.items()}
        else:
            for name, p in self.params.items():
                self.weights[name].lerp_(p.detach(), 1 - self.decay)
        self.updates += 1

    def state(self) -> dict | None:
        """What a checkpoint keeps: the average and its count, or None before it started."""
        if self.weights is None:
            return None
        return {"weights": self.weights, "updates": self.updates}

    def restore(self, state: dict | None, device: torch.device) -> None:
        if state is None:
            self.weights, self.updates = None, 0
            return
        missing = sorted(set(self.params) - set(state["weights"]))
        if missing:
            raise RnnregError(f"the checkpoint's weight average lacks {missing}")
        self.weights = {name: state["weights"][name].to(device) for name in self.params}
        self.updates = int(state["updates"])


def averaged_state(model: nn.Module, averages: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model``'s state dict with each averaged parameter (named as ``named_parameters``
    names it) in place of the weights, under every name it has: a tied embedding and decoder
    are one parameter with two state-dict entries, and both must hold the average, or loading
    the dict would leave whichever comes last."""
    state = model.state_dict()
    by_id = {id(p): name for name, p in model.named_parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        average = averages.get(by_id[id(p)])
        if average is not None and name in state:
            state[name] = average.clone()
    return state
