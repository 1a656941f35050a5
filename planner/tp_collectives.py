"""Tensor-parallel collectives of one decoder layer: which the runtime runs per direction
(`TP_PIPELINES`), how many bytes they send in a step, and the seconds they leave exposed beside
the GEMMs they are pipelined (or bulk-overlapped) with. The collective primitives (seconds,
bandwidth, latency) are `planner.collectives`'."""

from __future__ import annotations

from planner.collectives import (call_latency, collective_bw, overlaps_compute,
                                  tp_pipeline_exposed)
from planner.costtypes import CostParams
from planner.hardware import HardwareSpec
from planner.shapes import DTYPE_BYTES, ModelShape


TP_PIPELINES = {
    "forward": (("attention_in", {"all_gather": 1}, 1), ("attention_out", {"reduce_scatter": 1}, 1),
                ("mlp_in", {"all_gather": 1}, 1), ("mlp_out", {"reduce_scatter": 1}, 1)),
    "backward": (("attention_out", {"all_gather": 1}, 1),
                 ("attention_in", {"all_gather": 1, "reduce_scatter": 1}, 2),
                 ("mlp_out", {"all_gather": 1}, 1),
                 ("mlp_in", {"all_gather": 1, "reduce_scatter": 1}, 2))}
"""One decoder layer's hidden-wide tensor-parallel collectives as the runtime
(disttrain/parallel/tensor.py) runs them, by direction: (GEMM group, collectives, GEMM
multiple). Forward: the feature-sharded input all-gathered before the column-parallel GEMMs
(q/k/v: `attention_in`; the MLP's input projections: `mlp_in`), the row-parallel outputs (o,
the MLP's output projection) reduce-scattered after theirs. Backward: the output gradient
gathered beside the row-parallel input-gradient GEMMs (the weight gradient follows whole);
the saved input shard gathered again and the input gradient reduce-scattered around the
column-parallel ones (2x the forward GEMMs). With `tp_overlap_chunks` K > 1 each entry is
one pipeline over K token blocks (`tp_pipeline_exposed`) or a bulk pair (`TP_BULK`)."""

TP_COLLECTIVES = {direction: {kind: sum(kinds.get(kind, 0) for _, kinds, _ in pipes)
                              for kind in ("all_gather", "reduce_scatter")}
                  for direction, pipes in TP_PIPELINES.items()}
"""Per layer and direction, how many hidden-wide collectives of each kind (`TP_PIPELINES`):
forward 2 all-gathers + 2 reduce-scatters, backward 4 + 2."""

TP_BULK = frozenset({("backward", "attention_in"), ("backward", "mlp_in")})
"""`TP_PIPELINES` entries overlapped in bulk when K > 1 (`_ColumnParallel.backward`, Transformer
Engine's "bulk" qkv/fc1 dgrad + wgrad): the input's gather (one call) beside the whole input-
gradient GEMM, its reduce-scatter (one call) beside the whole weight-gradient GEMM, in order
on one stream: a, r seconds beside g each expose max(0, a - g) + max(0, r - g)."""

TP_OVERLAP_CHOICES = (1, 2, 4, 8)
"""Token blocks the planner considers for `parallel.tp_overlap_chunks` (1: blocking)."""


def tp_backward_gemms(split_s: list[float], whole_s: list[float],
                      column_s: list[float] | None = None) -> list[float]:
    """Backward (input + weight gradient) GEMM seconds of each projection from its forward's
    per token block (`split_s`) and whole (`whole_s`): row-parallel (o, the MLP's output) input
    gradient per block, weight gradient whole; column-parallel ones (`TP_BULK`) as
    `column_s` gives them (`parallel.tp_column_backward` 'lean': each of its two GEMMs as tp
    GEMMs of H / tp input features, one per rank's block of the gathered input;
    `disttrain/parallel/tp_linear.py`), else whole ('whole')."""
    last = len(split_s) - 1
    column = whole_s if column_s is None else column_s
    return [split_s[i] + whole_s[i] if i in (3, last) else 2 * column[i]
            for i in range(len(split_s))]


COLUMN_WHOLE_TRANSPOSES = 2
"""(T, H/tp) transposes a column-parallel backward with whole GEMMs makes (`_ColumnParallel`,
'whole'): the saved shard before its gather, the reduced input gradient after its
reduce-scatter; each reads and writes T x H/tp elements of the training dtype."""


