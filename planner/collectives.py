"""Communication: bytes of the runtime's collectives and their seconds on a cluster, intra-node
or hierarchical across nodes.

A group of `group` ranks whose members are `stride` rank ids apart (the rank grid is
(pp, dp, sp, tp) with tp innermost, so a dp x sp group has stride tp). Inside one node the
collective runs at the node's bandwidth. Across nodes it runs as NCCL's hierarchical
algorithms do: the members of each node reduce-scatter / all-gather among themselves over
NVLink, and each member exchanges its 1/per_node share with its peers on the other nodes
over its own NIC (`inter_node_bw` is per device), so the inter-node step moves 1/per_node
of the buffer. An all-to-all has no such reduction: the share of its data addressed to
other nodes crosses the NICs. Each call pays a fixed latency (NCCL's launch + handshake:
`CostParams.gpu_collective_latency_s`, or the node's measured one on CPU nodes) and a
further inter-node latency when it leaves the node.
"""

from __future__ import annotations

from planner.analytic import FP32, kv_heads_per_rank
from planner.costtypes import Candidate, CostParams
from planner.hardware import HardwareSpec
from planner.shapes import DTYPE_BYTES, ModelShape


def call_latency(hw: HardwareSpec, default_s: float, kind: str | None = None) -> float:
    """Per-call latency inside a node: measured for this collective `kind` when known (`probe`'s
    per-kind fit, or a CPU profile's calls between compute segments), else measured over all
    kinds, else `default_s` on GPUs and 0 elsewhere."""
    if kind in hw.intra_node_collective_latency_s:
        return hw.intra_node_collective_latency_s[kind]
    if hw.intra_node_latency_s:
        return hw.intra_node_latency_s
    return 0.0 if hw.device_name.lower() == "cpu" else default_s


