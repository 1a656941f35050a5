"""GPU cost-model mechanisms against hand-computed cases: GEMM-shape and attention-length
efficiency, hierarchical collectives, tensor parallelism's bytes and collectives, interleaved
1F1B."""

from __future__ import annotations

import pytest

from planner.collectives import collective_seconds, tp_pipeline_exposed
from planner.tp_collectives import (TP_BULK, TP_COLLECTIVES, TP_NORM_ALL_REDUCES, tp_all_reduce_seconds,
                                    tp_backward_gemms, tp_gemm_groups)
from planner.costmodel import (Candidate, CostParams, bubble_fraction, inflight_microbatches,
                               layer_cost, tp_comm_seconds)
from planner.analytic import layer_flops_per_token
from planner.contention import tp_contention_seconds
from planner.efficiency import (MEMORY_EFFICIENCY, attention_efficiency, device_family,
                                elementwise_bytes_per_token, gemm_efficiency, gemm_seconds,
                                layer_gemms)
from planner.hardware import CLUSTER_PRESETS, GB
from planner.shapes import MODEL_PRESETS

H100 = device_family("H100-80G")
A100 = device_family("A100-80G")


def test_families_by_name():
    assert device_family("cpu") is None and device_family("mystery-gpu") is None
    assert device_family("A100-40G").hbm_bw < A100.hbm_bw       # 40 GB part: HBM2, 1.55 TB/s
    assert device_family("H100-96G-HBM2e").name == "H100-HBM2e"
    assert device_family("NVIDIA B200").name == "B200"


def test_gemm_efficiency_drops_for_small_shards():
    assert gemm_efficiency(H100, 8192, 8192, 8192) == pytest.approx(H100.gemm_max)
    small = gemm_efficiency(H100, 512, 4096, 4096)
    assert small == pytest.approx(H100.gemm_max * (512 / 640) * (4096 / 4224) ** 2 / (8192 / 8320) ** 3)
    # a 64-token shard is memory-bound: the HBM roofline sets its time
    t = gemm_seconds(H100, 989e12, 64, 4096, 4096, 2)
    assert t == pytest.approx(2 * (64 * 4096 * 2 + 4096 * 4096) / (H100.hbm_bw * 0.8))


def test_attention_efficiency_grows_with_length_and_head_dim():
    short = attention_efficiency(A100, 512, 128, False)
    long = attention_efficiency(A100, 131072, 128, False)
    assert short == pytest.approx(A100.attn_fwd_max / 2)
    assert long > 0.99 * A100.attn_fwd_max
    assert attention_efficiency(A100, 131072, 64, False) < long
    assert attention_efficiency(A100, 131072, 128, True) < long


def test_hierarchical_collective_by_hand():
    hw = CLUSTER_PRESETS["8xh100-80g"].replace(nodes=4)
    sent = 31 / 32 * 1e9                      # reduce-scatter of a 1 GB buffer over 32 ranks
    intra, inter = 400 * GB, 40 * GB
    t = collective_seconds(hw, "reduce_scatter", sent, 32, 1, 1, intra_bw=intra, inter_bw=inter,
                           latency_s=1e-5, inter_latency_s=2e-5)
    # NVLink and NIC shares move at once (one ring): the slower link sets the time
    assert t == pytest.approx(max(1e9 * 7 / 8 / intra, 1e9 / 8 * 3 / 4 / inter) + 3e-5)
    slow_nic = collective_seconds(hw, "reduce_scatter", sent, 32, 1, 1, intra_bw=intra, inter_bw=inter / 10,
                                  latency_s=1e-5, inter_latency_s=2e-5)
    assert slow_nic == pytest.approx(1e9 / 8 * 3 / 4 / (inter / 10) + 3e-5)
    # inside one node: bytes over the intra-node rate only
    assert collective_seconds(hw, "all_gather", 7 / 8 * 1e9, 8, 1, 2, intra_bw=intra, inter_bw=inter,
                              latency_s=1e-5, inter_latency_s=2e-5) == pytest.approx(7 / 8 * 1e9 / intra + 2e-5)
    # stride 2 (tp=2 inside): 4 members per node, the inter-node step moves a quarter
    t2 = collective_seconds(hw, "reduce_scatter", 15 / 16 * 1e9, 16, 2, 1, intra_bw=intra,
                            inter_bw=inter, latency_s=0, inter_latency_s=0)
    assert t2 == pytest.approx(max(1e9 * 3 / 4 / intra, 1e9 / 4 * 3 / 4 / inter))


