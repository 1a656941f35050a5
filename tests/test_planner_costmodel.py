"""Cost-model formulas against hand-computed cases."""

from __future__ import annotations

import pytest

from planner.analytic import layer_flops_per_token, layer_saved_bytes_per_token, model_flops_per_token
from planner.collectives import call_latency, step_collective_calls, zero3_tail_chunks
from planner.costmodel import (Candidate, CostParams, bubble_fraction, comm_times, group_bandwidth,
                               inflight_microbatches, layer_cost, model_state_bytes,
                               ring_p2p_bytes, shard_group_span, stage_layer_ranges, stage_params,
                               step_time, throughput, ulysses_alltoall_bytes, zero_step_bytes,
                               pipeline_group_span, ring_p2p_backward_bytes, tiled_layer_cost,
                               working_base_bytes)
from planner.hardware import GB, CLUSTER_PRESETS, HardwareSpec
from planner.shapes import MODEL_PRESETS, ModelShape

SHAPE = ModelShape(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                   vocab_size=100)
HW = HardwareSpec(name="t", nodes=2, devices_per_node=4, device_memory_bytes=10**10,
                  peak_flops={"fp32": 1e12, "bf16": 4e12}, host_memory_bytes=10**11,
                  host_link_bw=10 * GB, intra_node_bw=100 * GB, inter_node_bw=10 * GB)


def test_layer_params_by_hand():
    # q,o: 64*64 each; k,v: 64*32 each; MLP 3*64*128; two norms 2*64
    assert SHAPE.layer_params() == 2 * 4096 + 2 * 2048 + 3 * 8192 + 128 == 36992


def test_model_states_by_zero_stage():
    n = 1000
    # bf16: compute parameters in bf16, gradients accumulated in fp32 (as the runtime holds them)
    assert model_state_bytes(n, "bf16", 0, 8) == {"parameters": 2000, "gradients": 4000, "optimizer": 12000}
    assert model_state_bytes(n, "bf16", 1, 8) == {"parameters": 2000, "gradients": 4000, "optimizer": 1500}
    assert model_state_bytes(n, "bf16", 2, 8) == {"parameters": 2000, "gradients": 500, "optimizer": 1500}
    assert model_state_bytes(n, "bf16", 3, 8) == {"parameters": 250, "gradients": 500, "optimizer": 1500}
    # fp32 training has no separate master copy: Adam m and v only
    assert model_state_bytes(n, "fp32", 3, 4) == {"parameters": 1000, "gradients": 1000, "optimizer": 2000}


def test_llama2_7b_states_alone_exceed_one_a800_without_zero():
    shape = MODEL_PRESETS["llama2-7b"]
    total = sum(model_state_bytes(shape.num_params(), "bf16", 0, 1).values())
    assert total == 18 * shape.num_params()
    assert total > 80 * 2**30


def test_pipeline_bubble_and_inflight():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 8) == 0
    assert [inflight_microbatches(4, 8, s) for s in range(4)] == [4, 3, 2, 1]
    assert [inflight_microbatches(4, 2, s) for s in range(4)] == [2, 2, 2, 1]


def test_step_time_composition():
    st = step_time(microbatch_compute_s=1.0, microbatch_recompute_s=0.5, microbatch_exposed_transfer_s=0.25,
                   microbatch_comm_s=0.25, step_comm_s=0.5, step_optimizer_s=0.1, pp=4, num_microbatches=8)
    assert st.compute == 8.0 and st.recompute == 4.0 and st.exposed_transfer == 2.0
    assert st.exposed_communication == 8 * 0.25 + 0.5
    assert st.bubble == 3 * 2.0
    assert st.total == pytest.approx(8 * 2.0 + 0.5 + 6.0 + 0.1)
    # bubble share of the schedule part equals (p - 1) / (m + p - 1)
    assert st.bubble / (st.bubble + 8 * 2.0) == pytest.approx(bubble_fraction(4, 8))


