"""Embedding, final norm and output head states as chunks like any other (issue 14): the stage
MIP places them against brute force, the planner holds them as CPU chunks when the device
needs the room (and says so in the plan and its report), and the runtime trains with them on
the CPU exactly as plain single-process PyTorch does (fp32, same seed)."""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import replace

import pytest
import torch

from disttrain.data import build_batches
from disttrain.engine import _first_chunk_ids, _local_cpu_chunks, build_runtime
from disttrain.model import build_model
from disttrain.parallel.chunks import outer_chunk_name, pack_chunks
from disttrain.parallel.pipeline import build_stage_module
from disttrain.planning import fixed_plan
from disttrain.spec import job_from_dict
from planner.costtypes import CostParams
from planner.hardware import CLUSTER_PRESETS
from planner.mip import NoSolution, evaluate_stage, solve_stage
from planner.outer import OuterChunk
from planner.plan import ModelStatePlan, Plan, TilingPlan
from planner.report import render_summary
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS
from test_planner_mip import GIB, layer_options, random_problem
from test_planner_report import _text

# ---- the stage MIP -------------------------------------------------------------------------


def _with_outer(seed: int):
    rng = random.Random(100 + seed)
    outer = tuple(OuterChunk(
        name=name, num_params=1.0, parameters_bytes=rng.uniform(0.2, 1) * GIB,
        gradients_bytes=rng.uniform(0.5, 2) * GIB, optimizer_bytes=rng.uniform(1, 4) * GIB,
        host_bytes=rng.uniform(2, 8) * GIB, link_bytes=rng.uniform(1, 10) * GIB,
        cpu_optimizer_s=rng.uniform(0, 6), device_optimizer_s=rng.uniform(0, 1))
        for name in ("embedding", "head"))
    problem = random_problem(seed, num_layers=1)
    return replace(problem, outer_chunks=outer, num_chunks=1,
                   device_capacity_bytes=problem.device_capacity_bytes + rng.uniform(0, 8) * GIB)


def _brute_force(problem) -> tuple[float, set]:
    best, placements = float("inf"), set()
    for acts in itertools.product(list(layer_options()), repeat=len(problem.layers)):
        for persistent, outer in itertools.product(range(problem.num_chunks + 1),
                                                   itertools.product((False, True), repeat=2)):
            for buffers in ((1, 2) if persistent < problem.num_chunks else (0,)):
                ev = evaluate_stage(problem, acts, persistent, buffers, outer_on_cpu=outer)
                if ev.feasible and ev.objective_s < best - 1e-12:
                    best, placements = ev.objective_s, {outer}
                elif ev.feasible and ev.objective_s <= best + 1e-12:
                    placements.add(outer)
    return best, placements


def test_mip_places_outer_chunks_as_brute_force_does():
    chosen = set()
    for seed in range(12):
        problem = _with_outer(seed)
        expected, placements = _brute_force(problem)
        if expected == float("inf"):
            with pytest.raises(NoSolution):
                solve_stage(problem, gap_rel=0.0)
            continue
        solution = solve_stage(problem, gap_rel=0.0)
        assert solution.evaluation.feasible, solution.evaluation.violations
        assert solution.evaluation.objective_s == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert solution.outer_on_cpu in placements
        chosen.add(solution.outer_on_cpu)
    assert len(chosen) >= 2, chosen  # the instances exercise the choice


def test_outer_chunk_on_cpu_moves_its_states_to_the_host():
    problem = _with_outer(0)
    acts = (layer_options().__next__(),) * len(problem.layers)
    dev = evaluate_stage(problem, acts, 1, 0, outer_on_cpu=(False, False))
    cpu = evaluate_stage(problem, acts, 1, 0, outer_on_cpu=(True, False))
    emb = problem.outer_chunks[0]
    assert dev.device_bytes - cpu.device_bytes == pytest.approx(emb.gradients_bytes + emb.optimizer_bytes)
    assert cpu.host_bytes - dev.host_bytes == pytest.approx(emb.host_bytes)
    with pytest.raises(ValueError, match="outer_on_cpu"):
        evaluate_stage(problem, acts, 1, 0, outer_on_cpu=(True,))


# ---- the planner ---------------------------------------------------------------------------

TWO_POOLS = CostParams(single_pool_on_cpu=False)
"""A CPU node planned as device + host (the default plans it as one pool: no CPU chunks)."""


def _tight_request(device_mib: float, **fixed) -> PlanRequest:
    """A vocabulary-heavy model whose ZeRO-3 embedding / head states barely fit on the device."""
    shape = MODEL_PRESETS["tiny"].replace(vocab_size=32768, num_layers=2)
    hw = CLUSTER_PRESETS["cpu-local"].replace(device_memory_bytes=int(device_mib * 2**20),
                                              devices_per_node=2)
    return PlanRequest(model=shape, hardware=hw, seq_len=256, dp=2, sp=1, pp=1, tp=1,
                       zero_stage=3, activation_offload="cpu", global_batch_size=2, **fixed)


