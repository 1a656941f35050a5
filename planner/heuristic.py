"""Quick feasible policies for a stage, evaluated exactly (no solver): an upper bound on the
stage's step time that lets the outer search prune layouts before their MIPs are solved.

Policies tried: keep every layer; keep the last k layers and recompute the rest (the largest
k that fits, found by bisection: device bytes grow with k); every non-kept layer swapping its
token-local tensors to the CPU or NVMe tier instead. Chunks: all persistent, else all on the
CPU with two prefetch buffers, with the outer (embedding / head) chunks on the device, else
on the CPU too.
"""

from __future__ import annotations

from planner.mip import StageEvaluation, StageProblem, evaluate_stage
from planner.plan import LayerActivationPlan

KEEP = LayerActivationPlan(keep_all=True)


def _evaluate(problem: StageProblem, acts: tuple) -> StageEvaluation | None:
    best = None
    outer = len(problem.outer_chunks)
    for persistent, buffers, on_cpu in ((problem.num_chunks, 2, False), (0, 2, False), (0, 2, True)):
        if persistent == 0 and problem.num_chunks == 0 and best is not None:
            break
        if on_cpu and not outer:
            continue
        ev = evaluate_stage(problem, acts, persistent, buffers, outer_on_cpu=(on_cpu,) * outer)
        if ev.feasible and (best is None or ev.objective_s < best.objective_s):
            best = ev
    return best


def quick_stage_bound(problem: StageProblem) -> StageEvaluation | None:
    """The best of a few simple policies (None: none of them fits)."""
    count = len(problem.layers)
    others = []
    if problem.allow_recompute:
        others.append(LayerActivationPlan(swap_fraction=0.0))
    if problem.allow_cpu:
        others.append(LayerActivationPlan(swap_fraction=1.0, tier="cpu"))
    if problem.allow_nvme:
        others.append(LayerActivationPlan(swap_fraction=1.0, tier="nvme"))
    best = None
    if problem.allow_keep:
        best = _evaluate(problem, (KEEP,) * count)
        if best is not None:
            return best
    for other in others:
        low, high = 0, count if problem.allow_keep else 0   # largest k kept that fits
        found = _evaluate(problem, (other,) * count)
        if found is None:
            continue
        while low < high:
            mid = (low + high + 1) // 2
            ev = _evaluate(problem, (other,) * (count - mid) + (KEEP,) * mid)
            if ev is not None:
                low, found = mid, ev
            else:
                high = mid - 1
        if best is None or found.objective_s < best.objective_s:
            best = found
    return best