def collective_seconds(hw: HardwareSpec, kind: str, sent_bytes: float, group: int, stride: int,
                       calls: float, *, intra_bw: float, inter_bw: float, latency_s: float,
                       inter_latency_s: float) -> float:
    """Seconds of `calls` collectives of `kind` whose bytes one rank sends sum to
    `sent_bytes` ((g-1)/g of the buffer; twice that for an all-reduce), over a group of
    `group` ranks `stride` apart. `intra_bw` / `inter_bw` are achieved bytes/s one rank
    sends (NVLink: half its bidirectional datasheet figure). Across nodes a rank sends
    (m - 1)/m of the buffer over NVLink and 1/m of it (the share of the other nodes) over its
    NIC, m members per node, both at once (one pipelined ring): the slower link's time."""
    if group <= 1:
        return 0.0
    span = group * stride
    if span <= hw.devices_per_node:
        return sent_bytes / intra_bw + calls * latency_s
    per_node = max(1, min(group, hw.devices_per_node // max(1, stride)))
    nodes = group / per_node
    if kind == "all_to_all":
        local = (per_node - 1) / (group - 1)
        seconds = sent_bytes * local / intra_bw + sent_bytes * (1 - local) / inter_bw
    else:
        full = sent_bytes * group / (group - 1)
        # a ring spanning nodes is one pipeline: its NVLink and NIC hops carry their shares
        # at the same time, so the slower of the two sets the time (NCCL's tuning model
        # prices a multi-node ring at its inter-node bandwidth alone, src/graph/tuning.cc)
        seconds = max(full * (per_node - 1) / per_node / intra_bw,
                      full / per_node * (nodes - 1) / nodes / inter_bw)
    return seconds + calls * (latency_s + inter_latency_s)


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
    return (2 * shape.q_dim + 2 * kv) * tokens * DTYPE_BYTES[dtype] * (sp - 1) / sp


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


def param_gather_overlap(hw: HardwareSpec, requested: bool | None = None) -> bool:
    """Whether ZeRO 0-2 overlap the post-update parameter all-gather with the next step's
    forward (`parallel.overlap_param_gather`): as requested, else where it helps. On GPUs it
    does (Megatron-LM's `--overlap-param-gather`, used for its published H100 runs: the
    gather runs on the collective stream while the forward computes). On a CPU node it is off:
    gloo's worker thread shares the cores the ranks compute on (bench/gloo_overlap.py)."""
    if requested is not None:
        return requested
    return overlaps_compute(hw)


def zero_collectives(num_params: float, zero_stage: int, group: int, units: int, *,
                     backward_resident_params: float = 0, param_bytes: int = FP32,
                     grad_bytes: int = FP32, gathered_once: int = 0
                     ) -> list[tuple[str, float, float, int, int]]:
    """(kind, bytes per microbatch, bytes per step, calls per microbatch, calls per step) of
    the runtime's ZeRO collectives for `num_params` packed into `units` chunks (one call per
    chunk and collective); `zero_step_bytes` sums their bytes. Gathers move `param_bytes`
    per parameter, gradient reductions `grad_bytes`. Stage 3 gathers `gathered_once` of the
    chunks (the backward-resident embedding, final norm and head) once per microbatch, the
    others twice."""
    if group <= 1:
        return []
    share = (group - 1) / group
    gather, reduce = share * param_bytes, share * grad_bytes
    if zero_stage == 3:
        gathers = (2 * num_params - backward_resident_params) * gather
        return [("all_gather", gathers, 0.0, 2 * units - gathered_once, 0),
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
        latency_s=call_latency(hw, params.gpu_collective_latency_s, kind),
        inter_latency_s=0.0 if hw.device_name.lower() == "cpu" else params.inter_node_latency_s)


def comm_times(shape: ModelShape, dtype: str, hw: HardwareSpec, cand: Candidate, *,
               stage_layers: int, stage_num_params: float, tokens: int,
               microbatch_compute_s: float, attention_forward_s: float, params: CostParams,
               backward_resident_params: float = 0, stage_units: int | None = None,
               grad_reduce_dtype: str = "fp32", microbatch_backward_s: float | None = None,
               overlap_param_gather: bool | None = None, last_stage: bool = True,
               loss_tiles: int = 1) -> tuple[float, float]:
    """(exposed per microbatch, exposed per step) communication seconds for one stage.

    Each call costs a latency (measured on CPU nodes, NCCL's on GPUs) on top of its bytes
    over the kind's bandwidth; groups that leave a node run hierarchically. Where collectives
    overlap compute (GPUs): ring K/V passing hides under its block's attention; ZeRO-3's
    prefetched all-gathers under the stage's compute except the first; gradient reductions
    are bucketed (one bucket per ZeRO unit) and run beside the backward, so only what exceeds
    the backward and the last bucket is exposed (stages 0-2 reduce once per step, in the last
    microbatch's backward); the stage 1-2 parameter all-gather after the update under the next
    step's first forward when `overlap_param_gather` (None: `param_gather_overlap`). Ulysses
    all-to-alls are on the critical path either way, and so are the step's tiny blocking
    all-reduces (`step_sync_calls`) and, on the `last_stage`, tensor parallelism's
    collectives outside the layers (`tp_head_seconds`, `loss_tiles` tiles of the loss).
    `stage_num_params` is per TP rank; `stage_units`: ZeRO units of the stage (default: its
    layers + embedding / head)."""
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
    if tp > 1 and last_stage:
        from planner.tp_collectives import tp_head_seconds   # it imports this module
        per_mb += tp_head_seconds(shape, dtype, hw, tokens, tp, params, loss_tiles=loss_tiles)
    units = stage_units if stage_units is not None else stage_layers + 2
    once = 0
    if cand.zero_stage == 3:
        units += int(last_stage) * (zero3_tail_chunks(shape, cand.pp) - 1)
        once = units - stage_layers
    mb, per_step = zero_microbatch_seconds(
        hw, params, cand, stage_num_params, units, microbatch_compute_s=microbatch_compute_s,
        backward_s=backward, backward_resident_params=backward_resident_params, param_bytes=b,
        grad_bytes=DTYPE_BYTES[grad_reduce_dtype], overlap=overlap,
        gather_overlap=param_gather_overlap(hw, overlap_param_gather), gathered_once=once)
    if tp > 1 and shape.qk_norm:     # q/k norm gradients summed over tp, once a step
        from planner.tp_collectives import tp_replicated_grad_bytes, tp_replicated_grad_calls
        per_step += _seconds(hw, params, "all_reduce", tp_replicated_grad_bytes(
            shape, tp, stage_layers, zero_stage=cand.zero_stage, shard_group=cand.shard_group),
            tp, 1, tp_replicated_grad_calls(shape, tp, stage_layers))
    shard_calls, pp_tp_calls = step_sync_calls(cand)
    per_step += (_seconds(hw, params, "all_reduce", shard_calls * 8.0, cand.shard_group, tp, shard_calls)
                 + (pp_tp_calls * call_latency(hw, params.gpu_collective_latency_s, "all_reduce")))
    return per_mb + mb, per_step


def zero3_tail_chunks(shape: ModelShape, pp: int) -> int:
    """Chunks ZeRO-3 packs the final norm and the head into (disttrain/parallel/chunks.py packs
    parameters in order into chunks of one layer's size, never splitting one): two when the
    head does not fit beside the norm, else one (a head tied to the embedding on one stage is
    not the tail's)."""
    head = 0 if shape.tie_embeddings and pp == 1 else shape.vocab_size * shape.hidden_size
    return 2 if head and shape.hidden_size + head > shape.layer_params() else 1


def step_sync_calls(cand: Candidate) -> tuple[int, int]:
    """(over the dp x sp group, over the pp x tp group) blocking all-reduces of one scalar a
    step runs besides its data's collectives: the loss summed over the dp x sp ranks
    (disttrain/engine.py, when they are 2+) and the gradient norm's sum of squares over the
    ZeRO group (stages 1-3: each rank holds a shard) and over the pp x tp ranks (each holds a
    part of the model)."""
    shard = 0 if cand.shard_group <= 1 else 1 + (cand.zero_stage > 0)
    return shard, int(cand.pp * cand.tp > 1)


def zero_microbatch_seconds(hw: HardwareSpec, params: CostParams, cand: Candidate,
                            num_params: float, units: int, *, microbatch_compute_s: float,
                            backward_s: float, backward_resident_params: float, param_bytes: int,
                            grad_bytes: int, overlap: bool, gather_overlap: bool = False,
                            gathered_once: int = 0) -> tuple[float, float]:
    """(exposed per microbatch, exposed per step) seconds of the ZeRO collectives of
    `num_params` parameters in `units` buckets. The runtime issues every ZeRO collective on
    one process group, whose NCCL calls run one after another on one stream and share the
    group's links: a ZeRO-3 microbatch's forward gathers hide under the forward only, and its
    backward gathers plus its gradient reductions queue behind each other under the
    backward, so what they need together beyond that window is exposed (at least the first
    gather and the last bucket). Stage 2 reduce-scatters every microbatch in its backward.
    Stages 0-1 reduce once per step, each chunk as soon as the last microbatch's backward has
    finished its gradient (disttrain/parallel/grad_reduce.py), alone on the group's stream in
    that backward: what exceeds one microbatch's backward, and at least the last bucket (the
    chunk the backward reaches last), is exposed. Stages 1-2 gather the updated parameters
    after the step: blocking (exposed), or with `gather_overlap` one chunk after another beside
    the next step's first forward, each chunk waited for before its first unit runs, so the
    first chunk's gather and what the gathers need beyond the forward are exposed
    (`tp_pipeline_exposed` over the units: max(g / U, g - f (U - 1) / U)). Off GPUs (`overlap`
    False: gloo shares the cores, bench/gloo_overlap.py) every second is exposed."""
    parts = zero_collectives(num_params, cand.zero_stage, cand.shard_group, units,
                             backward_resident_params=backward_resident_params,
                             param_bytes=param_bytes, grad_bytes=grad_bytes,
                             gathered_once=gathered_once)
    mb = {k: (_seconds(hw, params, k, mb_b, cand.shard_group, cand.tp, mb_c), mb_c)
          for k, mb_b, _, mb_c, _ in parts}
    step = {k: _seconds(hw, params, k, st_b, cand.shard_group, cand.tp, st_c)
            for k, _, st_b, _, st_c in parts}
    if not overlap:
        return sum(s for s, _ in mb.values()), sum(step.values())
    gather_s, gather_calls = mb.get("all_gather", (0.0, 0))
    reduce_s = mb.get("reduce_scatter", (0.0, 0))[0]
    per_mb = 0.0
    if gather_s:        # ZeRO-3: forward share of the gathers, then backward's with the reductions
        forward_share = num_params / max(1.0, 2 * num_params - backward_resident_params)
        forward_window = max(0.0, microbatch_compute_s - backward_s)
        per_mb = (max(0.0, forward_share * gather_s - forward_window)
                  + max(0.0, (1 - forward_share) * gather_s + reduce_s - backward_s))
        per_mb = max(per_mb, gather_s / max(1, gather_calls) + reduce_s / units)
    elif reduce_s:      # ZeRO-2: per-microbatch reduction beside the backward
        per_mb = max(reduce_s - backward_s, reduce_s / units)
    per_step = step.get("all_gather", 0.0)
    if per_step and gather_overlap:   # beside the next step's first forward, chunk by chunk
        per_step = tp_pipeline_exposed(per_step, max(0.0, microbatch_compute_s - backward_s),
                                       max(1, units))
    for kind in ("reduce_scatter", "all_reduce"):
        if step.get(kind):
            per_step += max(step[kind] - backward_s, step[kind] / units)
    return per_mb, per_step


def tp_pipeline_exposed(comm_s: float, gemm_s: float, chunks: int) -> float:
    """Exposed seconds of `comm_s` of collectives (their K x latency included) pipelined with
    `gemm_s` of GEMMs over K = `chunks` token blocks, block i's GEMM needing block i's
    collective (or the reverse): the collectives run one after another on their own stream,
    so the first (or last) block's is always exposed, and the rest hide behind the other
    blocks' GEMMs as far as those last: max(c / K, c - g (K - 1) / K). K = 1: all of it."""
    if chunks <= 1:
        return comm_s
    return max(comm_s / chunks, comm_s - gemm_s * (chunks - 1) / chunks)


def step_collective_calls(shape: ModelShape, cand: Candidate, *, stage_layers: int,
                          num_microbatches: int, first_stage: bool = True, last_stage: bool = True,
                          loss_tiles: int = 1, rebuilt_layers: int = 0) -> dict[str, int]:
    """Blocking collective calls one rank of a stage issues in a step, by kind, as `comm_times`
    prices them (pp = 1, no ring: their point-to-point traffic is not counted here): Ulysses'
    four all-to-alls per layer and microbatch, ZeRO's per chunk, the step's scalar all-reduces
    (`step_sync_calls`) and tensor parallelism's (per layer `TP_COLLECTIVES` and the norms'
    all-reduces, a token-wise rebuild of `rebuilt_layers` layers rerunning the forward ones;
    on the last stage the embedding's and head's, the final norm's and the loss's per tile)."""
    from planner.tp_collectives import (TP_COLLECTIVES, TP_HEAD_COLLECTIVES,
                                        TP_LOSS_ALL_REDUCES, TP_NORM_ALL_REDUCES,
                                        tp_replicated_grad_calls)
    m, calls = num_microbatches, {}

    def add(kind: str, n: int) -> None:
        if n:
            calls[kind] = calls.get(kind, 0) + n
    if cand.sp > 1 and cand.sp_kind == "ulysses":
        add("all_to_all", 4 * stage_layers * m)
    units = stage_layers + int(first_stage) + int(last_stage)
    once = 0
    if cand.zero_stage == 3:
        units += int(last_stage) * (zero3_tail_chunks(shape, cand.pp) - 1)
        once = units - stage_layers
    for kind, _, _, mb_calls, step_calls in zero_collectives(1.0, cand.zero_stage, cand.shard_group,
                                                             units, gathered_once=once):
        add(kind, m * mb_calls + step_calls)
    shard, pp_tp = step_sync_calls(cand)
    add("all_reduce", shard + pp_tp)
    if cand.tp > 1:
        for kind in ("all_gather", "reduce_scatter"):
            per_layer = TP_COLLECTIVES["forward"][kind] + TP_COLLECTIVES["backward"][kind]
            add(kind, m * (stage_layers * per_layer + rebuilt_layers * TP_COLLECTIVES["forward"][kind]
                           + (TP_HEAD_COLLECTIVES[kind] if last_stage else 0)))
        add("all_reduce", m * TP_NORM_ALL_REDUCES * (2 * stage_layers + rebuilt_layers)
            + (m * (2 + TP_LOSS_ALL_REDUCES * loss_tiles) if last_stage else 0)
            + tp_replicated_grad_calls(shape, cand.tp, stage_layers))
    return calls
