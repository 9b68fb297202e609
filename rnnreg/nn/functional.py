"""Dropout primitives: the building blocks every placement in rnnreg is made of, and the checks
every rate, size and switch given to them, to the layers or to a config goes through.

All of them are *inverted* dropout: kept units are scaled by 1/(1-p) during training so the
expected activation is unchanged and evaluation needs no rescaling (Srivastava et al. 2014;
Zaremba et al. 2014, section 3.1 uses the same operator ``D``).

Axis convention: time-major ``(T, B, F)`` unless ``batch_first=True``, as in ``torch.nn.LSTM``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnreg.errors import RnnregError

__all__ = [
    "check_bool",
    "check_positive_int",
    "check_probability",
    "check_zoneout",
    "dropout",
    "dropout_mask",
    "embedding_dropout",
    "is_positive_int",
    "locked_dropout",
]


def _named(name: str) -> str:
    """``name`` marked as the parameter it is (:mod:`rnnreg.errors`), where it is one."""
    return f"`{name}`" if name.isidentifier() else name


def check_probability(name: str, p: float) -> float:
    """Validate a dropout rate the way ``torch.nn.Dropout`` does, but say which option was wrong.

    Rates are never clamped: a silent 1.2 -> 1.0 hides a bug in the caller's config.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise RnnregError(f"{_named(name)} must be a probability in [0, 1], got {p!r}")
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise RnnregError(f"{_named(name)} must be a probability in [0, 1], got {p}")
    return float(p)


def check_zoneout(name: str, p: float) -> float:
    """A zoneout rate: a probability below 1, since at 1 a unit would never take a new value
    (Krueger et al. 2017: the state would stay at its initial value forever)."""
    p = check_probability(name, p)
    if p == 1.0:
        raise RnnregError(f"{_named(name)} must be a probability in [0, 1), got 1.0: every "
                          "unit would keep its initial value forever")
    return p


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is a size: an int above 0 (bool is an int subclass, but True is no
    size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(name: str, value: int) -> int:
    """A size (layer width, layer count, batch size, ...), or one ValueError naming the option."""
    if not is_positive_int(value):
        raise RnnregError(f"{_named(name)} must be a positive integer, got {value!r}")
    return value


def check_bool(name: str, value: bool) -> bool:
    """A switch: True or False only, so that a 0/1 or "yes" from a config does not pass."""
    if not isinstance(value, bool):
        raise RnnregError(f"{_named(name)} must be True or False, got {value!r}")
    return value


def dropout_mask(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A keep mask already scaled by 1/(1-p): entries are 0 or 1/(1-p).

    Sampling the mask separately from applying it is what lets one mask be reused across time
    steps (variational dropout) or across windows of a stream (MC-dropout evaluation).
    """
    check_probability("p", p)
    if p == 1.0:
        return torch.zeros(shape, device=device, dtype=dtype)
    if torch.device(device or "cpu").type != "cpu":
        return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p).div_(1.0 - p)
    # On CPU, comparing uniforms is over 2x faster than bernoulli_ (benchmarks/masks.py).
    # They are drawn in float32 whatever the mask's dtype (bfloat16 uniforms are too coarse to
    # keep the rate exact); the scale is applied in the mask's own dtype.
    keep = torch.rand(shape, device=device).ge_(p)
    return keep.to(dtype or torch.get_default_dtype()).mul_(1.0 / (1.0 - p))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Standard inverted dropout: a fresh, independent mask for every element.

    CUDA keeps torch's fused kernel; on CPU the mask comes from :func:`dropout_mask`, which
    is faster there than ``F.dropout``'s Bernoulli sampler (same distribution).
    """
    check_probability("p", p)
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, True)
    return x * dropout_mask(x.shape, p, dtype=x.dtype)


def locked_dropout(x: Tensor, p: float, training: bool = True, batch_first: bool = False) -> Tensor:
    """Variational ("locked") dropout: one mask per sequence, reused at every time step.

    Gal & Ghahramani (2016), section 4: sampling the mask once per sequence makes dropout an
    approximate Bayesian posterior over the weights instead of per-step noise.

    Shapes: ``(T, B, F)``, or ``(B, T, F)`` with ``batch_first``; the mask is ``(1, B, F)``
    (resp. ``(B, 1, F)``) and broadcasts over time.
    """
    check_probability("p", p)
    if not training or p == 0:
        return x
    if x.dim() != 3:
        raise RnnregError(
            f"locked_dropout expects a 3-D (time, batch, features) input, got {x.dim()}-D")
    mask_shape = (x.size(0), 1, x.size(2)) if batch_first else (1, x.size(1), x.size(2))
    return x * dropout_mask(mask_shape, p, device=x.device, dtype=x.dtype)


def embedding_dropout(
    ids: Tensor,
    weight: Tensor,
    p: float,
    training: bool = True,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """Look up embeddings, dropping whole words: every occurrence of a dropped word is zeroed.

    Gal & Ghahramani (2016), section 5 ("word dropout"): the same word type gets the same mask in
    one forward call, so the model cannot rely on any single word's vector. Kept vectors are scaled
    by 1/(1-p). The mask is gathered per position (cheap for big vocabularies) rather than
    multiplied into the full ``(V, E)`` matrix; the result and its gradient are the same.
    """
    check_probability("p", p)
    embedded = F.embedding(ids, weight, padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    if not training or p == 0:
        return embedded
    word_mask = dropout_mask((weight.size(0),), p, device=weight.device, dtype=weight.dtype)
    return embedded * word_mask[ids].unsqueeze(-1)
