"""One pipeline stage's memory and time problem, and its exact evaluation.

`StageProblem` holds what the stage MIP (`planner.mip`) decides over: the layers' costs,
device/host/NVMe capacities, links, model-state chunks and outer (embedding/head) chunks.
`evaluate_stage` computes, for a fixed decision, the same bytes and seconds the MIP's
constraints and objective do, in plain Python: the MIP is checked against it by brute force,
and the report and the heuristic use it. The byte helpers (`rebuilt_token_local_bytes`,
`selective_rebuilt_bytes`, `tile_scale`) are shared by the MIP and the candidate bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.costmodel import LayerCost
from planner.outer import OuterChunk, outer_terms
from planner.plan import LayerActivationPlan
from planner.solve import SolveResult


@dataclass(frozen=True, kw_only=True)
class StageProblem:
    """Numbers for one stage; bandwidths are per rank, bytes per rank."""

    layers: tuple[LayerCost, ...]
    """The stage's decoder layers in forward order."""
    inflight: int
    """Microbatches whose activations the stage holds at its peak (1F1B)."""
    slots: int
    """Schedule slots per step, m + p - 1."""
    device_capacity_bytes: float
    """Device bytes the plan may use (after reserved and fragmentation allowance)."""
    fixed_device_bytes: float
    """Bytes independent of the decisions: unchunked states, gather buffers, the loss."""
    host_capacity_bytes: float
    """Host bytes this rank may use."""
    nvme_capacity_bytes: float
    """NVMe bytes this rank may use."""
    host_link_bw: float
    """Host<->device bytes/s of this rank."""
    nvme_read_bw: float
    """NVMe read bytes/s of this rank (its share of the node's)."""
    nvme_write_bw: float
    """NVMe write bytes/s of this rank."""
    working_base_bytes: float = 0.0
    """Transient bytes of every layer's backward (activation gradients, one MLP tile). A
    non-kept layer's backward adds its rebuilt token-local tensors and its swapped input /
    attention output, and the previous layer's swapped bytes are being prefetched meanwhile."""
    tail_forward_window_s: float = 0.0
    """Compute after the last layer's forward that can hide its offload."""
    tail_backward_window_s: float = 0.0
    """Compute before the last layer's backward that can hide its prefetch."""
    num_chunks: int = 0
    """Model-state chunks the stage may place (0: states are not chunked)."""
    chunk_device_bytes: float = 0.0
    """Device bytes of one chunk when persistent (params, grads, optimizer shard)."""
    chunk_host_bytes: float = 0.0
    """Host bytes of one chunk when it lives on the CPU."""
    chunk_link_bytes: float = 0.0
    """Host-link bytes per microbatch of one CPU chunk (fetch fwd + bwd, grads back)."""
    chunk_buffer_bytes: float = 0.0
    """Bytes of one device prefetch buffer (1 buffer: fetches are exposed; 2: overlapped)."""
    chunk_cpu_optimizer_s: float = 0.0
    """CPU optimizer seconds per CPU chunk (overlapped with the backward)."""
    chunk_device_optimizer_s: float = 0.0
    """Device optimizer seconds per persistent chunk."""
    allow_keep: bool = True
    """Plain layers (keep everything) allowed."""
    allow_recompute: bool = True
    """Token-local recompute allowed (else every non-kept token is swapped)."""
    allow_cpu: bool = True
    """CPU tier allowed."""
    allow_nvme: bool = True
    """NVMe tier allowed."""
    token_chunks: int = 0
    """0: swap fractions continuous; K: multiples of 1/K (token chunks)."""
    cpu_optimizer_overlap: bool = True
    """The CPU chunks' optimizer runs beside the backward (False: after it, exposed)."""
    rebuild_fraction: float = 1.0
    """Share of the local tokens a non-kept layer's backward rebuilds at once (sequence-tiled
    rebuild: rebuild_tile_tokens / tokens; 1 = whole sequence). q, k, v are rebuilt whole
    (the attention core's backward needs them all)."""
    page_cache_reads: bool = False
    """NVMe reads are buffered through the page cache in the device's own memory (CPU nodes):
    a prefetched NVMe layer occupies its bytes twice while it is read."""
    outer_chunks: tuple[OuterChunk, ...] = ()
    """The stage's embedding / final norm + head states as chunks (planner.outer), each kept on
    the device or a CPU chunk; not in `fixed_device_bytes`."""
    swap_beside_compute: bool = True
    """Activation copies run beside the neighbouring layers' compute (False: a CPU node whose
    cores all compute, `planner.collectives.overlaps_compute`: every copy second is exposed)."""
    allow_selective: bool = True
    """Op-level selective checkpointing allowed (`planner.selective`; layers whose
    `selective_bytes` is 0 never get it)."""
    selective_only: bool = False
    """Every layer runs op-level selective checkpointing (a published system's policy)."""

    def __post_init__(self) -> None:
        for name in ("inflight", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("host_link_bw", "nvme_read_bw", "nvme_write_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("num_chunks", "token_chunks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class StageEvaluation:
    """Memory and time of one stage under fixed decisions."""

    feasible: bool
    """No constraint violated."""
    violations: tuple[str, ...]
    """Each violated constraint, with its numbers."""
    device_bytes: float
    """Peak device bytes of the stage (without reserved bytes and fragmentation allowance)."""
    working_bytes: float
    """The largest transient backward working set of the stage's layers (part of device_bytes)."""
    host_bytes: float
    """Host bytes: swapped activations of the in-flight microbatches + CPU chunks."""
    nvme_bytes: float
    """NVMe bytes: swapped activations of the in-flight microbatches."""
    resident_bytes_per_layer: tuple[float, ...]
    """Saved bytes each layer leaves on the device for one microbatch."""
    compute_s: float
    """Per microbatch: forward + backward of the stage's layers."""
    recompute_s: float
    """Per microbatch."""
    exposed_swap_s: float
    """Per microbatch: activation traffic beyond its windows."""
    exposed_chunk_s: float
    """Per microbatch: chunk traffic beyond the stage's compute."""
    optimizer_s: float
    """Per step: exposed CPU optimizer + device optimizer of persistent chunks."""
    objective_s: float
    """slots * (compute + recompute + exposed_swap + exposed_chunk) + optimizer."""


@dataclass(frozen=True, kw_only=True)
class StageSolution:
    activations: tuple[LayerActivationPlan, ...]
    """Per-layer decisions."""
    num_persistent_chunks: int
    """Chunks kept on the device (the stage's first ones)."""
    num_prefetch_buffers: int
    """0 without CPU chunks, else 1 or 2."""
    evaluation: StageEvaluation
    """The decisions re-evaluated by `evaluate_stage`."""
    solve: SolveResult
    """What the solver reported."""
    outer_on_cpu: tuple[bool, ...] = ()
    """Per `StageProblem.outer_chunks`: a CPU chunk (True) or kept on the device."""


def _layer_traffic(lc: LayerCost, act: LayerActivationPlan) -> tuple[float, float, float]:
    """(swapped bytes, resident bytes, recomputed fraction) of one layer (a selective layer
    recomputes `selective_recompute_s`, not a fraction of the token-local work: 0)."""
    if act.keep_all:
        return 0.0, lc.plain_bytes, 0.0
    if act.selective:
        return 0.0, lc.selective_bytes, 0.0
    swapped = (act.swap_fraction * lc.token_local_bytes
               + (lc.input_bytes if act.swap_input else 0.0)
               + (lc.attention_output_bytes if act.swap_attention_output else 0.0))
    resident = ((0.0 if act.swap_input else lc.input_bytes)
                + (0.0 if act.swap_attention_output else lc.attention_output_bytes))
    return swapped, resident, 1.0 - act.swap_fraction


def rebuilt_token_local_bytes(lc: LayerCost, fraction: float) -> float:
    """Token-local bytes a non-kept layer's backward holds at once when it rebuilds `fraction`
    of its tokens at a time: q, k, v whole, the rest one tile."""
    qkv = min(lc.qkv_bytes, lc.token_local_bytes)
    return qkv + (lc.token_local_bytes - qkv) * min(1.0, fraction)


def selective_rebuilt_bytes(lc: LayerCost) -> float:
    """What a selective layer's backward recomputes on top of what it kept."""
    return max(0.0, lc.plain_bytes - lc.selective_bytes)


def tile_scale(lc: LayerCost, fraction: float) -> float:
    """Share of a layer's token-local bytes resident at once under a tiled rebuild."""
    if lc.token_local_bytes <= 0:
        return 1.0
    return rebuilt_token_local_bytes(lc, fraction) / lc.token_local_bytes


def _prefetched_bytes(lc: LayerCost, act: LayerActivationPlan, fraction: float) -> float:
    """Swapped bytes of a layer resident while they are fetched ahead of its backward: its
    swapped input and attention output whole, its swapped token-local share one tile."""
    if act.keep_all or act.selective:
        return 0.0
    return (act.swap_fraction * lc.token_local_bytes * tile_scale(lc, fraction)
            + (lc.input_bytes if act.swap_input else 0.0)
            + (lc.attention_output_bytes if act.swap_attention_output else 0.0))


def _rebuilt_bytes(lc: LayerCost, act: LayerActivationPlan, fraction: float = 1.0) -> float:
    """What a non-kept layer's backward brings back at once: its token-local tensors (fetched
    or recomputed; a tile of them when tiled) and its swapped input / attention output; a
    selective layer's recompute rebuilds what it did not keep, the whole sequence at once."""
    if act.keep_all:
        return 0.0
    if act.selective:
        return selective_rebuilt_bytes(lc)
    return (rebuilt_token_local_bytes(lc, fraction) + (lc.input_bytes if act.swap_input else 0.0)
            + (lc.attention_output_bytes if act.swap_attention_output else 0.0))


def evaluate_stage(problem: StageProblem, activations: tuple[LayerActivationPlan, ...],
                   num_persistent_chunks: int, num_prefetch_buffers: int = 2, *,
                   outer_on_cpu: tuple[bool, ...] | None = None,
                   tol: float = 1e-6) -> StageEvaluation:
    """Memory, time and constraint violations of a fixed decision (the MIP's reference);
    `outer_on_cpu` places the outer chunks (None: all on the device)."""
    layers = problem.layers
    flags = tuple(outer_on_cpu or (False,) * len(problem.outer_chunks))
    if len(flags) != len(problem.outer_chunks):
        raise ValueError(f"outer_on_cpu: need {len(problem.outer_chunks)} entries, got {len(flags)}")
    outer = outer_terms(problem.outer_chunks, flags)
    if len(activations) != len(layers):
        raise ValueError(f"activations: need {len(layers)} entries, got {len(activations)}")
    if not 0 <= num_persistent_chunks <= problem.num_chunks:
        raise ValueError(f"num_persistent_chunks: must be in [0, {problem.num_chunks}]")
    traffic = [_layer_traffic(lc, act) for lc, act in zip(layers, activations)]
    cpu_chunks = problem.num_chunks - num_persistent_chunks
    if cpu_chunks and num_prefetch_buffers not in (1, 2):
        raise ValueError(f"num_prefetch_buffers: must be 1 or 2 with CPU chunks, got {num_prefetch_buffers}")
    buffers = num_prefetch_buffers if cpu_chunks else 0
    resident = sum(r for _, r, _ in traffic)
    ahead = [_prefetched_bytes(lc, a, problem.rebuild_fraction) for lc, a in zip(layers, activations)]
    cache = [p if (problem.page_cache_reads and a.tier == "nvme") else 0.0
             for p, a in zip(ahead, activations)]
    working = max(problem.working_base_bytes + _rebuilt_bytes(lc, act, problem.rebuild_fraction)
                  + (ahead[i - 1] + cache[i - 1] if i else 0.0)
                  for i, (lc, act) in enumerate(zip(layers, activations))) if layers else 0.0
    device = (problem.fixed_device_bytes + problem.chunk_device_bytes * num_persistent_chunks
              + problem.chunk_buffer_bytes * buffers + problem.inflight * resident + working
              + outer.device)
    host = problem.inflight * sum(s for (s, _, _), a in zip(traffic, activations)
                                  if a.tier == "cpu") + cpu_chunks * problem.chunk_host_bytes + outer.host
    nvme = problem.inflight * sum(s for (s, _, _), a in zip(traffic, activations)
                                  if a.tier == "nvme")
    recompute = [lc.selective_recompute_s if act.selective else lc.recompute_s * rf
                 for lc, act, (_, _, rf) in zip(layers, activations, traffic)]
    exposed = 0.0
    link_total = 0.0
    for index, (lc, act, (swapped, _, _)) in enumerate(zip(layers, activations, traffic)):
        last = index == len(layers) - 1
        fwd_window = problem.tail_forward_window_s if last else layers[index + 1].forward_s
        bwd_window = (problem.tail_backward_window_s if last
                      else layers[index + 1].backward_s + recompute[index + 1])
        if not problem.swap_beside_compute:
            fwd_window = bwd_window = 0.0
        link = swapped / problem.host_link_bw
        link_total += link
        nvme_bytes = swapped if act.tier == "nvme" else 0.0
        write = nvme_bytes / problem.nvme_write_bw if nvme_bytes else 0.0
        read = nvme_bytes / problem.nvme_read_bw if nvme_bytes else 0.0
        exposed += max(0.0, link - fwd_window, write - fwd_window)
        exposed += max(0.0, link - bwd_window, read - bwd_window)
    compute = sum(lc.forward_s + lc.backward_s for lc in layers)
    chunk_link = (cpu_chunks * problem.chunk_link_bytes + outer.link) / problem.host_link_bw
    window = compute if buffers >= 2 or not cpu_chunks else 0.0   # one buffer: fetch, then compute
    exposed_chunk = max(0.0, chunk_link + link_total - window) if cpu_chunks or any(flags) else 0.0
    backward = sum(lc.backward_s for lc in layers)
    opt_window = backward if problem.cpu_optimizer_overlap else 0.0
    optimizer = (max(0.0, cpu_chunks * problem.chunk_cpu_optimizer_s + outer.cpu_optimizer_s - opt_window)
                 + num_persistent_chunks * problem.chunk_device_optimizer_s + outer.device_optimizer_s)
    violations = []
    if device > problem.device_capacity_bytes * (1 + tol):
        violations.append(f"device {device / 2**30:.1f} GiB > {problem.device_capacity_bytes / 2**30:.1f} GiB")
    if host > problem.host_capacity_bytes * (1 + tol) + 1:
        violations.append(f"host {host / 2**30:.1f} GiB > {problem.host_capacity_bytes / 2**30:.1f} GiB")
    if nvme > problem.nvme_capacity_bytes * (1 + tol) + 1:
        violations.append(f"nvme {nvme / 2**30:.1f} GiB > {problem.nvme_capacity_bytes / 2**30:.1f} GiB")
    for act in activations:
        swaps = act.swap_fraction > 0 or act.swap_input or act.swap_attention_output
        if act.keep_all and (swaps or not problem.allow_keep):
            violations.append("keep_all layer with swaps, or keep_all not allowed")
        if swaps and not (problem.allow_nvme if act.tier == "nvme" else problem.allow_cpu):
            violations.append(f"tier {act.tier} not allowed")
        if not act.keep_all and not problem.allow_recompute and act.swap_fraction < 1 - tol:
            violations.append("recompute not allowed")
    for lc, act in zip(layers, activations):
        if act.selective and not (problem.allow_selective and lc.selective_bytes > 0):
            violations.append("selective checkpointing not allowed")
        if problem.selective_only and not act.selective:
            violations.append("every layer must be selective")
    per_mb = compute + sum(recompute) + exposed
    return StageEvaluation(
        feasible=not violations, violations=tuple(violations), device_bytes=device, working_bytes=working,
        host_bytes=host, nvme_bytes=nvme,
        resident_bytes_per_layer=tuple(r for _, r, _ in traffic), compute_s=compute,
        recompute_s=sum(recompute), exposed_swap_s=exposed, exposed_chunk_s=exposed_chunk,
        optimizer_s=optimizer,
        objective_s=problem.slots * (per_mb + exposed_chunk) + optimizer)
