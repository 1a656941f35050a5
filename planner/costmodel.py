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

import functools
from dataclasses import dataclass, replace

from planner.analytic import (FP32, SavedBytesPerToken, kv_heads_per_rank,
                              layer_flops_per_token, layer_saved_bytes_per_token,
                              model_flops_per_token, model_state_bytes)
from planner.collectives import (call_latency, collective_bw, comm_times,  # noqa: F401
                                 group_bandwidth, overlaps_compute, pipeline_group_span,
                                 ring_p2p_backward_bytes, ring_p2p_bytes, shard_group_span,
                                 ulysses_alltoall_bytes, zero_collectives, zero_step_bytes)
from planner.plan import TP_COLUMN_BACKWARDS
from planner.tp_collectives import (TP_OVERLAP_CHOICES, column_backward_copy_bytes,  # noqa: F401
                                    tp_backward_gemms, tp_comm_seconds, tp_gemm_groups,
                                    tp_step_bytes)
from planner.contention import tp_contention_seconds
from planner.costtypes import Candidate, CostParams, LayerCost, local_tokens  # noqa: F401
from planner.efficiency import (DeviceFamily, MEMORY_EFFICIENCY, attention_efficiency,
                                device_family, elementwise_bytes_per_token, gemm_seconds,
                                layer_gemms, loss_bytes_per_token)
from planner.hardware import HardwareSpec
from planner.selective import recomputed_matmuls, selective_bytes_per_token
from planner.shapes import DTYPE_BYTES, ModelShape
from planner.working_set import layer_backward_working_bytes


def qkv_bytes_per_token(shape: ModelShape, dtype: str, ulysses_sp: int = 1) -> float:
    """q, k and v (after RoPE) per token, with Ulysses' replicated KV heads."""
    kv = shape.kv_dim
    if ulysses_sp > 1:
        kv = max(kv, kv_heads_per_rank(shape, ulysses_sp) * ulysses_sp * shape.head_dim)
    return DTYPE_BYTES[dtype] * (shape.q_dim + 2 * kv)


def _family_layer_times(family: DeviceFamily, shape: ModelShape, dtype: str, hw: HardwareSpec,
                        cand: Candidate, tokens: int, seq_len: int, chunks: int,
                        column_backward: str = "lean"
                        ) -> tuple[float, float, float, float, list[float], list[float]]:
    """(token-local forward, token-local backward, attention forward, attention backward,
    forward seconds of each projection as `chunks` GEMMs of tokens / chunks rows, and each
    backward GEMM of a projection as the backward runs it) of one layer on a GPU of `family`
    from its efficiency curves. The column-parallel projections' gradients run as tp GEMMs of
    H / tp features ('lean') or whole on transposed layouts, with their (T, H/tp) transposes
    ('whole'; `tp_backward_gemms`, `column_backward_copy_bytes`)."""
    peak, b, tp = hw.flops(dtype), DTYPE_BYTES[dtype], cand.tp
    shapes = layer_gemms(shape, tokens, tp)
    gemms = [chunks * gemm_seconds(family, peak, m / chunks, n, k, b) for m, n, k in shapes]
    whole = [gemm_seconds(family, peak, m, n, k, b) for m, n, k in shapes]
    # 'lean': the column-parallel backward's GEMMs, one per rank's block of the input features
    column = (whole if column_backward == "whole" else
              [tp * gemm_seconds(family, peak, m, n, k / tp, b) for m, n, k in shapes])
    gemm = sum(gemms)
    ew_fwd, ew_bwd = elementwise_bytes_per_token(shape, dtype, tp)
    ew_bwd += column_backward_copy_bytes(shape, dtype, tp, column_backward)
    bw = family.hbm_bw * MEMORY_EFFICIENCY
    flops = layer_flops_per_token(shape, seq_len).attention * tokens / tp
    # Ulysses attends over the whole sequence; a ring rank attends block by block
    key_len = seq_len if cand.sp_kind == "ulysses" else seq_len / cand.sp
    kernel = hw.attention_kernel   # the stack's kernel generation (None: the family's curve)
    attn_f = flops / (peak * attention_efficiency(family, key_len, shape.head_dim, False, kernel))
    attn_b = 2.5 * flops / (peak * attention_efficiency(family, key_len, shape.head_dim, True, kernel))
    return (gemm + ew_fwd * tokens / bw, sum(tp_backward_gemms(gemms, whole, column))
            + ew_bwd * tokens / bw, attn_f, attn_b, gemms, column)