def column_backward_copy_bytes(shape: ModelShape, dtype: str, tp: int, mode: str) -> float:
    """HBM bytes per token one layer's column-parallel backwards (q/k/v and the MLP's input
    projections: two per layer) copy beyond the GEMMs: 'whole' transposes
    (`COLUMN_WHOLE_TRANSPOSES`, read + write each), 'lean' none (its GEMMs read and write the
    collectives' rank-major buffers in place)."""
    if tp <= 1 or mode == "lean":
        return 0.0
    return 2 * COLUMN_WHOLE_TRANSPOSES * 2 * DTYPE_BYTES[dtype] * shape.hidden_size / tp


def tp_gemm_groups(gemms_s: list[float]) -> dict[str, float]:
    """Forward GEMM seconds of `planner.efficiency.layer_gemms`' projections (attention's q,
    k, v, o first, then the MLP's, its output projection last) by `TP_PIPELINES` group."""
    return {"attention_in": sum(gemms_s[:3]), "attention_out": gemms_s[3],
            "mlp_in": sum(gemms_s[4:-1]), "mlp_out": gemms_s[-1]}


def tp_comm_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, tokens: int, tp: int,
                    params: CostParams, direction: str = "forward", *, chunks: int = 1,
                    gemm_s: dict[str, float] | None = None,
                    whole_gemm_s: dict[str, float] | None = None) -> float:
    """Exposed seconds of one layer's tensor-parallel collectives in one `direction`
    ('forward' or 'backward'; `TP_PIPELINES`) over the intra-node TP group: tokens x hidden
    in the training dtype each, one call per token block (`chunks`). Where collectives
    overlap compute (GPUs: NCCL runs them on its own stream) and the runtime pipelines them
    (`chunks` > 1), each pipeline exposes `tp_pipeline_exposed` of its collectives against its
    GEMMs (`gemm_s`: forward GEMM seconds per group, `tp_gemm_groups`), and a `TP_BULK` entry
    (one call per collective) what each collective needs beyond one whole GEMM of its group
    (`whole_gemm_s`: its input- or weight-gradient GEMMs as the backward runs them, whole or
    per rank's feature block, `parallel.tp_column_backward`; default `gemm_s`); else all of them."""
    if tp <= 1:
        return 0.0
    sent = tokens * shape.hidden_size * DTYPE_BYTES[dtype] * (tp - 1) / tp
    # the layer's two RMSNorms each all-reduce their fp32 sums of squares (forward) and the
    # gradient's dot product (backward) over the TP group: blocking, tiny, latency-bound
    norms = TP_NORM_ALL_REDUCES * tp_all_reduce_seconds(hw, tokens, tp, params)
    overlap = chunks > 1 and gemm_s is not None and overlaps_compute(hw)
    total = 0.0
    for group, kinds, multiple in TP_PIPELINES[direction]:
        bulk = chunks > 1 and (direction, group) in TP_BULK
        calls = 1 if bulk else chunks
        each = [count * (sent / collective_bw(hw, tp, params, kind)
                         + calls * call_latency(hw, params.gpu_collective_latency_s, kind))
                for kind, count in kinds.items()]
        if not overlap:
            total += sum(each)
        elif bulk:
            total += sum(max(0.0, c - (whole_gemm_s or gemm_s)[group]) for c in each)
        else:
            total += tp_pipeline_exposed(sum(each), multiple * gemm_s[group], chunks)
    return total + norms


TP_NORM_ALL_REDUCES = 2
"""All-reduces of one fp32 value per token a layer's RMSNorms run over the TP group in each
direction (disttrain/parallel/tensor.py: the sum of squares of a feature-sharded input
forward, the gradient's dot product backward; two norms per layer)."""
TP_LOSS_ALL_REDUCES = 2
"""Blocking all-reduces of the vocabulary-parallel loss per loss tile (tp_vocab.py: the
logits' maximum, then the stacked sums)."""
TP_HEAD_COLLECTIVES = {"all_gather": 3, "reduce_scatter": 2}
"""Hidden-wide collectives of the embedding and the head per microbatch (forward + backward):
the embedding's output reduce-scattered, its gradient gathered; the final hidden states
gathered before the head, the head's input gradient gathered and reduce-scattered."""