def test_communication_volumes_by_hand():
    tokens = 1000
    # Ulysses sp=2: q (64) + out (64) + k, v (2 * 32) per token, bf16, half leaves the rank
    assert ulysses_alltoall_bytes(SHAPE, "bf16", tokens, 2) == (128 + 64) * 1000 * 2 * 1 / 2
    # sp=4 > 2 kv heads: each rank holds one replicated KV head, so k, v are 4 heads * 16 wide
    assert ulysses_alltoall_bytes(SHAPE, "bf16", tokens, 4) == (128 + 128) * 1000 * 2 * 3 / 4
    assert ulysses_alltoall_bytes(SHAPE, "bf16", tokens, 1) == 0
    # ring: K and V of the local block (2 * 32 per token, fp32) passed sp - 1 = 3 times
    assert ring_p2p_bytes(SHAPE, "fp32", tokens, 4) == 3 * 1000 * 64 * 4
    # bf16 training gathers bf16 parameters (2 bytes) and reduces gradients in fp32 (4 bytes)
    # by default; 7/8 of each leaves the rank
    per_mb, per_step = zero_step_bytes(1000, "bf16", 3, 8, 4)
    assert (per_mb, per_step) == ((2 * 2000 + 4000) * 7 / 8, 0.0)
    assert zero_step_bytes(1000, "bf16", 3, 8, 4, backward_resident_params=100) == (
        ((2000 - 100) * 2 + 4000) * 7 / 8, 0.0)
    assert zero_step_bytes(1000, "bf16", 3, 8, 4, grad_reduce_dtype="bf16") == (3 * 2000 * 7 / 8, 0.0)
    assert zero_step_bytes(1000, "fp32", 2, 8, 4) == (4000 * 7 / 8, 4000 * 7 / 8)
    assert zero_step_bytes(1000, "fp32", 1, 8, 4) == (0.0, 2 * 4000 * 7 / 8)
    assert zero_step_bytes(1000, "bf16", 1, 8, 4) == (0.0, (4000 + 2000) * 7 / 8)
    assert zero_step_bytes(1000, "bf16", 0, 8, 4) == (0.0, 2 * 4000 * 7 / 8)
    assert zero_step_bytes(1000, "bf16", 2, 1, 4) == (0.0, 0.0)
    # ring backward: K/V again plus fp32 dK/dV totals, sp hops
    assert ring_p2p_backward_bytes(SHAPE, "fp32", tokens, 4) == (3 + 4) * 1000 * 64 * 4


def test_group_span_and_bandwidth():
    params = CostParams(comm_efficiency=1.0)
    # grid (dp, pp, sp): dp=2, pp=2, sp=2 -> dp x sp group members {0, 1, 4, 5}: span 6 > 4 per node
    # grid (pp, dp, sp): the dp x sp group is 4 consecutive ranks; stages are 4 ranks apart
    cand = Candidate(dp=2, sp=2, sp_kind="ring", pp=2, num_microbatches=4, zero_stage=3)
    assert shard_group_span(cand) == 4
    assert pipeline_group_span(cand) == 5
    assert group_bandwidth(HW, 6, params) == 10 * GB
    assert group_bandwidth(HW, 2, params) == 100 * GB


def test_layer_cost_times_by_hand():
    params = CostParams(matmul_efficiency=0.5, attention_efficiency=0.25, attention_backward_factor=2.5)
    cand = Candidate(dp=1, sp=2, sp_kind="ring", pp=1, num_microbatches=1, zero_stage=0)
    lc = layer_cost(SHAPE, "fp32", HW, cand, seq_len=2048, micro_batch_size=1, params=params)
    tokens = 1024
    tl = 2 * 36992 * tokens / (1e12 * 0.5)
    attn = 2 * 2048 * 64 * tokens / (1e12 * 0.25)
    assert lc.tokens == tokens
    assert lc.forward_s == pytest.approx(tl + attn)
    assert lc.backward_s == pytest.approx(2 * tl + 2.5 * attn)
    assert lc.recompute_s == pytest.approx(tl)
    per_token = layer_saved_bytes_per_token(SHAPE, "fp32")
    assert lc.token_local_bytes == per_token.token_local * tokens
    assert lc.plain_bytes == per_token.plain_total * tokens
    # packed documents: only the attention core shrinks, to the documents' share
    packed = layer_cost(SHAPE, "fp32", HW, cand, seq_len=2048, micro_batch_size=1, params=params,
                        attention_fraction=0.25)
    assert packed.forward_s == pytest.approx(tl + 0.25 * attn)
    assert packed.backward_s == pytest.approx(2 * tl + 2.5 * 0.25 * attn)
    assert packed.recompute_s == pytest.approx(tl)


def test_saved_bytes_formula_by_hand():
    # fp32, H=64, KV=32, N=4, F=128 (see analytic.py): input 4H, attention out 4H + 4N,
    # token-local: two norms (rsqrt 4 + normed 4H), their weighted outputs (2 * 4H), q (4H),
    # k and v (2 * 4KV), the residual h the MLP norm saves (4H), gate/silu/up/product (4 * 4F)
    per = layer_saved_bytes_per_token(SHAPE, "fp32")
    assert per.input_saved == 256 and per.attention_output == 256 + 16
    assert per.token_local == 2 * (4 + 256) + 2 * 256 + 256 + 2 * 128 + 256 + 4 * 4 * 128
    bf16 = layer_saved_bytes_per_token(SHAPE, "bf16")
    assert bf16.input_saved == 0          # RMSNorm saves its fp32 copy instead
    # norms: fp32 copy (4H) + rsqrt + bf16 normed (2H); weighted outputs, q, k, v; no h
    assert bf16.token_local == 2 * (256 + 4 + 128) + 2 * 128 + 128 + 2 * 64 + 4 * 2 * 128


