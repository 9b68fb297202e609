"""One record of a recurrent stack's regularization: its rates, their masks' schedules, their
sampling, and whether they need rnnreg's own loop.

A rate travels from a strategy (:func:`rnnreg.strategy`), a config or a layer's keywords to the
masks of one forward call; :class:`Regularization` is that rate's one typed home on the way. It
checks every rate once, when it is made, says how often each placement's mask is drawn
(:class:`Schedule`: what a study reports, read here rather than re-derived from tensor shapes),
draws the masks of one call (:meth:`Regularization.sample_masks`) or their evaluation values
(:meth:`Regularization.evaluation_masks`), and answers from the rates alone, without drawing
anything, whether the recurrence must leave torch's fused kernel
(:meth:`Regularization.needs_own_loop`).

Its fields are the keywords of :class:`rnnreg.LSTM`, so the record is also a read-only mapping of
them: ``rnnreg.LSTM(10, 20, **record)`` builds the same layer as ``regularization=record``. The
zoneout rates appear among the keys only where they are on, as the GRU and the Elman RNN have no
``zoneout_cell`` keyword.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum

import torch
from torch import Tensor

from rnnreg.errors import RnnregError
from rnnreg.nn.functional import check_bool, check_probability, check_zoneout, dropout_mask
from rnnreg.nn.masks import DropoutMasks

__all__ = ["RECURRENT_MASKS", "ZONEOUT", "MaskSizes", "Regularization", "Schedule",
           "check_recurrent_mask"]

# How the recurrent masks are shared (``recurrent_mask``): "sequence" is Gal & Ghahramani's
# (2016, section 3) one mask per row, "batch" one mask per forward call for every row and step.
RECURRENT_MASKS = ("sequence", "batch")

# The keywords of the rates with which zoneout keeps h or c (Krueger et al. 2017), in the order
# of a layer's zoneout pair; the GRU and the Elman RNN have only the first.
ZONEOUT = ("zoneout_hidden", "zoneout_cell")


class Schedule(StrEnum):
    """How often a mask is drawn, named by what shares one draw."""

    # A new draw at every step, as Zaremba et al. (2014, section 3) drop the non-recurrent
    # connections.
    STEP = "fresh each step"
    # Each sequence (row) keeps its mask over the window: Gal & Ghahramani's (2016, section 3)
    # variational dropout.
    SEQUENCE = "one per sequence"
    # One mask for every row and step of the call: DropConnect on W_hh (Merity et al. 2018,
    # section 2), whole-word embedding dropout, a batch-shared recurrent mask.
    WINDOW = "one per window"


def check_recurrent_mask(value: str) -> str:
    if value not in RECURRENT_MASKS:
        raise RnnregError(f"`recurrent_mask` must be one of "
                          f"{', '.join(map(repr, RECURRENT_MASKS))}; got {value!r}")
    return value


@dataclass(frozen=True)
class MaskSizes:
    """The sizes a stack's masks take: its input width, each layer's hidden size, its
    directions and its gates per layer (4 for the LSTM, 3 for the GRU, 1 for the Elman RNN)."""

    input_size: int
    hidden_sizes: tuple[int, ...]
    directions: int
    gates: int


@dataclass(frozen=True, eq=False)
class Regularization(Mapping):
    """Where a recurrent stack drops and at what rate; see the module docstring.

    ``dropout`` is torch's between-layer rate; ``recurrent_mask`` says whether the mask on
    h(t-1) is one per sequence or one per call (it needs ``variational``: per-step masks
    differ by step and cannot be one weight).
    """

    input_dropout: float = 0.0
    dropout: float = 0.0
    output_dropout: float = 0.0
    recurrent_dropout: float = 0.0
    weight_dropout: float = 0.0
    variational: bool = False
    recurrent_mask: str = "sequence"
    zoneout_hidden: float = 0.0
    zoneout_cell: float = 0.0

    def __post_init__(self) -> None:
        for field in fields(self):
            name, value = field.name, getattr(self, field.name)
            if name == "variational":
                check_bool(name, value)
            elif name == "recurrent_mask":
                check_recurrent_mask(value)
            else:
                check = check_zoneout if name in ZONEOUT else check_probability
                object.__setattr__(self, name, check(name, value))
        if self.recurrent_mask == "batch" and not self.variational:
            raise RnnregError("`recurrent_mask='batch'` shares one mask by every row and step of "
                              "a call, which needs `variational=True`: per-step masks differ by "
                              "step and cannot be one weight")

    # --- the layer keywords, as a mapping ----------------------------------------------------

    def __getitem__(self, keyword: str):
        if keyword not in self._keywords():
            raise KeyError(keyword)
        return getattr(self, keyword)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keywords())

    def __len__(self) -> int:
        return len(self._keywords())

    def _keywords(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self)
                     if f.name not in ZONEOUT or getattr(self, f.name) > 0)

    def __repr__(self) -> str:
        on = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                       if getattr(self, f.name) != f.default)
        return f"Regularization({on})"

    # --- what runs where -------------------------------------------------------------------

    @property
    def zoneout(self) -> bool:
        return self.zoneout_hidden > 0 or self.zoneout_cell > 0

    def needs_own_loop(self, training: bool) -> bool:
        """Whether the masks of a call need rnnreg's own loop, not torch's fused kernel.

        torch's kernels take weights and states, nothing per row inside the time loop. A
        recurrent mask drawn per sequence or per step differs by row on h(t-1) (Gal &
        Ghahramani 2016, eq. 7), and zoneout keeps h(t-1) per unit and row (Krueger et al.
        2017), in evaluation too, at its expectation. The other placements and
        ``recurrent_mask="batch"`` are inputs, outputs or weights of the kernel. Read from
        the rates alone: asking draws nothing, so it never moves torch's random state.
        """
        per_row = training and self.recurrent_dropout > 0 and self.recurrent_mask != "batch"
        return per_row or self.zoneout

    def draws_own_masks(self, training: bool) -> bool:
        """Whether rnnreg must draw the call's masks itself and run the stack layer by layer:
        a mask that outlives one step (``variational``), acts on the recurrence (on h(t-1) or
        ``weight_hh``), or zoneout. Otherwise torch's one-call stack can draw its own
        between-layer dropout."""
        inside = self.recurrent_dropout > 0 or self.weight_dropout > 0 or self.variational
        return self.zoneout or (training and inside)

    def schedule(self, placement: str) -> Schedule:
        """How often the mask of ``placement`` (a field of :class:`DropoutMasks`) is drawn.

        The weight-drop mask is one weight sample per call (Merity et al. 2018, section 2), as
        is a batch-shared recurrent mask; every other mask is redrawn at each step, or held
        for the sequence when ``variational`` (Gal & Ghahramani 2016, section 3).
        """
        if placement == "weight" or (placement == "recurrent" and self.recurrent_mask == "batch"):
            return Schedule.WINDOW
        return Schedule.SEQUENCE if self.variational else Schedule.STEP

    # --- parts of a stack -------------------------------------------------------------------

    def inside(self) -> Regularization:
        """The part acting inside each layer's recurrence: what a stack of single layers
        (:class:`rnnreg.StackedRNN`) hands each of them."""
        return replace(self, input_dropout=0.0, dropout=0.0, output_dropout=0.0)

    def outside(self) -> Regularization:
        """The part acting on the stack's input, its layer boundaries and its output."""
        return replace(self, recurrent_dropout=0.0, weight_dropout=0.0, recurrent_mask="sequence",
                       zoneout_hidden=0.0, zoneout_cell=0.0)

    # --- masks -----------------------------------------------------------------------------

    def sample_masks(self, sizes: MaskSizes, steps: int, batch_size: int, *, device,
                     dtype) -> DropoutMasks:
        """Every mask of one forward call over ``steps`` steps and ``batch_size`` rows.

        Drawn in the order input, between, recurrent, weight, zoneout, output: the output mask
        last, as it acts last. A mask whose rate is 0 is None.
        """
        t = 1 if self.variational else steps
        d, b = sizes.directions, batch_size

        def sample(shape, p):
            return dropout_mask(shape, p, device=device, dtype=dtype) if p > 0 else None

        def zone(shape, rate):  # a unit keeps its previous value (factor 1) with this rate
            return (torch.rand(shape, device=device) < rate).to(dtype) if rate > 0 else None

        hidden = sizes.hidden_sizes
        batch = self.recurrent_mask == "batch"
        input_mask = sample((t, b, sizes.input_size), self.input_dropout)
        between = tuple(sample((t, b, d * h), self.dropout) for h in hidden[:-1])
        recurrent = tuple(sample((1, d, 1, h) if batch else (t, d, b, h), self.recurrent_dropout)
                          for h in hidden)
        weight = tuple(sample((d, sizes.gates * h, h), self.weight_dropout) for h in hidden)
        zoneout = tuple((zone((t, d, b, h), self.zoneout_hidden),
                         zone((t, d, b, h), self.zoneout_cell))
                        for h in hidden) if self.zoneout else None
        output = sample((t, b, d * hidden[-1]), self.output_dropout)
        return DropoutMasks(input=input_mask, between=between, recurrent=recurrent,
                            weight=weight, output=output, zoneout=zoneout)

    def evaluation_masks(self, sizes: MaskSizes, batch_size: int, *, device,
                         dtype) -> DropoutMasks:
        """Evaluation: no dropout, and every zoneout factor at its expectation, the rate
        (Krueger et al. 2017, section 3, as dropout's test-time scaling)."""
        layers = len(sizes.hidden_sizes)
        none = (None,) * layers

        def expected(h: int, rate: float) -> Tensor | None:
            shape = (1, sizes.directions, batch_size, h)
            return torch.full(shape, rate, device=device, dtype=dtype) if rate > 0 else None

        zoneout = tuple((expected(h, self.zoneout_hidden), expected(h, self.zoneout_cell))
                        for h in sizes.hidden_sizes) if self.zoneout else None
        return DropoutMasks(input=None, between=none[1:], recurrent=none, weight=none,
                            output=None, zoneout=zoneout)
