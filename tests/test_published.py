"""The planner against published GPU runs (bench/published.py): a few fast calibration specs
must stay feasible, inside +-25% of the published tokens/s/GPU, with shallow pipelines, and
plan within the time target; a regression in the cost model fails here."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import published  # noqa: E402

from disttrain.spec import load_job  # noqa: E402
from planner.costmodel import Candidate, CostParams, layer_cost  # noqa: E402
from planner.efficiency import ATTENTION_KERNEL_TFLOPS  # noqa: E402
from planner.hardware import CLUSTER_PRESETS  # noqa: E402
from planner.request import PlanRequest  # noqa: E402
from planner.search import plan_job  # noqa: E402
from planner.shapes import MODEL_PRESETS  # noqa: E402

FAST = (("megatron-1p7b-48xh100", ("free", "fixed")),        # H100 SXM, Megatron, short sequence
        ("megatron-16b-192xh100", ("fixed",)),               # tensor parallelism (TP4)
        ("tt-llama3-8b-64xa100-fixed-dp", ("free",)),        # A100, FSDP64 fixed in the spec
        ("tt-llama2-13b-64xa100", ("fixed",)),               # A100, FSDP64, no recompute
        ("tt-llama2-70b-64xa100", ("fixed",)),               # A100, FSDP64, full recompute
        ("usp-llama3-8b-208k-16xa800", ("fixed",)),          # long sequence, ring attention
        ("tt-llama31-8b-128xh100", ("fixed",)),              # H100, FSDP128, selective op AC
        ("dsulysses-gpt7b-256k-32xa100-40g", ("free", "fixed")))  # 256K, cluster.attention_kernel
"""Rows inside the band whose plans take well under a second alone (`bench/published.py`
prints every row; the slow free searches of the big jobs stay out of the test)."""


@pytest.mark.parametrize("name,kinds", FAST)
def test_published_row_inside_the_band(name, kinds):
    job = load_job(published.SPECS / f"{name}.yaml")
    pub = published.PUBLISHED[name]
    free = published.free_request(job)
    requests = {"free": free, "fixed": dataclasses.replace(free, **pub["layout"])}
    for request in (requests[k] for k in kinds):
        row = published.plan_one(request)
        plan = row["plan"]
        assert plan.feasible
        assert abs(row["tok"] / pub["tok_s"] - 1) <= published.BAND, (name, row["layout"], row["tok"])
        assert plan.parallel.pp <= published.MAX_PP_SHORT
        assert row["wall"] <= 2 * published.TIME_LIMIT_S     # 10 s target; headroom for busy CI
        assert plan.prediction.mfu_noncausal > plan.prediction.mfu > 0
        if getattr(request, "recompute", "auto") == "selective":  # torchtitan's selective op AC
            assert all(a.selective for a in plan.activations)


def test_fixed_tensor_parallel_layout_is_planned():
    job = load_job(published.SPECS / "megatron-16b-192xh100.yaml")
    plan = plan_job(dataclasses.replace(job.plan_request(), tp=4, dp=48, pp=1, sp=1), with_layout=False)
    assert published.free_request(job).tp is None
    assert plan.feasible and plan.parallel.tp == 4 and plan.parallel.world_size == 192
    free = plan_job(dataclasses.replace(job.plan_request(), tp=1, dp=48, pp=1, sp=4, sp_kind="ulysses",
                                        zero_stage=0), with_layout=False)
    # TP divides the model states per rank by tp: ZeRO-0 states of 16B do not fit without it
    assert not free.feasible or free.prediction.bytes_by_category["optimizer"] > \
        plan.prediction.bytes_by_category["optimizer"]


def test_sequence_tiled_rebuild_makes_fpdt_feasible():
    job = load_job(published.SPECS / "fpdt-llama3-70b-4m-32xa100-40g.yaml")
    plan = plan_job(published.free_request(job), with_layout=False)
    assert plan.feasible
    assert plan.tiling.rebuild_tile_tokens > 0      # whole-sequence rebuild would not fit


def test_single_pool_cpu_node_offers_no_cpu_tier():
    hw = CLUSTER_PRESETS["cpu-local"].replace(device_memory_bytes=64 * 2**20)
    request = PlanRequest(model=MODEL_PRESETS["tiny"], hardware=hw, seq_len=1024)
    plan = plan_job(request, params=CostParams(single_pool_on_cpu=True), with_layout=False)
    assert plan.feasible
    assert all(a.keep_all or a.tier == "nvme" or (a.swap_fraction == 0 and not a.swap_input
                                                   and not a.swap_attention_output)
               for a in plan.activations)
    assert not plan.model_states.cpu_chunks and plan.prediction.host_bytes == 0


def test_single_pool_leanest_bound_counts_the_page_cache_and_stays_a_lower_bound():
    """One pool, NVMe only: the leanest bound (which sizes rebuild tiles and rejects layouts)
    counts a fetched layer twice (tensor + page cache) and stays below every policy's bytes."""
    import itertools
    from dataclasses import replace

    from planner.candidates import _leanest, _min_device
    from planner.mip import evaluate_stage
    from planner.plan import LayerActivationPlan
    from test_planner_mip import random_problem

    options = (LayerActivationPlan(keep_all=True), LayerActivationPlan(swap_fraction=0.0),
               LayerActivationPlan(swap_fraction=0.0, tier="nvme", swap_input=True,
                                   swap_attention_output=True),
               LayerActivationPlan(swap_fraction=1.0, tier="nvme", swap_input=True,
                                   swap_attention_output=True))
    for seed in range(5):
        problem = random_problem(seed)     # identical layers, as the planner builds them
        problem = replace(problem, layers=problem.layers[:1] * 3, allow_cpu=False, num_chunks=0,
                          page_cache_reads=True, rebuild_fraction=0.5)
        lean = _min_device(problem, _leanest(problem, 0.5))
        assert lean > _min_device(replace(problem, page_cache_reads=False),
                                  _leanest(replace(problem, page_cache_reads=False), 0.5))
        for acts in itertools.product(options, repeat=3):
            assert lean <= evaluate_stage(problem, acts, 0).device_bytes * (1 + 1e-9)