def test_planner_holds_outer_states_on_the_cpu_when_the_device_needs_the_room():
    roomy = plan_job(_tight_request(512), params=TWO_POOLS, with_layout=False)
    assert roomy.feasible and roomy.model_states.cpu_outer == ()
    # 16 B/param fp32 ZeRO-3 over 2: 2 x 4.2M params of embedding + head = 67 MiB of states
    tight = plan_job(_tight_request(48), params=TWO_POOLS, with_layout=False)
    assert tight.feasible, tight.rejected[0]["reason"]
    assert tight.model_states.cpu_outer, tight.model_states
    assert tight.prediction.host_bytes > 0
    cats = tight.prediction.bytes_by_category
    assert sum(cats.values()) == tight.prediction.per_rank_peak_bytes
    assert Plan.from_dict(tight.to_dict()) == tight
    shown = " + ".join(tight.model_states.cpu_outer) + " states as CPU chunks (CPU optimizer)"
    assert shown in _text(render_summary(tight))
    assert "embedding, final norm + head on the device" in _text(render_summary(roomy))


@pytest.mark.parametrize("params", [TWO_POOLS, CostParams()], ids=["two-pools", "one-pool"])
def test_infeasible_reason_parts_add_up_with_outer_chunks(params):
    plan = plan_job(_tight_request(8), params=params, with_layout=False)
    assert not plan.feasible
    assert all(r["shortfall_bytes"] is None or r["shortfall_bytes"] > 0 for r in plan.rejected)
    reason = plan.rejected[0]["reason"]
    assert reason.startswith("needs at least") and "outer_shards" in reason, reason
    match = re.search(r"needs at least ([\d.]+) (GiB|MiB)", reason)
    total = float(match.group(1)) * (1024 if match.group(2) == "GiB" else 1)
    parts = [float(x) * (1024 if unit == "GiB" else 1) for x, unit in
             re.findall(r"[a-z_]+ ([\d.]+) (GiB|MiB)", reason.split(" = ", 1)[1].split(" > ")[0])]
    assert sum(parts) == pytest.approx(total, rel=0.02, abs=0.2)
    # one pool: no chunk can leave the device, so the reason counts them there and says no CPU
    one_pool = params.single_pool_on_cpu
    assert ("chunks_the_host_cannot_take" in reason) == one_pool, reason
    assert ("on the CPU" in reason) != one_pool, reason


def test_plan_rejects_unknown_outer_names():
    with pytest.raises(ValueError, match="model_states.cpu_outer"):
        ModelStatePlan(cpu_outer=("lm_head",))


# ---- the runtime ---------------------------------------------------------------------------

SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
             vocab_size=512, max_seq_len=1024)


def _spec(tie: bool) -> dict:
    return {"name": "outer", "model": {"dtype": "fp32", **SHAPE, "tie_embeddings": tie},
            "train": {"seq_len": 32, "micro_batch_size": 1, "global_batch_size": 2, "steps": 2,
                      "lr": 1e-2, "min_lr": 1e-2, "seed": 0, "grad_clip": 0.0,
                      "weight_decay": 0.1},
            "data": {"kind": "synthetic"}, "cluster": {"preset": "cpu-local"},
            "launch": {"launcher": "local"}, "output_dir": "/tmp/disttrain-outer"}


def _train(job, plan: Plan):
    runtime = build_runtime(job, plan)
    batches = build_batches("synthetic", None, vocab_size=SHAPE["vocab_size"],
                            seq_len=plan.seq_len, micro_batch_size=1, seed=0)
    history = [runtime.train_step(step, batches, 1e-2) for step in range(job.spec.train.steps)]
    states = runtime.states
    params = (states.full_state_dict() if hasattr(states, "full_state_dict")
              else {n: p.detach().clone() for n, p in runtime.model.named_parameters()})
    places = states.bytes_by_place()
    runtime.close()
    return history, params, places


def test_pipeline_stages_name_their_outer_chunks():
    model = build_model(MODEL_PRESETS["tiny"].replace(num_layers=4, vocab_size=2048), seed=0)
    layer = sum(p.numel() for p in model.layers[0].parameters())
    names = []
    for stage in range(3):
        module = build_stage_module(model, stage, ((0, 1), (1, 3), (3, 4)))
        names.append(sorted(outer_chunk_name(module, c) for c in pack_chunks(module, chunk_numel=layer,
                                                                             group_size=1) if not c.layers))
    # the head (larger than a layer) packs apart from the final norm: both are 'head'
    assert names == [["embedding"], [], ["head", "head"]]


@pytest.mark.parametrize("tie", [False, True])
def test_outer_cpu_chunks_train_as_plain_pytorch(tie):
    job = job_from_dict(_spec(tie))
    ref_history, ref_params, _ = _train(job, fixed_plan(job, 1))  # torch.optim.AdamW
    layer_bytes = 4 * job.shape.layer_params()
    base = fixed_plan(job, 1)
    plan = Plan.from_dict({**base.to_dict(),
                           "parallel": {**base.parallel.__dict__, "zero_stage": 3},
                           "model_states": ModelStatePlan(chunk_size_bytes=layer_bytes,
                                                          cpu_outer=("embedding", "head")).__dict__,
                           "tiling": TilingPlan().__dict__})
    model = build_model(job.shape, seed=0)
    local = _local_cpu_chunks(model, plan, _first_chunk_ids(model, plan))
    chunks = pack_chunks(model, chunk_numel=job.shape.layer_params(), group_size=1)
    assert {outer_chunk_name(model, chunks[i]) for i in local} == {"embedding", "head"}
    assert all(not chunks[i].layers for i in local)
    history, params, places = _train(job, plan)
    assert [h[0] for h in history] == pytest.approx([h[0] for h in ref_history], rel=1e-6)
    assert [h[1] for h in history] == pytest.approx([h[1] for h in ref_history], rel=1e-5)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=2e-5, msg=name)
    outer = job.shape.embedding_params()
    assert places["cpu"]["optimizer"] == 8 * outer  # the moments of embedding, norm and head
