"""Memory layout (bi-level DSA): the checker proves no overlap and catches one; the MIP
reaches the brute-force optimum on small instances and never does worse than best-fit."""

from __future__ import annotations

import itertools
import random

import pytest

from planner.layout import Block, best_fit, check_layout, max_live_bytes, plan_memory_layout, solve_layout
from planner.plan import LayerActivationPlan
from planner.shapes import MODEL_PRESETS


def random_blocks(seed: int, count: int) -> list[Block]:
    rng = random.Random(seed)
    blocks = []
    for index in range(count):
        start = rng.randint(0, 10)
        blocks.append(Block(name=f"t{index}", size_bytes=rng.randint(1, 9) * 1000, start=start,
                            end=start + rng.randint(0, 5)))
    return blocks


def test_checker_catches_overlap():
    a = Block(name="a", size_bytes=100, start=0, end=5)
    b = Block(name="b", size_bytes=100, start=3, end=8)
    c = Block(name="c", size_bytes=100, start=6, end=9)
    assert check_layout([a, b, c], {"a": 0, "b": 100, "c": 0}) == []      # a and c never co-live
    problems = check_layout([a, b, c], {"a": 0, "b": 50, "c": 0})
    assert problems == ["a [0, 100) overlaps b [50, 150)", "b [50, 150) overlaps c [0, 100)"]
    assert check_layout([a, b], {"a": 0}) == ["b: no offset"]


def brute_force_peak(blocks: list[Block]) -> int:
    """Best arena over every order in which blocks are stacked lowest-fit (exact for DSA)."""
    best = None
    for order in itertools.permutations(blocks):
        placed, peak = [], 0
        for block in order:
            busy = sorted((off, off + o.size_bytes) for o, off in placed if o.overlaps_in_time(block))
            offset = 0
            for low, high in busy:
                if offset + block.size_bytes <= low:
                    break
                offset = max(offset, high)
            placed.append((block, offset))
            peak = max(peak, offset + block.size_bytes)
        best = peak if best is None else min(best, peak)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_mip_matches_brute_force(seed):
    blocks = random_blocks(seed, 6)
    layout = solve_layout(blocks, time_limit_s=5)
    assert check_layout(blocks, layout.offsets) == []
    assert layout.arena_bytes == brute_force_peak(blocks)
    assert layout.arena_bytes >= max_live_bytes(blocks)


def test_mip_beats_greedy_somewhere():
    improved = 0
    for seed in range(30):
        blocks = random_blocks(seed, 12)
        greedy = best_fit(blocks)
        greedy_peak = max(greedy[b.name] + b.size_bytes for b in blocks)
        layout = solve_layout(blocks, time_limit_s=5)
        assert check_layout(blocks, layout.offsets) == []
        assert layout.arena_bytes <= greedy_peak
        improved += layout.arena_bytes < greedy_peak
    assert improved >= 1


def test_greedy_fallback_when_solver_stops_early(monkeypatch):
    import planner.layout as layout_module
    from planner.solve import SolveResult

    def timed_out(build, **kwargs):
        build(False)
        return None, SolveResult(backend="highs", status="No Solution Found", has_solution=False,
                                 proven_optimal=False, infeasible=False, objective=float("inf"),
                                 gap=float("inf"), solve_time_s=kwargs["time_limit_s"])

    monkeypatch.setattr(layout_module, "solve_model", timed_out)
    # an instance where best-fit is above the live-bytes bound, so the MIP would be asked
    blocks = next(b for b in (random_blocks(seed, 12) for seed in range(100))
                  if max(best_fit(b)[x.name] + x.size_bytes for x in b) > max_live_bytes(b))
    layout = solve_layout(blocks, time_limit_s=0.01)
    assert layout.method == "greedy" and "No Solution Found" in layout.status
    assert layout.offsets == best_fit(blocks)
    assert check_layout(blocks, layout.offsets) == []


def test_bi_level_layout_of_a_plan():
    shape = MODEL_PRESETS["small"]
    acts = (LayerActivationPlan(keep_all=True),) + tuple(
        LayerActivationPlan(swap_fraction=0.5, swap_input=i % 2 == 0) for i in range(shape.num_layers - 1))
    layout = plan_memory_layout(shape, "bf16", 4096, acts)
    assert layout["fragmentation_ratio"] >= 1.0 and layout["inner_fragmentation_ratio"] >= 1.0
    outer = layout["outer"]
    assert set(outer["offsets"]) == {"layer_arena"} | {f"layer_{i}_kept" for i in range(shape.num_layers)}
    assert layout["arena_bytes"] == outer["arena_bytes"] >= outer["max_live_bytes"]
