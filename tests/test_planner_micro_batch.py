"""The micro-batch size as a planner decision (`micro_batch_size=None`, the spec's auto): the
sizes offered per layout, the fastest kept (no int size plans faster), an int request
unchanged, and the layer-time pruning of unbuilt candidates leaving the plan unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from planner.grid import MAX_AUTO_MICRO_BATCH, enumerate_candidates, micro_batch_sizes
from planner.hardware import CLUSTER_PRESETS
from planner.request import PlanRequest
from planner.search import plan_job, search
from planner.shapes import MODEL_PRESETS


def request(**changes) -> PlanRequest:
    """A 'small' model at 2K tokens on one H100 node, 32 sequences a step: one layout (dp8)
    gives 4 per rank, so sizes 1, 2 and 4 compete; the GEMM curves make 4 fastest there."""
    base = dict(model=MODEL_PRESETS["small"], hardware=CLUSTER_PRESETS["8xh100-80g"],
                dtype="bf16", seq_len=2048, global_batch_size=32, micro_batch_size=None)
    return PlanRequest(**{**base, **changes})


def test_sizes_offered_divide_the_per_rank_batch():
    assert micro_batch_sizes(request(global_batch_size=384), 48) == [1, 2, 4, 8]
    assert micro_batch_sizes(request(global_batch_size=36), 1) == [1, 2, 3, 4, 6]
    assert max(micro_batch_sizes(request(global_batch_size=1024), 1)) == MAX_AUTO_MICRO_BATCH
    assert micro_batch_sizes(request(global_batch_size=32, num_microbatches=2), 4) == [4]
    assert micro_batch_sizes(request(global_batch_size=32, num_microbatches=3), 4) == []
    assert micro_batch_sizes(request(micro_batch_size=3), 4) == [3]     # fixed: as given
    with pytest.raises(ValueError, match="micro_batch_size: must be >= 1"):
        request(micro_batch_size=0)


def test_candidates_carry_their_size_and_microbatches():
    candidates, _, _ = enumerate_candidates(request(tp=1, sp=1))   # dp x pp = 8
    assert {(c.dp, c.micro_batch_size, c.num_microbatches) for c in candidates} == {
        (1, 1, 32), (1, 2, 16), (1, 4, 8), (1, 8, 4), (2, 1, 16), (2, 2, 8), (2, 4, 4),
        (2, 8, 2), (4, 1, 8), (4, 2, 4), (4, 4, 2), (4, 8, 1), (8, 1, 4), (8, 2, 2), (8, 4, 1)}
    fixed, _, _ = enumerate_candidates(request(tp=1, sp=1, pp=1, micro_batch_size=2))
    assert {c.micro_batch_size for c in fixed} == {2}
    _, rejected, _ = enumerate_candidates(request(tp=1, sp=1, pp=1, num_microbatches=3))
    assert any("num_microbatches=3 (fixed) does not divide the per-rank batch" in r["reason"]
               for r in rejected)


def test_auto_keeps_the_fastest_size():
    auto = plan_job(request(), with_layout=False)
    fixed = {m: plan_job(request(micro_batch_size=m), with_layout=False) for m in (1, 2, 4)}
    best = min(fixed.values(), key=lambda p: p.prediction.step_time_s)
    assert auto.feasible and auto.micro_batch_size == best.micro_batch_size
    assert auto.prediction.step_time_s == pytest.approx(best.prediction.step_time_s, rel=1e-3)
    assert auto.micro_batch_size > 1        # bigger GEMMs win here, and not the biggest size:
    assert fixed[1].prediction.step_time_s > auto.prediction.step_time_s
    par = auto.parallel
    assert par.num_microbatches * auto.micro_batch_size * par.dp == 32
    assert any(f"micro-batch size {auto.micro_batch_size} chosen by the planner" in note
               for note in auto.notes)
    assert not any("chosen by the planner" in note for note in fixed[1].notes)


def test_pruning_unbuilt_candidates_keeps_the_plan():
    req = request(global_batch_size=64)
    fast, rejected, _ = search(req)
    slow, _, _ = search(req, skip_by_layer_time=False)
    assert fast.cand == slow.cand and fast.step.total == slow.step.total
    assert any(r["reason"].startswith("pruned: layer-time lower bound") for r in rejected)
    same = dataclasses.replace(req, micro_batch_size=2)
    assert search(same)[0].cand == search(same, skip_by_layer_time=False)[0].cand