def tp_all_reduce_seconds(hw: HardwareSpec, tokens: float, tp: int, params: CostParams) -> float:
    """One blocking all-reduce of one fp32 value per token over the TP group."""
    sent = 2 * tokens * 4 * (tp - 1) / tp
    return (sent / collective_bw(hw, tp, params, "all_reduce")
            + call_latency(hw, params.gpu_collective_latency_s, "all_reduce"))


def tp_head_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, tokens: int, tp: int,
                    params: CostParams, *, loss_tiles: int = 1) -> float:
    """Seconds of one microbatch's tensor-parallel collectives outside the decoder layers,
    blocking: the embedding's and head's hidden-wide ones (`TP_HEAD_COLLECTIVES`), the final
    norm's all-reduces (forward, backward) and the loss's per tile (`TP_LOSS_ALL_REDUCES`)."""
    if tp <= 1:
        return 0.0
    sent = tokens * shape.hidden_size * DTYPE_BYTES[dtype] * (tp - 1) / tp
    wide = sum(count * (sent / collective_bw(hw, tp, params, kind)
                        + call_latency(hw, params.gpu_collective_latency_s, kind))
               for kind, count in TP_HEAD_COLLECTIVES.items())
    tile = tokens / max(1, loss_tiles)
    return (wide + 2 * tp_all_reduce_seconds(hw, tokens, tp, params)
            + loss_tiles * TP_LOSS_ALL_REDUCES * tp_all_reduce_seconds(hw, tile, tp, params))


def tp_step_bytes(shape: ModelShape, dtype: str, tokens: int, tp: int, *,
                  recomputed_mlp: bool = False, recomputed_layer_tokens: float = 0) -> int:
    """Bytes one rank's tensor-parallel collectives send in one forward + backward of `tokens`
    tokens (the runtime's count, docs/design.md "Tensor parallelism"): per layer the
    `TP_COLLECTIVES` (+2 when a tiled MLP reruns its forward in the backward), the embedding 2
    and the head 3 hidden-wide collectives in the training dtype; one fp32 all-reduce per token
    for each RMSNorm forward and backward (2 per layer + the final norm) and 3 for the loss.
    A token-wise recompute reruns a layer's forward collectives (4 hidden-wide, 2 norm
    all-reduces) for the tokens it rebuilds: `recomputed_layer_tokens` is their sum over layers."""
    if tp <= 1:
        return 0
    per_layer = sum(sum(kinds.values()) for kinds in TP_COLLECTIVES.values())
    units = (per_layer + 2 * recomputed_mlp) * shape.num_layers + 5
    unit = tokens * shape.hidden_size * DTYPE_BYTES[dtype] * (tp - 1) // tp
    norms = 2 * (2 * shape.num_layers + 1)
    forward_units = sum(TP_COLLECTIVES["forward"].values())
    rerun = recomputed_layer_tokens * (forward_units * shape.hidden_size * DTYPE_BYTES[dtype]
                                       + 2 * 2 * 4) * (tp - 1) / tp
    return units * unit + (norms + 3) * 2 * tokens * 4 * (tp - 1) // tp + int(rerun)


def tp_replicated_grad_bytes(shape: ModelShape, tp: int, layers: int, *, zero_stage: int = 0,
                             shard_group: int = 1) -> float:
    """Bytes one rank sends per step summing the gradients of the parameters every tp rank
    holds whole (Qwen3's q/k norm weights, `ModelShape.tp_replicated_layer_params`) over the
    tp group: one fp32 all-reduce per layer chunk of its gradient shard's share of them, once
    per step (`disttrain.parallel.grad_reduce.TpReplicatedGrads`). ZeRO 1-3 shard them over
    the `shard_group`: the group's mean (exact per rank when the group is 1)."""
    if tp <= 1:
        return 0.0
    share = shape.tp_replicated_layer_params * layers / (shard_group if zero_stage else 1)
    return 2 * share * 4 * (tp - 1) / tp


def tp_replicated_grad_calls(shape: ModelShape, tp: int, layers: int) -> int:
    """All-reduces per step of `tp_replicated_grad_bytes`: one per layer chunk holding them."""
    return layers if tp > 1 and shape.tp_replicated_layer_params else 0
