"""A profile beside twins, timed in interleaved rounds (`planner.profiler.profile_layer`)."""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.profiler import LayerMeasurement

TWIN_ROUNDS = 4
"""Interleaved rounds of a profile taken beside twins (CPU ranks sharing cores). This 2-core
VM's speed drifts with no load of its own (`bench/profile_spread.py --drift`: one process
timing the same layer moved 1.5-1.6x within seconds), so pieces timed one after the other in one
pass (each length's layer, the head, the update, the page-fault price) each caught another
moment, and rows of the fidelity grid that lean on different pieces moved apart from one
profile to the next. `bench/profile_spread.py`, 5 profiles of each kind alternately: each
row's prediction over the profile's mean over rows varied 5.8% (relative sd, mean over rows)
in one pass, 3.3% in 4 rounds (the profile taking 11.6 s instead of 7.0 s)."""


def pool_rounds(rounds: list[tuple[list[LayerMeasurement], float, float, float]]
                ) -> tuple[list[LayerMeasurement], float, float, float]:
    """One (runs, optimizer s/param, page-fault s/byte, loss-tile s) from interleaved rounds:
    every time the median of its rounds (bytes and allocations from the first round: they
    do not depend on the moment)."""
    if len(rounds) == 1:
        return rounds[0]
    times = ("forward_s", "backward_s", "token_local_forward_s", "attention_forward_s",
             "head_forward_s", "head_backward_s")
    runs = [dataclasses.replace(first, **{name: statistics.median(getattr(r[0][i], name)
                                                                  for r in rounds)
                                          for name in times})
            for i, first in enumerate(rounds[0][0])]
    return (runs, *(statistics.median(r[k] for r in rounds) for k in (1, 2, 3)))