class _Same:
    """Hashes and compares by identity (a HardwareSpec holds dicts): a cache key for one
    search's hardware object, kept alive by the cache so that its id is not reused."""

    def __init__(self, obj) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


@functools.lru_cache(maxsize=4096)
def _layer_times(shape: ModelShape, dtype: str, hw_ref: _Same, cand: Candidate, tokens: int,
                 seq_len: int, params: CostParams, tp_overlap_chunks: int | None,
                 tp_column_backward: str | None = "lean"
                 ) -> tuple[tuple[int, str], float, float, float, float, float, float, float]:
    """((tp_overlap_chunks, tp_column_backward), token-local forward, token-local backward,
    attention forward, attention backward, exposed TP forward, exposed TP backward, selective
    recompute without its TP collectives) of `layer_cost`."""
    hw = hw_ref.obj
    tp = cand.tp
    family = device_family(hw.device_name)
    peak = hw.flops(dtype)
    if tp <= 1:
        choices, modes = (1,), ("lean",)
    else:
        choices = ((tp_overlap_chunks,) if tp_overlap_chunks else
                   tuple(k for k in TP_OVERLAP_CHOICES if k <= max(1, tokens)))
        modes = (tp_column_backward,) if tp_column_backward else TP_COLUMN_BACKWARDS
    best = None
    for chunks, mode in ((k, m) for k in choices for m in modes):
        if family is None:
            flops = layer_flops_per_token(shape, seq_len)
            tl_f = flops.token_local * tokens / tp / (peak * params.matmul_efficiency)
            tl_b = 2 * tl_f
            attn_f = flops.attention * tokens / tp / (peak * params.attention_efficiency)
            attn_b = params.attention_backward_factor * attn_f
            gemms = [2.0 * m * n * k / (peak * params.matmul_efficiency)
                     for m, n, k in layer_gemms(shape, tokens, tp)]
            column = gemms
        else:
            tl_f, tl_b, attn_f, attn_b, gemms, column = _family_layer_times(
                family, shape, dtype, hw, cand, tokens, seq_len, chunks, mode)
        # op-level selective checkpointing reruns the element-wise forward and every second
        # matmul (planner.selective); CPU / unknown devices: the matmuls at the flat efficiency
        ew = (elementwise_bytes_per_token(shape, dtype, tp)[0] * tokens
              / (family.hbm_bw * MEMORY_EFFICIENCY)) if family is not None else 0.0
        sel = ew + sum(gemms[i] for i in recomputed_matmuls(shape))
        groups = tp_gemm_groups(gemms)
        comm_f, comm_b = (tp_comm_seconds(shape, dtype, hw, tokens, tp, params, direction,
                                          chunks=chunks, gemm_s=groups,
                                          whole_gemm_s=tp_gemm_groups(column))
                          for direction in ("forward", "backward"))
        # the GEMMs under the hidden part run on fewer SMs (planner.contention)
        comm_f, comm_b = (exposed + tp_contention_seconds(shape, dtype, hw, tokens, tp, params,
                                                          direction, chunks=chunks, exposed_s=exposed)
                          for exposed, direction in ((comm_f, "forward"), (comm_b, "backward")))
        total = tl_f + tl_b + comm_f + comm_b
        if best is None or total < best[0]:   # a tie keeps 'lean' and the fewer blocks
            best = (total, (chunks, mode), tl_f, tl_b, attn_f, attn_b, comm_f, comm_b, sel)
    return best[1:]