def test_tensor_parallel_divides_bytes_and_adds_collectives():
    shape, hw, params = MODEL_PRESETS["llama3-8b"], CLUSTER_PRESETS["8xh100-80g"], CostParams()
    one = Candidate(dp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=3)
    four = Candidate(dp=2, tp=4, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=3)
    kw = dict(seq_len=8192, micro_batch_size=1, params=params)
    a, b = layer_cost(shape, "bf16", hw, one, **kw), layer_cost(shape, "bf16", hw, four, **kw)
    for field in ("token_local_bytes", "plain_bytes", "input_bytes", "attention_output_bytes"):
        assert getattr(b, field) == pytest.approx(getattr(a, field) / 4)
    comm = tp_comm_seconds(shape, "bf16", hw, 8192, 4, params)
    sent = 8192 * 4096 * 2 * 3 / 4
    rate = hw.intra_node_bw / 2 * params.comm_efficiency
    # + the two RMSNorms' all-reduces of one fp32 value per token
    norms = 2 * (2 * 8192 * 4 * 3 / 4 / rate + params.gpu_collective_latency_s)
    assert comm == pytest.approx(4 * (sent / rate + params.gpu_collective_latency_s) + norms)
    assert b.recompute_s > comm and b.forward_s < a.forward_s



def test_tp_overlap_pipeline_exposes_the_first_block_or_what_the_gemms_cannot_hide():
    assert tp_pipeline_exposed(3.0, 10.0, 1) == 3.0                 # blocking: all of it
    assert tp_pipeline_exposed(3.0, 10.0, 4) == pytest.approx(0.75)  # GEMM-bound: one block
    assert tp_pipeline_exposed(3.0, 1.0, 4) == pytest.approx(3.0 - 0.75)  # comm-bound
    assert TP_COLLECTIVES == {"forward": {"all_gather": 2, "reduce_scatter": 2},
                              "backward": {"all_gather": 4, "reduce_scatter": 2}}
    assert tp_gemm_groups([1, 2, 3, 4, 5, 6, 7]) == {"attention_in": 6, "attention_out": 4,
                                                     "mlp_in": 11, "mlp_out": 7}


