"""A stage's MIP input with what the step composition and report need (`StageSetup`), and
the memory bounds `build_stages` checks before any solve: the leanest policy's activation
bytes, the device minimum, the rebuild tile a non-kept layer's backward uses, and the
binding constraint an infeasible stage names (`memory_rejection`). Re-exported by
`planner.candidates`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.costmodel import LayerCost
from planner.heuristic import quick_stage_bound
from planner.mip import StageProblem, rebuilt_token_local_bytes, selective_rebuilt_bytes

GiB = 2**30

def gib(num_bytes: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB so small jobs' reasons still carry the numbers."""
    if abs(num_bytes) >= GiB:
        return f"{num_bytes / GiB:.1f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


@dataclass(frozen=True, kw_only=True)
class StageSetup:
    """A stage's MIP input plus what the step composition and report need."""

    problem: StageProblem
    layer_range: tuple[int, int]
    head_compute_s: float
    comm_microbatch_s: float
    comm_step_s: float
    fixed_optimizer_s: float
    fixed_bytes: dict[str, float]
    chunk_states: dict[str, float]
    min_device_bytes: float
    leanest_activation_bytes: float = 0.0
    """Activation bytes of the leanest policy (part of `min_device_bytes`)."""
    page_fault_microbatch_s: float = 0.0
    """CPU nodes: seconds of one microbatch's freshly mapped pages when the plan is
    memory-bound (`planner.page_faults`; 0: not priced)."""
    page_fault_step_s: float = 0.0
    """The same, once per step (the optimizer's fresh blocks: `planner.page_faults`)."""
    memory_bound_above_bytes: float = float("inf")
    """Device bytes (as `StageEvaluation.device_bytes`) above which the runtime treats the
    plan as memory-bound even when every layer is kept."""


MIN_REBUILD_TILE = 1024
"""Smallest token tile a non-kept layer's backward rebuilds at once (GEMMs stay efficient)."""
REBUILD_HEADROOM = 0.9
"""A rebuild tile is chosen so that the stage's leanest policy fits in this share of memory."""