def layer_cost(shape: ModelShape, dtype: str, hw: HardwareSpec, cand: Candidate, *,
               seq_len: int, micro_batch_size: int, params: CostParams,
               bytes_per_token: SavedBytesPerToken | None = None,
               attention_fraction: float = 1.0, tp_overlap_chunks: int | None = None,
               tp_column_backward: str | None = None) -> LayerCost:
    """Bytes and times of one layer for one microbatch on one rank. GPUs of a known family:
    efficiency curves by GEMM shape and sequence length (`planner.efficiency`); CPU and
    unknown devices: analytic FLOPs at the flat `params` efficiencies. Tensor parallelism
    divides bytes and FLOPs by tp and adds its collectives to forward, backward and the
    recompute (which re-runs the forward's gathers): the exposed part when they are pipelined
    with the GEMMs over `tp_overlap_chunks` token blocks (None: the planner's choice among
    `TP_OVERLAP_CHOICES`, the fastest forward + backward, smaller GEMMs and more calls
    against less exposed communication) and the column-parallel backward's GEMMs as
    `tp_column_backward` runs them (None: the faster of 'lean' and 'whole'; they hold the same
    bytes, `planner.working_set`, so time alone decides). Packed documents: the attention core's time is
    `attention_fraction` of the full causal core's (sum of squared document lengths over the
    squared sequence length)."""
    tokens = local_tokens(seq_len, micro_batch_size, cand.sp)
    ulysses_sp = cand.sp if cand.sp_kind == "ulysses" else 1
    per_token = bytes_per_token or layer_saved_bytes_per_token(shape, dtype, ulysses_sp)
    tp = cand.tp
    layout = Candidate(dp=1, tp=tp, sp=cand.sp, sp_kind=cand.sp_kind, pp=1, num_microbatches=1,
                       zero_stage=0)   # what the times depend on: the search asks again and again
    (chunks, column), tl_f, tl_b, attn_f, attn_b, comm_f, comm_b, sel_s = _layer_times(
        shape, dtype, _Same(hw), layout, tokens, seq_len, params, tp_overlap_chunks,
        tp_column_backward)
    attn_f, attn_b = attn_f * attention_fraction, attn_b * attention_fraction
    return LayerCost(
        tokens=tokens, input_bytes=per_token.layer_input * tokens / tp,
        attention_output_bytes=per_token.attention_output * tokens / tp,
        token_local_bytes=per_token.token_local * tokens / tp, mlp_bytes=per_token.mlp * tokens / tp,
        plain_bytes=per_token.plain_total * tokens / tp, forward_s=tl_f + attn_f + comm_f,
        qkv_bytes=qkv_bytes_per_token(shape, dtype, ulysses_sp) * tokens / tp,
        backward_s=tl_b + attn_b + comm_b, recompute_s=tl_f + comm_f,
        tp_overlap_chunks=chunks, tp_column_backward=column,
        # op-level selective checkpointing: not offered with tensor parallelism (its sharded
        # linears are autograd functions with collectives inside: not run by the runtime)
        selective_bytes=selective_bytes_per_token(shape, dtype) * tokens if tp == 1 else 0.0,
        selective_recompute_s=sel_s if tp == 1 else 0.0)


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
        total += shape.input_embedding_params()
    if stage == pp - 1:
        total += shape.hidden_size
        if not shape.tie_embeddings or pp > 1:
            total += shape.vocab_size * shape.hidden_size
    return total


def optimizer_bytes_per_param(dtype: str) -> int:
    """Adam: m and v in fp32, plus an fp32 master copy when training in bf16."""
    return 2 * FP32 + (FP32 if DTYPE_BYTES[dtype] != FP32 else 0)


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


def logits_working_bytes(shape: ModelShape, tokens: int, loss_chunk_tokens: int) -> float:
    """fp32 logits + their gradient for one chunk of the loss."""
    chunk = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    return 2 * FP32 * shape.vocab_size * chunk


def mlp_intermediate_bytes(shape: ModelShape, dtype: str, tokens: int) -> float:
    """MLP intermediates autograd saves (SwiGLU: gate, silu, up, product; GeLU: up, gelu): what
    MLP tiling removes from the saved set (a tiled MLP saves its input only and rebuilds a
    tile at a time)."""
    return float(shape.mlp_saved_per_ffn * DTYPE_BYTES[dtype] * shape.ffn_hidden_size * tokens)


