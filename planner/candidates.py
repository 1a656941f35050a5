"""Candidate parallel layouts and the per-stage problems the MIP solves for each.

`enumerate_candidates` (planner.grid) lists the layouts with a reason for each one ruled out.
`build_stages` turns one candidate
into `StageProblem`s: fixed bytes (unchunked model states, gather buffers, the working set
of one layer's backward, the loss chunk), chunkable states, capacities and bandwidths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.analytic import SavedBytesPerToken, layer_saved_bytes_per_token, zero3_gather_bytes
from planner.costmodel import (Candidate, CostParams, LayerCost, comm_times, cpu_optimizer_s,
                               device_optimizer_s, inflight_microbatches, layer_cost,
                               qkv_bytes_per_token,
                               local_tokens, tiled_layer_cost, working_base_bytes, logits_working_bytes,
                               model_state_bytes, optimizer_bytes_per_param, overlaps_compute, stage_layer_ranges,
                               stage_params, tp_comm_seconds)
from planner.contention import zero_contention_seconds
from planner.efficiency import (MEMORY_EFFICIENCY, REFERENCE_KERNEL, device_family,
                                grad_bookkeeping_bytes_per_param)
from planner.grid import divisors, enumerate_candidates, tp_problem  # noqa: F401
from planner.loss_tiles import head_mapped_bytes, loss_tile_options, stage_head_seconds
from planner.mip import StageProblem
from planner.outer import build_outer_chunks
from planner.page_faults import HEADROOM, microbatch_mapped_bytes, state_mapped_bytes
from planner.request import PlanRequest
from planner.shapes import DTYPE_BYTES
from planner.stage_setup import (  # noqa: F401  (re-exported: callers import them from here)
    MIN_REBUILD_TILE, REBUILD_HEADROOM, StageSetup, _choose_rebuild_tile, _fastest_loss_tile,
    _leanest, _min_device, _with_rebuild, gib, memory_rejection, rebuild_tiles)

GiB = 2**30
LOSS_CHUNK_BUDGET = 1 * GiB
"""Bytes the fp32 logits (+ their gradient) of one loss chunk may take."""
MLP_TILE_SHARE = 0.05
"""Share of device memory one MLP token tile (saved + gradients) may take."""




def bytes_per_token(request: PlanRequest, cand: Candidate, measured: dict[str, float] | None
                    ) -> SavedBytesPerToken:
    """Analytic per-token bytes, or a profile's measured categories (+ KV replication)."""
    ulysses_sp = cand.sp if cand.sp_kind == "ulysses" else 1
    analytic = layer_saved_bytes_per_token(request.model, request.dtype, ulysses_sp)
    if not measured:
        return analytic
    replication = analytic.token_local - layer_saved_bytes_per_token(request.model, request.dtype).token_local
    return SavedBytesPerToken(
        input_saved=measured["input"], layer_input=analytic.layer_input,
        attention_output=measured["attention_output"],
        token_local=measured["token_local"] + replication, mlp=analytic.mlp)


LAYER_TIME_NAMES = ("forward_s", "backward_s", "token_local_forward_s")
"""A profile's fitted layer times that replace the cost model's layer prices (attention included)."""


def profile_prices_layers(request: PlanRequest, profile) -> bool:
    """Whether `profile`'s measured layer times replace the efficiency curves for `request`
    (taken on the target's device type and dtype): then `HardwareSpec.attention_kernel` has
    no effect, the measurement being of the kernel the runtime runs."""
    return _profile_applies(request, profile, LAYER_TIME_NAMES)


KERNEL_NOTE = "attention kernel"
"""How the note on `HardwareSpec.attention_kernel` starts (the report shows it beside the cluster)."""


