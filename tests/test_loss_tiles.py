"""The tiled loss in the cost model (`planner.loss_tiles`) against the runtime's loss: its
collectives per tile, its fresh blocks, and the priced time's growth with the tile count."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from planner.costtypes import CostParams
from planner.hardware import CLUSTER_PRESETS
from planner.loss_tiles import (HEAD_TP_COLLECTIVES, LOSS_ALL_REDUCES_PER_TILE, TILE_BLOCKS,
                                head_comm_seconds, head_mapped_bytes, loss_head_seconds,
                                loss_tile_options, num_tiles, stage_head_seconds)
from planner.shapes import ModelShape

T, H, V = 256, 96, 4096
SHAPE = ModelShape(hidden_size=H, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=256,
                   vocab_size=V, max_seq_len=T)


@pytest.fixture
def fake_tp2():
    """A 2-rank tensor-parallel group on the fake backend (collectives are no-ops): the
    runtime's vocabulary-parallel loss runs its tp=2 code path in this process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from disttrain.parallel.tp_comm import TensorParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        tp = TensorParallel(dist.group.WORLD)
        tp.vocab_size = V
        yield tp
    finally:
        dist.destroy_process_group()


def _tp_inputs(tp):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, T, H // tp.size, generator=gen).requires_grad_()
    weight = (torch.randn(V // tp.size, H, generator=gen) * 0.02).requires_grad_()
    return hidden, weight, torch.randint(V, (1, T), generator=gen)


@pytest.mark.parametrize("chunk", [0, 64, 32])
def test_vocab_parallel_collectives_per_tile_are_the_runtimes(fake_tp2, monkeypatch, chunk):
    from disttrain.parallel.tp_vocab import vocab_parallel_lm_loss

    calls = {"forward": {}, "backward": {}}
    phase = ["forward"]
    for kind, method in (("all_reduce", "all_reduce"), ("all_gather", "start_gather"),
                         ("reduce_scatter", "start_reduce_scatter")):
        original = getattr(type(fake_tp2), method)

        def counted(self, *args, _kind=kind, _original=original, **kwargs):
            calls[phase[0]][_kind] = calls[phase[0]].get(_kind, 0) + 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(type(fake_tp2), method, counted)
    hidden, weight, targets = _tp_inputs(fake_tp2)
    loss = vocab_parallel_lm_loss(fake_tp2, hidden, weight, targets, chunk)
    phase[0] = "backward"
    loss.backward()
    tiles = num_tiles(T, chunk)
    assert calls["forward"] == {**HEAD_TP_COLLECTIVES["forward"],
                                "all_reduce": LOSS_ALL_REDUCES_PER_TILE * tiles}
    assert calls["backward"] == HEAD_TP_COLLECTIVES["backward"]


def _blocks(sizes: list[int], tile: int, rows: int) -> tuple[int, int]:
    """(tile x rows fp32 blocks, rows x H fp32 blocks) among `sizes`."""
    return sizes.count(tile * rows * 4), sizes.count(rows * H * 4)


@pytest.mark.parametrize("chunk", [256, 64, 32])
def test_tile_blocks_are_what_the_runtime_allocates(fake_tp2, chunk):
    from disttrain.parallel.tp_vocab import vocab_parallel_lm_loss
    from disttrain.tiling import chunked_lm_loss
    from planner.profile_memory import record_allocations

    tiles = num_tiles(T, chunk)
    hidden, weight, targets = _tp_inputs(fake_tp2)
    sizes = record_allocations(
        lambda: vocab_parallel_lm_loss(fake_tp2, hidden, weight, targets, chunk).backward())
    per_tile, weight_tile, weight_call = TILE_BLOCKS["vocab_parallel"]
    assert _blocks(sizes, chunk, V // 2) == (per_tile * tiles, weight_tile * tiles + weight_call)
    full = torch.randn(1, T, H).requires_grad_()
    big = (torch.randn(V, H) * 0.02).requires_grad_()
    sizes = record_allocations(lambda: chunked_lm_loss(full, big, targets, chunk).backward())
    per_tile, weight_tile, weight_call = TILE_BLOCKS["chunked"]
    assert _blocks(sizes, chunk, V) == (per_tile * tiles, weight_tile * tiles + weight_call)
    # priced: every block of 1 MiB or more (threshold lowered so the small test shape counts)
    priced = head_mapped_bytes(SHAPE, tokens=T, chunk=chunk, tp=1, threshold=1)
    assert priced == sum(s for s in sizes if s in (chunk * V * 4, V * H * 4))


def test_priced_head_grows_with_the_tiles_by_the_per_tile_terms():
    hw = replace(CLUSTER_PRESETS["cpu-local"], devices_per_node=2)
    params = CostParams()
    fwd, bwd, tile_s = 0.04, 0.08, 1e-3
    untiled = loss_head_seconds(fwd, bwd, tokens=T, chunk=0, tp=1, tile_s=tile_s)
    assert untiled == (fwd, bwd)
    for chunk in (128, 64, 32):  # no tp: all in the forward, nothing recomputed
        tiled = loss_head_seconds(fwd, bwd, tokens=T, chunk=chunk, tp=1, tile_s=tile_s)
        assert tiled == pytest.approx((fwd + bwd + (T // chunk - 1) * tile_s, 0.0))
    comm = {c: head_comm_seconds(SHAPE, "fp32", hw, T, 2, num_tiles(T, c), params) for c in (0, 64)}
    assert comm[64][1] == comm[0][1] > 0                   # backward: no collective per tile
    latency = hw.intra_node_latency_s
    assert latency > 0
    assert comm[64][0] - comm[0][0] == pytest.approx(LOSS_ALL_REDUCES_PER_TILE * 3 * latency)
    tp_untiled = loss_head_seconds(fwd, bwd, tokens=T, chunk=0, tp=2, tile_s=tile_s, comm=comm[0])
    tp_tiled = loss_head_seconds(fwd, bwd, tokens=T, chunk=64, tp=2, tile_s=tile_s, comm=comm[64])
    assert tp_untiled[1] == pytest.approx(bwd + fwd + comm[0][1])  # the backward recomputes
    assert sum(tp_tiled) - sum(tp_untiled) == pytest.approx(
        3 * tile_s + LOSS_ALL_REDUCES_PER_TILE * 3 * latency)


def test_stage_head_uses_the_measured_tile_cost_and_splits_the_vocabulary():
    hw, params = replace(CLUSTER_PRESETS["cpu-local"], devices_per_node=2), CostParams()
    measured = (0.04, 0.08, 2e-3)
    one = stage_head_seconds(SHAPE, "fp32", hw, tokens=T, tp=1, chunk=32, params=params,
                             measured=measured)
    assert one == pytest.approx((0.12 + 7 * 2e-3, 0.0))
    two = stage_head_seconds(SHAPE, "fp32", hw, tokens=T, tp=2, chunk=0, params=params,
                             measured=measured)
    comm = head_comm_seconds(SHAPE, "fp32", hw, T, 2, 1, params)
    assert two == pytest.approx((0.02 + comm[0], 0.04 + 0.02 + comm[1]))


def test_loss_tile_options_untiled_then_larger_first():
    assert loss_tile_options(512, 64) == [0, 256, 128, 64]
    assert loss_tile_options(512, 0) == [0]


def test_profile_measures_a_positive_tile_cost():
    from disttrain.profiling import _Head
    from planner.profile_loss import measure_loss_tile_s

    torch.manual_seed(0)
    head = _Head(SHAPE, seed=0)
    assert measure_loss_tile_s(head, H, torch.float32, repeats=3) > 0
    assert measure_loss_tile_s(lambda x: x.sum(), H, torch.float32) == 0.0


def test_without_a_profile_each_tile_pays_its_weight_gradient_traffic():
    from planner.efficiency import MEMORY_EFFICIENCY, device_family
    from planner.loss_tiles import analytic_tile_s

    hw, params = CLUSTER_PRESETS["8xh100-80g"], CostParams()
    big = ModelShape(hidden_size=4096, num_layers=1, num_heads=32, num_kv_heads=8,
                     ffn_hidden_size=14336, vocab_size=128256, max_seq_len=8192)
    untiled = sum(stage_head_seconds(big, "bf16", hw, tokens=8192, tp=1, chunk=0, params=params))
    tiled = sum(stage_head_seconds(big, "bf16", hw, tokens=8192, tp=1, chunk=1024, params=params))
    tile_s = analytic_tile_s(big, "bf16", 1, params, device_family(hw.device_name).hbm_bw * MEMORY_EFFICIENCY)
    # bf16 product written and read, fp32 gradient read and written: 12 bytes per element
    assert tile_s == pytest.approx(12 * 128256 * 4096 / (device_family(hw.device_name).hbm_bw
                                                          * MEMORY_EFFICIENCY))
    assert tiled - untiled == pytest.approx(7 * tile_s)