def test_copies_on_a_busy_cpu_node_are_exposed_in_full():
    """swap_beside_compute=False (one pool, every core computing): the evaluation and the MIP
    charge every copy second; with it the neighbours' compute hides them."""
    from dataclasses import replace

    from planner.mip import evaluate_stage, solve_stage
    from planner.plan import LayerActivationPlan
    from test_planner_mip import random_problem

    problem = random_problem(3)
    problem = replace(problem, layers=problem.layers[:1] * 2, allow_cpu=False, num_chunks=0,
                      device_capacity_bytes=1e15, nvme_capacity_bytes=1e15)
    lc = problem.layers[0]
    swap = LayerActivationPlan(swap_fraction=1.0, tier="nvme")
    busy = replace(problem, swap_beside_compute=False)
    ev = evaluate_stage(busy, (swap, swap), 0)
    write, read = lc.token_local_bytes / problem.nvme_write_bw, lc.token_local_bytes / problem.nvme_read_bw
    link = lc.token_local_bytes / problem.host_link_bw
    assert ev.exposed_swap_s == pytest.approx(2 * (max(link, write) + max(link, read)))
    assert evaluate_stage(problem, (swap, swap), 0).exposed_swap_s < ev.exposed_swap_s
    assert solve_stage(busy, time_limit_s=10).evaluation.objective_s >= (
        solve_stage(problem, time_limit_s=10).evaluation.objective_s)


def test_infeasible_reason_parts_add_up():
    request = PlanRequest(model=MODEL_PRESETS["llama2-70b"], hardware=CLUSTER_PRESETS["8xa800-80g"],
                          dtype="bf16", seq_len=1 << 22, tp=1, sp=8, pp=1, dp=1, sp_kind="ring",
                          zero_stage=3)
    plan = plan_job(request, with_layout=False)
    assert not plan.feasible
    assert all(r["shortfall_bytes"] is None or r["shortfall_bytes"] > 0 for r in plan.rejected)
    reason = plan.rejected[0]["reason"]
    assert reason.startswith("needs at least"), reason
    total = float(re.search(r"needs at least ([\d.]+) GiB", reason).group(1))
    parts = [float(x) * (1 if unit == "GiB" else 1 / 1024) for x, unit in
             re.findall(r"[a-z_]+ ([\d.]+) (GiB|MiB)", reason.split(" = ", 1)[1].split(" > ")[0])]
    assert len(parts) >= 4 and "activations" in reason
    assert sum(parts) == pytest.approx(total, rel=0.02)


def test_interleaved_schedule_is_planned_with_its_chunks():
    job = load_job(published.SPECS / "megatron-70b-768xh100.yaml")
    request = dataclasses.replace(published.free_request(job), tp=8, pp=2, dp=48, sp=1)
    plan = plan_job(request, with_layout=False)
    one_f_one_b = plan_job(dataclasses.replace(request, schedule="1f1b"), with_layout=False)
    assert plan.feasible and one_f_one_b.feasible
    assert plan.parallel.schedule == "interleaved-1f1b" and len(plan.parallel.stages) == 4
    assert plan.prediction.time_breakdown["bubble"] < one_f_one_b.prediction.time_breakdown["bubble"]
    assert len(plan.activations) == 84


def test_only_unpublished_micro_batch_sizes_are_left_to_the_planner():
    """Megatron-LM's README table gives no micro-batch size: auto, in both rows; torchtitan's
    configs give their local batch sizes: fixed as published."""
    for path in sorted(published.SPECS.glob("*.yaml")):
        size = load_job(path).plan_request().micro_batch_size
        layout = published.PUBLISHED[path.stem]["layout"] or {}
        assert "micro_batch_size" not in layout
        assert (size is None) == path.stem.startswith("megatron-"), (path.stem, size)


