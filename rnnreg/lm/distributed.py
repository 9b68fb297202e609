"""Data-parallel training on ``torch.distributed``: who this process is, and what ranks share.

A job started by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and the ``MASTER_ADDR``/``MASTER_PORT`` rendezvous) trains one model on several
processes. Each rank owns a block of the B parallel streams
(:func:`rnnreg.lm.corpus.batches.shard_streams`), so the ranks together see exactly the
single-process batch. :class:`World` is what the trainer asks of the other ranks; in a single
process every method is the identity, so the one training loop serves both without branching.

The process group pairs gloo with CPU tensors and NCCL with CUDA tensors (``cpu:gloo,cuda:nccl``
where CUDA exists), so each collective takes the backend of the device its tensors live on:
gradients of a GPU model travel over NCCL, scalars and Python objects over gloo.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from rnnreg.errors import RnnregError
from rnnreg.lm.corpus.batches import shard_streams

__all__ = ["PeerFailed", "World", "detect", "is_main", "launch", "resolve_device"]

_T = TypeVar("_T")

# What torchrun sets for every worker; RANK/WORLD_SIZE alone identify a distributed launch.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def resolve_device(name: str) -> torch.device:
    """The device a ``--device`` name means here: ``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RnnregError(f"`device={name!r}` was asked for but CUDA is not available here")
    return device


class PeerFailed(RuntimeError):
    """Another rank failed at a step all ranks take together; this rank stops with it."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size``, GPU ``local_rank`` of its node.

    ``distributed`` is true whenever a launcher started the process, even with one rank, so
    ``torchrun --nproc-per-node 1`` runs the same code path as a larger job.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory, logs and prints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: ``cuda`` becomes this rank's ``cuda:LOCAL_RANK``."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train through: DDP across ranks, the model itself in one process."""
        if not self.distributed:
            return model
        parameter = next(model.parameters())
        device_ids = [parameter.device.index] if parameter.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # --- collectives -----------------------------------------------------------------------

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks, in float64: the precision of the NLL sums they feed."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, *values: float) -> list[float]:
        """Element-wise maxima over ranks: any rank's flag (as 0/1), the slowest rank's time."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values, op) -> list[float]:
        if not self.distributed:
            return list(values)
        # On the CPU whatever the model's device: a handful of scalars gains nothing from NCCL.
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def gather_objects(self, value: Any) -> list:
        """Every rank's ``value``, as a list indexed by rank (pickled: for small states)."""
        if not self.distributed:
            return [value]
        values: list = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def gather_columns(self, state):
        """The full batch of a recurrent state (a tensor or tuple of tensors, batch in dim 1).

        Rank ``r`` holds columns ``[r*w, (r+1)*w)``; concatenating in rank order gives the
        columns of the single-process batch, which is what a checkpoint stores.
        """
        if not self.distributed:
            return state
        return tree_map_only(torch.Tensor, self._gathered, state)

    def _gathered(self, columns: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(columns) for _ in range(self.size)]
        dist.all_gather(parts, columns.contiguous())
        return torch.cat(parts, dim=1)

    def shard_columns(self, state):
        """This rank's columns of a full-batch recurrent state: the inverse of gather_columns."""
        return tree_map_only(torch.Tensor,  # batch is dim 1 there too
                             lambda full: shard_streams(full, self.rank, self.size), state)

    def from_main(self, action: Callable[[], _T]) -> _T:
        """Run ``action`` on rank 0 only and hand every rank its result, or its failure.

        Without this, an error on rank 0 alone (a locked or existing run directory, say) would
        leave the other ranks waiting for it at the next collective until the timeout.
        """
        if not self.distributed:
            return action()
        outcome: list = [None]
        if self.is_main:
            try:
                outcome[0] = (True, action())
            except Exception as error:
                dist.broadcast_object_list([(False, _describe(error))], src=0)
                raise
        dist.broadcast_object_list(outcome, src=0)
        ok, value = outcome[0]
        if not ok:
            raise PeerFailed(f"rank 0 failed: {value}")
        return value

    def everywhere(self, action: Callable[[], _T]) -> _T:
        """Run ``action`` on every rank; if it failed on any rank, fail on all of them."""
        if not self.distributed:
            return action()
        try:
            value, failure = action(), None
        except Exception as error:
            value, failure = None, error
        failures = self.gather_objects(None if failure is None else _describe(failure))
        if failure is not None:
            raise failure
        for rank, text in enumerate(failures):
            if text is not None:
                raise PeerFailed(f"rank {rank} failed: {text}")
        return value


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def detect() -> World:
    """The world a launcher described in the environment; a single process when none did."""
    present = [name for name in _LAUNCH_VARIABLES if name in os.environ]
    if not present:
        return World()
    if "RANK" not in present or "WORLD_SIZE" not in present:
        raise RnnregError(f"{', '.join(present)} set without RANK and WORLD_SIZE: start "
                          "distributed training with torchrun (see README, Scaling out)")
    rank, size = _int_variable("RANK"), _int_variable("WORLD_SIZE")
    local_rank = _int_variable("LOCAL_RANK") if "LOCAL_RANK" in present else 0
    if size < 1 or not 0 <= rank < size:
        raise RnnregError(f"RANK={rank} and WORLD_SIZE={size} do not describe a rank of a job")
    return World(rank, size, local_rank, distributed=True)


def _int_variable(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise RnnregError(f"environment variable {name} must be an integer, got {text!r}") from None


def is_main() -> bool:
    """Whether this process is rank 0 (or alone): the one that prints and writes.

    Read from the launcher's environment rather than the process group, so it answers the
    same before the group exists and after it is torn down.
    """
    return detect().is_main


@contextlib.contextmanager
def launch() -> Iterator[World]:
    """Join the job's process group for the duration of the block; tear it down afterwards.

    A group the caller already initialised is used and left alone, so a program that manages
    its own group can call :func:`rnnreg.lm.training.loop.train` inside it.
    """
    world = detect()
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if torch.cuda.is_available():
        # Before the group exists, so NCCL binds each rank to its own GPU.
        torch.cuda.set_device(world.local_rank)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        gc.collect()  # anything still holding the group (a DDP wrapper in a cycle) goes first
        dist.destroy_process_group()
