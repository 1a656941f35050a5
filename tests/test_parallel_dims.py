"""Rank grid, process groups, and the shared spawn helper."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from disttrain.parallel.dims import ParallelDims, build_groups
from disttrain.parallel.spawn import spawn_ranks


def test_grid_and_coords():
    dims = ParallelDims(dp=2, sp=2, pp=2, world_size=8)
    grid = dims.grid()
    assert grid.shape == (2, 2, 2, 1)
    for rank in range(8):
        p, d, s, t = dims.coords(rank)
        assert grid[p, d, s, t] == rank
    assert dims.coords(5) == (1, 0, 1, 0)
    with pytest.raises(ValueError, match="dp\\*sp\\*pp\\*tp = 4 must equal the world size \\(8\\)"):
        ParallelDims(dp=2, sp=2, pp=1, world_size=8)


def test_tp_is_the_innermost_axis():
    dims = ParallelDims(dp=2, sp=2, pp=1, tp=2, world_size=8)
    assert dims.coords(1) == (0, 0, 0, 1)  # tp peers are adjacent ranks
    assert dims.coords(2) == (0, 0, 1, 0)
    assert dims.coords(7) == (0, 1, 1, 1)
    assert dims.grid()[0, 1, 0].tolist() == [4, 5]


def _groups_worker(rank, world, dp, sp, pp, tp=1):
    groups = build_groups(ParallelDims(dp=dp, sp=sp, pp=pp, tp=tp, world_size=world), rank)
    sums = {}
    for axis in ("sp", "dp", "dp_sp", "pp", "tp", "pp_tp"):
        group = getattr(groups, axis)
        value = torch.tensor([float(rank)])
        if group is not None:
            dist.all_reduce(value, group=group)
        sums[axis] = value.item()
    return groups.ranks, sums


@pytest.mark.slow
def test_groups_on_four_gloo_ranks():
    results = spawn_ranks(_groups_worker, 4, 2, 2, 1)
    for rank, (ranks, sums) in enumerate(results):
        assert ranks["sp"] == ([0, 1] if rank < 2 else [2, 3])
        assert ranks["dp"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert ranks["dp_sp"] == [0, 1, 2, 3] and ranks["pp"] == [rank]
        for axis in ("sp", "dp", "dp_sp", "pp"):
            assert sums[axis] == sum(ranks[axis])


@pytest.mark.slow
def test_tp_groups_on_four_gloo_ranks():
    results = spawn_ranks(_groups_worker, 4, 1, 2, 1, 2)
    for rank, (ranks, sums) in enumerate(results):
        assert ranks["tp"] == ranks["pp_tp"] == ([0, 1] if rank < 2 else [2, 3])
        assert ranks["sp"] == ranks["dp_sp"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert ranks["dp"] == ranks["pp"] == [rank]
        for axis in ("sp", "dp", "dp_sp", "pp", "tp"):
            assert sums[axis] == sum(ranks[axis])


def _failing_worker(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_spawn_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        spawn_ranks(_failing_worker, 2)