def rebuild_tiles(tokens: int) -> list[int]:
    """Candidate rebuild tiles for `tokens` local tokens: 0 (whole sequence), then halves."""
    tiles, k = [0], 1
    while -(-tokens // (1 << k)) >= MIN_REBUILD_TILE:
        tiles.append(-(-tokens // (1 << k)))
        k += 1
    return tiles


def _fastest_loss_tile(tilings: list[tuple], build) -> tuple[list[StageSetup], tuple[int, int, int]]:
    """`build(tiling)` for the tiling (untiled loss first, then larger tiles before smaller)
    whose quick policies (`planner.heuristic`) give the shortest step, head and loss included
    (each tile pays a fixed cost and, under tensor parallelism, its all-reduces: fewer, larger
    tiles are faster; larger tiles' logits leave less room for kept activations). A tie goes
    to the earlier tiling; when none fits, the last (the leanest)."""
    def seconds(setups) -> float:
        bounds = [quick_stage_bound(s.problem) for s in setups]
        if any(b is None for b in bounds):
            return float("inf")
        return max(b.objective_s + s.problem.slots * s.head_compute_s
                   for b, s in zip(bounds, setups))

    best, best_s = None, float("inf")
    for tiling in tilings:
        built = build(tiling)
        time_s = seconds(built[0])
        if time_s < best_s * (1 - 1e-9):
            best, best_s = built, time_s
    return best if best is not None else built   # none fits: the leanest (smallest tile)


def _with_rebuild(setup: "StageSetup", tile: int, tokens: int) -> "StageSetup":
    """The set-up with its MIP rebuilding non-kept layers `tile` tokens at a time (0: all)."""
    fraction = min(1.0, tile / tokens) if tile else 1.0
    problem = replace(setup.problem, rebuild_fraction=fraction)
    leanest = _leanest(problem, fraction)
    return replace(setup, problem=problem, leanest_activation_bytes=leanest,
                   min_device_bytes=_min_device(problem, leanest))


def _leanest(problem: StageProblem, fraction: float) -> float:
    count = len(problem.layers)
    return _leanest_activation_bytes(problem, problem.layers[0], count, fraction) if count else 0.0


def _min_device(problem: StageProblem, leanest: float) -> float:
    return (problem.fixed_device_bytes + problem.working_base_bytes + _outer_shards(problem)
            + _prefetch_buffer(problem) + leanest + _chunks_kept_for_the_host(problem))


def _prefetch_buffer(problem: StageProblem) -> float:
    """The gather buffer CPU chunks need (none when no chunk can be a CPU chunk)."""
    return problem.chunk_buffer_bytes if problem.num_chunks and problem.host_capacity_bytes > 0 else 0.0


def _chunks_kept_for_the_host(problem: StageProblem) -> float:
    """Device bytes of chunks that cannot leave the device at all: on a CPU node planned as one
    pool the host budget for chunks is 0, so the leanest placement keeps every chunk on the
    device (with some host, the leanest bound places them all on the CPU and the host-memory
    constraint of the solver names what the host lacks)."""
    if problem.host_capacity_bytes > 0:
        return 0.0
    kept = sum(c.device_bytes - c.shard_bytes for c in problem.outer_chunks)
    return kept + problem.num_chunks * problem.chunk_device_bytes


def _outer_shards(problem: StageProblem) -> float:
    """Device bytes of the outer chunks at their leanest (all CPU chunks: their shards)."""
    return sum(c.shard_bytes for c in problem.outer_chunks)


def _choose_rebuild_tile(setups: list, tokens: int, usable: float, fixed: int | None,
                         by_time: bool = False) -> int:
    """The largest rebuild tile whose leanest policy leaves headroom on every stage (fewer,
    larger tiles keep the recompute's GEMMs efficient), else the smallest; or `fixed`.
    `by_time` (one memory pool: every byte a tile frees can keep activations instead): the
    tile whose quick policies (`planner.heuristic`) give the shortest stage time, the larger
    tile on a tie."""
    if fixed is not None:
        return fixed
    tiles = rebuild_tiles(tokens)
    if by_time and len(tiles) > 1:
        best, best_s = None, float("inf")
        for tile in tiles:
            fraction = min(1.0, tile / tokens) if tile else 1.0
            bounds = [quick_stage_bound(replace(s.problem, rebuild_fraction=fraction)) for s in setups]
            if all(b is not None for b in bounds):
                seconds = max(b.objective_s for b in bounds)
                if seconds < best_s * (1 - 1e-9):
                    best, best_s = tile, seconds
        if best is not None:
            return best
    for tile in tiles:
        fraction = min(1.0, tile / tokens) if tile else 1.0
        if all(_min_device(s.problem, _leanest(s.problem, fraction)) <= REBUILD_HEADROOM * usable
               for s in setups):
            return tile
    return tiles[-1]


def _leanest_activation_bytes(problem: StageProblem, lc: LayerCost, count: int,
                              fraction: float | None = None) -> float:
    """A lower bound of the stage's activation bytes on the device (resident for the in-flight
    microbatches + what a non-kept layer rebuilds in its backward). Mixing kept and non-kept
    layers is linear in their number, so the bound is the better of all-kept and all-not."""
    options = [problem.inflight * count * lc.plain_bytes] if problem.allow_keep else []
    rebuilt = rebuilt_token_local_bytes(lc, problem.rebuild_fraction if fraction is None else fraction)
    swaps = problem.allow_cpu or problem.allow_nvme
    # NVMe only, one pool: a fetched layer passes through the page cache in the same memory
    twice = problem.page_cache_reads and not problem.allow_cpu
    if swaps:    # + the previous layer's input and attention output, resident or being fetched
        options.append(rebuilt + (1 + twice) * (lc.input_bytes + lc.attention_output_bytes
                                                if count > 1 else 0.0))
    if problem.allow_recompute and (twice or not swaps):   # inputs kept, the rest recomputed
        options.append(problem.inflight * count * (lc.input_bytes + lc.attention_output_bytes)
                       + rebuilt)
    selective = (problem.inflight * count * lc.selective_bytes + selective_rebuilt_bytes(lc)
                 if problem.allow_selective and problem.allow_recompute and lc.selective_bytes > 0
                 else None)
    if problem.selective_only:
        options = [selective] if selective is not None else []
    elif selective is not None:
        options.append(selective)
    return min(options) if options and count else 0.0


def memory_rejection(setups: list[StageSetup], capacity: float, usable: float) -> tuple[str, float] | None:
    """A reason with numbers when even the leanest policy cannot fit some stage."""
    for index, setup in enumerate(setups):
        if setup.min_device_bytes <= usable:
            continue
        states = sum(v for k, v in setup.fixed_bytes.items() if k in ("parameters", "gradients", "optimizer"))
        chunked = sum(setup.chunk_states.values()) if setup.problem.num_chunks else 0.0
        chunked += sum(c.host_bytes for c in setup.problem.outer_chunks)
        where = f" (stage {index})" if len(setups) > 1 else ""
        if states > usable:     # the shortfall is the leanest policy's, activations included
            return (f"model states alone need {gib(states)} per rank{where} > {gib(usable)} usable "
                    f"of {gib(capacity)} (with the leanest activations: "
                    f"{gib(setup.min_device_bytes)})", setup.min_device_bytes - usable)
        items = dict(setup.fixed_bytes, activations=setup.leanest_activation_bytes,
                     prefetch_buffer=_prefetch_buffer(setup.problem),
                     outer_shards=_outer_shards(setup.problem),
                     chunks_the_host_cannot_take=_chunks_kept_for_the_host(setup.problem))
        parts = " + ".join(f"{k} {gib(v)}" for k, v in items.items() if v)
        outer = "+".join(c.name for c in setup.problem.outer_chunks)
        count = f"{setup.problem.num_chunks} layer chunks" + (f" and {outer}" if outer else "")
        note = (f" with all {count} ({gib(chunked)}) on the CPU"
                if chunked and not items["chunks_the_host_cannot_take"] else "")
        return (f"needs at least {gib(setup.min_device_bytes)} per rank{where}{note} = {parts} "
                f"> {gib(usable)} usable of {gib(capacity)}", setup.min_device_bytes - usable)
    return None
