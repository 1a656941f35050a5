"""Exact shortfalls for a plan that found no layout.

The search rejects some candidates before building their stages: when ZeRO 0-2 model states
alone exceed the device (`search._rank`), the candidate cannot fit whatever its activations
do, and building its stages would cost time for nothing. That rejection's shortfall (states -
usable) is only a lower bound of what the candidate misses by: its activations, working set
and buffers come on top. A plan with no feasible layout headlines its closest miss (the
smallest shortfall), so a lower bound would win against exact shortfalls of candidates that
really are closer, and blame model states where the working set binds.

`refine_misses` replaces those lower bounds by each candidate's exact shortfall (its stages
built and the leanest policy priced, `candidates.memory_rejection`) in order of the bound,
while a bound is below the smallest exact shortfall known: the closest miss reported is then
exact. It runs only when no layout fits.
"""

from __future__ import annotations

import math

from planner.candidates import memory_rejection, profiled_stages
from planner.costmodel import Candidate, CostParams
from planner.grid import sized_request
from planner.request import PlanRequest

MAX_REFINED = 12
"""At most this many candidates get their stages built to refine a lower-bound shortfall."""


def refine_misses(request: PlanRequest, rejected: list[dict], loose: list[tuple[int, Candidate]],
                  params: CostParams, profile, measured_bytes, usable: float) -> int:
    """Refine, in place, the rejections at the indices of `loose` (lower-bound shortfalls of
    candidates whose stages were never built); returns how many were refined."""
    exact = min((r["shortfall_bytes"] for i, r in enumerate(rejected)
                 if r.get("shortfall_bytes") is not None and i not in {j for j, _ in loose}),
                default=math.inf)
    refined = 0
    for index, cand in sorted(loose, key=lambda item: rejected[item[0]]["shortfall_bytes"]):
        if refined >= MAX_REFINED or rejected[index]["shortfall_bytes"] >= exact:
            break
        setups, _ = profiled_stages(sized_request(request, cand), cand, params, profile, measured_bytes)
        why = memory_rejection(setups, request.hardware.device_memory_bytes, usable)
        refined += 1
        if why is None:     # cannot happen: its model states alone exceed `usable`
            continue
        rejected[index] = dict(rejected[index], reason=why[0], shortfall_bytes=why[1])
        exact = min(exact, why[1])
    return refined
