"""The optimizer: plain SGD (the paper), or AWD-LSTM's non-monotonically triggered ASGD.

NT-ASGD (Merity et al. 2018, section 3, Algorithm 1) trains with SGD and switches to averaged
SGD once validation perplexity has not improved on the best of all but the last ``nonmono``
epochs; from then on the model is evaluated (and its ``best`` weights saved) with the running
average of the iterates, not the iterates themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rnnreg.lm.config import Config

__all__ = ["NTASGD"]


class NTASGD:
    """The optimizer of one run and its switch to averaging; with ``optimizer="sgd"`` it never
    switches, so every run holds one of these."""

    def __init__(self, model: nn.Module, config: Config, *, averaging: bool = False) -> None:
        self.model, self.config, self.averaging = model, config, averaging
        self.optimizer = self._make()

    def _make(self) -> torch.optim.Optimizer:
        # ASGD with t0=0 and lambd=0 averages from its first step and decays nothing: AWD's phase.
        if self.averaging:
            return torch.optim.ASGD(self.model.parameters(), lr=self.config.lr, t0=0,
                                    lambd=0.0, weight_decay=self.config.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr,
                               weight_decay=self.config.weight_decay)

    def observe(self, history: list[float], valid_ppl: float) -> bool:
        """Record an epoch's validation perplexity in ``history``; switch if it has stalled.

        Returns whether averaging started now.
        """
        nonmono = self.config.asgd_nonmono
        switch = (self.config.optimizer == "asgd" and not self.averaging
                  and len(history) > nonmono and valid_ppl > min(history[:-nonmono]))
        history.append(valid_ppl)
        if switch:
            self.averaging = True
            self.optimizer = self._make()
        return switch

    def evaluated_state(self) -> dict:
        """The state dict to evaluate (and save as ``best``): the iterates, or ASGD's running
        average of them once averaging has started."""
        weights = self.model.state_dict()
        if not self.averaging:
            return weights
        averaged = dict(weights)
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if "ax" in self.optimizer.state.get(p, {}):
                    averaged[names[id(p)]] = self.optimizer.state[p]["ax"].clone()
        return averaged

    @contextlib.contextmanager
    def evaluated_state_loaded(self) -> Iterator[None]:
        """Load :meth:`evaluated_state` into the model for the block, and the iterates back
        after it (nothing to swap before averaging starts)."""
        if not self.averaging:
            yield
            return
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.evaluated_state())
        try:
            yield
        finally:
            self.model.load_state_dict(current)