@pytest.mark.parametrize("mode", ["lean", "whole"])
def test_column_parallel_backward_priced_as_bulk_overlap_with_whole_gemms(mode):
    shape, hw, params = MODEL_PRESETS["llama3-8b"], CLUSTER_PRESETS["8xh100-80g"], CostParams()
    tokens, tp = 4096, 8
    sent = tokens * shape.hidden_size * 2 * (tp - 1) / tp
    one = sent / (hw.intra_node_bw / 2 * params.comm_efficiency) + params.gpu_collective_latency_s
    assert TP_BULK == {("backward", "attention_in"), ("backward", "mlp_in")}
    # GEMMs longer than a collective: the bulk pairs hide all; the row-parallel pipelines
    # (attention_out, mlp_out: one gather each over 4 blocks) expose their first block
    big = dict.fromkeys(("attention_in", "attention_out", "mlp_in", "mlp_out"), 1.0)
    first = (sent / (hw.intra_node_bw / 2 * params.comm_efficiency)
             + 4 * params.gpu_collective_latency_s) / 4
    norms = TP_NORM_ALL_REDUCES * tp_all_reduce_seconds(hw, tokens, tp, params)  # blocking
    assert tp_comm_seconds(shape, "bf16", hw, tokens, tp, params, "backward", chunks=4,
                           gemm_s=big) == pytest.approx(2 * first + norms)
    # GEMMs shorter than a collective: each bulk collective exposes what its GEMM cannot
    # hide, one call each (not one per block)
    tiny = dict.fromkeys(big, 0.25 * one)
    whole = dict(tiny, attention_in=0.5 * one, mlp_in=0.5 * one)
    got = tp_comm_seconds(shape, "bf16", hw, tokens, tp, params, "backward", chunks=4,
                          gemm_s=tiny, whole_gemm_s=whole)
    # the row-parallel gathers hide beside the input-gradient blocks only (1 x the GEMMs)
    row = tp_pipeline_exposed(one + 3 * params.gpu_collective_latency_s, 0.25 * one, 4)
    assert got == pytest.approx(2 * row + 4 * 0.5 * one + norms)
    # the backward's GEMMs: row-parallel (o = index 3, down = last) input gradient per block
    # and weight gradient whole, column-parallel both whole or as given (one GEMM per rank's
    # block of the input features, as the runtime runs them)
    assert tp_backward_gemms([10, 11, 12, 13, 14, 15, 16], [1, 2, 3, 4, 5, 6, 7]) == [
        2, 4, 6, 17, 10, 12, 23]
    assert tp_backward_gemms([10, 11, 12, 13, 14, 15, 16], [1, 2, 3, 4, 5, 6, 7],
                             [20, 30, 40, 50, 60, 70, 80]) == [40, 60, 80, 17, 120, 140, 23]
    tp8 = Candidate(dp=1, tp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=1)
    kw = dict(seq_len=4096, micro_batch_size=1, params=params)
    blocked = layer_cost(shape, "bf16", hw, tp8, tp_overlap_chunks=4, tp_column_backward=mode,
                         **kw)
    assert blocked.tp_column_backward == mode
    family, peak = device_family(hw.device_name), hw.flops("bf16")
    gemms = layer_gemms(shape, tokens, tp)
    split = [4 * gemm_seconds(family, peak, m / 4, n, k, 2) for m, n, k in gemms]
    unsplit = [gemm_seconds(family, peak, m, n, k, 2) for m, n, k in gemms]
    # the layer's backward: 2 x (row-parallel GEMMs per block + column-parallel ones whole),
    # element-wise, attention and the exposed collectives against those GEMMs
    flops = layer_flops_per_token(shape, 4096).attention * tokens / tp
    attn_b = 2.5 * flops / (peak * attention_efficiency(family, 4096, shape.head_dim, True))
    # 'whole' transposes the shard and the reduced gradient of q/k/v's and gate/up's backward:
    # 2 x 2 x (read + write) of T x H/tp
    copies = 8 * 2 * shape.hidden_size / tp if mode == "whole" else 0
    ew_b = ((elementwise_bytes_per_token(shape, "bf16", tp)[1] + copies) * tokens
            / (family.hbm_bw * MEMORY_EFFICIENCY))
    # 'lean': the column-parallel GEMMs per rank's block of the input features
    column = [tp * gemm_seconds(family, peak, m, n, k / tp, 2) for m, n, k in gemms]
    assert all(c > u for c, u in zip(column, unsplit))  # narrower GEMMs run less efficiently
    column = column if mode == "lean" else unsplit
    # the bulk-overlapped collectives beside those GEMMs as they run
    comm_b = tp_comm_seconds(shape, "bf16", hw, tokens, tp, params, "backward", chunks=4,
                             gemm_s=tp_gemm_groups(split), whole_gemm_s=tp_gemm_groups(column))
    gemm_b = sum(tp_backward_gemms(split, unsplit, column))
    # plus the GEMMs slowed by the collectives hidden under them (planner.contention)
    slowed = tp_contention_seconds(shape, "bf16", hw, tokens, tp, params, "backward", chunks=4,
                                   exposed_s=comm_b)
    assert slowed > 0
    assert blocked.backward_s == pytest.approx(gemm_b + ew_b + attn_b + comm_b + slowed)


