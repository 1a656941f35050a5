"""Cost-model findings of the held-out published runs (bench/heldout.py) turned into unit
checks: a layout the runtime cannot run is refused with the reason, not priced as a memory
shortfall."""

from __future__ import annotations

from planner.grid import enumerate_candidates
from planner.hardware import CLUSTER_PRESETS
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS


def _request(**kw) -> PlanRequest:
    return PlanRequest(model=MODEL_PRESETS["llama3-8b"], hardware=CLUSTER_PRESETS["8xh100-80g"],
                       dtype="bf16", seq_len=8192, micro_batch_size=1, global_batch_size=8, **kw)


def test_selective_with_tensor_parallelism_is_refused_by_name():
    """torchtitan's FSDP8 TP8 per-op SAC row: op-level selective checkpointing is priced at
    tp 1 only (planner.costmodel), so a fixed tp > 1 with recompute 'selective' used to come
    back as 'device memory binds' from the stage solver. The layout step names the cause."""
    cands, rejected, _ = enumerate_candidates(_request(tp=2, recompute="selective"))
    assert not cands
    assert rejected and all("recompute 'selective' with tp=2" in r["reason"] for r in rejected)
    plan = plan_job(_request(tp=2, dp=4, sp=1, pp=1, recompute="selective"))
    assert not plan.feasible and "op-level checkpointing runs at tp 1" in plan.rejected[0]["reason"]


def test_selective_leaves_tp1_and_other_policies_keep_tp():
    cands, _, _ = enumerate_candidates(_request(recompute="selective"))
    assert cands and {c.tp for c in cands} == {1}
    cands, _, _ = enumerate_candidates(_request(tp=2, recompute="full"))
    assert cands and {c.tp for c in cands} == {2}
