"""The inner problem: per-layer activation policy, chunk placement and prefetch buffers
for one pipeline stage.

Per layer: keep everything (plain layer), or keep/swap the layer input and the attention
output, and split the token-local activations into a swapped share (to CPU or NVMe, one
tier per layer) and a recomputed rest, or run op-level selective checkpointing (keep every
other matmul's output and the attention output, `planner.selective`). Per stage: how many model-state chunks stay on the
device (the rest live on the host, are prefetched, and get their optimizer step on the
CPU), and one or two prefetch buffers (two overlap the fetches with compute). Constraints: device memory at the peak, host and NVMe capacity, and each layer's
swap traffic against its neighbours' compute window (host link and NVMe separately; the
excess is exposed time). Objective: the stage's predicted step time.

`evaluate_stage` (`planner.stage`, re-exported here with the problem types) computes the same
numbers for a fixed decision in plain Python: the MIP is checked against it by brute force.

Speed on 80-126 mostly identical layers comes from a tight relaxation, not from ordering the
layers: the optimum can interleave policies (a kept or selective layer between two swapping
ones lends them its window and keeps its prefetch out of their working set;
tests/test_stage_mip_tight.py), so no ordering constraint is imposed. Instead the window
constraints count a layer's window only where it may swap, one tier at a time, and the working
set has one binary per kind of rebuild: all exact for integer solutions, and they bring the
relaxation within 0.05-0.3% of the MIP on the published specs (it was 1-5% below with selective layers).
The MIP starts from the relaxation rounded layer by layer (`planner.mip_start`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pulp

from planner import lp_fast
from planner.outer import outer_terms, scaled
from planner.plan import LayerActivationPlan
from planner.mip_start import rounded_start
from planner.solve import SolveResult, solve_model
from planner.stage import (  # noqa: F401  (re-exported: callers import them from here)
    StageEvaluation, StageProblem, StageSolution, _layer_traffic, evaluate_stage,
    rebuilt_token_local_bytes, selective_rebuilt_bytes, tile_scale)


BYTE_UNIT = float(2**30)
"""Bytes (and bytes/s) enter the MIP in GiB so its coefficients stay near 1."""
_BYTE_FIELDS = ("device_capacity_bytes", "fixed_device_bytes", "working_base_bytes", "host_capacity_bytes",
                "nvme_capacity_bytes", "host_link_bw", "nvme_read_bw", "nvme_write_bw",
                "chunk_device_bytes", "chunk_host_bytes", "chunk_link_bytes", "chunk_buffer_bytes")
_LAYER_BYTE_FIELDS = ("input_bytes", "attention_output_bytes", "token_local_bytes", "mlp_bytes",
                      "plain_bytes", "qkv_bytes", "selective_bytes")


def _in_gib(problem: StageProblem) -> StageProblem:
    """The same problem with bytes and bandwidths in GiB (seconds are unchanged)."""
    layers = tuple(replace(lc, **{f: getattr(lc, f) / BYTE_UNIT for f in _LAYER_BYTE_FIELDS})
                   for lc in problem.layers)
    return replace(problem, layers=layers,
                   outer_chunks=tuple(scaled(c, BYTE_UNIT) for c in problem.outer_chunks),
                   **{f: getattr(problem, f) / BYTE_UNIT for f in _BYTE_FIELDS})


def build_stage_model(problem: StageProblem, relax: bool = False, lp=lp_fast) -> tuple[pulp.LpProblem, dict]:
    """The model of `problem`; `relax` drops integrality (for a bound). `lp` is the modelling
    module: `planner.lp_fast` (the same model as pulp's, built and handed to HiGHS faster) or
    `pulp` itself."""
    problem = _in_gib(problem)
    binary = lp.LpContinuous if relax else lp.LpBinary
    integer = lp.LpContinuous if relax else lp.LpInteger
    model = lp.LpProblem("stage_activation_policy", lp.LpMinimize)
    count = len(problem.layers)
    steps = problem.token_chunks or 1
    frac_cat = integer if problem.token_chunks else lp.LpContinuous

    def flag(name: str, allowed: bool) -> pulp.LpVariable:
        # pulp resets a binary's bounds to [0, 1]: a forbidden choice is fixed after creation.
        var = model.add_variable(name, 0, 1, binary)
        var.upBound = 1 if allowed else 0
        return var

    def binaries(name: str, allowed: bool) -> list[pulp.LpVariable]:
        return [flag(f"{name}_{i}", allowed) for i in range(count)]

    keep = binaries("keep_all", problem.allow_keep)
    selective = [flag(f"selective_{i}", problem.allow_selective and problem.allow_recompute
                      and lc.selective_bytes > 0) for i, lc in enumerate(problem.layers)]
    on_nvme = binaries("tier_is_nvme", problem.allow_nvme)
    steps_cpu = [model.add_variable(f"swap_steps_cpu_{i}", 0, steps if problem.allow_cpu else 0, frac_cat)
                 for i in range(count)]
    steps_nvme = [model.add_variable(f"swap_steps_nvme_{i}", 0, steps if problem.allow_nvme else 0, frac_cat)
                  for i in range(count)]
    input_cpu, input_nvme = binaries("input_to_cpu", problem.allow_cpu), binaries("input_to_nvme", problem.allow_nvme)
    attn_cpu, attn_nvme = binaries("attn_out_to_cpu", problem.allow_cpu), binaries("attn_out_to_nvme", problem.allow_nvme)
    exposed_fwd = [model.add_variable(f"exposed_offload_s_{i}", 0) for i in range(count)]
    exposed_bwd = [model.add_variable(f"exposed_prefetch_s_{i}", 0) for i in range(count)]
    persistent = model.add_variable("persistent_chunks", 0, problem.num_chunks, integer)
    any_cpu_chunk = flag("any_cpu_chunk", bool(problem.num_chunks))
    double_buffered = flag("double_buffered", bool(problem.num_chunks))
    second_buffer = flag("second_buffer_used", bool(problem.num_chunks))
    exposed_chunk = model.add_variable("exposed_chunk_s", 0)
    exposed_opt = model.add_variable("exposed_cpu_optimizer_s", 0)
    working = model.add_variable("working_set", 0)
    cpu_chunks = problem.num_chunks - persistent
    outer_cpu = [flag(f"outer_on_cpu_{j}", True) for j in range(len(problem.outer_chunks))]
    outer = outer_terms(problem.outer_chunks, outer_cpu)

    swap_frac, recompute_frac, swapped, nvme_swapped, cpu_swapped, resident = [], [], [], [], [], []
    ahead, ahead_nvme = [], []
    for i, lc in enumerate(problem.layers):
        frac = (steps_cpu[i] + steps_nvme[i]) * (1.0 / steps)
        swap_frac.append(frac)
        recompute_frac.append(1 - keep[i] - selective[i] - frac)
        model += frac + keep[i] + selective[i] <= 1, f"token_shares_{i}"
        if not problem.allow_recompute:
            model += frac + keep[i] >= 1, f"no_recompute_{i}"
        if problem.selective_only:
            model += selective[i] >= 1, f"selective_only_{i}"
        model += steps_nvme[i] <= steps * on_nvme[i], f"nvme_tier_tokens_{i}"
        model += steps_cpu[i] <= steps * (1 - on_nvme[i]), f"cpu_tier_tokens_{i}"
        for cpu_var, nvme_var, what in ((input_cpu[i], input_nvme[i], "input"),
                                        (attn_cpu[i], attn_nvme[i], "attn_out")):
            model += cpu_var + nvme_var <= 1 - keep[i] - selective[i], f"{what}_swapped_once_{i}"
            model += nvme_var <= on_nvme[i], f"{what}_nvme_tier_{i}"
            model += cpu_var <= 1 - on_nvme[i], f"{what}_cpu_tier_{i}"
        cpu_bytes = (lc.token_local_bytes * (1.0 / steps) * steps_cpu[i]
                     + lc.input_bytes * input_cpu[i] + lc.attention_output_bytes * attn_cpu[i])
        nvme_bytes = (lc.token_local_bytes * (1.0 / steps) * steps_nvme[i]
                      + lc.input_bytes * input_nvme[i] + lc.attention_output_bytes * attn_nvme[i])
        cpu_swapped.append(cpu_bytes)
        nvme_swapped.append(nvme_bytes)
        swapped.append(cpu_bytes + nvme_bytes)
        scale = tile_scale(lc, problem.rebuild_fraction)
        tl_ahead = lc.token_local_bytes * scale * (1.0 / steps)
        ahead_nvme.append(tl_ahead * steps_nvme[i] + lc.input_bytes * input_nvme[i]
                          + lc.attention_output_bytes * attn_nvme[i])
        ahead.append(tl_ahead * (steps_cpu[i] + steps_nvme[i]) + lc.input_bytes * (input_cpu[i] + input_nvme[i])
                     + lc.attention_output_bytes * (attn_cpu[i] + attn_nvme[i]))
        resident.append(lc.plain_bytes * keep[i] + lc.selective_bytes * selective[i]
                        + lc.input_bytes * (1 - keep[i] - selective[i] - input_cpu[i] - input_nvme[i])
                        + lc.attention_output_bytes * (1 - keep[i] - selective[i] - attn_cpu[i]
                                                       - attn_nvme[i]))
    # the working set is a maximum over layers: one binary says whether any layer rebuilds its
    # token-local tensors (any selective layer its recomputed ones), and the smallest such
    # rebuild bounds the working set then (implied for integers; the relaxation can no longer
    # spread a share of every layer over the policies to shrink each layer's term)
    any_rebuild = flag("any_token_rebuild", bool(count))
    any_selective = flag("any_selective", bool(count))
    if count:
        model += (working >= problem.working_base_bytes + any_rebuild * min(
            rebuilt_token_local_bytes(lc, problem.rebuild_fraction) for lc in problem.layers)), "working_if_rebuild"
        model += (working >= problem.working_base_bytes + any_selective * min(
            selective_rebuilt_bytes(lc) for lc in problem.layers)), "working_if_selective"
    for i, lc in enumerate(problem.layers):
        cache = (ahead_nvme[i - 1] if i and problem.page_cache_reads else 0)
        model += (working >= problem.working_base_bytes
                  + rebuilt_token_local_bytes(lc, problem.rebuild_fraction) * (1 - keep[i] - selective[i])
                  + selective_rebuilt_bytes(lc) * selective[i]
                  + lc.input_bytes * (input_cpu[i] + input_nvme[i])
                  + lc.attention_output_bytes * (attn_cpu[i] + attn_nvme[i])
                  + (ahead[i - 1] if i else 0) + cache), f"backward_working_set_{i}"
        model += any_rebuild >= 1 - keep[i] - selective[i], f"any_token_rebuild_{i}"
        model += any_selective >= selective[i], f"any_selective_{i}"
        last = i == count - 1
        nxt = None if last else problem.layers[i + 1]
        # a window's fixed part (the next layer's compute) counts only where layer i may swap:
        # keep + selective = 1 swaps nothing, so scaling by (1 - keep - selective) is exact for
        # integers and stops the relaxation from using a mostly-kept layer's whole window
        fwd_fixed = problem.tail_forward_window_s if last else nxt.forward_s
        bwd_fixed = problem.tail_backward_window_s if last else nxt.backward_s
        bwd_var = 0 if last else (nxt.recompute_s * recompute_frac[i + 1]
                                  + nxt.selective_recompute_s * selective[i + 1])
        bwd_var_max = 0.0 if last else max(nxt.recompute_s, nxt.selective_recompute_s)
        if not problem.swap_beside_compute:
            fwd_fixed = bwd_fixed = bwd_var = bwd_var_max = 0
        may_swap = 1 - keep[i] - selective[i]
        link = swapped[i] * (1.0 / problem.host_link_bw)
        model += exposed_fwd[i] >= link - fwd_fixed * may_swap, f"offload_link_window_{i}"
        model += exposed_bwd[i] >= link - bwd_fixed * may_swap - bwd_var, f"prefetch_link_window_{i}"
        model += (exposed_bwd[i] >= link - (bwd_fixed + bwd_var_max) * may_swap,
                  f"prefetch_link_window_cap_{i}")
        if problem.allow_nvme:
            # a layer swaps to one tier: its CPU bytes over the link plus its NVMe bytes over
            # the disk fit one window (exact for integers, and no relaxation splitting a layer
            # between the tiers to use both a full window)
            cpu_link = cpu_swapped[i] * (1.0 / problem.host_link_bw)
            write = nvme_swapped[i] * (1.0 / problem.nvme_write_bw)
            read = nvme_swapped[i] * (1.0 / problem.nvme_read_bw)
            model += exposed_fwd[i] >= write - fwd_fixed * on_nvme[i], f"nvme_write_window_{i}"
            model += exposed_fwd[i] >= cpu_link + write - fwd_fixed * may_swap, f"tier_write_window_{i}"
            model += exposed_bwd[i] >= read - bwd_fixed * on_nvme[i] - bwd_var, f"nvme_read_window_{i}"
            model += (exposed_bwd[i] >= cpu_link + read - bwd_fixed * may_swap - bwd_var,
                      f"tier_read_window_{i}")
    model += problem.num_chunks * any_cpu_chunk >= cpu_chunks, "buffers_when_any_cpu_chunk"
    model += second_buffer >= double_buffered + any_cpu_chunk - 1, "second_buffer_allocated"
    model += (problem.fixed_device_bytes + problem.chunk_device_bytes * persistent
              + problem.chunk_buffer_bytes * (any_cpu_chunk + second_buffer)
              + problem.inflight * lp.lpSum(resident) + working + outer.device
              <= problem.device_capacity_bytes), "device_memory"
    model += (problem.inflight * lp.lpSum(cpu_swapped) + problem.chunk_host_bytes * cpu_chunks
              + outer.host <= problem.host_capacity_bytes), "host_memory"
    model += problem.inflight * lp.lpSum(nvme_swapped) <= problem.nvme_capacity_bytes, "nvme_capacity"
    compute = sum(lc.forward_s + lc.backward_s for lc in problem.layers)
    backward = sum(lc.backward_s for lc in problem.layers)
    chunk_traffic = ((cpu_chunks * problem.chunk_link_bytes + outer.link + lp.lpSum(swapped))
                     * (1.0 / problem.host_link_bw))
    if problem.num_chunks:
        model += (exposed_chunk >= chunk_traffic - compute * double_buffered
                  - problem.num_chunks * (1 - any_cpu_chunk) * 1e6), "chunk_link_window"
    for j, on_cpu in enumerate(outer_cpu):  # an outer chunk has its own buffer: fetched under compute
        model += exposed_chunk >= chunk_traffic - compute - (1 - on_cpu) * 1e6, f"outer_link_window_{j}"
    if problem.num_chunks or outer_cpu:
        opt_window = backward if problem.cpu_optimizer_overlap else 0.0
        model += (exposed_opt >= cpu_chunks * problem.chunk_cpu_optimizer_s + outer.cpu_optimizer_s
                  - opt_window), "cpu_optimizer_window"
    per_microbatch = (compute + lp.lpSum(lc.recompute_s * recompute_frac[i]
                                           + lc.selective_recompute_s * selective[i]
                                           for i, lc in enumerate(problem.layers))
                      + lp.lpSum(exposed_fwd) + lp.lpSum(exposed_bwd))
    model += (problem.slots * (per_microbatch + exposed_chunk) + exposed_opt
              + problem.chunk_device_optimizer_s * persistent + outer.device_optimizer_s), "predicted_step_time"
    variables = dict(keep=keep, selective=selective, on_nvme=on_nvme, steps_cpu=steps_cpu, steps_nvme=steps_nvme,
                     input_cpu=input_cpu, input_nvme=input_nvme, attn_cpu=attn_cpu,
                     attn_nvme=attn_nvme, persistent=persistent, double_buffered=double_buffered,
                     outer_cpu=outer_cpu)
    return model, variables


def _read_decisions(problem: StageProblem, variables: dict
                    ) -> tuple[tuple[LayerActivationPlan, ...], int, int, tuple[bool, ...]]:
    steps = problem.token_chunks or 1
    acts = []
    for i in range(len(problem.layers)):
        val = {name: (variables[name][i].value() or 0.0) for name in
               ("keep", "selective", "on_nvme", "steps_cpu", "steps_nvme", "input_cpu",
                "input_nvme", "attn_cpu", "attn_nvme")}
        keep = val["keep"] > 0.5
        if not keep and val["selective"] > 0.5:
            acts.append(LayerActivationPlan(selective=True))
            continue
        frac = (val["steps_cpu"] + val["steps_nvme"]) / steps
        frac = 0.0 if keep else min(1.0, max(0.0, round(frac, 9)))
        tier = "nvme" if val["on_nvme"] > 0.5 else "cpu"
        acts.append(LayerActivationPlan(
            keep_all=keep, swap_fraction=frac, tier=tier,
            swap_input=not keep and val["input_cpu"] + val["input_nvme"] > 0.5,
            swap_attention_output=not keep and val["attn_cpu"] + val["attn_nvme"] > 0.5))
    persistent = int(round(variables["persistent"].value() or 0)) if problem.num_chunks else 0
    buffers = 0
    if persistent < problem.num_chunks:
        buffers = 2 if (variables["double_buffered"].value() or 0) > 0.5 else 1
    outer = tuple((v.value() or 0.0) > 0.5 for v in variables["outer_cpu"])
    return tuple(acts), persistent, buffers, outer


def prefer_keep(problem: StageProblem, activations: tuple[LayerActivationPlan, ...],
                num_persistent_chunks: int, num_prefetch_buffers: int,
                outer_on_cpu: tuple[bool, ...] | None = None) -> tuple[LayerActivationPlan, ...]:
    """Turn non-kept layers into plain ones while the result stays feasible and no slower.

    Swapping whose copies hide fully under compute costs no predicted time, so the solver may
    return it when memory is ample (a tie, or within its gap); the runtime's copies still use
    memory bandwidth and copy threads. Among equally fast policies the plainest is kept."""
    if not problem.allow_keep:
        return activations
    acts = list(activations)
    best = evaluate_stage(problem, tuple(acts), num_persistent_chunks, num_prefetch_buffers,
                          outer_on_cpu=outer_on_cpu)
    for i in reversed(range(len(acts))):
        if acts[i].keep_all:
            continue
        trial = tuple(acts[:i] + [LayerActivationPlan(keep_all=True)] + acts[i + 1:])
        ev = evaluate_stage(problem, trial, num_persistent_chunks, num_prefetch_buffers,
                            outer_on_cpu=outer_on_cpu)
        if ev.feasible and ev.objective_s <= best.objective_s * (1 + 1e-9):
            acts, best = list(trial), ev
    return tuple(acts)


class NoSolution(Exception):
    """The stage MIP returned no solution; `result` says what the solver reported."""

    def __init__(self, result: SolveResult):
        super().__init__(f"no solution: {result.status}")
        self.result = result


STAGE_MAX_NODES = 200
"""Branch-and-bound nodes of one stage MIP (HiGHS `mip_max_nodes`): the deterministic work
limit; the stage MIPs of the published specs finish at their root node."""


def solve_stage(problem: StageProblem, *, backend: str = "auto", time_limit_s: float = 10.0,
                gap_rel: float = 1e-4, max_nodes: int | None = STAGE_MAX_NODES,
                warm_start: bool = True, relaxation: StageRelaxation | None = None) -> StageSolution:
    """Solve the stage MIP; raises `NoSolution` (carrying the solver's status) when none.
    `max_nodes` bounds its work; `time_limit_s` is a wall-clock safety cap. `warm_start`
    seeds HiGHS with the rounded relaxation (`planner.mip_start`); `relaxation` (this
    problem's `stage_relaxation`, already solved for the search's bound) saves solving the
    relaxation again for it."""
    if relaxation is not None and relaxation.problem is not problem and relaxation.problem != problem:
        raise ValueError("relaxation: solved for another stage problem")
    relaxed = relaxation.values if relaxation is not None and relaxation.result.backend == "highs" else None
    holder: dict = {}

    def build(relax: bool) -> pulp.LpProblem:
        model, variables = build_stage_model(problem, relax)
        if not relax:
            holder["variables"] = variables
        return model

    def start(model: pulp.LpProblem, solver) -> dict[str, float] | None:
        return rounded_start(model, holder["variables"], solver, relaxed)

    # The compute term is a constant: stop once the gap is gap_rel of it, in seconds.
    constant = problem.slots * sum(lc.forward_s + lc.backward_s for lc in problem.layers)
    _, result = solve_model(build, backend=backend, time_limit_s=time_limit_s, gap_rel=gap_rel,
                            gap_abs=gap_rel * constant if gap_rel > 0 else None,
                            max_nodes=max_nodes, warm_start=start if warm_start else None)
    if not result.has_solution:
        raise NoSolution(result)
    acts, persistent, buffers, outer = _read_decisions(problem, holder["variables"])
    acts = prefer_keep(problem, acts, persistent, buffers or 2, outer)
    return StageSolution(activations=acts, num_persistent_chunks=persistent,
                         num_prefetch_buffers=buffers, outer_on_cpu=outer, solve=result,
                         evaluation=evaluate_stage(problem, acts, persistent, buffers or 2,
                                                   outer_on_cpu=outer))


@dataclass(frozen=True, kw_only=True, eq=False)
class StageRelaxation:
    """A stage MIP's LP relaxation, solved once: its optimum is the search's lower bound
    (`planner.search_steps`) and its solution what the MIP's start rounds
    (`planner.mip_start`), so `solve_stage` does not solve it again."""

    problem: StageProblem
    bound: float
    """The relaxation's optimum (inf when even the relaxation is infeasible, so the MIP is too)."""
    result: SolveResult
    values: dict[str, float] | None = field(default=None, repr=False)
    """Variable name -> value at that optimum (None when there is none)."""


def stage_relaxation(problem: StageProblem, *, backend: str = "auto", time_limit_s: float = 10.0
                     ) -> StageRelaxation:
    """The LP relaxation's optimum: a lower bound on the stage MIP's objective. Cheap next to
    the MIP (no cuts, no branching) and within about 1% of it on the published specs, so the
    outer search can skip layouts that cannot beat the best plan found; its solution seeds
    the MIP's start when the layout is solved (`solve_stage(relaxation=...)`)."""
    model, result = solve_model(lambda relax: build_stage_model(problem, True)[0], backend=backend,
                                time_limit_s=time_limit_s, gap_rel=0.0)
    if not result.has_solution:
        return StageRelaxation(problem=problem, bound=math.inf, result=result)
    return StageRelaxation(problem=problem, bound=result.objective, result=result,
                           values={v.name: float(v.value() or 0.0) for v in model.variables()})


def stage_lower_bound(problem: StageProblem, *, backend: str = "auto", time_limit_s: float = 10.0
                      ) -> tuple[float, SolveResult]:
    """`stage_relaxation`'s (bound, solver result): inf when the relaxation is infeasible."""
    relaxation = stage_relaxation(problem, backend=backend, time_limit_s=time_limit_s)
    return relaxation.bound, relaxation.result
