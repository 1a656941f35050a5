"""Cost model: per-rank memory by category and step time for one candidate. Pure functions.

No torch here: every input is a number, a `ModelShape`, a `HardwareSpec` or a profile's
per-token bytes, so the planner runs on a laptop for a cluster that is not there.

Rank grid: `arange(world).view(pp, dp, sp, tp)` - tp innermost (a TP group stays in a
node), then sp, dp, pp. Model states are sharded over tp (Megatron-style: every weight split
over the TP group) and over the dp x sp group (sequence-parallel ranks hold the same
parameters). Times are per rank; a step is (m + p - 1) slots of one microbatch's forward +
backward on the slowest stage (1F1B), so the bubble is (p - 1)/(m + p - 1); interleaved 1F1B
with v chunks per rank shrinks it to (p - 1)/v slots. GPU compute times come from the device
efficiency curves of `planner.efficiency`; CPU ranks keep the flat efficiencies below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.analytic import (FP32, SavedBytesPerToken, kv_heads_per_rank,
                              layer_flops_per_token, layer_saved_bytes_per_token,
                              model_flops_per_token)
from planner.collectives import call_latency, collective_seconds
from planner.efficiency import (DeviceFamily, MEMORY_EFFICIENCY, attention_efficiency,
                                device_family, elementwise_bytes_per_token, gemm_seconds,
                                layer_gemms, loss_bytes_per_token)
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
    gpu_collective_latency_s: float = 1e-5
    """Fixed cost of one NCCL call inside a node (launch + handshake; nccl-tests' small-message
    times are ~10 us on NVLink)."""
    inter_node_latency_s: float = 1e-5
    """Extra fixed cost of a call that leaves the node (network round trips)."""
    host_reserve_share: float = 0.1
    """Share of host memory the plan never budgets (OS, page cache, the framework's own)."""
    gpus_per_pcie_switch: int = 2
    """GPUs sharing one PCIe uplink to the host (DGX/HGX boards: 2 per switch), so concurrent
    host copies of a node's ranks get host_link_bw / this each."""
    single_pool_on_cpu: bool = False
    """Model a node without accelerators as one memory pool (device = host): the cpu tier and
    CPU chunks save nothing there, so only keep / recompute / NVMe are offered and NVMe reads
    count their page cache. Off by default: the CPU test suite uses CPU-tier plans to
    exercise the runtime's offload paths on this machine."""
    pinned_share: float = 0.5
    """Largest share of host memory the runtime pins for device copies on GPU nodes."""

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
    tp: int = 1
    """Tensor-parallel degree (Megatron-style with sequence parallelism)."""
    virtual: int = 1
    """Model chunks per pipeline rank: 1 = 1F1B, 2 = interleaved 1F1B."""

    @property
    def shard_group(self) -> int:
        return self.dp * self.sp

    @property
    def schedule(self) -> str:
        if self.pp == 1:
            return "none"
        return "interleaved-1f1b" if self.virtual > 1 else "1f1b"

    def to_dict(self) -> dict:
        out = dict(dp=self.dp, tp=self.tp, sp=self.sp, sp_kind=self.sp_kind, pp=self.pp,
                   num_microbatches=self.num_microbatches, zero_stage=self.zero_stage)
        if self.virtual > 1:
            out["schedule"] = self.schedule
        return out


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
    qkv_bytes: float = 0.0
    """The part of token_local_bytes the attention core's backward needs for the whole
    sequence at once (q, k, v after RoPE): a sequence-tiled rebuild cannot tile it."""


def local_tokens(seq_len: int, micro_batch_size: int, sp: int) -> int:
    return micro_batch_size * seq_len // sp


def qkv_bytes_per_token(shape: ModelShape, dtype: str, ulysses_sp: int = 1) -> float:
    """q, k and v (after RoPE) per token, with Ulysses' replicated KV heads."""
    kv = shape.kv_dim
    if ulysses_sp > 1:
        kv = max(kv, kv_heads_per_rank(shape, ulysses_sp) * ulysses_sp * shape.head_dim)
    return DTYPE_BYTES[dtype] * (shape.hidden_size + 2 * kv)


def tp_comm_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, tokens: int, tp: int,
                    params: CostParams) -> float:
    """Exposed seconds of one layer's tensor-parallel collectives in one direction (forward,
    or backward): Megatron-style sequence parallelism all-gathers the token-sharded input
    before the attention and the MLP and reduce-scatters their outputs (4 collectives of
    tokens x hidden in the training dtype, over the intra-node TP group; the runtime's
    `parallelize_module` does not overlap them with compute)."""
    if tp <= 1:
        return 0.0
    sent = tokens * shape.hidden_size * DTYPE_BYTES[dtype] * (tp - 1) / tp
    seconds = 0.0
    for kind in ("all_gather", "reduce_scatter"):
        seconds += 2 * (sent / collective_bw(hw, tp, params, kind)
                        + call_latency(hw, params.gpu_collective_latency_s))
    return seconds


