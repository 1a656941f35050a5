"""Cost model: per-rank memory by category and step time for one candidate. Pure functions.

No torch here: every input is a number, a `ModelShape`, a `HardwareSpec` or a profile's
per-token bytes, so the planner runs on a laptop for a cluster that is not there.

Rank grid: `arange(world).view(dp, pp, sp)` - sp innermost (intra-node first), then pp,
then dp. Model states are sharded over the dp x sp group (sequence-parallel ranks hold the
same parameters). Times are per rank; a step is (m + p - 1) slots of one microbatch's
forward + backward on the slowest stage (1F1B), so the bubble is (p - 1)/(m + p - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.analytic import (FP32, SavedBytesPerToken, kv_heads_per_rank,
                              layer_flops_per_token, layer_saved_bytes_per_token,
                              model_flops_per_token)
from planner.hardware import GiB, HardwareSpec
from planner.shapes import DTYPE_BYTES, ModelShape


@dataclass(frozen=True, kw_only=True)
class CostParams:
    """Efficiency factors and allowances the cost model applies to peak numbers."""

    matmul_efficiency: float = 0.6
    """Achieved fraction of peak FLOP/s in projections and MLP."""
    attention_efficiency: float = 0.5
    """Achieved fraction of peak FLOP/s in the attention core."""
    attention_backward_factor: float = 2.5
    """Attention backward time / forward time (flash recomputes the scores)."""
    comm_efficiency: float = 0.8
    """Achieved fraction of the nominal collective bandwidth."""
    cpu_adam_params_per_s: float = 2e9
    """Parameters per second a node's CPU Adam updates (shared by its ranks)."""
    device_memory_bw: float = 1.5e12
    """Device memory bandwidth for the (memory-bound) on-device optimizer step, bytes/s."""
    fragmentation: float = 0.05
    """Share of device memory held back for allocator fragmentation."""
    reserved_bytes: int = 1 * GiB
    """Per-rank device bytes the framework holds (context, workspace); 0 on CPU ranks."""

    def __post_init__(self) -> None:
        for name in ("matmul_efficiency", "attention_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.fragmentation < 1:
            raise ValueError(f"fragmentation: must be in [0, 1), got {self.fragmentation}")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One parallel layout the search considers."""

    dp: int
    """Data-parallel degree."""
    sp: int
    """Sequence-parallel degree."""
    sp_kind: str
    """'ulysses' or 'ring'."""
    pp: int
    """Pipeline degree."""
    num_microbatches: int
    """Microbatches per step per pipeline."""
    zero_stage: int
    """ZeRO stage 0-3 over the dp x sp group."""

    @property
    def shard_group(self) -> int:
        return self.dp * self.sp

    def to_dict(self) -> dict:
        return dict(dp=self.dp, sp=self.sp, sp_kind=self.sp_kind, pp=self.pp,
                    num_microbatches=self.num_microbatches, zero_stage=self.zero_stage)


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """One decoder layer, one microbatch, one rank: bytes and seconds."""

    tokens: int
    """Local tokens of the microbatch on this rank."""
    input_bytes: float
    """Layer input a memory policy keeps (or swaps)."""
    attention_output_bytes: float
    """Attention output + log-sum-exp."""
    token_local_bytes: float
    """Token-local saved bytes (swapped or recomputed)."""
    mlp_bytes: float
    """Part of token_local inside the MLP (bounded by MLP tiling when materialised)."""
    plain_bytes: float
    """Saved bytes of the unmodified layer (keep_all)."""
    forward_s: float
    """Forward time."""
    backward_s: float
    """Backward time (without recompute)."""
    recompute_s: float
    """Time to recompute all token-local parts (qkv + post_attention forward)."""


def local_tokens(seq_len: int, micro_batch_size: int, sp: int) -> int:
    return micro_batch_size * seq_len // sp


def layer_cost(shape: ModelShape, dtype: str, hw: HardwareSpec, cand: Candidate, *,
               seq_len: int, micro_batch_size: int, params: CostParams,
               bytes_per_token: SavedBytesPerToken | None = None) -> LayerCost:
    """Bytes and times of one layer for one microbatch on one rank (analytic FLOPs)."""
    tokens = local_tokens(seq_len, micro_batch_size, cand.sp)
    ulysses_sp = cand.sp if cand.sp_kind == "ulysses" else 1
    per_token = bytes_per_token or layer_saved_bytes_per_token(shape, dtype, ulysses_sp)
    flops = layer_flops_per_token(shape, seq_len)
    peak = hw.flops(dtype)
    tl_s = flops.token_local * tokens / (peak * params.matmul_efficiency)
    attn_s = flops.attention * tokens / (peak * params.attention_efficiency)
    return LayerCost(
        tokens=tokens, input_bytes=per_token.layer_input * tokens,
        attention_output_bytes=per_token.attention_output * tokens,
        token_local_bytes=per_token.token_local * tokens, mlp_bytes=per_token.mlp * tokens,
        plain_bytes=per_token.plain_total * tokens, forward_s=tl_s + attn_s,
        backward_s=2 * tl_s + params.attention_backward_factor * attn_s, recompute_s=tl_s)


def stage_layer_ranges(num_layers: int, pp: int) -> tuple[tuple[int, int], ...]:
    """Balanced half-open layer ranges; earlier stages get the remainder."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        count = base + (1 if stage < extra else 0)
        ranges.append((start, start + count))
        start += count
    return tuple(ranges)


def stage_params(shape: ModelShape, pp: int, stage: int) -> int:
    """Parameters held by one pipeline stage (embedding on the first, head on the last)."""
    start, end = stage_layer_ranges(shape.num_layers, pp)[stage]
    total = (end - start) * shape.layer_params()
    if stage == 0:
        total += shape.vocab_size * shape.hidden_size
    if stage == pp - 1:
        total += shape.hidden_size
        if not shape.tie_embeddings or pp > 1:
            total += shape.vocab_size * shape.hidden_size
    return total


def optimizer_bytes_per_param(dtype: str) -> int:
    """Adam: m and v in fp32, plus an fp32 master copy when training in bf16."""
    return 2 * FP32 + (FP32 if DTYPE_BYTES[dtype] != FP32 else 0)


def model_state_bytes(num_params: int, dtype: str, zero_stage: int, shard_group: int
                      ) -> dict[str, float]:
    """Per-rank parameters, gradients and optimizer states under ZeRO over `shard_group`."""
    b = DTYPE_BYTES[dtype]
    group = max(1, shard_group)
    return {"parameters": num_params * b / (group if zero_stage >= 3 else 1),
            "gradients": num_params * b / (group if zero_stage >= 2 else 1),
            "optimizer": num_params * optimizer_bytes_per_param(dtype)
            / (group if zero_stage >= 1 else 1)}


def inflight_microbatches(pp: int, num_microbatches: int, stage: int) -> int:
    """Microbatches whose activations a 1F1B stage holds at its peak."""
    return max(1, min(pp - stage, num_microbatches))


def bubble_fraction(pp: int, num_microbatches: int) -> float:
    """Idle share of a 1F1B step: (p - 1) / (m + p - 1)."""
    return (pp - 1) / (num_microbatches + pp - 1)


def group_bandwidth(hw: HardwareSpec, span: int, params: CostParams) -> float:
    """Collective bandwidth of a group whose ranks span `span` consecutive rank ids."""
    nominal = hw.intra_node_bw if span <= hw.devices_per_node else hw.inter_node_bw
    return nominal * params.comm_efficiency


def shard_group_span(cand: Candidate) -> int:
    """Rank-id span of the dp x sp group on the runtime's (pp, dp, sp) grid: consecutive."""
    return cand.dp * cand.sp


def pipeline_group_span(cand: Candidate) -> int:
    """Rank-id span of a pp group on the (pp, dp, sp) grid: stages are dp*sp ranks apart."""
    return (cand.pp - 1) * cand.dp * cand.sp + 1


def ulysses_alltoall_bytes(shape: ModelShape, dtype: str, tokens: int, sp: int) -> float:
    """Bytes one rank sends per layer forward: q, k, v in and the output back. The runtime's
    backward sends twice this (dout, q, k, v, out in; dq, dk, dv back)."""
    if sp <= 1:
        return 0.0
    kv = max(shape.kv_dim, kv_heads_per_rank(shape, sp) * sp * shape.head_dim)
    return (2 * shape.hidden_size + 2 * kv) * tokens * DTYPE_BYTES[dtype] * (sp - 1) / sp


def ring_p2p_bytes(shape: ModelShape, dtype: str, tokens: int, sp: int) -> float:
    """Bytes one rank sends per layer forward: its K/V block passed sp - 1 times."""
    if sp <= 1:
        return 0.0
    return (sp - 1) * tokens * 2 * shape.kv_dim * DTYPE_BYTES[dtype]


def ring_p2p_backward_bytes(shape: ModelShape, dtype: str, tokens: int, sp: int) -> float:
    """Bytes one rank sends per layer backward: K/V passed sp - 1 times again, and the fp32
    dK/dV totals that travel behind them, sp hops (the last one home)."""
    if sp <= 1:
        return 0.0
    return ring_p2p_bytes(shape, dtype, tokens, sp) + sp * tokens * 2 * shape.kv_dim * FP32


def zero_step_bytes(num_params: int, dtype: str, zero_stage: int, group: int,
                    num_microbatches: int, *, backward_resident_params: int = 0
                    ) -> tuple[float, float]:
    """(per-microbatch, per-step) collective bytes one rank sends for ZeRO / data parallel,
    as the runtime (disttrain.parallel.zero) moves them.

    Stage 3 gathers parameters in the forward and again in the backward, except the
    `backward_resident_params` that are not gathered twice (the embedding, whose backward
    never reads its weight, and the final norm + head, kept from forward to backward), and
    reduce-scatters gradients every microbatch; stage 2 reduce-scatters every microbatch and
    all-gathers parameters once per step; stage 1 reduce-scatters and all-gathers once per step;
    stage 0 all-reduces once per step (2x a reduce-scatter). The runtime's model states and
    their collectives are fp32 whatever the training dtype (bf16 trains under autocast).
    """
    del dtype, num_microbatches  # fp32 states; per-microbatch volumes are per microbatch
    parts = zero_collectives(num_params, zero_stage, group, units=0,
                             backward_resident_params=backward_resident_params)
    return sum(p[1] for p in parts), sum(p[2] for p in parts)


def logits_working_bytes(shape: ModelShape, tokens: int, loss_chunk_tokens: int) -> float:
    """fp32 logits + their gradient for one chunk of the loss."""
    chunk = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    return 2 * FP32 * shape.vocab_size * chunk


def mlp_intermediate_bytes(shape: ModelShape, dtype: str, tokens: int) -> float:
    """MLP intermediates autograd saves (gate, silu, up, product): what MLP tiling removes from
    the saved set (a tiled MLP saves its input only and rebuilds a tile at a time)."""
    return 4.0 * DTYPE_BYTES[dtype] * shape.ffn_hidden_size * tokens


def tiled_layer_cost(lc: LayerCost, shape: ModelShape, dtype: str, mlp_chunk_tokens: int
                     ) -> LayerCost:
    """The layer's saved bytes when its MLP runs tiled over `mlp_chunk_tokens` (0: unchanged).
    The runtime tiles every layer's MLP, kept or not, so plain and token-local bytes shrink."""
    if not mlp_chunk_tokens or mlp_chunk_tokens >= lc.tokens:
        return lc
    cut = mlp_intermediate_bytes(shape, dtype, lc.tokens)
    return replace(lc, token_local_bytes=lc.token_local_bytes - cut,
                   mlp_bytes=lc.mlp_bytes - cut, plain_bytes=lc.plain_bytes - cut)


def working_base_bytes(lc: LayerCost, shape: ModelShape, dtype: str, mlp_chunk_tokens: int
                       ) -> float:
    """Transient bytes of any layer's backward whatever its policy: the activation gradients
    (dx, dy, dq, dk, dv), the MLP's intermediate gradients and, when tiled, one tile's rebuilt
    intermediates. What a non-kept layer rebuilds on top (its token-local tensors, swapped
    input / attention output) and the next layer's prefetch depend on the policy: the stage
    MIP adds them (`planner.mip`)."""
    tiled = bool(mlp_chunk_tokens) and mlp_chunk_tokens < lc.tokens
    tile = mlp_chunk_tokens / lc.tokens if tiled else 1.0
    b = DTYPE_BYTES[dtype]
    grads = lc.tokens * b * (3 * shape.hidden_size + 2 * shape.kv_dim)
    mlp_grads = lc.tokens * b * 2 * shape.ffn_hidden_size * tile
    rebuilt = mlp_intermediate_bytes(shape, dtype, lc.tokens) * tile if tiled else 0.0
    return grads + mlp_grads + rebuilt


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """Predicted step time and its parts (seconds); `total` is their sum."""

    compute: float
    """Forward + backward of all microbatches on the slowest stage."""
    recompute: float
    """Token-local recompute of dropped tokens."""
    exposed_transfer: float
    """Swap and chunk traffic not hidden under compute."""
    exposed_communication: float
    """All-to-all / ring / pipeline p2p / ZeRO collectives not hidden under compute."""
    bubble: float
    """Pipeline fill and drain: (p - 1) microbatch slots."""
    optimizer: float
    """Optimizer step not overlapped with the backward (device step, CPU excess)."""

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + self.exposed_transfer
                + self.exposed_communication + self.bubble + self.optimizer)

    def to_dict(self) -> dict[str, float]:
        return dict(compute=self.compute, recompute=self.recompute,
                    exposed_transfer=self.exposed_transfer,
                    exposed_communication=self.exposed_communication, bubble=self.bubble,
                    optimizer=self.optimizer)


