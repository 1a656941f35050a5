"""Costs of work that runs beside the layers' kernels on a GPU (planner/contention.py,
planner/efficiency.py): compute slowed by the collectives hidden under it, and the runtime's
per-microbatch gradient bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest

from planner.collectives import zero_microbatch_seconds
from planner.tp_collectives import tp_comm_seconds, tp_gemm_groups
from planner.contention import tp_contention_seconds, zero_contention_seconds
from planner.costmodel import Candidate, CostParams, layer_cost
from planner.efficiency import (MEMORY_EFFICIENCY, NCCL_CTAS, device_family,
                                elementwise_bytes_per_token, gemm_seconds,
                                grad_bookkeeping_bytes_per_param, layer_gemms)
from planner.hardware import CLUSTER_PRESETS
from planner.shapes import MODEL_PRESETS

H100 = CLUSTER_PRESETS["8xh100-80g"]
PARAMS = CostParams(gpu_collective_latency_s=0.0)


def test_collective_slowdown_is_the_share_of_sms_nccl_holds():
    assert device_family("H100-SXM-80G").collective_slowdown == pytest.approx(NCCL_CTAS / 132)
    assert device_family("A100-80G").collective_slowdown == pytest.approx(NCCL_CTAS / 108)
    assert device_family("B200").collective_slowdown < device_family("A800-80G").collective_slowdown


def test_hidden_zero_collectives_slow_the_compute_under_them():
    cand = Candidate(dp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=3)
    n, units = 1e9, 10
    kw = dict(backward_resident_params=0, param_bytes=2, grad_bytes=4)
    total, _ = zero_microbatch_seconds(H100, PARAMS, cand, n, units, microbatch_compute_s=1.0,
                                       backward_s=0.5, overlap=False, **kw)
    share = device_family(H100.device_name).collective_slowdown
    # ample windows: all but the first gather and the last bucket hide, and slow the compute
    ample = dict(microbatch_compute_s=30 * total, backward_s=20 * total)
    exposed, _ = zero_microbatch_seconds(H100, PARAMS, cand, n, units, overlap=True, **ample, **kw)
    slow, per_step = zero_contention_seconds(H100, PARAMS, cand, n, units, **ample, **kw)
    assert 0 < exposed < total and per_step == 0
    assert slow == pytest.approx(share * (total - exposed))
    # no window to hide in: nothing runs beside compute, nothing slows it
    none = dict(microbatch_compute_s=1e-9, backward_s=1e-9)
    assert zero_contention_seconds(H100, PARAMS, cand, n, units, **none, **kw)[0] == pytest.approx(0, abs=1e-9)
    # a CPU node: gloo's seconds are all exposed already (planner.collectives)
    cpu = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=8)
    assert zero_contention_seconds(cpu, PARAMS, cand, n, units, **ample, **kw) == (0.0, 0.0)


def test_tp_collectives_pipelined_with_gemms_slow_them():
    shape, tokens, tp, k = MODEL_PRESETS["llama3-8b"], 8192, 4, 4
    family = device_family(H100.device_name)
    # the layer's projections as K GEMMs of tokens / K rows each (planner.costmodel)
    gemms = [k * gemm_seconds(family, H100.flops("bf16"), m / k, n, kk, 2)
             for m, n, kk in layer_gemms(shape, tokens, tp)]
    exposed = tp_comm_seconds(shape, "bf16", H100, tokens, tp, PARAMS, "forward", chunks=k,
                              gemm_s=tp_gemm_groups(gemms))
    total = tp_comm_seconds(shape, "bf16", H100, tokens, tp, PARAMS, "forward", chunks=k)
    assert 0 < exposed < total
    slow = tp_contention_seconds(shape, "bf16", H100, tokens, tp, PARAMS, "forward", chunks=k,
                                 exposed_s=exposed)
    assert slow == pytest.approx(family.collective_slowdown * (total - exposed))
    # blocking collectives (one block) hide nothing
    assert tp_contention_seconds(shape, "bf16", H100, tokens, tp, PARAMS, "forward", chunks=1,
                                 exposed_s=total) == 0.0
    # the layer's forward (its recompute: token-local work + TP collectives) carries it
    cand = Candidate(dp=1, tp=tp, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    lc = layer_cost(shape, "bf16", H100, cand, seq_len=tokens, micro_batch_size=1, params=PARAMS,
                    tp_overlap_chunks=k)
    elementwise = (elementwise_bytes_per_token(shape, "bf16", tp)[0] * tokens
                   / (family.hbm_bw * MEMORY_EFFICIENCY))
    assert lc.recompute_s == pytest.approx(sum(gemms) + elementwise + exposed + slow)


@pytest.mark.parametrize("stage,dtype,reduce,want", [
    (0, "bf16", "fp32", 10), (1, "bf16", "bf16", 10),   # fp32 accumulation: read 4 + 2, write 4
    (2, "bf16", "fp32", 10), (3, "bf16", "bf16", 6),    # packing: zeros r, read b, write r
    (3, "fp32", "fp32", 12)])
def test_gradient_bookkeeping_bytes_follow_the_runtime(stage, dtype, reduce, want):
    assert grad_bookkeeping_bytes_per_param(stage, dtype, reduce) == want


def test_gradient_bookkeeping_enters_every_stage_once_per_microbatch():
    from planner.candidates import build_stages, bytes_per_token
    from planner.costmodel import stage_params
    from planner.request import PlanRequest

    shape = MODEL_PRESETS["llama3-8b"]
    req = PlanRequest(model=shape, hardware=H100, dtype="bf16", seq_len=4096)
    family = device_family(H100.device_name)
    for stage_kind, reduce in ((1, "fp32"), (3, "bf16")):
        cand = Candidate(dp=4, sp=1, sp_kind="ulysses", pp=2, num_microbatches=4, zero_stage=stage_kind)
        req = dataclasses.replace(req, grad_reduce_dtype=reduce)
        setups, _ = build_stages(req, cand, PARAMS, bytes_per_token(req, cand, None))
        first = setups[0]   # not the last stage: no head, only the bookkeeping
        want = (stage_params(shape, 2, 0) * grad_bookkeeping_bytes_per_param(stage_kind, "bf16", reduce)
                / (family.hbm_bw * MEMORY_EFFICIENCY))
        assert first.head_compute_s == pytest.approx(want)
