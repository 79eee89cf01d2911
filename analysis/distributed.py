"""The process group of a ``torchrun`` launch, seen by the run driver: which rank this is, of how many.

``torchrun --nproc_per_node N -m analysis.trace ...`` starts N copies of a command; each learns its rank and the
world size from the environment torchrun sets, and they coordinate through torch.distributed (the gloo backend:
only small Python objects and barriers cross between ranks, never tensors, so it serves CPU and GPU runs alike).
Without torchrun the world is one process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes and this one's index on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes the manifest and reports."""
        return self.rank == 0


def current_world() -> World:
    """The launch's world (one process without torchrun), its process group started on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), local_size)


def barrier(world: World) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if world.size > 1:
        dist.barrier()


def from_main(world: World, value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if world.size == 1:
        return value
    box: list[Any] = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_device(world: World, device: str) -> str:
    """The device of this rank: its own GPU where the command asks for CUDA without naming one."""
    if world.size > 1 and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def share_of(world: World, items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items`` (all of them in one process): the shares in rank order are
    ``items``, as even as whole items allow."""
    base, extra = divmod(len(items), world.size)
    start = world.rank * base + min(world.rank, extra)
    return items[start : start + base + (world.rank < extra)]


def gathered(world: World, value: T) -> list[T]:
    """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
    if world.size == 1:
        return [value]
    box: list[Any] = [None] * world.size
    dist.all_gather_object(box, value)
    return box