def step_time(*, microbatch_compute_s: float, microbatch_recompute_s: float,
              microbatch_exposed_transfer_s: float, microbatch_comm_s: float,
              step_comm_s: float, step_optimizer_s: float, pp: int,
              num_microbatches: int) -> StepTime:
    """Compose one stage's per-microbatch times into a 1F1B step with its bubble."""
    per_mb = (microbatch_compute_s + microbatch_recompute_s + microbatch_exposed_transfer_s
              + microbatch_comm_s)
    m = num_microbatches
    return StepTime(compute=m * microbatch_compute_s, recompute=m * microbatch_recompute_s,
                    exposed_transfer=m * microbatch_exposed_transfer_s,
                    exposed_communication=m * microbatch_comm_s + step_comm_s,
                    bubble=(pp - 1) * per_mb, optimizer=step_optimizer_s)


def collective_bw(hw: HardwareSpec, span: int, params: CostParams, kind: str) -> float:
    """Achieved bytes/s of one collective kind: measured on the node (`probe`) when the group
    stays inside it, else the nominal group bandwidth x efficiency."""
    if span <= hw.devices_per_node and kind in hw.intra_node_collective_bw:
        return hw.intra_node_collective_bw[kind]
    return group_bandwidth(hw, span, params)


def overlaps_compute(hw: HardwareSpec) -> bool:
    """Whether side work (collectives, the CPU chunks' optimizer) runs beside compute: on GPUs
    (NCCL kernels, copy engines, an idle host CPU) it does; on a CPU node gloo's threads and
    the optimizer thread share the cores the ranks compute on, and measured steps show no
    overlap (`bench/cpu_optimizer_overlap.py`), so every such second is exposed."""
    return hw.device_name.lower() != "cpu"


