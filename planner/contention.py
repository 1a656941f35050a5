"""Compute slowed by the collectives hidden beside it (docs/design.md, "Contention").

A collective that overlaps compute is not free: its NCCL kernel holds `NCCL_CTAS` SMs for as
long as it runs, so the GEMMs and attention kernels beside it run on the remaining ones.
`planner.collectives` prices what a ZeRO or tensor-parallel collective leaves exposed; this
module prices the other part, the seconds it is hidden: the compute under it loses
`collective_slowdown` of its rate for that long, i.e. that share of the hidden seconds is
added to the step. Ring attention's point-to-point sends are left out (NCCL runs them on
fewer channels than a collective; no measurement at hand). Only where
collectives run beside compute (GPUs; on a CPU node every collective second is exposed
already) and on a device family whose SM count is known.
"""

from __future__ import annotations

from planner.collectives import overlaps_compute, param_gather_overlap, zero_microbatch_seconds
from planner.costtypes import Candidate, CostParams
from planner.efficiency import device_family
from planner.hardware import HardwareSpec
from planner.shapes import ModelShape
from planner.tp_collectives import tp_comm_seconds


def zero_contention_seconds(hw: HardwareSpec, params: CostParams, cand: Candidate,
                            num_params: float, units: int, *, microbatch_compute_s: float,
                            backward_s: float, backward_resident_params: float,
                            param_bytes: int, grad_bytes: int,
                            overlap_param_gather: bool | None = None) -> tuple[float, float]:
    """(per microbatch, per step) seconds the ZeRO collectives of one stage add to its compute
    while they run hidden beside it: `collective_slowdown` x (all their seconds - the exposed
    ones of `zero_microbatch_seconds`). Same arguments as that function."""
    family = device_family(hw.device_name)
    if family is None or not overlaps_compute(hw):
        return 0.0, 0.0
    common = dict(microbatch_compute_s=microbatch_compute_s, backward_s=backward_s,
                  backward_resident_params=backward_resident_params, param_bytes=param_bytes,
                  grad_bytes=grad_bytes)
    total_mb, total_step = zero_microbatch_seconds(hw, params, cand, num_params, units,
                                                   overlap=False, **common)
    exposed_mb, exposed_step = zero_microbatch_seconds(
        hw, params, cand, num_params, units, overlap=True,
        gather_overlap=param_gather_overlap(hw, overlap_param_gather), **common)
    share = family.collective_slowdown
    return share * max(0.0, total_mb - exposed_mb), share * max(0.0, total_step - exposed_step)


def tp_contention_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, tokens: int, tp: int,
                          params: CostParams, direction: str, *, chunks: int,
                          exposed_s: float) -> float:
    """Seconds one layer's tensor-parallel collectives in `direction` add to the GEMMs they are
    pipelined with (`parallel.tp_overlap_chunks` = `chunks` > 1): `collective_slowdown` x
    (all their seconds - `exposed_s`, what `tp_comm_seconds` leaves exposed)."""
    family = device_family(hw.device_name)
    if family is None or tp <= 1 or chunks <= 1 or not overlaps_compute(hw):
        return 0.0
    total = tp_comm_seconds(shape, dtype, hw, tokens, tp, params, direction, chunks=chunks)
    return family.collective_slowdown * max(0.0, total - exposed_s)
