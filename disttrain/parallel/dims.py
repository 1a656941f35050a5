"""The rank grid and its process groups, built once and passed explicitly.

Ranks are laid out as `torch.arange(world).view(pp, dp, sp, tp)`: tensor-parallel peers are
adjacent ranks (a tp group stays inside a node: it communicates every block), then
sequence-parallel peers; pipeline stages are outermost. ZeRO shards model states over the
flattened dp x sp group of each tp rank: sequence-parallel ranks hold identical parameters,
tensor-parallel ranks hold different shards of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    dp: int = 1
    """Data-parallel degree."""
    sp: int = 1
    """Sequence-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree (innermost axis)."""
    world_size: int = 1
    """Number of ranks; must equal dp * sp * pp * tp."""

    def __post_init__(self) -> None:
        for name in ("dp", "sp", "pp", "tp", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dp * self.sp * self.pp * self.tp != self.world_size:
            raise ValueError(f"parallel: dp*sp*pp*tp = {self.dp * self.sp * self.pp * self.tp} "
                             f"must equal the world size ({self.world_size})")

    def grid(self) -> torch.Tensor:
        """(pp, dp, sp, tp) tensor of global ranks."""
        return torch.arange(self.world_size).view(self.pp, self.dp, self.sp, self.tp)

    def coords(self, rank: int) -> tuple[int, int, int, int]:
        """(pp_rank, dp_rank, sp_rank, tp_rank) of a global rank."""
        rest, tp_rank = divmod(rank, self.tp)
        pp_rank, rest = divmod(rest, self.dp * self.sp)
        dp_rank, sp_rank = divmod(rest, self.sp)
        return pp_rank, dp_rank, sp_rank, tp_rank


@dataclass
class ParallelGroups:
    """This rank's process groups (None where the degree is 1 or no process group exists)."""

    dims: ParallelDims
    rank: int
    sp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    dp_sp: dist.ProcessGroup | None = None
    """The ZeRO sharding group: every rank holding the same layers."""
    pp: dist.ProcessGroup | None = None
    tp: dist.ProcessGroup | None = None
    """The tensor-parallel group: ranks holding different shards of the same layers."""
    pp_tp: dist.ProcessGroup | None = None
    """Ranks of one (dp, sp) slice: together they hold every parameter once (gradient norm)."""
    ranks: dict[str, list[int]] = field(default_factory=dict)
    """Global ranks of each of this rank's groups, by axis name."""

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def sp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[3]

    @property
    def dp_sp_rank(self) -> int:
        return self.dp_rank * self.dims.sp + self.sp_rank


def build_groups(dims: ParallelDims, rank: int) -> ParallelGroups:
    """Create every group of the grid (all ranks must call this, in the same order) and keep
    this rank's. Without an initialised process group, returns a single-rank ParallelGroups."""
    groups = ParallelGroups(dims=dims, rank=rank)
    if not dist.is_initialized():
        assert dims.world_size == 1, "a multi-rank layout needs torch.distributed initialised"
        return groups
    grid = dims.grid()
    pp, dp, sp, tp = dims.pp, dims.dp, dims.sp, dims.tp
    axes = {
        "sp": [grid[p, d, :, t].tolist() for p in range(pp) for d in range(dp) for t in range(tp)],
        "dp": [grid[p, :, s, t].tolist() for p in range(pp) for s in range(sp) for t in range(tp)],
        "dp_sp": [grid[p, :, :, t].flatten().tolist() for p in range(pp) for t in range(tp)],
        "pp": [grid[:, d, s, t].tolist() for d in range(dp) for s in range(sp) for t in range(tp)],
        "tp": [grid[p, d, s, :].tolist() for p in range(pp) for d in range(dp) for s in range(sp)],
        "pp_tp": [grid[:, d, s, :].flatten().tolist() for d in range(dp) for s in range(sp)],
    }
    for axis, members in axes.items():
        for ranks in members:
            group = dist.new_group(ranks)
            if rank in ranks:
                groups.ranks[axis] = ranks
                if len(ranks) > 1:
                    setattr(groups, axis, group)
    return groups
