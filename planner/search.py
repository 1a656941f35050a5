"""Outer search: every candidate layout, pruned by bounds, the best MIP result as a Plan.

Candidates that cannot fit even with every activation swapped and every chunk on the CPU
are rejected before any solve, with the numbers. The rest are searched best-first: each
starts with a cheap step-time lower bound (no recompute, nothing exposed); when it comes up,
its stage MIPs' LP relaxations tighten the bound (within about 1% of the MIP), and only when
that tightened bound comes up is the MIP solved. The search stops once the lowest bound left
reaches the best predicted step time found, so every layout left out provably cannot beat
the plan (to within the MIP gap). Every rejected or pruned candidate keeps its reason.

The plan is a function of the request and the profile, not of the machine's load: the
order is fixed (bound, then enumeration order), the MIPs stop on work limits
(`planner.mip.STAGE_MAX_NODES`), and the search on a count of stage MIPs
(`MAX_STAGE_MIPS`). Wall-clock limits remain only as safety caps (`SEARCH_SAFETY_S`, the
request's `time_limit_s` per solve), and a plan says so in its notes when one was hit.
"""

from __future__ import annotations

import heapq
import math
import time

from planner.candidates import (enumerate_candidates, gib, kernel_note, memory_rejection,
                                profiled_stages)
from planner.analytic import noncausal_flops_ratio
from planner.collectives import param_gather_overlap
from planner.grid import micro_batch_sizes, sized_request
from planner.costmodel import Candidate, CostParams, stage_layer_ranges, throughput
from planner.layout import plan_memory_layout
from planner.misses import refine_misses
from planner.mip import NoSolution, StageProblem, StageRelaxation, StageSolution, solve_stage
from planner.outer import device_categories
from planner.plan import (LayerActivationPlan, ModelStatePlan, OUTER_NAMES, ParallelPlan, Plan,
                          Prediction, SolverInfo, TilingPlan)
from planner.request import PlanRequest
from planner.trial import layout_key, part_factors
from planner.shapes import DTYPE_BYTES
from planner.search_steps import (  # noqa: F401  (compose_step, Outcome: re-exported)
    Outcome, _better, _corrected, _infeasible_reason, _lower_bound, _quick_upper_bound,
    _relaxed_bound, _unchunked_states_bytes, compose_step)

LAYOUT_TIME_LIMIT_S = 2.0
"""Wall-clock safety cap of each memory-layout MIP (its work limit: LAYOUT_MAX_NODES)."""
LAYOUT_MAX_NODES = 500
"""Branch-and-bound nodes of each memory-layout MIP."""
MAX_STAGE_MIPS = 16
"""Work budget: once a plan is found, at most this many stage MIPs are solved in all (with
the LP-tightened bounds the published specs solve 1-5 stage MIPs free and 1-8 with the
published layout fixed, pp8 being 8 stages)."""
SEARCH_SAFETY_S = 60.0
"""Wall-clock safety cap of the search: once a plan is found, no new solve starts after it
(reported in the plan's notes when hit; the plan then depends on the machine's speed)."""