def test_published_flop_counts_follow_their_sources():
    """Megatron-DeepSpeed's 2023 count (Narayanan et al. eq. 3) is 4/3 of its no-recompute
    count under --checkpoint-activations; for a GPT block (multi-head, 4h GeLU) its attention
    and MLP terms equal Megatron-LM f2e5db4's general count, which differs only in the logit
    term (V/(12Lh) against V/(16Lh)); the converted rows reproduce the calibration README."""
    from planner.shapes import ModelShape

    gpt = ModelShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                     ffn_hidden_size=16384, vocab_size=50257, mlp="gelu", positions="learned",
                     max_seq_len=262144)
    s, V = 262144, published.padded_vocab(50257)
    assert V == 50304
    with_ac = published.megatron_deepspeed_flops_per_token(gpt, s, checkpoint_activations=True)
    without = published.megatron_deepspeed_flops_per_token(gpt, s, checkpoint_activations=False)
    assert with_ac / without == pytest.approx(4 / 3)
    L, h = gpt.num_layers, gpt.hidden_size
    logit_ds, logit_lm = 72 * L * h * h * V / (16 * L * h), 72 * L * h * h * V / (12 * L * h)
    assert without - logit_ds == pytest.approx(
        published.megatron_lm_flops_per_token(gpt, s) - logit_lm, rel=1e-12)
    # shared/published/README.md: TFLOP/s/GPU / 72 l h^2 (1 + s/6h + V/12hl)
    for name, tok in (("megatron-1p7b-48xh100", 36259), ("megatron-16b-192xh100", 4820),
                      ("megatron-32b-384xh100", 2297), ("megatron-70b-768xh100", 941)):
        assert published.PUBLISHED[name]["tok_s"] == tok
    assert published.PUBLISHED["dsulysses-gpt7b-256k-32xa100-40g"]["tok_s"] == round(174e12 / with_ac)


def test_attention_kernel_generation_is_opt_in():
    from planner.efficiency import (ATTENTION_KERNEL_TFLOPS, attention_efficiency,
                                    device_family)

    a100 = device_family("A100-40G")
    for bwd in (False, True):
        own = attention_efficiency(a100, 1 << 18, 128, bwd)
        assert attention_efficiency(a100, 1 << 18, 128, bwd, "flash-attn-2") == own
        assert attention_efficiency(a100, 1 << 18, 128, bwd, "flash-attn-1") == pytest.approx(
            own * ATTENTION_KERNEL_TFLOPS["flash-attn-1"] / ATTENTION_KERNEL_TFLOPS["flash-attn-2"])
    with pytest.raises(ValueError, match="kernel"):
        attention_efficiency(device_family("H100"), 1 << 18, 128, False, "flash-attn-1")
    with pytest.raises(ValueError, match="kernel"):
        attention_efficiency(a100, 1 << 18, 128, False, "flash-attn-0")


def test_as_published_price_adds_only_the_attention_core_recompute():
    """Without recompute the price is the plan's; with it, every layer's forward rerun as
    planned, attention core included, at the spec's kernel: flash-attn-1's attention forward
    counted once (the table ratio over the device curve's), not a second time on top."""
    name = "dsulysses-gpt7b-256k-32xa100-40g"
    pub = published.PUBLISHED[name]
    request = dataclasses.replace(published.free_request(load_job(published.SPECS / f"{name}.yaml")),
                                  **pub["layout"])
    assert request.hardware.attention_kernel == "flash-attn-1"    # the spec says so
    own = dataclasses.replace(request, hardware=request.hardware.replace(attention_kernel=None))
    plan = plan_job(request, with_layout=False)
    par = plan.parallel
    assert (par.pp, par.num_microbatches) == (1, 1)               # one slot per step
    step = plan.prediction.step_time_s
    price = published.as_published_step
    assert price(request, plan, recompute_attention=False) == pytest.approx(step)
    recompute = price(request, plan, recompute_attention=True)
    assert recompute > step
    # priced the same plan with the device curve's kernel, the rerun differs only by the
    # attention forward's kernel ratio over all layers
    cand = Candidate(dp=par.dp, sp=par.sp, sp_kind=par.sp_kind, pp=1, tp=par.tp,
                     num_microbatches=1, zero_stage=par.zero_stage)
    kw = dict(seq_len=request.seq_len, micro_batch_size=plan.micro_batch_size, params=CostParams())
    attn = lambda hw: (lambda lc: lc.forward_s - lc.recompute_s)(  # noqa: E731
        layer_cost(request.model, request.dtype, hw, cand, **kw))
    ratio = ATTENTION_KERNEL_TFLOPS["flash-attn-2"] / ATTENTION_KERNEL_TFLOPS["flash-attn-1"]
    assert attn(request.hardware) == pytest.approx(ratio * attn(own.hardware))
    assert recompute - price(own, plan, recompute_attention=True) == pytest.approx(
        request.model.num_layers * (attn(request.hardware) - attn(own.hardware)))