def _family_layer_times(family: DeviceFamily, shape: ModelShape, dtype: str, hw: HardwareSpec,
                        cand: Candidate, tokens: int, seq_len: int, micro_batch_size: int
                        ) -> tuple[float, float, float, float]:
    """(token-local forward, token-local backward, attention forward, attention backward)
    seconds of one layer on a GPU of `family` from its efficiency curves."""
    peak, b, tp = hw.flops(dtype), DTYPE_BYTES[dtype], cand.tp
    gemm = sum(gemm_seconds(family, peak, m, n, k, b) for m, n, k in layer_gemms(shape, tokens, tp))
    ew_fwd, ew_bwd = elementwise_bytes_per_token(shape, dtype, tp)
    bw = family.hbm_bw * MEMORY_EFFICIENCY
    flops = layer_flops_per_token(shape, seq_len).attention * tokens / tp
    # Ulysses attends over the whole sequence; a ring rank attends block by block
    key_len = seq_len if cand.sp_kind == "ulysses" else seq_len / cand.sp
    attn_f = flops / (peak * attention_efficiency(family, key_len, shape.head_dim, False))
    attn_b = 2.5 * flops / (peak * attention_efficiency(family, key_len, shape.head_dim, True))
    del micro_batch_size
    return gemm + ew_fwd * tokens / bw, 2 * gemm + ew_bwd * tokens / bw, attn_f, attn_b


def layer_cost(shape: ModelShape, dtype: str, hw: HardwareSpec, cand: Candidate, *,
               seq_len: int, micro_batch_size: int, params: CostParams,
               bytes_per_token: SavedBytesPerToken | None = None) -> LayerCost:
    """Bytes and times of one layer for one microbatch on one rank. GPUs of a known family:
    efficiency curves by GEMM shape and sequence length (`planner.efficiency`); CPU and
    unknown devices: analytic FLOPs at the flat `params` efficiencies. Tensor parallelism
    divides bytes and FLOPs by tp and adds its collectives to forward, backward and the
    recompute (which re-runs the forward's gathers)."""
    tokens = local_tokens(seq_len, micro_batch_size, cand.sp)
    ulysses_sp = cand.sp if cand.sp_kind == "ulysses" else 1
    per_token = bytes_per_token or layer_saved_bytes_per_token(shape, dtype, ulysses_sp)
    tp = cand.tp
    family = device_family(hw.device_name)
    if family is None:
        flops = layer_flops_per_token(shape, seq_len)
        peak = hw.flops(dtype)
        tl_f = flops.token_local * tokens / tp / (peak * params.matmul_efficiency)
        tl_b = 2 * tl_f
        attn_f = flops.attention * tokens / tp / (peak * params.attention_efficiency)
        attn_b = params.attention_backward_factor * attn_f
    else:
        tl_f, tl_b, attn_f, attn_b = _family_layer_times(family, shape, dtype, hw, cand, tokens,
                                                         seq_len, micro_batch_size)
    comm = tp_comm_seconds(shape, dtype, hw, tokens, tp, params)
    return LayerCost(
        tokens=tokens, input_bytes=per_token.layer_input * tokens / tp,
        attention_output_bytes=per_token.attention_output * tokens / tp,
        token_local_bytes=per_token.token_local * tokens / tp, mlp_bytes=per_token.mlp * tokens / tp,
        plain_bytes=per_token.plain_total * tokens / tp, forward_s=tl_f + attn_f + comm,
        qkv_bytes=qkv_bytes_per_token(shape, dtype, ulysses_sp) * tokens / tp,
        backward_s=tl_b + attn_b + comm, recompute_s=tl_f + comm)


