"""The search's pieces for one candidate layout: its step time composed from the stage
evaluations (`compose_step`, page faults of memory-bound CPU stages included), the cheap and
LP-relaxed lower bounds the best-first search orders layouts by, the quick upper bound, and
the reason an infeasible stage gives. Used by `planner.search` (which re-exports
`compose_step` and `Outcome`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.candidates import StageSetup, gib
from planner.costmodel import Candidate, StepTime, model_state_bytes, step_time
from planner.heuristic import quick_stage_bound
from planner.mip import StageEvaluation, StageProblem, StageSolution, stage_relaxation
from planner.page_faults import memory_bound
from planner.request import PlanRequest
from planner.trial import layout_key, part_factors


def _unchunked_states_bytes(request: PlanRequest, cand: Candidate) -> float:
    """Device bytes of model states of the lightest stage when they cannot be chunked to the
    CPU (ZeRO 0-2): a bound that rejects layouts before their stages are built."""
    if cand.zero_stage == 3:
        return 0.0
    shape = request.model
    lightest = (shape.num_layers // cand.pp) * shape.layer_params_per_tp_rank(cand.tp)
    return sum(model_state_bytes(lightest, request.dtype, cand.zero_stage, cand.shard_group).values())


def _quick_upper_bound(ranked: list, corrections: dict[str, float] | None) -> float:
    """The best step time of simple policies over every ranked candidate (inf: none fits):
    a feasible plan's time, so layouts whose lower bound exceeds it need no MIP."""
    best = math.inf
    for bound, cand, setups, _ in ranked:
        if bound >= best:
            continue
        evaluations = [quick_stage_bound(s.problem) for s in setups]
        if all(ev is not None for ev in evaluations):
            factors = part_factors(corrections, layout_key(cand))
            best = min(best, _corrected(compose_step(cand, setups, evaluations), factors).total)
    return best


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """A candidate with a solved policy for every stage."""

    cand: Candidate
    setups: tuple[StageSetup, ...]
    solutions: tuple[StageSolution, ...]
    tiling: tuple[int, int, int]
    step: StepTime
    worst_memory_stage: int


def _page_fault_s(setup: StageSetup, ev: StageEvaluation, per_step: bool = False) -> float:
    """One microbatch's (`per_step`: the step's once) freshly mapped pages when the stage's
    policy makes the plan memory-bound on a CPU node (`planner.page_faults`: some layer not
    kept whole, some chunk off the device, or the peak above the runtime's headroom), else 0."""
    seconds = setup.page_fault_step_s if per_step else setup.page_fault_microbatch_s
    if not seconds:
        return 0.0
    layers = setup.problem.layers
    not_kept = any(r < lc.plain_bytes * (1 - 1e-9) for r, lc in zip(ev.resident_bytes_per_layer, layers))
    bound = memory_bound(any_layer_not_kept=not_kept, any_chunk_off_device=ev.host_bytes > 0,
                         peak_bytes=ev.device_bytes, capacity_bytes=setup.memory_bound_above_bytes,
                         headroom=1.0)
    return seconds if bound else 0.0


def _stage_total(setup: StageSetup, ev: StageEvaluation) -> float:
    slots = setup.problem.slots
    return (ev.objective_s + slots * (setup.head_compute_s + setup.comm_microbatch_s
                                      + _page_fault_s(setup, ev))
            + setup.comm_step_s + setup.fixed_optimizer_s + _page_fault_s(setup, ev, per_step=True))


def compose_step(cand: Candidate, setups: tuple[StageSetup, ...], evaluations: list[StageEvaluation]) -> StepTime:
    """Step time of the slowest stage, split into compute / recompute / exposed / bubble /
    page faults."""
    worst = max(range(len(setups)), key=lambda i: _stage_total(setups[i], evaluations[i]))
    setup, ev = setups[worst], evaluations[worst]
    return step_time(microbatch_compute_s=ev.compute_s + setup.head_compute_s,
                     microbatch_recompute_s=ev.recompute_s,
                     microbatch_exposed_transfer_s=ev.exposed_swap_s + ev.exposed_chunk_s,
                     microbatch_comm_s=setup.comm_microbatch_s, step_comm_s=setup.comm_step_s,
                     step_optimizer_s=ev.optimizer_s + setup.fixed_optimizer_s, pp=cand.pp,
                     num_microbatches=cand.num_microbatches, virtual=cand.virtual,
                     microbatch_page_fault_s=_page_fault_s(setup, ev),
                     step_page_fault_s=_page_fault_s(setup, ev, per_step=True))


def _better(new: Outcome, old: Outcome, rel_tol: float = 1e-3) -> bool:
    """Faster wins; within `rel_tol` (the MIP gap's scale) the simpler layout wins, then the
    smaller micro-batch size (less activation memory for the same time)."""
    if abs(new.step.total - old.step.total) > rel_tol * old.step.total:
        return new.step.total < old.step.total
    simplicity = lambda o: (o.cand.zero_stage, o.cand.pp, o.cand.virtual, o.cand.tp, o.cand.sp,  # noqa: E731
                            o.cand.micro_batch_size)
    return simplicity(new) < simplicity(old)


