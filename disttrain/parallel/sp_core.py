"""What every sequence-parallel attention core shares: its group and a communication counter.

A sequence-parallel core is an `AttentionCore` whose `forward`/`backward` see only this
rank's tokens and talk to the other ranks of the sequence-parallel group *inside* those two
calls (no autograd-visible collectives), so the activation runtime can keep or swap `saved`,
recompute q, k, v and call `backward` later exactly as it does for the local core.

`comm_bytes` counts the bytes this rank *sends to other ranks* (its own share of an
all-to-all is not counted), by collective kind: 'all_to_all' (Ulysses) and 'p2p' (ring).
This is the quantity `planner.costmodel.ulysses_alltoall_bytes` / `ring_p2p_bytes` predict,
so a script can compare measured and predicted volume per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from disttrain.model.attention import AttentionCore
from disttrain.parallel.comm_counter import CommCounter

COMM_KINDS = ("all_to_all", "p2p")
"""Keys of `SequenceParallelCore.comm_bytes`."""


class SequenceParallelCore(AttentionCore, CommCounter):
    """Base of the Ulysses and ring cores: the sp group, this rank's place in it, counters."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        if group is None:
            if not dist.is_initialized():
                raise ValueError("group: sequence parallelism needs an initialised process "
                                 "group (got group=None without torch.distributed)")
            group = dist.group.WORLD
        self.group = group
        """The sequence-parallel process group (ranks holding shards of the same sequences)."""
        self.sp = dist.get_world_size(group)
        """Sequence-parallel degree."""
        if self.sp < 2:
            raise ValueError(f"sp: a sequence-parallel core needs sp >= 2, got {self.sp}; "
                             f"with sp=1 keep the local core")
        self.sp_rank = dist.get_rank(group)
        """This rank's index in the group; also the index of its sequence shard."""
        CommCounter.__init__(self, COMM_KINDS)


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()