def test_tp_overlap_chunks_priced_on_gpus_and_blocking_on_cpu_nodes():
    shape, params = MODEL_PRESETS["llama3-8b"], CostParams()
    tp8 = Candidate(dp=1, tp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=1)
    kw = dict(seq_len=4096, micro_batch_size=1, params=params)
    gpu = CLUSTER_PRESETS["8xh100-80g"]
    blocking = layer_cost(shape, "bf16", gpu, tp8, tp_overlap_chunks=1, **kw)
    chosen = layer_cost(shape, "bf16", gpu, tp8, **kw)
    assert chosen.tp_overlap_chunks > 1
    assert chosen.forward_s + chosen.backward_s < blocking.forward_s + blocking.backward_s
    cpu = CLUSTER_PRESETS["cpu-local"]
    tp2 = Candidate(dp=1, tp=2, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    assert layer_cost(shape, "fp32", cpu, tp2, **kw).tp_overlap_chunks == 1
    groups = {"attention_in": 1.0, "attention_out": 1.0, "mlp_in": 1.0, "mlp_out": 1.0}
    forced = tp_comm_seconds(shape, "fp32", cpu, 4096, 2, params, chunks=4, gemm_s=groups)
    assert forced >= tp_comm_seconds(shape, "fp32", cpu, 4096, 2, params)  # no overlap on CPU

def test_interleaved_schedule_bubble_and_inflight():
    assert bubble_fraction(4, 8, virtual=2) == pytest.approx(1.5 / 9.5)
    assert bubble_fraction(4, 8, virtual=2) < bubble_fraction(4, 8)
    # Megatron's warm-up on rank 0: 2(p-1) + (v-1)p + 1 = 11 chunk forwards of half a stage
    assert inflight_microbatches(4, 8, 0, virtual=2) == 6
    assert inflight_microbatches(4, 8, 3, virtual=2) == 3
    assert inflight_microbatches(4, 2, 0, virtual=2) == 2


def test_page_cache_and_tiled_rebuild_in_the_working_set():
    from dataclasses import replace

    from planner.costmodel import LayerCost
    from planner.mip import StageProblem, evaluate_stage
    from planner.plan import LayerActivationPlan

    lc = LayerCost(tokens=1000, input_bytes=100.0, attention_output_bytes=100.0,
                   token_local_bytes=1000.0, mlp_bytes=500.0, plain_bytes=1200.0, forward_s=1.0,
                   backward_s=2.0, recompute_s=0.5, qkv_bytes=200.0)
    problem = StageProblem(layers=(lc, lc), inflight=1, slots=1, device_capacity_bytes=1e9,
                           fixed_device_bytes=0.0, host_capacity_bytes=1e9, nvme_capacity_bytes=1e9,
                           host_link_bw=1e9, nvme_read_bw=1e9, nvme_write_bw=1e9)
    acts = (LayerActivationPlan(swap_fraction=1.0, tier="nvme"),) * 2
    whole = evaluate_stage(problem, acts, 0).working_bytes
    assert whole == 1000.0 + 1000.0             # rebuilt layer 1 + layer 0 being prefetched
    cached = evaluate_stage(replace(problem, page_cache_reads=True), acts, 0).working_bytes
    assert cached == whole + 1000.0             # the read also sits in the page cache
    tiled = evaluate_stage(replace(problem, rebuild_fraction=0.25), acts, 0).working_bytes
    # q, k, v whole (200) + a quarter of the rest (200), for the rebuilt and the prefetched layer
    assert tiled == 2 * (200.0 + 0.25 * 800.0)


def test_power_capped_part_runs_tensor_kernels_at_the_cube_root_clock():
    capped = device_family("H100-96G-HBM2e")
    assert capped.clock_factor == pytest.approx((500 / 700) ** (1 / 3))
    assert H100.clock_factor == 1.0 and A100.clock_factor == 1.0
    # the law against NVIDIA's datasheets: H100 NVL (400 W) 835 vs H100 SXM (700 W) 989 dense
    # bf16 TFLOP/s, same 132 SMs, within 2%
    assert (400 / 700) ** (1 / 3) == pytest.approx(835 / 989, rel=0.02)
    assert gemm_efficiency(capped, 8192, 8192, 8192) == pytest.approx(capped.clock_factor * capped.gemm_max)
    assert attention_efficiency(capped, 1 << 17, 128, False) < attention_efficiency(H100, 1 << 17, 128, False)
    # a memory-bound shard is not slowed (HBM clock is not the tensor clock)
    assert gemm_seconds(capped, 989e12, 64, 4096, 4096, 2) == pytest.approx(
        2 * (64 * 4096 * 2 + 4096 * 4096) / (capped.hbm_bw * 0.8))


def test_eager_elementwise_bytes_count_each_kernel():
    from planner.efficiency import elementwise_bytes_per_token
    shape = MODEL_PRESETS["llama3-8b"]
    h, f, kv = shape.hidden_size, shape.ffn_hidden_size, shape.kv_dim
    forward, backward = elementwise_bytes_per_token(shape, "bf16", 1)
    # per element: RMSNorm 36 B (upcast 6, square 8, mean 4, scale 8, downcast 6, weight 4),
    # RoPE 18 B on q and k, SiLU x up 10 B, a residual add 6 B
    assert forward == pytest.approx(2 * 36 * h + 18 * (h + kv) + 10 * f + 2 * 6 * h)
    assert backward == pytest.approx(2 * forward)
    fp32, _ = elementwise_bytes_per_token(shape, "fp32", 1)
    assert fp32 == pytest.approx(2 * 28 * h + 36 * (h + kv) + 20 * f + 2 * 12 * h)   # no casts


def test_zero3_collectives_share_one_stream():
    from planner.collectives import zero_microbatch_seconds
    hw = CLUSTER_PRESETS["8xh100-80g"]
    params = CostParams(gpu_collective_latency_s=0.0)
    cand = Candidate(dp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=3)
    n = 1e9
    bw = hw.intra_node_bw / 2 * params.comm_efficiency
    gather = 2 * n * 2 * 7 / 8 / bw                 # bf16, forward + backward
    reduce = n * 4 * 7 / 8 / bw                     # fp32
    kw = dict(backward_resident_params=0, param_bytes=2, grad_bytes=4, overlap=True)
    # the backward alone would hide its gathers, and alone its reductions, not both
    bwd = 0.8 * (gather / 2 + reduce)
    assert bwd > max(gather / 2, reduce)
    per_mb, per_step = zero_microbatch_seconds(hw, params, cand, n, 10, microbatch_compute_s=bwd * 1.5,
                                               backward_s=bwd, **kw)
    assert per_mb == pytest.approx(gather / 2 + reduce - bwd) and per_step == 0
    # a long forward does not lend its slack to the backward's queue
    long_fwd, _ = zero_microbatch_seconds(hw, params, cand, n, 10, microbatch_compute_s=bwd + 10,
                                          backward_s=bwd, **kw)
    assert long_fwd == pytest.approx(per_mb)
    # ample windows: the first gather and the last bucket stay exposed
    hidden, _ = zero_microbatch_seconds(hw, params, cand, n, 10, microbatch_compute_s=100.0,
                                        backward_s=50.0, **kw)
    assert hidden == pytest.approx(gather / 20 + reduce / 10)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero012_reduction_overlaps_the_last_backward_except_one_bucket(stage):
    """Stages 0-1 reduce once per step during the last microbatch's backward, stage 2 every
    microbatch during its backward: exposed is what exceeds that backward, at least the last
    bucket; the stage 1-2 parameter all-gather after the update stays exposed."""
    from planner.collectives import zero_microbatch_seconds
    hw = CLUSTER_PRESETS["8xh100-80g"]
    params = CostParams(gpu_collective_latency_s=0.0)
    cand = Candidate(dp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=4, zero_stage=stage)
    n, units = 1e9, 10
    bw = hw.intra_node_bw / 2 * params.comm_efficiency
    reduce = (2 if stage == 0 else 1) * n * 4 * 7 / 8 / bw   # fp32 gradients
    gather = 0.0 if stage == 0 else n * 2 * 7 / 8 / bw        # bf16 parameters
    kw = dict(backward_resident_params=0, param_bytes=2, grad_bytes=4, overlap=True)
    exposed = {}
    for name, bwd in (("short", 0.25 * reduce), ("ample", 10 * reduce)):
        exposed[name] = zero_microbatch_seconds(hw, params, cand, n, units, backward_s=bwd,
                                                microbatch_compute_s=1.5 * bwd, **kw)
    want = {"short": 0.75 * reduce, "ample": reduce / units}
    for name, (per_mb, per_step) in exposed.items():
        if stage == 2:
            assert per_mb == pytest.approx(want[name]) and per_step == pytest.approx(gather)
        else:
            assert per_mb == 0 and per_step == pytest.approx(want[name] + gather)
    blocking = zero_microbatch_seconds(hw, params, cand, n, units, backward_s=10 * reduce,
                                       microbatch_compute_s=15 * reduce,
                                       **dict(kw, overlap=False))
    assert sum(blocking) == pytest.approx(reduce + gather)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_param_gather_hides_under_the_next_forward_except_the_first_chunk(stage):
    """`overlap_param_gather`: the post-update all-gather runs chunk by chunk beside the next
    step's first forward; exposed is the first chunk's gather and what the gathers need
    beyond that forward, max(g / U, g - f (U - 1) / U). Off, or on a CPU node, all of it."""
    from planner.collectives import comm_times, zero_microbatch_seconds
    hw = CLUSTER_PRESETS["8xh100-80g"]
    params = CostParams(gpu_collective_latency_s=0.0)
    cand = Candidate(dp=8, sp=1, sp_kind="ulysses", pp=1, num_microbatches=4, zero_stage=stage)
    n, units = 1e9, 10
    gather = n * 2 * 7 / 8 / (hw.intra_node_bw / 2 * params.comm_efficiency)
    kw = dict(backward_resident_params=0, param_bytes=2, grad_bytes=4, overlap=True)
    for forward, want in ((10 * gather, gather / units), (0.25 * gather, 0.775 * gather)):
        seconds = {on: zero_microbatch_seconds(hw, params, cand, n, units, backward_s=2 * forward,
                                               microbatch_compute_s=3 * forward,
                                               gather_overlap=on, **kw) for on in (False, True)}
        assert seconds[True][0] == seconds[False][0]              # per microbatch: unchanged
        assert seconds[False][1] - seconds[True][1] == pytest.approx(gather - want)
    # auto: on for GPUs, off on a CPU node (gloo shares the cores); asked for, as asked
    common = dict(stage_layers=4, stage_num_params=1e6, tokens=512, microbatch_compute_s=1.0,
                  attention_forward_s=0.1, params=params, stage_units=6)
    shape, cpu = MODEL_PRESETS["tiny"], CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2)
    z = Candidate(dp=2, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=stage)
    auto = comm_times(shape, "bf16", hw, z, **common)
    assert auto == comm_times(shape, "bf16", hw, z, overlap_param_gather=True, **common)
    assert auto[1] < comm_times(shape, "bf16", hw, z, overlap_param_gather=False, **common)[1]
    assert comm_times(shape, "bf16", cpu, z, **common) == comm_times(
        shape, "bf16", cpu, z, overlap_param_gather=False, **common)
