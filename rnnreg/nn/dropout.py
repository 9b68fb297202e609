"""Dropout modules: thin ``nn.Module`` faces of :mod:`rnnreg.nn.functional`.

Each holds its rate (shown in ``repr``) and samples its masks inside ``forward``; nothing is
cached between calls, so there is no mask state to reset from outside.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.func import functional_call

from rnnreg.errors import RnnregError
from rnnreg.nn import functional as RF

__all__ = ["EmbeddingDropout", "LockedDropout", "WeightDrop"]


class LockedDropout(nn.Module):
    """One dropout mask per sequence, shared by every time step (Gal & Ghahramani 2016)."""

    def __init__(self, p: float = 0.5, *, batch_first: bool = False) -> None:
        super().__init__()
        self.p = RF.check_probability("p", p)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        return RF.locked_dropout(x, self.p, self.training, self.batch_first)

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"


class EmbeddingDropout(nn.Embedding):
    """``nn.Embedding`` that drops whole words during training (Gal & Ghahramani 2016, sec. 5).

    Same constructor and ``state_dict`` as ``nn.Embedding``; the rate is keyword-only ``p``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, p: float = 0.1, **kwargs):
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.p = RF.check_probability("p", p)

    def forward(self, ids: Tensor) -> Tensor:
        if self.max_norm is not None or self.sparse:
            raise RnnregError("EmbeddingDropout supports neither max_norm nor sparse gradients")
        return RF.embedding_dropout(ids, self.weight, self.p, self.training, self.padding_idx,
                                    self.scale_grad_by_freq)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class WeightDrop(nn.Module):
    """DropConnect on named parameters of any module (Wan et al. 2013; AWD-LSTM's weight drop).

    The wrapped module is run through ``torch.func.functional_call`` with dropped copies of the
    chosen parameters, so the module's own parameters are never deleted, replaced or patched
    (the parameter surgery that broke awd-lstm-lm on several PyTorch releases). One mask per
    forward call. For rnnreg's recurrent layers prefer their ``weight_dropout=`` option, which
    drops the hidden-to-hidden weights and runs torch's fused kernel on them.
    """

    def __init__(self, module: nn.Module, weights: Iterable[str], p: float = 0.5) -> None:
        super().__init__()
        self.module = module
        self.weights = tuple(weights)
        self.p = RF.check_probability("p", p)
        own = dict(module.named_parameters())
        missing = [name for name in self.weights if name not in own]
        if not self.weights or missing:
            raise RnnregError(
                "weights must name parameters of the wrapped module; "
                f"unknown: {missing or '(none given)'}; "
                f"available: {sorted(own)}"
            )

    def forward(self, *args, **kwargs):
        if not self.training or self.p == 0:
            return self.module(*args, **kwargs)
        params = dict(self.module.named_parameters())
        dropped = {
            name: params[name] * RF.dropout_mask(params[name].shape, self.p,
                                                 device=params[name].device,
                                                 dtype=params[name].dtype)
            for name in self.weights
        }
        return functional_call(self.module, dropped, args, kwargs)

    def extra_repr(self) -> str:
        return f"weights={list(self.weights)}, p={self.p}"