def kernel_note(request: PlanRequest, profile) -> tuple[str, ...]:
    """Says which attention kernel generation priced the attention core, when the cluster
    names one (`cluster.attention_kernel`), and that a profile's measured layer times win."""
    kernel = request.hardware.attention_kernel
    if kernel is None:
        return ()
    if profile_prices_layers(request, profile):
        return (f"{KERNEL_NOTE} {kernel} (cluster.attention_kernel) not used: the profile's "
                f"measured layer times price the attention core",)
    if kernel == REFERENCE_KERNEL:
        return (f"{KERNEL_NOTE} {kernel} (cluster.attention_kernel): the device's own curve, "
                f"the kernel class disttrain's runtime runs (torch SDPA)",)
    return (f"{KERNEL_NOTE} {kernel} (cluster.attention_kernel): the attention core priced at "
            f"{kernel}'s published throughput over {REFERENCE_KERNEL}'s, the device curve's "
            f"class; pricing only, disttrain's runtime runs torch SDPA",)


def _profile_applies(request: PlanRequest, profile, names: tuple[str, ...]) -> bool:
    """The profile was taken on the target's device type and dtype and has these timings."""
    coeffs = getattr(profile, "time_coeffs", None) or {}
    return (profile is not None and all(n in coeffs for n in names) and profile.dtype == request.dtype
            and profile.device.lower() == request.hardware.device_name.lower())


@dataclass(frozen=True, kw_only=True)
class ProfiledTiming:
    """Parts of a step outside the decoder layers, measured by the profile on the target."""

    head_forward_s: float
    """Final norm + output head + loss forward of one microbatch on one rank."""
    head_backward_s: float
    """Its backward."""
    optimizer_s_per_param: float
    """Clip + AdamW seconds per parameter of a rank's shard (0: not measured)."""
    page_fault_s_per_byte: float = 0.0
    """A freshly mapped block's extra seconds per byte (0: not measured)."""
    allocation_fits: dict | None = None
    """The profile's allocations ('layer', 'head') as [a, b] of a + b * tokens."""
    loss_tile_s: float = 0.0
    """Fixed seconds of one more tile of the tiled loss (0: not measured)."""


def profiled_timing(request: PlanRequest, cand: Candidate, profile) -> ProfiledTiming | None:
    """Head and optimizer times from a profile taken on the target device type, else None."""
    if not _profile_applies(request, profile, ("head_forward_s", "head_backward_s")):
        return None
    tokens = local_tokens(request.seq_len, request.micro_batch_size, cand.sp)
    return ProfiledTiming(
        head_forward_s=profile.time_s("head_forward_s", tokens, request.seq_len),
        head_backward_s=profile.time_s("head_backward_s", tokens, request.seq_len),
        optimizer_s_per_param=getattr(profile, "optimizer_s_per_param", 0.0) or 0.0,
        page_fault_s_per_byte=getattr(profile, "page_fault_s_per_byte", 0.0) or 0.0,
        allocation_fits=getattr(profile, "allocation_fits", None) or None,
        loss_tile_s=getattr(profile, "loss_tile_s", 0.0) or 0.0)


def profiled_layer_cost(request: PlanRequest, cand: Candidate, per_token: SavedBytesPerToken,
                        profile, params: CostParams | None = None) -> LayerCost | None:
    """Layer times from a profile taken on the target device type (None when it was not):
    token-local parts scale with local tokens, the core with local tokens x full sequence.
    The profile times one rank without tensor parallelism: tp divides its times and adds the
    TP collectives, blocking (the GEMM times the overlap needs per group are not profiled;
    the plan then says `tp_overlap_chunks` 1, as priced; nor are narrow against whole GEMMs:
    `tp_column_backward` is the request's, else 'lean')."""
    names = LAYER_TIME_NAMES
    if not profile_prices_layers(request, profile):
        return None
    tokens = local_tokens(request.seq_len, request.micro_batch_size, cand.sp)
    forward, backward, recompute = (profile.time_s(n, tokens, request.seq_len) / cand.tp
                                    for n in names)
    if request.attention_fraction is not None:  # packed documents: the core shrinks
        core_forward = max(forward - recompute, 0.0) * (1 - request.attention_fraction)
        forward -= core_forward
        backward -= min(backward - recompute, CostParams.attention_backward_factor * core_forward)
    ulysses_sp = cand.sp if cand.sp_kind == "ulysses" else 1
    tp = cand.tp
    if tp > 1:
        comm_f, comm_b = (tp_comm_seconds(request.model, request.dtype, request.hardware, tokens,
                                          tp, params or CostParams(), direction,
                                          chunks=request.tp_overlap_chunks or 1)
                          for direction in ("forward", "backward"))
        forward, backward, recompute = forward + comm_f, backward + comm_b, recompute + comm_f
    return LayerCost(tokens=tokens, input_bytes=per_token.layer_input * tokens / tp,
                     tp_overlap_chunks=request.tp_overlap_chunks or 1,
                     tp_column_backward=request.tp_column_backward or "lean",
                     attention_output_bytes=per_token.attention_output * tokens / tp,
                     token_local_bytes=per_token.token_local * tokens / tp,
                     mlp_bytes=per_token.mlp * tokens / tp,
                     plain_bytes=per_token.plain_total * tokens / tp, forward_s=forward,
                     backward_s=backward, recompute_s=recompute,
                     qkv_bytes=qkv_bytes_per_token(request.model, request.dtype, ulysses_sp) * tokens / tp)