def search(request: PlanRequest, *, profile=None, params: CostParams | None = None,
           gap_rel: float = 5e-3, corrections: dict[str, float] | None = None,
           skip_by_layer_time: bool = True) -> tuple[Outcome | None, list[dict], dict]:
    """Run the outer search; (best outcome or None, rejected, summary of the solves).

    A `profile` supplies measured bytes per token, and layer times when it was taken on the
    target's device type; otherwise both come from the analytic model.
    `skip_by_layer_time=False` builds every candidate's stages (the same plan, slower:
    `_rank`).
    """
    measured_bytes = dict(profile.bytes_per_token) if profile is not None else None
    params = params or CostParams()
    hw = request.hardware
    usable = hw.device_memory_bytes * (1 - params.fragmentation) - (
        0 if hw.device_name.lower() == "cpu" else params.reserved_bytes)
    candidates, rejected, notes = enumerate_candidates(request)
    loose: list[tuple[int, Candidate]] = []   # rejections whose shortfall is a lower bound
    ranked, upper = _rank(request, candidates, params, profile, measured_bytes, usable,
                          corrections, rejected, loose, skip_by_layer_time=skip_by_layer_time)
    best: Outcome | None = None
    cache: dict[StageProblem, StageSolution | NoSolution] = {}
    bounds: dict[StageProblem, StageRelaxation] = {}   # a MIP's start reuses its relaxation
    summary = {"solves": 0, "relaxations": 0, "backend": "none", "statuses": [], "gaps": [],
               "notes": notes, "limits": []}
    start = time.perf_counter()
    # best-first: (bound, enumeration order, LP-tightened?) ; a cheap bound is tightened by
    # the stage LP relaxations before the layout's MIPs are solved
    heap = [(bound, order, False) for order, (bound, *_rest) in enumerate(ranked)]
    heapq.heapify(heap)
    safety_hit = False
    while heap:
        bound, order, tightened = heapq.heappop(heap)
        _, cand, setups, tiling = ranked[order]
        factors = part_factors(corrections, layout_key(cand))
        factor = min(factors.values())  # the corrected step is at least this x the bound
        target = min(upper, best.step.total) if best is not None else upper
        kind = "LP-relaxation" if tightened else "step-time"
        if (best is not None and bound >= best.step.total) or bound > upper * (1 + 1e-9):
            rejected.append({"candidate": cand.to_dict(), "shortfall_bytes": None,
                             "reason": f"pruned: {kind} lower bound {bound:.4g} s >= a feasible "
                                       f"plan's {target:.4g} s"})
            continue
        if best is not None and time.perf_counter() - start > SEARCH_SAFETY_S:
            safety_hit = True
            rejected.append({"candidate": cand.to_dict(), "shortfall_bytes": None,
                             "reason": f"not solved: wall-clock safety cap {SEARCH_SAFETY_S:.0f} s "
                                       f"reached ({kind} lower bound {bound:.4g} s)"})
            continue
        if not tightened:
            lp, failure = _relaxed_bound(request, cand, setups, bounds, summary)
            if failure:
                rejected.append({"candidate": cand.to_dict(), "reason": failure[0],
                                 "shortfall_bytes": failure[1]})
            else:
                heapq.heappush(heap, (max(bound, factor * lp), order, True))
            continue
        if best is not None and summary["solves"] >= MAX_STAGE_MIPS:
            rejected.append({"candidate": cand.to_dict(), "shortfall_bytes": None,
                             "reason": f"not solved: work budget of {MAX_STAGE_MIPS} stage MIPs spent "
                                       f"(LP-relaxation lower bound {bound:.4g} s vs best "
                                       f"{best.step.total:.4g} s)"})
            continue
        solutions, failure = [], None
        for index, setup in enumerate(setups):
            if setup.problem not in cache:
                try:
                    cache[setup.problem] = solve_stage(setup.problem, backend=request.solver,
                                                       time_limit_s=request.time_limit_s,
                                                       gap_rel=gap_rel,
                                                       relaxation=bounds.get(setup.problem))
                except NoSolution as exc:
                    cache[setup.problem] = exc
                summary["solves"] += 1
            result = cache[setup.problem]
            solve = result.result if isinstance(result, NoSolution) else result.solve
            summary["backend"] = solve.backend
            if solve.stopped_by == "time limit":
                summary["limits"].append(f"a stage MIP of {layout_key(cand)} stopped at its "
                                         f"wall-clock cap ({request.time_limit_s:g} s)")
            if isinstance(result, NoSolution):
                failure = _infeasible_reason(setup.problem, setup, index, solve.status)
                break
            solutions.append(result)
        if failure:
            rejected.append({"candidate": cand.to_dict(), "reason": failure[0], "shortfall_bytes": failure[1]})
            continue
        evaluations = [s.evaluation for s in solutions]
        step = _corrected(compose_step(cand, setups, evaluations), factors)
        worst_mem = max(range(len(setups)), key=lambda i: evaluations[i].device_bytes)
        outcome = Outcome(cand=cand, setups=setups, solutions=tuple(solutions), tiling=tiling,
                          step=step, worst_memory_stage=worst_mem)
        if best is None or _better(outcome, best):
            if best is not None:
                rejected.append({"candidate": best.cand.to_dict(), "shortfall_bytes": None,
                                 "reason": f"not chosen: {best.step.total:.4g} s per step vs {step.total:.4g} s"})
            best = outcome
        else:
            tie = " (within 0.1%: the simpler layout is kept)" if step.total <= best.step.total else ""
            rejected.append({"candidate": cand.to_dict(), "shortfall_bytes": None,
                             "reason": f"not chosen: {step.total:.4g} s per step vs {best.step.total:.4g} s{tie}"})
    if safety_hit:
        summary["limits"].append(f"search stopped at its wall-clock safety cap ({SEARCH_SAFETY_S:.0f} s): "
                                 f"the layouts left unsolved are listed as 'not solved'")
    if best is None:
        refine_misses(request, rejected, loose, params, profile, measured_bytes, usable)
    if best is not None:
        summary["notes"] = {**notes, best.cand: notes.get(best.cand, []) + sorted(
            {s.solve.note for s in best.solutions if s.solve.note})}
        summary["statuses"] = [s.solve.status for s in best.solutions]
        summary["gaps"] = [s.solve.gap for s in best.solutions]
        summary["notes"][best.cand] += sorted(set(summary["limits"]))
    return best, rejected, summary