def tiled_layer_cost(lc: LayerCost, shape: ModelShape, dtype: str, mlp_chunk_tokens: int,
                     tp: int = 1) -> LayerCost:
    """The layer's saved bytes when its MLP runs tiled over `mlp_chunk_tokens` (0: unchanged).
    The runtime tiles every layer's MLP, kept or not, so plain and token-local bytes shrink."""
    if not mlp_chunk_tokens or mlp_chunk_tokens >= lc.tokens:
        return lc
    cut = mlp_intermediate_bytes(shape, dtype, lc.tokens) / tp
    # a tiled MLP runs its matmuls tile by tile: the selective policy is not offered with it
    return replace(lc, token_local_bytes=lc.token_local_bytes - cut,
                   mlp_bytes=lc.mlp_bytes - cut, plain_bytes=lc.plain_bytes - cut,
                   selective_bytes=0.0, selective_recompute_s=0.0)


def working_base_bytes(lc: LayerCost, shape: ModelShape, dtype: str, mlp_chunk_tokens: int,
                       tp: int = 1) -> float:
    """Transient bytes of any layer's backward on one rank whatever its policy. What a non-kept
    layer rebuilds on top (its token-local tensors, swapped input / attention output) and the
    next layer's prefetch depend on the policy: the stage MIP adds them (`planner.mip`).

    As the runtime's plain backward holds them (`planner.working_set`, the largest of the
    backward's phases), any tp: the TP linears' full-width gathers and input gradients do not
    shrink with tp. A layer under a sequence-tiled rebuild runs those phases a tile at a time,
    so this over-counts it (one base for every policy); with the chunked RMSNorm backward the
    plain phases no longer reject FPDT's tiled-rebuild plan (docs/design.md)."""
    return layer_backward_working_bytes(shape, DTYPE_BYTES[dtype], lc.tokens, tp,
                                        lc.tp_overlap_chunks, mlp_chunk_tokens,
                                        column_backward=lc.tp_column_backward)


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
    page_faults: float = 0.0
    """CPU nodes, memory-bound plans: freshly mapped pages of the step's large blocks
    (`planner.page_faults`)."""

    @property
    def total(self) -> float:
        return (self.compute + self.recompute + self.exposed_transfer
                + self.exposed_communication + self.bubble + self.optimizer + self.page_faults)

    def to_dict(self) -> dict[str, float]:
        """The parts by name; `page_faults` only where a CPU node prices it."""
        parts = dict(compute=self.compute, recompute=self.recompute,
                     exposed_transfer=self.exposed_transfer,
                     exposed_communication=self.exposed_communication, bubble=self.bubble,
                     optimizer=self.optimizer)
        return {**parts, "page_faults": self.page_faults} if self.page_faults else parts


def step_time(*, microbatch_compute_s: float, microbatch_recompute_s: float,
              microbatch_exposed_transfer_s: float, microbatch_comm_s: float,
              step_comm_s: float, step_optimizer_s: float, pp: int,
              num_microbatches: int, virtual: int = 1,
              microbatch_page_fault_s: float = 0.0, step_page_fault_s: float = 0.0) -> StepTime:
    """Compose one stage's per-microbatch times into a 1F1B step with its bubble ((p - 1)
    microbatch slots; (p - 1)/v with v interleaved chunks per rank)."""
    per_mb = (microbatch_compute_s + microbatch_recompute_s + microbatch_exposed_transfer_s
              + microbatch_comm_s + microbatch_page_fault_s)
    m = num_microbatches
    return StepTime(compute=m * microbatch_compute_s, recompute=m * microbatch_recompute_s,
                    exposed_transfer=m * microbatch_exposed_transfer_s,
                    exposed_communication=m * microbatch_comm_s + step_comm_s,
                    bubble=(pp - 1) / virtual * per_mb, optimizer=step_optimizer_s,
                    page_faults=m * microbatch_page_fault_s + step_page_fault_s)


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