def _lower_bound(cand: Candidate, setups: list[StageSetup]) -> float:
    slots = cand.num_microbatches + (cand.pp - 1) / cand.virtual
    return max(slots * (sum(lc.forward_s + lc.backward_s for lc in s.problem.layers)
                        + s.head_compute_s + s.comm_microbatch_s) + s.comm_step_s
               for s in setups)


def _relaxed_bound(request: PlanRequest, cand: Candidate, setups: tuple[StageSetup, ...],
                   bounds: dict, summary: dict) -> tuple[float, tuple[str, float] | None]:
    """(a lower bound on the layout's step time from its stages' LP relaxations, None) or
    (inf, the infeasibility reason) when a relaxation has no solution (nor has the MIP).
    `bounds` keeps each stage problem's relaxation (`planner.mip.StageRelaxation`): the
    stage MIP's start reuses its solution.

    The MIP weighs a microbatch by slots = m + p - 1; the step by m + (p - 1)/v
    (`compose_step`), at most as much, so the bound is scaled by their ratio."""
    totals = []
    for index, setup in enumerate(setups):
        if setup.problem not in bounds:
            relaxation = stage_relaxation(setup.problem, backend=request.solver,
                                          time_limit_s=request.time_limit_s)
            summary["relaxations"] += 1
            summary["backend"] = relaxation.result.backend
            if not math.isfinite(relaxation.bound):
                return math.inf, _infeasible_reason(setup.problem, setup, index,
                                                    f"LP relaxation: {relaxation.result.status}")
            bounds[setup.problem] = relaxation
        problem = setup.problem
        totals.append(bounds[problem].bound + problem.slots * (setup.head_compute_s + setup.comm_microbatch_s)
                      + setup.comm_step_s + setup.fixed_optimizer_s)
    slots = setups[0].problem.slots
    return (cand.num_microbatches + (cand.pp - 1) / cand.virtual) / slots * max(totals), None


def _infeasible_reason(problem: StageProblem, setup: StageSetup, index: int, status: str) -> tuple[str, float]:
    """Explain a stage the MIP found no solution for, naming the capacity that runs out and
    by how much (never 0: the binding constraint is the one with the largest excess)."""
    count, lc = len(problem.layers), problem.layers[0] if problem.layers else None
    room = problem.device_capacity_bytes - setup.min_device_bytes
    # outer chunks stay on the device when their states fit there, else they take host memory
    outer_extra = sum(c.device_bytes - c.shard_bytes for c in problem.outer_chunks)
    outer_host = 0.0 if outer_extra <= room else sum(c.host_bytes for c in problem.outer_chunks)
    room -= outer_extra if not outer_host else 0.0
    fits = 0
    if problem.num_chunks and problem.chunk_device_bytes > 0:
        fits = max(0, min(problem.num_chunks, int(room // problem.chunk_device_bytes)))
    host_states = (problem.num_chunks - fits) * problem.chunk_host_bytes + outer_host
    kept = problem.inflight * count * ((lc.input_bytes + lc.attention_output_bytes) if lc else 0.0)
    host = problem.host_capacity_bytes if problem.allow_cpu or problem.num_chunks else 0.0
    nvme = problem.nvme_capacity_bytes if problem.allow_nvme else 0.0
    where = f"stage {index}: "
    if host_states > problem.host_capacity_bytes:
        outer = " and the embedding/head states" if outer_host else ""
        return (f"{where}host memory binds: only {fits} of {problem.num_chunks} model-state chunks fit "
                f"on the device; the other {problem.num_chunks - fits}{outer} need {gib(host_states)} of host "
                f"memory > {gib(problem.host_capacity_bytes)} per rank (solver: {status})",
                host_states - problem.host_capacity_bytes)
    stays = max(0.0, kept - max(0.0, host + nvme - host_states))
    device_need = setup.min_device_bytes + stays
    if device_need > problem.device_capacity_bytes:
        return (f"{where}device memory binds: the leanest policy needs {gib(device_need)} of "
                f"{gib(problem.device_capacity_bytes)} usable ({gib(setup.min_device_bytes)} with every "
                f"activation swapped + {gib(stays)} that {gib(host)} host + {gib(nvme)} NVMe per rank "
                f"cannot take) (solver: {status})", device_need - problem.device_capacity_bytes)
    slack = problem.device_capacity_bytes - setup.min_device_bytes
    return (f"{where}device memory binds once swap traffic and tiers are combined: "
            f"{gib(slack)} of room over the leanest bound was not enough for the solver "
            f"(solver: {status})", max(1.0, 0.01 * setup.min_device_bytes))


def _corrected(step: StepTime, factors: dict[str, float]) -> StepTime:
    """A step time with each part scaled by its measured correction (`planner.trial`)."""
    if all(f == 1.0 for f in factors.values()):
        return step
    return StepTime(**{k: v * factors.get(k, 1.0) for k, v in step.to_dict().items()})