def _rank(request: PlanRequest, candidates: list[Candidate], params: CostParams, profile,
          measured_bytes, usable: float, corrections, rejected: list, loose: list, *,
          skip_by_layer_time: bool = True) -> tuple[list, float]:
    """(candidates with their stages, sorted by step-time lower bound then enumeration
    order; the best quick feasible step time among them, inf when none).

    Building a candidate's stages is most of a search's time, and most candidates are then
    pruned. Shallow pipelines are built first (few stages, and they give a feasible time
    early); a later candidate whose layers alone (`_layer_time_floor`, with the layer time
    of a candidate built with the same tp, sp and micro-batch size: layer times depend on
    nothing else) already exceed that time is pruned unbuilt. Its full lower bound could
    only be larger, so the search would have pruned it anyway: the plan is the same (its
    reason says "layer-time lower bound", a looser one than the step-time bounds)."""
    hw = request.hardware
    layer_s: dict[tuple, float] = {}
    upper, built = math.inf, []
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].pp * candidates[i].virtual, i))
    for index in order:
        cand = candidates[index]
        states = _unchunked_states_bytes(request, cand)
        if states > usable:      # ZeRO 0-2 states never leave the device: no stage fits
            loose.append((len(rejected), cand))
            rejected.append({"candidate": cand.to_dict(), "shortfall_bytes": states - usable,
                             "reason": f"model states alone need {gib(states)} per rank > "
                                       f"{gib(usable)} usable of {gib(hw.device_memory_bytes)} "
                                       f"(lightest stage, ZeRO-{cand.zero_stage} keeps them on the device)"})
            continue
        factor = min(1.0, *part_factors(corrections, layout_key(cand)).values())
        key = (cand.tp, cand.sp, cand.sp_kind, cand.micro_batch_size)
        if skip_by_layer_time and key in layer_s:
            floor = factor * _layer_time_floor(request.model.num_layers, cand, layer_s[key])
            if floor > upper * (1 + 1e-9):
                rejected.append({"candidate": cand.to_dict(), "shortfall_bytes": None,
                                 "reason": f"pruned: layer-time lower bound {floor:.4g} s >= "
                                           f"a feasible plan's {upper:.4g} s"})
                continue
        setups, tiling = profiled_stages(sized_request(request, cand), cand, params, profile,
                                         measured_bytes)
        layers = [lc for s in setups for lc in s.problem.layers]
        if layers:
            layer_s[key] = min(layer_s.get(key, math.inf),
                               min(lc.forward_s + lc.backward_s for lc in layers))
        why = memory_rejection(setups, hw.device_memory_bytes, usable)
        if why:
            rejected.append({"candidate": cand.to_dict(), "reason": why[0], "shortfall_bytes": why[1]})
            continue
        entry = (factor * _lower_bound(cand, setups), cand, tuple(setups), tiling)
        built.append((entry, index))
        if entry[0] < upper:
            upper = min(upper, _quick_upper_bound([entry], corrections))
    built.sort(key=lambda item: (item[0][0], item[1]))
    return [entry for entry, _ in built], upper


def _layer_time_floor(num_layers: int, cand: Candidate, layer_s: float) -> float:
    """A lower bound of `_lower_bound` from one layer's forward + backward seconds: the
    busiest stage's layers over every microbatch slot (no head, no communication)."""
    slots = cand.num_microbatches + (cand.pp - 1) / cand.virtual
    busiest = max(end - start for start, end in stage_layer_ranges(num_layers, cand.pp))
    return slots * busiest * layer_s


def stage_ranges(num_layers: int, cand: Candidate) -> tuple[tuple[int, int], ...]:
    """Layer ranges of the plan's stages: one per rank (1F1B), or pp x v model chunks
    (interleaved: chunk c runs on rank c mod pp)."""
    return stage_layer_ranges(num_layers, cand.pp * cand.virtual)


def rank_layers(ranges: tuple[tuple[int, int], ...], rank: int, cand: Candidate) -> list[int]:
    """Decoder layers of pipeline rank `rank` in execution order."""
    return [i for c in range(rank, len(ranges), cand.pp) for i in range(*ranges[c])]