def zero_collectives(num_params: int, zero_stage: int, group: int, units: int, *,
                     backward_resident_params: int = 0) -> list[tuple[str, float, float, int, int]]:
    """(kind, bytes per microbatch, bytes per step, calls per microbatch, calls per step) of
    the runtime's ZeRO collectives for `num_params` packed into `units` chunks (one call per
    chunk and collective); `zero_step_bytes` sums their bytes."""
    if group <= 1:
        return []
    vol = (group - 1) / group * FP32
    if zero_stage == 3:
        gathers = (2 * num_params - backward_resident_params) * vol
        return [("all_gather", gathers, 0.0, 2 * units, 0),
                ("reduce_scatter", num_params * vol, 0.0, units, 0)]
    if zero_stage == 2:
        return [("reduce_scatter", num_params * vol, 0.0, units, 0),
                ("all_gather", 0.0, num_params * vol, 0, units)]
    if zero_stage == 1:
        return [("reduce_scatter", 0.0, num_params * vol, 0, units),
                ("all_gather", 0.0, num_params * vol, 0, units)]
    return [("all_reduce", 0.0, 2 * num_params * vol, 0, units)]


def comm_times(shape: ModelShape, dtype: str, hw: HardwareSpec, cand: Candidate, *,
               stage_layers: int, stage_num_params: int, tokens: int,
               microbatch_compute_s: float, attention_forward_s: float, params: CostParams,
               backward_resident_params: int = 0, stage_units: int | None = None
               ) -> tuple[float, float]:
    """(exposed per microbatch, exposed per step) communication seconds for one stage.

    Each call costs the node's measured latency (`hw.intra_node_latency_s`) on top of its bytes
    over the kind's bandwidth. Where collectives overlap compute (GPUs), ring K/V passing hides
    under its block's attention and ZeRO-3's prefetched all-gathers under the stage's compute;
    reduce-scatters, Ulysses all-to-alls and the once-per-step collectives of stages 0-2 (run
    after the backward) are on the critical path either way. `stage_units`: ZeRO chunks of
    the stage (default: its layers + embedding / head)."""
    b = DTYPE_BYTES[dtype]
    overlap = overlaps_compute(hw)
    latency = hw.intra_node_latency_s
    per_mb = 0.0
    if cand.sp > 1 and cand.sp_kind == "ulysses":   # 1x fwd, 2x bwd; 2 calls each way
        a2a = ulysses_alltoall_bytes(shape, dtype, tokens, cand.sp)
        per_mb += stage_layers * (3 * a2a / collective_bw(hw, cand.sp, params, "all_to_all")
                                  + 4 * latency)
    elif cand.sp > 1:                                # ring: sp-1 hops fwd, 2sp-1 bwd
        sp_bw = collective_bw(hw, cand.sp, params, "send")
        ring_fwd = ring_p2p_bytes(shape, dtype, tokens, cand.sp) / sp_bw
        ring_bwd = ring_p2p_backward_bytes(shape, dtype, tokens, cand.sp) / sp_bw
        fwd_window = attention_forward_s if overlap else 0.0
        bwd_window = params.attention_backward_factor * fwd_window
        per_mb += stage_layers * (max(0.0, ring_fwd - fwd_window) + max(0.0, ring_bwd - bwd_window)
                                  + (3 * cand.sp - 2) * latency)
    if cand.pp > 1:                 # activations forward, their gradients backward
        span = pipeline_group_span(cand)
        per_mb += 2 * (tokens * shape.hidden_size * b / collective_bw(hw, span, params, "send")
                       + latency)
    span = shard_group_span(cand)
    units = stage_units if stage_units is not None else stage_layers + 2
    per_step = 0.0
    for kind, mb_bytes, step_bytes, mb_calls, step_calls in zero_collectives(
            stage_num_params, cand.zero_stage, cand.shard_group, units,
            backward_resident_params=backward_resident_params):
        bw = collective_bw(hw, span, params, kind)
        mb_s, step_s = mb_bytes / bw + mb_calls * latency, step_bytes / bw + step_calls * latency
        hidden = overlap and kind == "all_gather"
        per_mb += max(0.0, mb_s - microbatch_compute_s) if hidden else mb_s
        per_step += step_s          # after the backward (stages 0-2), before the update
    return per_mb, per_step


def device_optimizer_s(num_params_on_device: float, dtype: str, params: CostParams) -> float:
    """Memory-bound Adam on the device: read/write params, grads and states once."""
    touched = DTYPE_BYTES[dtype] * 3 + optimizer_bytes_per_param(dtype) * 2
    return num_params_on_device * touched / params.device_memory_bw


def cpu_optimizer_s(num_params_on_cpu: float, hw: HardwareSpec, params: CostParams) -> float:
    """CPU Adam over this rank's host-resident shard (the node's CPUs shared by its ranks)."""
    return num_params_on_cpu * hw.devices_per_node / params.cpu_adam_params_per_s


def throughput(shape: ModelShape, hw: HardwareSpec, dtype: str, *, seq_len: int,
               global_batch_size: int, step_s: float) -> tuple[float, float]:
    """(tokens per second of the job, MFU) for a step of `step_s` seconds."""
    tokens = seq_len * global_batch_size
    tokens_per_s = tokens / step_s if step_s > 0 else 0.0
    mfu = (model_flops_per_token(shape, seq_len) * tokens_per_s
           / (hw.flops(dtype) * hw.world_size))
    return tokens_per_s, mfu
