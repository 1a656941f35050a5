"""A start for the stage MIP: the LP relaxation rounded layer by layer, then the rest solved.

The stage MIP has seven binaries per layer over up to 126 layers that are mostly
identical; its LP relaxation is tight (within ~0.3% of the MIP on the published specs) and
spreads each policy evenly over the layers (e.g. every layer 0.32 selective). HiGHS then
spends seconds at the root node on cuts and sub-MIP heuristics to find an integer
solution near that bound. This module builds one directly:

1. per layer, the relaxation's shares of (keep, selective, neither) are apportioned by
   cumulative rounding in layer order (each layer gets the class with the largest
   accumulated share, which then gives back 1): the counts match the relaxation's sums to
   within one layer, spread as evenly as the relaxation spread them, so e.g. selective
   layers alternate with swapping ones as the relaxation's windows assume;
2. the swapping layers' tier and whether they swap their input / attention output are
   rounded the same way from the relaxation's shares;
3. with those binaries fixed, the same model is solved for the rest (swap fractions,
   model-state chunks, buffers; a layer rounded to keep or selective may still swap instead,
   for the relaxation underestimates what a whole rebuild adds to the working set): a small
   MIP.

If that is infeasible, the input / attention-output swaps are left to it too; if it still is,
there is no start. The start only seeds the exact MIP (`planner.mip.solve_stage`),
which still proves its gap against the relaxation: it changes how fast a solution within the
gap is found, not which solutions are allowed. Deterministic: the relaxation and the small
MIP are solved on one thread with a fixed seed, and the rounding is plain arithmetic.
"""

from __future__ import annotations

from typing import Callable, Mapping

import pulp

LAYER_BINARIES = ("keep", "selective", "on_nvme", "input_cpu", "input_nvme", "attn_cpu", "attn_nvme")
"""The per-layer binaries of `planner.mip.build_stage_model` that the rounding fixes."""


def _value(var: pulp.LpVariable) -> float:
    return float(var.value() or 0.0)


def round_layers(lp: dict, count: int) -> list[dict[str, int]]:
    """Per layer, the binaries of `LAYER_BINARIES` rounded from the relaxation's values
    `lp[name][i]` (floats): cumulative rounding in layer order, so that each class's count
    stays within one of the relaxation's running sum."""
    acc = {"swap": 0.0, "selective": 0.0, "keep": 0.0}
    tier_acc = input_acc = attn_acc = 0.0
    layers = []
    for i in range(count):
        keep, sel = lp["keep"][i], lp["selective"][i]
        acc["keep"] += keep
        acc["selective"] += sel
        acc["swap"] += max(0.0, 1.0 - keep - sel)
        kind = max(acc, key=lambda k: acc[k])   # ties: the first of swap, selective, keep
        acc[kind] -= 1.0
        fixed = dict.fromkeys(LAYER_BINARIES, 0)
        if kind == "keep":
            fixed["keep"] = 1
        elif kind == "selective":
            fixed["selective"] = 1
        else:
            rest = max(1e-9, 1.0 - keep - sel)
            tier_acc += lp["on_nvme"][i]
            nvme = tier_acc >= 0.5
            tier_acc -= 1.0 if nvme else 0.0
            input_acc += min(1.0, (lp["input_cpu"][i] + lp["input_nvme"][i]) / rest)
            attn_acc += min(1.0, (lp["attn_cpu"][i] + lp["attn_nvme"][i]) / rest)
            tier = "nvme" if nvme else "cpu"
            fixed["on_nvme"] = int(nvme)
            if input_acc >= 0.5:
                fixed[f"input_{tier}"], input_acc = 1, input_acc - 1.0
            if attn_acc >= 0.5:
                fixed[f"attn_{tier}"], attn_acc = 1, attn_acc - 1.0
        layers.append(fixed)
    return layers


def rounded_start(model: pulp.LpProblem, variables: dict, solver: Callable[[bool], pulp.LpSolver],
                  relaxed: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """Values of every variable of `model` (`planner.mip.build_stage_model`, with its
    `variables`) forming a feasible solution, or None. `solver(mip)` is a fresh deterministic
    solver (mip=False: the LP relaxation). `relaxed` is the relaxation's solution (variable
    name -> value) when it was already solved (`planner.mip.stage_relaxation`, the same LP on
    the same solver): then it is not solved again. The model's bounds are restored afterwards."""
    binaries = [var for name in LAYER_BINARIES for var in variables[name]]
    bounds = [(var.lowBound, var.upBound) for var in binaries]
    try:
        if relaxed is None:
            model.solve(solver(False))
            if model.sol_status != pulp.LpSolutionOptimal:
                return None
            relaxed = {v.name: _value(v) for v in binaries}
        lp = {name: [float(relaxed[v.name]) for v in variables[name]] for name in LAYER_BINARIES}
        for free_swaps in (False, True):
            for var, (low, up) in zip(binaries, bounds):
                var.lowBound, var.upBound = low, up
            for i, fixed in enumerate(round_layers(lp, len(variables["keep"]))):
                for name, value in fixed.items():
                    var = variables[name][i]
                    value = min(value, var.upBound)   # never a forbidden choice
                    if name in ("keep", "selective"):
                        var.upBound = value           # a kept / selective layer may swap instead
                    elif not (free_swaps and name.startswith(("input", "attn"))):
                        var.lowBound = var.upBound = value
            model.solve(solver(True))
            if model.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
                return {v.name: _value(v) for v in model.variables()}
        return None
    finally:
        for var, (low, up) in zip(binaries, bounds):
            var.lowBound, var.upBound = low, up