def test_mlp_tiling_shrinks_saved_bytes_and_working_set():
    cand = Candidate(dp=1, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    lc = layer_cost(SHAPE, "bf16", HW, cand, seq_len=4096, micro_batch_size=1, params=CostParams())
    tiled = tiled_layer_cost(lc, SHAPE, "bf16", 1024)
    intermediates = 4096 * 4 * 2 * 128        # gate, silu, up, product: 4 x bf16 x F per token
    for field in ("token_local_bytes", "mlp_bytes", "plain_bytes"):
        assert getattr(lc, field) - getattr(tiled, field) == intermediates
    assert tiled.input_bytes == lc.input_bytes and tiled.forward_s == lc.forward_s
    assert tiled_layer_cost(lc, SHAPE, "bf16", 0) is lc
    assert tiled_layer_cost(lc, SHAPE, "bf16", 4096) is lc    # one tile: untiled
    # the runtime's backward phases (planner.working_set, measured by test_working_set.py):
    # a tile's rebuilt intermediates and gradients instead of the whole sequence's
    from planner.working_set import layer_backward_working_bytes
    whole = working_base_bytes(lc, SHAPE, "bf16", 0)
    assert whole == layer_backward_working_bytes(SHAPE, 2, 4096)
    tiled_base = working_base_bytes(lc, SHAPE, "bf16", 1024)
    assert tiled_base == layer_backward_working_bytes(SHAPE, 2, 4096, mlp_chunk_tokens=1024)
    assert tiled_base < whole


def test_stages_and_params():
    assert stage_layer_ranges(10, 4) == ((0, 3), (3, 6), (6, 8), (8, 10))
    shape = MODEL_PRESETS["llama2-7b"]
    total = sum(stage_params(shape, 4, s) for s in range(4))
    assert total == shape.num_params()


def test_throughput_and_mfu_by_hand():
    shape = SHAPE
    flops = model_flops_per_token(shape, 512)
    per_layer = layer_flops_per_token(shape, 512)
    assert flops == 3 * (4 * (per_layer.token_local + per_layer.attention) + 2 * 100 * 64)
    tps, mfu = throughput(shape, HW, "fp32", seq_len=512, global_batch_size=8, step_s=2.0)
    assert tps == 512 * 8 / 2.0
    assert mfu == pytest.approx(flops * tps / (1e12 * 8))


def test_ulysses_comm_is_exposed_ring_overlaps():
    params = CostParams(comm_efficiency=1.0)
    shape, hw = MODEL_PRESETS["llama2-7b"], CLUSTER_PRESETS["8xa800-80g"]
    common = dict(stage_layers=32, stage_num_params=0, tokens=8192, microbatch_compute_s=100.0,
                  params=params)
    uly = Candidate(dp=1, sp=8, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    per_mb, _ = comm_times(shape, "bf16", hw, uly, attention_forward_s=1.0, **common)
    # 1x forward + 2x backward (the backward re-sends q, k, v and out with dout); each of the
    # 4 NCCL calls per layer pays the GPU call latency
    latency = params.gpu_collective_latency_s
    # NVLink's datasheet figure counts both directions: a rank sends at half of it
    assert per_mb == pytest.approx(3 * 32 * ulysses_alltoall_bytes(shape, "bf16", 8192, 8) / (hw.intra_node_bw / 2)
                                   + 32 * 4 * latency)
    ring = Candidate(dp=1, sp=8, sp_kind="ring", pp=1, num_microbatches=1, zero_stage=0)
    hidden, _ = comm_times(shape, "bf16", hw, ring, attention_forward_s=1.0, **common)
    calls = 32 * (3 * 8 - 2) * latency     # only the per-hop latency remains
    assert hidden == pytest.approx(calls)  # K/V passing fits under the block's attention
    exposed, _ = comm_times(shape, "bf16", hw, ring, attention_forward_s=0.0, **common)
    fwd_bwd = ring_p2p_bytes(shape, "bf16", 8192, 8) + ring_p2p_backward_bytes(shape, "bf16", 8192, 8)
    assert exposed == pytest.approx(32 * fwd_bwd / (hw.intra_node_bw / 2) + calls)


def test_cpu_collectives_are_exposed_and_pay_latency_per_call():
    # On a CPU node gloo shares the cores: ring passing and ZeRO gathers hide under nothing,
    # each call costs the measured latency, and each kind its measured bandwidth.
    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2)
    params = CostParams()
    common = dict(stage_num_params=10**6, tokens=512, microbatch_compute_s=100.0,
                  attention_forward_s=100.0, params=params)
    ring = Candidate(dp=1, sp=2, sp_kind="ring", pp=1, num_microbatches=1, zero_stage=0)
    per_mb, _ = comm_times(SHAPE, "fp32", hw, ring, stage_layers=4, **common)
    p2p = ring_p2p_bytes(SHAPE, "fp32", 512, 2) + ring_p2p_backward_bytes(SHAPE, "fp32", 512, 2)
    assert per_mb == pytest.approx(4 * (p2p / (hw.intra_node_bw * params.comm_efficiency)
                                        + 4 * hw.intra_node_latency_s))
    z3 = Candidate(dp=2, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=3)
    per_mb, per_step = comm_times(SHAPE, "fp32", hw, z3, stage_layers=4, stage_units=6, **common)
    bw = hw.intra_node_collective_bw
    vol = 10**6 * 4 / 2
    # the step's two scalar all-reduces (the loss, the gradient norm's sum of squares)
    syncs = 2 * (8 / bw["all_reduce"] + hw.intra_node_latency_s)
    assert per_step == pytest.approx(syncs)
    # ZeRO-3: each layer chunk gathered twice, the embedding / norm / head chunks once
    units = 6 + zero3_tail_chunks(SHAPE, 1) - 1
    assert per_mb == pytest.approx(2 * vol / bw["all_gather"] + vol / bw["reduce_scatter"]
                                   + (units + 4 + units) * hw.intra_node_latency_s)
    z1 = Candidate(dp=2, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=1)
    per_mb, per_step = comm_times(SHAPE, "fp32", hw, z1, stage_layers=4, stage_units=6, **common)
    assert per_mb == 0.0
    assert per_step == pytest.approx(vol / bw["all_gather"] + vol / bw["reduce_scatter"]
                                     + 12 * hw.intra_node_latency_s + syncs)


def test_measured_latency_per_kind_prices_each_kind():
    # a node whose calls were timed per kind (probe, or a CPU profile between compute segments)
    # prices each kind's calls at its own latency; unmeasured kinds keep the all-kinds figure
    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2)
    timed = hw.replace(intra_node_collective_latency_s={"all_to_all": 3e-3})
    assert call_latency(timed, 1e-5, "all_to_all") == 3e-3
    assert call_latency(timed, 1e-5, "all_gather") == hw.intra_node_latency_s
    uly = Candidate(dp=1, sp=2, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    common = dict(stage_num_params=10**6, tokens=512, microbatch_compute_s=1.0,
                  attention_forward_s=1.0, params=CostParams(), stage_layers=4)
    base, _ = comm_times(SHAPE, "fp32", hw, uly, **common)
    more, _ = comm_times(SHAPE, "fp32", timed, uly, **common)
    calls = step_collective_calls(SHAPE, uly, stage_layers=4, num_microbatches=1)["all_to_all"]
    assert more - base == pytest.approx(calls * (3e-3 - hw.intra_node_latency_s))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_gpt_block_params_flops_and_gemms_agree(mlp):
    """Per block kind, the GPU path's GEMM list does exactly the analytic matmul FLOPs
    (2 x weights per token; a GeLU MLP has 2 matrices, SwiGLU 3) and MLP tiling cuts exactly
    what the MLP saves."""
    from planner.costmodel import mlp_intermediate_bytes
    from planner.efficiency import layer_gemms

    shape = SHAPE.replace(mlp=mlp, ffn_hidden_size=256)
    h, f = shape.hidden_size, shape.ffn_hidden_size
    assert shape.layer_params() - 2 * h == 2 * h * h + 2 * h * shape.kv_dim + shape.mlp_matrices * h * f
    tokens = 96
    gemm_flops = sum(2 * m * n * k for m, n, k in layer_gemms(shape, tokens, 1))
    assert gemm_flops == (layer_flops_per_token(shape, 512).token_local - 4 * h) * tokens
    saved = layer_saved_bytes_per_token(shape, "bf16")
    without_mlp = layer_saved_bytes_per_token(shape.replace(ffn_hidden_size=1), "bf16")
    assert mlp_intermediate_bytes(shape, "bf16", tokens) == pytest.approx(
        (saved.mlp - without_mlp.mlp) * tokens * f / (f - 1))


def test_learned_positions_sit_on_the_first_stage():
    gpt = SHAPE.replace(positions="learned", max_seq_len=512)
    assert gpt.num_params() == SHAPE.num_params() + 512 * 64
    assert stage_params(gpt, 2, 0) == stage_params(SHAPE, 2, 0) + 512 * 64
    assert stage_params(gpt, 2, 1) == stage_params(SHAPE, 2, 1)
