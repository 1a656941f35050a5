"""The plan's choice of how tensor parallelism's column-parallel backward runs its GEMMs
(`parallel.tp_column_backward`, disttrain/parallel/tp_linear.py): 'whole' (one GEMM per input /
weight gradient) where whole GEMMs are faster than tp GEMMs of H/tp features (GPUs, by their
efficiency curves), 'lean' where nothing is gained (CPU nodes: flat GEMM efficiency, and
'whole' transposes two (T, H/tp) tensors more). Memory does not decide: the two hold the same
bytes at every phase (planner.working_set; tests/test_working_set.py measures both runtimes), so
a plan whose memory binds picks 'whole' as one with room does. The field round-trips through
the plan JSON; a plan written before it existed reads as 'lean'."""

from __future__ import annotations

import json

import pytest

from planner.hardware import CLUSTER_PRESETS
from planner.plan import Plan
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS, ModelShape


def _gpu_plan(seq_len: int, column: str | None) -> Plan:
    # llama3-8b at tp8 on one H100 node: 4K tokens keep every layer, 128K must recompute
    return plan_job(PlanRequest(
        model=MODEL_PRESETS["llama3-8b"], hardware=CLUSTER_PRESETS["8xh100-80g"], dtype="bf16",
        seq_len=seq_len, global_batch_size=1, dp=1, tp=8, sp=1, pp=1, zero_stage=1,
        tp_column_backward=column), with_layout=False)


@pytest.mark.parametrize("seq_len,binds", [(4096, False), (131072, True)])
def test_gpu_plans_pick_whole_gemms_with_or_without_memory_room(seq_len, binds):
    auto, lean = _gpu_plan(seq_len, None), _gpu_plan(seq_len, "lean")
    assert auto.feasible and lean.feasible
    kept = [a.keep_all for a in auto.activations]
    assert (not all(kept)) == binds             # 128K: memory binds, layers are recomputed
    assert auto.parallel.tp_column_backward == "whole"
    assert lean.parallel.tp_column_backward == "lean"
    # the same working set either way; whole GEMMs run faster than tp narrow ones
    working = [p.prediction.bytes_by_category["working_set"] for p in (auto, lean)]
    assert working[0] == working[1] > 0
    assert auto.prediction.step_time_s < lean.prediction.step_time_s


def test_cpu_plans_keep_the_lean_layout():
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=128, vocab_size=64, max_seq_len=256)
    cpu = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2)
    plan = plan_job(PlanRequest(model=shape, hardware=cpu, seq_len=256,
                                global_batch_size=1, dp=1, tp=2, sp=1, pp=1),
                    with_layout=False)
    assert plan.feasible and plan.parallel.tp == 2
    assert plan.parallel.tp_column_backward == "lean"


def test_plan_json_round_trips_the_choice_and_old_plans_read_lean():
    plan = _gpu_plan(4096, None)
    data = json.loads(plan.to_json())
    assert data["parallel"]["tp_column_backward"] == "whole"
    assert Plan.from_dict(data).parallel.tp_column_backward == "whole"
    del data["parallel"]["tp_column_backward"]          # written before the field existed
    assert Plan.from_dict(data).parallel.tp_column_backward == "lean"
    data["parallel"]["tp_column_backward"] = "wide"
    with pytest.raises(ValueError, match=r"^parallel\.tp_column_backward: must be one of"):
        Plan.from_dict(data)
    with pytest.raises(ValueError, match=r"^tp_column_backward: must be one of"):
        PlanRequest(model=MODEL_PRESETS["llama3-8b"], hardware=CLUSTER_PRESETS["8xh100-80g"],
                    seq_len=4096, tp_column_backward="wide")