def profiled_collectives(request: PlanRequest, profile) -> PlanRequest:
    """The request with its node's per-kind collective latency and bandwidth replaced by the
    profile's (`LayerProfile.collective_fits`: blocking gloo calls between the ranks, reached
    from compute on the cores they share, measured beside the layer), where that profile was
    taken on the target's CPU; else unchanged."""
    fits = getattr(profile, "collective_fits", None) or {}
    hw = request.hardware
    if not fits or hw.device_name.lower() != "cpu" or not _profile_applies(request, profile, ()):
        return request
    return replace(request, hardware=hw.replace(
        intra_node_collective_latency_s={k: float(lat) for k, (lat, _) in fits.items()},
        intra_node_collective_bw={**hw.intra_node_collective_bw,
                                  **{k: float(bw) for k, (_, bw) in fits.items()}}))


def profiled_stages(request: PlanRequest, cand: Candidate, params: CostParams, profile,
                    measured_bytes: dict[str, float] | None,
                    tiling: tuple[int, int] | None = None) -> tuple[list[StageSetup], tuple[int, int]]:
    """`build_stages` with what a profile gives: its bytes per token (`measured_bytes`), and
    its layer, head and optimizer times when it was taken on the target's device type."""
    per_token = bytes_per_token(request, cand, measured_bytes)
    request = profiled_collectives(request, profile)
    return build_stages(request, cand, params, per_token,
                        profiled_layer_cost(request, cand, per_token, profile, params), tiling=tiling,
                        timing=profiled_timing(request, cand, profile))


