"""What a model samples for one forward call, read from the masks it draws itself.

A language model's masks for one call are one record (:class:`rnnreg.lm.model.ModelMasks`
holding a :class:`rnnreg.nn.masks.DropoutMasks`). This module walks that record generically, so
a mask added to it (a new placement) appears in the report's table of what each strategy
samples, and is redrawn in the report's per-step heatmap panel, without either naming it.
The walk is its own rather than ``torch.utils._pytree``'s: a pytree sees into a dataclass only
once its class is registered, so a new record type would silently become one opaque leaf.

How often a mask is drawn is the model's answer for the field that holds it
(:meth:`rnnreg.lm.model.LanguageModel.schedule`, from its :class:`rnnreg.nn.Regularization`),
one of the three :class:`rnnreg.nn.Schedule` values (see :func:`schedules`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import fields, is_dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from rnnreg.nn.regularization import ZONEOUT, Schedule

__all__ = ["Mask", "masks", "named_schedules", "schedules", "stack_steps"]

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
    def field(self) -> str:
        """The field that holds it (``between``, ``output``), one name for every layer."""
        return [part for part in self.path if isinstance(part, str)][-1]

    @property
    def name(self) -> str:
        """:attr:`field`; a member of a per-layer pair adds the member's name
        (``zoneout cell``)."""
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


def schedules(model) -> list[tuple[Mask, Schedule]]:
    """Every mask ``model.sample_masks`` draws, with its schedule, ``model.schedule(field)``
    for the field holding it. The draw that lists the masks runs in a forked RNG, which
    leaves the caller's random state as is.
    """
    with torch.random.fork_rng(devices=[]):
        drawn = list(masks(model.sample_masks(1, 1)))
    return [(mask, model.schedule(mask.field)) for mask in drawn]


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

    The masks at the paths in ``keep`` (those :func:`schedules` finds drawn once per window)
    have no step dimension: the first draw's is kept. Every other mask is concatenated over
    the draws.
    """
    tables = [{mask.path: mask.tensor for mask in masks(draw)} for draw in draws]

    def make(path: MaskPath, first: Tensor) -> Tensor:
        return first if path in keep else torch.cat([table[path] for table in tables])

    return _rebuild(draws[0], (), make)