def _bytes_by_category(outcome: Outcome, capacity: float, params: CostParams, cpu: bool) -> dict[str, int]:
    index = outcome.worst_memory_stage
    setup, solution = outcome.setups[index], outcome.solutions[index]
    ev, problem = solution.evaluation, setup.problem
    share = solution.num_persistent_chunks / problem.num_chunks if problem.num_chunks else 0.0
    outer = device_categories(problem.outer_chunks, solution.outer_on_cpu)
    cats = {k: setup.fixed_bytes[k] + setup.chunk_states[k] * share + outer[k]
            for k in ("parameters", "gradients", "optimizer")}
    cats["activations"] = problem.inflight * sum(ev.resident_bytes_per_layer)
    cats["working_set"] = ev.working_bytes
    cats["buffers"] = (setup.fixed_bytes["buffers"] + setup.fixed_bytes["loss"] + outer["buffers"]
                       + problem.chunk_buffer_bytes * solution.num_prefetch_buffers)
    cats["reserved"] = 0 if cpu else params.reserved_bytes
    cats["fragmentation"] = capacity * params.fragmentation
    return {k: int(round(v)) for k, v in cats.items()}


def _status_text(statuses: list[str]) -> str:
    if not statuses:
        return "not-run"
    unique = sorted(set(statuses))
    return unique[0] if len(unique) == 1 else "; ".join(f"{s} x{statuses.count(s)}" for s in unique)


def plan_job(request: PlanRequest, profile=None, *, params: CostParams | None = None,
             with_layout: bool = True, corrections: dict[str, float] | None = None) -> Plan:
    """Plan `request`: the fastest feasible layout and policy, or feasible=False with reasons.

    `profile` is a `planner.profiler.LayerProfile` for the same shape and dtype: its measured
    bytes replace the analytic ones, and its fitted times do too when it was taken on the
    target's device type. None plans from the analytic model alone.
    """
    start = time.perf_counter()
    params = params or CostParams()
    best, rejected, summary = search(request, profile=profile, params=params,
                                     corrections=corrections)
    hw, shape = request.hardware, request.model
    ordered = sorted(rejected, key=lambda r: (r["shortfall_bytes"] is None, r["shortfall_bytes"] or 0.0))
    common = dict(model=shape.to_dict(), dtype=request.dtype, seq_len=request.seq_len,
                  micro_batch_size=best.cand.micro_batch_size if best is not None
                  else request.micro_batch_size or 1,
                  global_batch_size=request.global_batch_size,
                  grad_clip=request.grad_clip,
                  rejected=tuple(ordered))
    profile_dict = profile.to_dict() if profile is not None else {"source": "analytic"}
    if best is None:
        return Plan(feasible=False, **common,
                    prediction=Prediction(hardware=hw.to_dict(), profile=profile_dict),
                    solver=SolverInfo(backend=summary["backend"], status="no feasible candidate",
                                      solve_time_s=time.perf_counter() - start))
    cand = best.cand
    per_layer: dict[int, LayerActivationPlan] = {}
    cpu_chunks: list[int] = []
    cpu_outer: set[str] = set()
    ranges = stage_ranges(shape.num_layers, cand)
    for rank, (setup, solution) in enumerate(zip(best.setups, best.solutions)):
        layers = rank_layers(ranges, rank, cand)
        per_layer.update(zip(layers, solution.activations))
        if setup.problem.num_chunks:
            cpu_chunks.extend(layers[solution.num_persistent_chunks:])
        cpu_outer.update(c.name for c, on_cpu in zip(setup.problem.outer_chunks, solution.outer_on_cpu)
                         if on_cpu)
    activations = [per_layer[i] for i in range(shape.num_layers)]
    cpu_chunks.sort()
    b = DTYPE_BYTES[request.dtype]
    chunked = cand.zero_stage == 3
    states = ModelStatePlan(
        # one decoder layer as this rank holds it (its 1/tp shard under tensor parallelism,
        # the q/k norm weights whole)
        chunk_size_bytes=int(shape.layer_params_per_tp_rank(cand.tp)) * b if chunked else 0,
        num_chunks=shape.num_layers if chunked else 0,
        num_persistent_chunks=(shape.num_layers - len(cpu_chunks)) if chunked else 0,
        num_prefetch_buffers=max(s.num_prefetch_buffers for s in best.solutions),
        cpu_chunks=tuple(cpu_chunks), optimizer_on="device",
        cpu_outer=tuple(n for n in OUTER_NAMES if n in cpu_outer))
    worst = best.solutions[best.worst_memory_stage].evaluation
    cpu = hw.device_name.lower() == "cpu"
    categories = _bytes_by_category(best, hw.device_memory_bytes, params, cpu)
    tokens_per_s, mfu = throughput(shape, hw, request.dtype, seq_len=request.seq_len,
                                   global_batch_size=request.global_batch_size, step_s=best.step.total)
    mfu_nc = mfu * noncausal_flops_ratio(shape, request.seq_len)
    tokens = best.setups[0].problem.layers[0].tokens // cand.tp if best.setups[0].problem.layers else 0
    layout = None
    if with_layout:
        stage0 = best.solutions[0].activations
        layout = plan_memory_layout(shape, request.dtype, tokens, stage0,
                                    time_limit_s=min(LAYOUT_TIME_LIMIT_S, request.time_limit_s),
                                    max_nodes=LAYOUT_MAX_NODES, backend=request.solver)
    gaps = [g for g in summary["gaps"] if math.isfinite(g)]
    return Plan(
        feasible=True, **common,
        parallel=ParallelPlan(dp=cand.dp, tp=cand.tp, sp=cand.sp, sp_kind=cand.sp_kind, pp=cand.pp,
                              num_microbatches=cand.num_microbatches,
                              schedule=cand.schedule, zero_stage=cand.zero_stage,
                              stages=ranges, tp_overlap_chunks=_tp_overlap_chunks(best),
                              tp_column_backward=_tp_column_backward(best),
                              overlap_param_gather=param_gather_overlap(
                                  hw, request.overlap_param_gather)),
        model_states=states, activations=tuple(activations),
        tiling=TilingPlan(loss_chunk_tokens=best.tiling[0], mlp_chunk_tokens=best.tiling[1],
                          rebuild_tile_tokens=best.tiling[2]),
        memory_layout=layout,
        prediction=Prediction(
            per_rank_peak_bytes=sum(categories.values()), bytes_by_category=categories,
            host_bytes=int(max(s.evaluation.host_bytes for s in best.solutions)),
            nvme_bytes=int(max(s.evaluation.nvme_bytes for s in best.solutions)),
            activation_bytes_per_layer=tuple(int(round(r)) for s in best.solutions
                                             for r in s.evaluation.resident_bytes_per_layer),
            step_time_s=best.step.total, time_breakdown=best.step.to_dict(),
            tokens_per_s=tokens_per_s, mfu=mfu, mfu_noncausal=mfu_nc, hardware=hw.to_dict(),
            profile=profile_dict),
        solver=SolverInfo(backend=summary["backend"], status=_status_text(summary["statuses"]),
                          objective=best.step.total, solve_time_s=time.perf_counter() - start,
                          gap=max(gaps) if len(gaps) == len(summary["gaps"]) else 1.0),
        notes=tuple(summary["notes"].get(cand, ())) + _micro_batch_note(request, cand) + (
            _attention_note(request), *kernel_note(request, profile),
            f"{summary['solves']} stage MIPs and {summary['relaxations']} LP relaxations solved; "
            f"worst device use {gib(worst.device_bytes)}",))


