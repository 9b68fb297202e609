"""The optimizer: plain SGD (the paper), or AWD-LSTM's non-monotonically triggered ASGD; and
which weights a run evaluates: the iterates, or an average of them.

NT-ASGD (Merity et al. 2018, section 3, Algorithm 1) trains with SGD and switches to averaged
SGD once validation perplexity has not improved on the best of all but the last ``nonmono``
epochs; from then on the model is evaluated (and its ``best`` weights saved) with the running
average of the iterates, not the iterates themselves. ``Config.ema_decay`` averages the tail of
a plain SGD run instead (:mod:`rnnreg.lm.training.averaging`), evaluated the same way once it
has started; the two are never combined (the config refuses it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rnnreg.lm.config import Config
from rnnreg.lm.training.averaging import WeightEMA, averaged_state

__all__ = ["NTASGD"]


class NTASGD:
    """The optimizer of one run and its switch to averaging; with ``optimizer="sgd"`` it never
    switches, so every run holds one of these."""

    def __init__(self, model: nn.Module, config: Config, *, averaging: bool = False) -> None:
        self.model, self.config, self.averaging = model, config, averaging
        self.optimizer = self._make()
        self.ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None

    @property
    def averaged(self) -> bool:
        """Whether the weights evaluated are an average (NT-ASGD's or the EMA's), not the
        iterates."""
        return self.averaging or (self.ema is not None and self.ema.started)

    def after_step(self, done: float) -> None:
        """Take in an optimizer step taken when the fraction ``done`` of the run was behind:
        the EMA starts at the first step with ``done >= ema_start`` and follows every step
        after it."""
        if self.ema is not None and (self.ema.started or done >= self.config.ema_start):
            self.ema.update()

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
        """The state dict to evaluate (and save as ``best``): the iterates, or their average
        (ASGD's running average, or the EMA) once averaging has started."""
        if self.ema is not None and self.ema.started:
            return averaged_state(self.model, self.ema.weights)
        if not self.averaging:
            return self.model.state_dict()
        names = {id(p): n for n, p in self.model.named_parameters()}
        averages = {names[id(p)]: self.optimizer.state[p]["ax"]
                    for group in self.optimizer.param_groups for p in group["params"]
                    if "ax" in self.optimizer.state.get(p, {})}
        return averaged_state(self.model, averages)

    @contextlib.contextmanager
    def evaluated_state_loaded(self) -> Iterator[None]:
        """Load :meth:`evaluated_state` into the model for the block, and the iterates back
        after it (nothing to swap before averaging starts)."""
        if not self.averaged:
            yield
            return
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.evaluated_state())
        try:
            yield
        finally:
            self.model.load_state_dict(current)