def choose_tiling(request: PlanRequest, lc: LayerCost, tp: int = 1) -> tuple[int, int]:
    """(loss_chunk_tokens, mlp_chunk_tokens): powers of two within their budgets; 0 = untiled."""
    shape = request.model
    per_token_logits = 2 * 4 * shape.vocab_size / tp
    loss_chunk = 0
    loss_budget = min(LOSS_CHUNK_BUDGET, MLP_TILE_SHARE * request.hardware.device_memory_bytes)
    if per_token_logits * lc.tokens > loss_budget:
        loss_chunk = 1 << max(0, int(loss_budget // per_token_logits).bit_length() - 1)
    mlp_per_token = lc.mlp_bytes / lc.tokens + 2 * DTYPE_BYTES[request.dtype] * shape.ffn_hidden_size / tp
    budget = MLP_TILE_SHARE * request.hardware.device_memory_bytes
    mlp_chunk = 0
    if mlp_per_token * lc.tokens > budget:
        mlp_chunk = 1 << max(10, int(budget // mlp_per_token).bit_length() - 1)
        mlp_chunk = 0 if mlp_chunk >= lc.tokens else mlp_chunk
    return loss_chunk, mlp_chunk


SELECTIVE_IN_AUTO = True
"""Offer op-level selective checkpointing per layer when `recompute` is 'auto' (the stage MIP
chooses it beside keep / swap / recompute, tests/test_selective.py, tests/test_stage_mip_tight.py;
`planner.mip` keeps the 126-layer stages fast with it). `recompute: selective` runs it on every layer."""

def host_budget_per_rank(hw, params: CostParams) -> float:
    """Host bytes one rank may use for CPU chunks and swapped activations: the node's memory
    less a reserve the plan never budgets, on GPU nodes also no more than the pinned-memory
    limit (copies to and from the device need page-locked buffers), shared by the ranks.
    CPU nodes: all of it, or 0 when modelled as one pool (moving bytes there saves nothing)."""
    if hw.device_name.lower() == "cpu":
        return 0.0 if params.single_pool_on_cpu else float(hw.host_memory_bytes) / hw.devices_per_node
    share = min(1 - params.host_reserve_share, params.pinned_share)
    return hw.host_memory_bytes * share / hw.devices_per_node


def build_stages(request: PlanRequest, cand: Candidate, params: CostParams, per_token: SavedBytesPerToken,
                 layer_override: LayerCost | None = None, tiling: tuple[int, ...] | None = None,
                 timing: ProfiledTiming | None = None) -> tuple[list[StageSetup], tuple[int, int, int]]:
    """One StageSetup per pipeline stage, and the (loss, mlp, rebuild) tiling: chosen, or
    `tiling`. `timing` replaces the analytic head and optimizer times with measured ones.
    Everything per rank: tensor parallelism divides states, activations and logits by tp."""
    shape, hw, dtype = request.model, request.hardware, request.dtype
    b, group, tp = DTYPE_BYTES[dtype], cand.shard_group, cand.tp
    cpu_node = hw.device_name.lower() == "cpu"
    one_pool = cpu_node and params.single_pool_on_cpu
    lc = layer_override or layer_cost(shape, dtype, hw, cand, seq_len=request.seq_len,
                                      micro_batch_size=request.micro_batch_size, params=params,
                                      bytes_per_token=per_token,
                                      attention_fraction=request.attention_fraction or 1.0,
                                      tp_overlap_chunks=request.tp_overlap_chunks,
                                      tp_column_backward=request.tp_column_backward)
    tokens = local_tokens(request.seq_len, request.micro_batch_size, cand.sp)
    if tiling is not None:
        loss_chunk, mlp_chunk, fixed_rebuild = (tuple(tiling) + (0, 0, 0))[:3]
    else:
        (loss_chunk, mlp_chunk), fixed_rebuild = choose_tiling(request, lc, tp), None
        if one_pool and loss_chunk:
            return _fastest_loss_tile(
                [(t, mlp_chunk, None) for t in loss_tile_options(tokens, loss_chunk)],
                lambda t: build_stages(request, cand, params, per_token, layer_override, t, timing))
    working = working_base_bytes(lc, shape, dtype, mlp_chunk, tp)   # per rank: not all of it shrinks with tp
    lc = tiled_layer_cost(lc, shape, dtype, mlp_chunk, tp)
    head_fwd, head_bwd = stage_head_seconds(  # as the runtime tiles it (planner.loss_tiles)
        shape, dtype, hw, tokens=tokens, tp=tp, chunk=loss_chunk, params=params,
        measured=None if timing is None else (timing.head_forward_s, timing.head_backward_s,
                                              timing.loss_tile_s))
    per_param_s = timing.optimizer_s_per_param if timing is not None else 0.0

    def opt_s(numel: float, on_cpu: bool) -> float:
        if per_param_s:
            return numel * per_param_s
        return cpu_optimizer_s(numel, hw, params) if on_cpu else device_optimizer_s(numel, dtype, params)

    reserved = 0 if cpu_node else params.reserved_bytes
    usable = hw.device_memory_bytes * (1 - params.fragmentation) - reserved
    usable -= max(4096.0, 1e-6 * usable)  # the solver's feasibility tolerance (~1e-7 GiB)
    per_rank = hw.devices_per_node
    layer_params = shape.layer_params_per_tp_rank(tp)
    # as the runtime holds them: compute parameters in the dtype, fp32 gradients, the optimizer
    per_param_states = b + DTYPE_BYTES["fp32"] + optimizer_bytes_per_param(dtype)
    host = host_budget_per_rank(hw, params)
    setups = []
    family = device_family(hw.device_name)
    for stage, (start, end) in enumerate(stage_layer_ranges(shape.num_layers, cand.pp)):
        count, last = end - start, stage == cand.pp - 1
        total_params = (stage_params(shape, cand.pp, stage) / tp    # q/k norms: whole on each
                        + count * (layer_params - shape.layer_params() / tp))
        chunked = cand.zero_stage == 3
        num_chunks = count if chunked else 0
        # ZeRO-3: the embedding / final norm + head states are chunks too (planner.outer)
        outer = build_outer_chunks(shape, dtype, pp=cand.pp, stage=stage, group=group, tp=tp,
                                   stage_total=stage_params(shape, cand.pp, stage),
                                   layer_total=count * shape.layer_params(),
                                   optimizer_s=opt_s) if chunked else ()
        outer_params = sum(c.num_params for c in outer)
        fixed_states = model_state_bytes(total_params - num_chunks * layer_params - outer_params,
                                         dtype, cand.zero_stage, group)
        buffers = zero3_gather_bytes(shape, dtype, 1, num_layers=count, first=stage == 0,
                                     last=last) / tp if chunked else 0.0
        head = ((logits_working_bytes(shape, tokens, loss_chunk) + 2 * b * shape.hidden_size * tokens) / tp
                if last else 0.0)
        fixed = sum(fixed_states.values()) + buffers + head
        # gradient bookkeeping of the stage's parameters, every microbatch (HBM-bound copies)
        grad_s = (total_params * grad_bookkeeping_bytes_per_param(
            cand.zero_stage, dtype, request.grad_reduce_dtype) / (family.hbm_bw * MEMORY_EFFICIENCY)
            if family is not None else 0.0)
        compute = count * (lc.forward_s + lc.backward_s) + (head_fwd + head_bwd if last else 0.0)
        backward = count * lc.backward_s + (head_bwd if last else 0.0)
        resident = ((shape.input_embedding_params() if stage == 0 else 0) + (
            shape.embedding_params() - shape.input_embedding_params() if last else 0)) / tp
        comm_mb, comm_step = comm_times(
            shape, dtype, hw, cand, stage_layers=count, stage_num_params=total_params,
            tokens=tokens, microbatch_compute_s=compute, attention_forward_s=lc.forward_s - lc.recompute_s,
            params=params, backward_resident_params=resident,
            stage_units=count + (1 if stage == 0 else 0) + (1 if last else 0),
            grad_reduce_dtype=request.grad_reduce_dtype, microbatch_backward_s=backward,
            overlap_param_gather=request.overlap_param_gather, last_stage=last,
            loss_tiles=-(-tokens // loss_chunk) if loss_chunk else 1)
        # the compute under the hidden ZeRO collectives runs on fewer SMs (planner.contention)
        slow_mb, slow_step = zero_contention_seconds(
            hw, params, cand, total_params, count + (1 if stage == 0 else 0) + (1 if last else 0),
            microbatch_compute_s=compute, backward_s=backward, backward_resident_params=resident,
            param_bytes=b, grad_bytes=DTYPE_BYTES[request.grad_reduce_dtype],
            overlap_param_gather=request.overlap_param_gather)
        comm_mb, comm_step = comm_mb + slow_mb, comm_step + slow_step
        chunk_device = per_param_states * layer_params / group
        problem = StageProblem(
            layers=(lc,) * count,
            inflight=inflight_microbatches(cand.pp, cand.num_microbatches, stage, cand.virtual),
            slots=cand.num_microbatches + cand.pp - 1, device_capacity_bytes=usable,
            fixed_device_bytes=fixed, working_base_bytes=working, host_capacity_bytes=host,
            nvme_capacity_bytes=hw.nvme_capacity_bytes / per_rank,
            host_link_bw=hw.host_link_bw / (1 if cpu_node else min(per_rank, params.gpus_per_pcie_switch)),
            nvme_read_bw=(hw.nvme_read_bw or 1.0) / per_rank, nvme_write_bw=(hw.nvme_write_bw or 1.0) / per_rank,
            tail_forward_window_s=head_fwd if last else 0.0,
            tail_backward_window_s=head_bwd if last else 0.0,
            num_chunks=num_chunks, chunk_device_bytes=chunk_device, chunk_host_bytes=chunk_device,
            chunk_link_bytes=3 * b * layer_params / group,
            chunk_buffer_bytes=b * layer_params / group,
            chunk_cpu_optimizer_s=opt_s(layer_params / group, True),
            chunk_device_optimizer_s=opt_s(layer_params / group, False),
            allow_keep=request.recompute not in ("full", "selective"),
            allow_recompute=request.recompute != "none",
            allow_selective=request.recompute == "selective" or (
                SELECTIVE_IN_AUTO and request.recompute in ("auto", "token")),
            selective_only=request.recompute == "selective",
            # on a CPU node the cpu tier is the same RAM: only an explicit request uses it
            allow_cpu=request.activation_offload == "cpu" or (
                request.activation_offload == "auto" and not one_pool),
            allow_nvme=request.activation_offload in ("auto", "nvme") and hw.has_nvme,
            token_chunks=0, page_cache_reads=one_pool, outer_chunks=outer,
            # one pool: the copies to and from NVMe share the cores the rank computes on
            swap_beside_compute=not one_pool or overlaps_compute(hw),
            # clipping waits for the global norm; on a CPU node no core is idle to hide it
            cpu_optimizer_overlap=not request.grad_clip and overlaps_compute(hw))
        fixed_states_opt = opt_s((total_params - num_chunks * layer_params - outer_params)
                                 / (group if cand.zero_stage >= 1 else 1), False)
        # one pool: a memory-bound plan maps its large blocks fresh (tp shards them: / tp)
        faults = timing.allocation_fits if one_pool and timing is not None else None
        tiled_head = head_mapped_bytes(shape, tokens=tokens, chunk=loss_chunk, tp=tp) if last else None
        fault_s = (timing.page_fault_s_per_byte * (microbatch_mapped_bytes(
            faults.get("layer", ()), faults.get("head", ()), tokens=tokens / tp, layers=count,
            with_head=last and tiled_head is None, loss_chunk_tokens=loss_chunk)
            + (tiled_head or 0.0)) if faults else 0.0)
        # ... and so do the model states: ZeRO's buffers per microbatch, the optimizer per step
        states_mb, states_step = state_mapped_bytes(
            shape, layers=count, first=stage == 0, last=last, tp=tp, zero_stage=cand.zero_stage,
            group=group, compute_bytes=b, reduce_bytes=DTYPE_BYTES[request.grad_reduce_dtype]
        ) if faults else (0.0, 0.0)
        fault_s += timing.page_fault_s_per_byte * states_mb if faults else 0.0
        setups.append(StageSetup(
            problem=problem, layer_range=(start, end), head_compute_s=(head_fwd + head_bwd if last else 0.0) + grad_s,
            comm_microbatch_s=comm_mb, comm_step_s=comm_step, fixed_optimizer_s=fixed_states_opt,
            fixed_bytes=dict(fixed_states, buffers=buffers, working_set=working, loss=head),
            chunk_states=model_state_bytes(num_chunks * layer_params, dtype, cand.zero_stage, group),
            min_device_bytes=0.0, leanest_activation_bytes=0.0, page_fault_microbatch_s=fault_s,
            page_fault_step_s=timing.page_fault_s_per_byte * states_step if faults else 0.0,
            memory_bound_above_bytes=(HEADROOM - params.fragmentation) * hw.device_memory_bytes))
    rebuild = _choose_rebuild_tile(setups, tokens, usable, fixed_rebuild, by_time=one_pool)
    return [_with_rebuild(s, rebuild, tokens) for s in setups], (loss_chunk, mlp_chunk, rebuild)
