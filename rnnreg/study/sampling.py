"""What a model samples for one forward call, read from the masks it draws itself.

A language model's masks for one call are one record (:class:`rnnreg.lm.model.ModelMasks`
holding a :class:`rnnreg.nn.masks.DropoutMasks`). This module walks that record generically, so
a mask added to it (a new placement) appears in the report's table of what each strategy
samples, and is redrawn in the report's per-step heatmap panel, without either naming it.

How often a mask is drawn is measured rather than looked up: the model draws masks twice, for
different numbers of steps and rows, and the dimensions that follow them say which of three
schedules the mask has (see :func:`schedules`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import fields, is_dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from rnnreg.nn.strategies import ZONEOUT

__all__ = ["FRESH", "SEQUENCE", "WINDOW", "Mask", "masks", "named_schedules", "schedules",
           "stack_steps"]

# A mask whose first dimension follows the number of steps: a new draw at every step, as
# Zaremba et al. (2014, section 3) drop the non-recurrent connections.
FRESH = "fresh each step"
# Follows the rows but not the steps: each sequence keeps its mask over the window, Gal &
# Ghahramani's (2016) variational dropout.
SEQUENCE = "one per sequence"
# Follows neither: one mask for every row and step of the call, e.g. DropConnect on W_hh
# (Merity et al. 2018), whole-word embedding dropout or a batch-shared recurrent mask.
WINDOW = "one per window"

# Steps and rows of the two measuring draws; any two different pairs would do.
_SMALL, _LARGE = (3, 2), (4, 5)

# The members of a per-layer pair, by the field holding the pairs: DropoutMasks.zoneout holds
# (hidden, cell), the order of the zoneout rates' keywords.
_MEMBERS = {"zoneout": tuple(keyword.replace("_", " ") for keyword in ZONEOUT)}

MaskPath = tuple[str | int, ...]


class Mask(NamedTuple):
    """One mask tensor of a record: where it is (field names, layer and member indices), its
    position in the record's field order, and the tensor."""

    path: MaskPath
    order: tuple[int, ...]
    tensor: Tensor

    @property
    def name(self) -> str:
        """The field that holds it (``between``, ``output``), one name for every layer; a
        member of a per-layer pair adds the member's name (``zoneout cell``)."""
        last = max(i for i, part in enumerate(self.path) if isinstance(part, str))
        field, indices = self.path[last], self.path[last + 1:]
        if len(indices) < 2:
            return field
        members = _MEMBERS.get(field)
        return members[indices[1]] if members else f"{field} {indices[1]}"


def masks(record: object) -> Iterator[Mask]:
    """Every mask tensor in ``record`` (dataclasses and tuples of them; None is a mask that is
    off), in field order."""
    yield from _walk(record, (), ())


def _walk(record: object, path: MaskPath, order: tuple[int, ...]) -> Iterator[Mask]:
    if record is None:
        return
    if isinstance(record, Tensor):
        yield Mask(path, order, record)
    elif is_dataclass(record):
        for index, field in enumerate(fields(record)):
            yield from _walk(getattr(record, field.name), (*path, field.name), (*order, index))
    elif isinstance(record, tuple):
        for index, item in enumerate(record):
            yield from _walk(item, (*path, index), (*order, index))
    else:
        raise TypeError(f"a mask record holds tensors, dataclasses and tuples; {path} holds "
                        f"{type(record).__name__}")


def _rebuild(record: object, path: MaskPath, make: Callable[[MaskPath, Tensor], Tensor]) -> object:
    """``record`` with every mask tensor replaced by ``make(path, tensor)``."""
    if record is None:
        return None
    if isinstance(record, Tensor):
        return make(path, record)
    if is_dataclass(record):
        return replace(record, **{field.name: _rebuild(getattr(record, field.name),
                                                       (*path, field.name), make)
                                  for field in fields(record)})
    return tuple(_rebuild(item, (*path, index), make) for index, item in enumerate(record))


def schedules(model) -> list[tuple[Mask, str]]:
    """Every mask ``model.sample_masks`` draws, with its schedule (FRESH, SEQUENCE or WINDOW).

    Two draws, of 3 steps x 2 rows and 4 steps x 5 rows: a mask whose first dimension changed
    is fresh each step, one with another changed dimension (its rows) is one per sequence, one
    with none changed is one per window. A forked RNG leaves the caller's random state as is.
    """
    with torch.random.fork_rng(devices=[]):
        small = list(masks(model.sample_masks(*_SMALL)))
        large = {mask.path: mask.tensor.shape for mask in masks(model.sample_masks(*_LARGE))}
    return [(mask, _schedule(mask.tensor.shape, large[mask.path])) for mask in small]


def _schedule(small: torch.Size, large: torch.Size) -> str:
    if small[0] != large[0]:
        return FRESH
    return SEQUENCE if small != large else WINDOW


def named_schedules(model) -> dict[str, tuple[tuple[int, ...], str]]:
    """Mask name -> (its first position in the record, its schedule) for every mask ``model``
    draws: the layers of one field are one entry, their schedules joined if they differ."""
    named: dict[str, tuple[tuple[int, ...], list[str]]] = {}
    for mask, schedule in schedules(model):
        order, texts = named.setdefault(mask.name, (mask.order, []))
        if schedule not in texts:
            texts.append(schedule)
    return {name: (order, "; ".join(texts)) for name, (order, texts) in named.items()}


def stack_steps(draws: Sequence[object], keep: Collection[MaskPath]) -> object:
    """Single-step draws of one record stacked along time into masks redrawn at every step.

    The masks at the paths in ``keep`` (those :func:`schedules` finds WINDOW) have no step
    dimension: the first draw's is kept. Every other mask is concatenated over the draws.
    """
    tables = [{mask.path: mask.tensor for mask in masks(draw)} for draw in draws]

    def make(path: MaskPath, first: Tensor) -> Tensor:
        return first if path in keep else torch.cat([table[path] for table in tables])

    return _rebuild(draws[0], (), make)