def head_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, tokens: int, tp: int,
                 params: CostParams) -> tuple[float, float]:
    """(forward, backward) seconds of the final norm + output head + loss on one rank
    (vocabulary-parallel over tp)."""
    family = device_family(hw.device_name)
    peak = hw.flops(dtype)
    if family is None:
        fwd = 2.0 * shape.vocab_size * shape.hidden_size * tokens / tp / (peak * params.matmul_efficiency)
        return fwd, 2 * fwd
    gemm = gemm_seconds(family, peak, tokens, -(-shape.vocab_size // tp), shape.hidden_size,
                        DTYPE_BYTES[dtype])
    loss = loss_bytes_per_token(shape, tp) * tokens / (family.hbm_bw * MEMORY_EFFICIENCY)
    return gemm + 0.4 * loss, 2 * gemm + 0.6 * loss


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


def inflight_microbatches(pp: int, num_microbatches: int, stage: int, virtual: int = 1) -> int:
    """Microbatches (of the whole stage's layers) whose activations a 1F1B stage holds at its
    peak. Interleaved with v chunks per rank: Megatron's warm-up runs 2(p - r - 1) + (v - 1)p
    chunk-forwards before the first backward, each 1/v of the rank's layers."""
    if virtual <= 1:
        return max(1, min(pp - stage, num_microbatches))
    chunks = 2 * (pp - stage - 1) + (virtual - 1) * pp + 1
    return max(1, min(num_microbatches, -(-chunks // virtual)))


def bubble_fraction(pp: int, num_microbatches: int, virtual: int = 1) -> float:
    """Idle share of a 1F1B step: (p - 1) / (m + p - 1); interleaved: (p - 1)/v slots."""
    idle = (pp - 1) / virtual
    return idle / (num_microbatches + idle)


def group_bandwidth(hw: HardwareSpec, span: int, params: CostParams) -> float:
    """Collective bandwidth (bytes one rank sends per second) of a group whose ranks span
    `span` consecutive rank ids. GPU intra-node figures are NVLink datasheet numbers, which
    count both directions: a rank sends at half of them."""
    if span <= hw.devices_per_node:
        nominal = hw.intra_node_bw / (1 if hw.device_name.lower() == "cpu" else 2)
    else:
        nominal = hw.inter_node_bw
    return nominal * params.comm_efficiency


def shard_group_span(cand: Candidate) -> int:
    """Rank-id span of the dp x sp group on the runtime's (pp, dp, sp, tp) grid: its members
    are tp apart."""
    return cand.dp * cand.sp * cand.tp


def pipeline_group_span(cand: Candidate) -> int:
    """Rank-id span of a pp group on the (pp, dp, sp, tp) grid: stages are dp*sp*tp ranks apart."""
    return (cand.pp - 1) * cand.dp * cand.sp * cand.tp + 1


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
                    num_microbatches: int, *, backward_resident_params: int = 0,
                    grad_reduce_dtype: str = "fp32") -> tuple[float, float]:
    """(per-microbatch, per-step) collective bytes one rank sends for ZeRO / data parallel,
    as the runtime (disttrain.parallel.zero) moves them.

    Stage 3 gathers parameters in the forward and again in the backward, except the
    `backward_resident_params` that are not gathered twice (the embedding, whose backward
    never reads its weight, and the final norm + head, kept from forward to backward), and
    reduce-scatters gradients every microbatch; stage 2 reduce-scatters every microbatch and
    all-gathers parameters once per step; stage 1 reduce-scatters and all-gathers once per step;
    stage 0 all-reduces once per step (2x a reduce-scatter). The runtime's model states and
    Parameters are gathered in the training dtype; gradients are reduced in
    `grad_reduce_dtype` (fp32 by default, as the mixed-precision runtime keeps fp32 gradient
    reductions unless the spec asks for bf16).
    """
    del num_microbatches  # per-microbatch volumes are per microbatch
    parts = zero_collectives(num_params, zero_stage, group, units=0,
                             backward_resident_params=backward_resident_params,
                             param_bytes=DTYPE_BYTES[dtype], grad_bytes=DTYPE_BYTES[grad_reduce_dtype])
    return sum(p[1] for p in parts), sum(p[2] for p in parts)


def logits_working_bytes(shape: ModelShape, tokens: int, loss_chunk_tokens: int) -> float:
    """fp32 logits + their gradient for one chunk of the loss."""
    chunk = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    return 2 * FP32 * shape.vocab_size * chunk


def mlp_intermediate_bytes(shape: ModelShape, dtype: str, tokens: int) -> float:
    """MLP intermediates autograd saves (gate, silu, up, product): what MLP tiling removes from
    the saved set (a tiled MLP saves its input only and rebuilds a tile at a time)."""
    return 4.0 * DTYPE_BYTES[dtype] * shape.ffn_hidden_size * tokens


def tiled_layer_cost(lc: LayerCost, shape: ModelShape, dtype: str, mlp_chunk_tokens: int,
                     tp: int = 1) -> LayerCost:
    """The layer's saved bytes when its MLP runs tiled over `mlp_chunk_tokens` (0: unchanged).
    The runtime tiles every layer's MLP, kept or not, so plain and token-local bytes shrink."""
    if not mlp_chunk_tokens or mlp_chunk_tokens >= lc.tokens:
        return lc
    cut = mlp_intermediate_bytes(shape, dtype, lc.tokens) / tp
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
              num_microbatches: int, virtual: int = 1) -> StepTime:
    """Compose one stage's per-microbatch times into a 1F1B step with its bubble ((p - 1)
    microbatch slots; (p - 1)/v with v interleaved chunks per rank)."""
    per_mb = (microbatch_compute_s + microbatch_recompute_s + microbatch_exposed_transfer_s
              + microbatch_comm_s)
    m = num_microbatches
    return StepTime(compute=m * microbatch_compute_s, recompute=m * microbatch_recompute_s,
                    exposed_transfer=m * microbatch_exposed_transfer_s,
                    exposed_communication=m * microbatch_comm_s + step_comm_s,
                    bubble=(pp - 1) / virtual * per_mb, optimizer=step_optimizer_s)


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


def zero_collectives(num_params: float, zero_stage: int, group: int, units: int, *,
                     backward_resident_params: float = 0, param_bytes: int = FP32,
                     grad_bytes: int = FP32) -> list[tuple[str, float, float, int, int]]:
    """(kind, bytes per microbatch, bytes per step, calls per microbatch, calls per step) of
    the runtime's ZeRO collectives for `num_params` packed into `units` chunks (one call per
    chunk and collective); `zero_step_bytes` sums their bytes. Gathers move `param_bytes`
    per parameter, gradient reductions `grad_bytes`."""
    if group <= 1:
        return []
    share = (group - 1) / group
    gather, reduce = share * param_bytes, share * grad_bytes
    if zero_stage == 3:
        gathers = (2 * num_params - backward_resident_params) * gather
        return [("all_gather", gathers, 0.0, 2 * units, 0),
                ("reduce_scatter", num_params * reduce, 0.0, units, 0)]
    if zero_stage == 2:
        return [("reduce_scatter", num_params * reduce, 0.0, units, 0),
                ("all_gather", 0.0, num_params * gather, 0, units)]
    if zero_stage == 1:
        return [("reduce_scatter", 0.0, num_params * reduce, 0, units),
                ("all_gather", 0.0, num_params * gather, 0, units)]
    return [("all_reduce", 0.0, 2 * num_params * reduce, 0, units)]


def _seconds(hw: HardwareSpec, params: CostParams, kind: str, sent: float, group: int,
             stride: int, calls: float) -> float:
    """Seconds of `calls` collectives: measured per-kind bandwidth inside a CPU node,
    else intra-node or hierarchical across nodes (`planner.collectives`)."""
    if group <= 1:
        return 0.0
    return collective_seconds(
        hw, kind, sent, group, stride, calls,
        intra_bw=collective_bw(hw, min(group * stride, hw.devices_per_node), params, kind),
        inter_bw=hw.inter_node_bw * params.comm_efficiency,
        latency_s=call_latency(hw, params.gpu_collective_latency_s),
        inter_latency_s=0.0 if hw.device_name.lower() == "cpu" else params.inter_node_latency_s)


def comm_times(shape: ModelShape, dtype: str, hw: HardwareSpec, cand: Candidate, *,
               stage_layers: int, stage_num_params: float, tokens: int,
               microbatch_compute_s: float, attention_forward_s: float, params: CostParams,
               backward_resident_params: float = 0, stage_units: int | None = None,
               grad_reduce_dtype: str = "fp32", microbatch_backward_s: float | None = None
               ) -> tuple[float, float]:
    """(exposed per microbatch, exposed per step) communication seconds for one stage.

    Each call costs a latency (measured on CPU nodes, NCCL's on GPUs) on top of its bytes
    over the kind's bandwidth; groups that leave a node run hierarchically. Where collectives
    overlap compute (GPUs): ring K/V passing hides under its block's attention; ZeRO-3's
    prefetched all-gathers under the stage's compute except the first; gradient reductions
    are bucketed (one bucket per ZeRO unit) and run beside the backward, so only what exceeds
    the backward and the last bucket is exposed (stages 0-2 reduce once per step, in the last
    microbatch's backward). Ulysses all-to-alls and the stage 1-2 parameter all-gather after
    the update are on the critical path either way. `stage_num_params` is per TP rank;
    `stage_units`: ZeRO units of the stage (default: its layers + embedding / head)."""
    b, tp = DTYPE_BYTES[dtype], cand.tp
    overlap = overlaps_compute(hw)
    latency = call_latency(hw, params.gpu_collective_latency_s)
    backward = microbatch_backward_s if microbatch_backward_s is not None else 2 * microbatch_compute_s / 3
    per_mb = 0.0
    if cand.sp > 1 and cand.sp_kind == "ulysses":   # 1x fwd, 2x bwd; 2 calls each way
        a2a = ulysses_alltoall_bytes(shape, dtype, tokens, cand.sp) / tp
        per_mb += stage_layers * _seconds(hw, params, "all_to_all", 3 * a2a, cand.sp, tp, 4)
    elif cand.sp > 1:                                # ring: sp-1 hops fwd, 2sp-1 bwd
        span = cand.sp * tp
        sp_bw = collective_bw(hw, span, params, "send")
        ring_fwd = ring_p2p_bytes(shape, dtype, tokens, cand.sp) / tp / sp_bw
        ring_bwd = ring_p2p_backward_bytes(shape, dtype, tokens, cand.sp) / tp / sp_bw
        fwd_window = attention_forward_s if overlap else 0.0
        bwd_window = params.attention_backward_factor * fwd_window
        per_mb += stage_layers * (max(0.0, ring_fwd - fwd_window) + max(0.0, ring_bwd - bwd_window)
                                  + (3 * cand.sp - 2) * latency)
    if cand.pp > 1:                 # activations forward, their gradients backward (v chunks)
        span = pipeline_group_span(cand)
        per_mb += 2 * cand.virtual * (tokens * shape.hidden_size * b / tp
                                      / collective_bw(hw, span, params, "send") + latency)
    units = stage_units if stage_units is not None else stage_layers + 2
    per_step = 0.0
    for kind, mb_bytes, step_bytes, mb_calls, step_calls in zero_collectives(
            stage_num_params, cand.zero_stage, cand.shard_group, units,
            backward_resident_params=backward_resident_params, param_bytes=b,
            grad_bytes=DTYPE_BYTES[grad_reduce_dtype]):
        mb_s = _seconds(hw, params, kind, mb_bytes, cand.shard_group, tp, mb_calls)
        step_s = _seconds(hw, params, kind, step_bytes, cand.shard_group, tp, step_calls)
        if not overlap:
            per_mb, per_step = per_mb + mb_s, per_step + step_s
        elif kind == "all_gather":              # ZeRO-3 prefetch; stages 1-2 after the update
            per_mb += max(mb_s - microbatch_compute_s, mb_s / max(1, mb_calls)) if mb_s else 0.0
            per_step += step_s
        else:                                   # bucketed reduction beside the backward
            per_mb += max(mb_s - backward, mb_s / units) if mb_s else 0.0
            per_step += max(step_s - backward, step_s / units) if step_s else 0.0
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