def _tp_overlap_chunks(best) -> int:
    """The token blocks the chosen layout's layer times assume for tensor parallelism."""
    layers = [lc for setup in best.setups for lc in setup.problem.layers]
    return layers[0].tp_overlap_chunks if layers else 1


def _tp_column_backward(best) -> str:
    """How the chosen layout's layer times run the column-parallel backward's GEMMs."""
    layers = [lc for setup in best.setups for lc in setup.problem.layers]
    return layers[0].tp_column_backward if layers else "lean"


def _micro_batch_note(request: PlanRequest, cand: Candidate) -> tuple[str, ...]:
    """Says the micro-batch size was the planner's choice (train.micro_batch_size: auto)."""
    if request.micro_batch_size is not None:
        return ()
    return (f"micro-batch size {cand.micro_batch_size} chosen by the planner (auto; tried "
            f"{', '.join(map(str, micro_batch_sizes(request, cand.dp)))} sequences per "
            f"microbatch per rank at dp {cand.dp}): {cand.num_microbatches} microbatches per "
            f"step",)


def _attention_note(request: PlanRequest) -> str:
    """What the attention core was priced as: packed documents' measured share, or one
    document per sequence (MFU is reported over the full causal sequence either way)."""
    if request.attention_fraction is None:
        return "attention priced as one document per sequence (no packed-document statistics)"
    return (f"packed documents: attention priced at {request.attention_fraction:.3f} of a full "
            f"causal sequence (sum of squared document lengths / seq_len^2)")
