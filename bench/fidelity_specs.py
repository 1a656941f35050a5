"""The fidelity grid's job specs and what the cost model predicts for each row
(split from `bench/fidelity.py`, which re-exports them): a row's spec with this machine's
disk (`measured_disk`), and the planner's predicted activations, model states, step time
and bytes sent per step.
"""

from __future__ import annotations

import statistics

from peers import job_spec

from planner.costmodel import (ring_p2p_backward_bytes, ring_p2p_bytes, ulysses_alltoall_bytes,
                               zero_step_bytes)
from planner.tp_collectives import tp_step_bytes

DISK_PROBE_BYTES = 128 * 2**20
"""Bytes of each timed write and read of the swap directory's disk (`measured_disk`). The
cpu-local preset's NVMe figures (0.8 GB/s write, 0.6 read) are a guess; this machine's disk
does ~2.2 and ~1.5 with the copy engine's writers (`bench/copy_engine.py`), ~1.5-1.7 both
ways with the probe's one writer (printed with the results), so with the preset's the swap
rows' exposed transfer was priced ~2-2.5x its cost. The grid describes this machine as a user would, with
`disttrain profile --hardware`'s disk figures in `cluster.nvme`."""


def config_spec(seq_len: int, budget_mib: float, parallel: dict, memory: dict, steps: int,
                nvme: dict | None = None) -> dict:
    """A grid row's job; `nvme`: the spec's `cluster.nvme` (the disk as measured here,
    `measured_disk`), else the preset's figures."""
    spec = job_spec(seq_len, budget_mib, steps)
    if nvme is not None:
        spec = {**spec, "cluster": {**spec["cluster"], "nvme": nvme}}
    return {**spec, "parallel": parallel, "memory": memory}


def measured_disk(num_bytes: int = DISK_PROBE_BYTES) -> dict:
    """`cluster.nvme` for the runs' swap directory (the preset's path) with its write and read
    bandwidth measured now (`planner.hardware._timed_nvme`, the probe of `disttrain profile
    --hardware`: an O_DIRECT write as the swap store writes, the page cache dropped, a
    buffered read; the median of 3)."""
    from planner.hardware import CLUSTER_PRESETS, GB, GiB, _timed_nvme

    preset = CLUSTER_PRESETS["cpu-local"]
    runs = [_timed_nvme(preset.nvme_path, num_bytes) for _ in range(3)]
    return {"path": preset.nvme_path, "capacity_gib": preset.nvme_capacity_bytes / GiB,
            "write_gbps": round(statistics.median(r[0] for r in runs) / GB, 3),
            "read_gbps": round(statistics.median(r[1] for r in runs) / GB, 3)}


def predicted_comm(job, plan) -> float:
    """Bytes one rank sends per step by the cost model's collective formulas (rank 0)."""
    shape, par = job.shape, plan.parallel
    micro = plan.global_batch_size // (plan.micro_batch_size * par.dp)
    tokens = plan.micro_batch_size * plan.seq_len // par.sp
    total = 0.0
    if par.sp > 1 and par.sp_kind == "ulysses":
        total += micro * shape.num_layers * 3 * ulysses_alltoall_bytes(shape, "fp32", tokens, par.sp)
    if par.sp > 1 and par.sp_kind == "ring":
        total += micro * shape.num_layers * (ring_p2p_bytes(shape, "fp32", tokens, par.sp)
                                             + ring_p2p_backward_bytes(shape, "fp32", tokens, par.sp))
    if par.pp > 1:
        total += micro * tokens * shape.hidden_size * 4
    tp = getattr(par, "tp", 1)
    if tp > 1:  # the planner's TP volume per microbatch
        rebuilt = sum(tokens * (1 - a.swap_fraction) for a in plan.activations if not a.keep_all)
        total += micro * tp_step_bytes(shape, "fp32", tokens, tp, recomputed_layer_tokens=rebuilt)
    group = par.dp * par.sp
    if group > 1 and par.pp == 1:
        per_mb, per_step = zero_step_bytes(shape.num_params() // tp, "fp32", par.zero_stage, group,
                                           micro, backward_resident_params=shape.embedding_params() // tp)
        total += micro * per_mb + per_step
    return total


def predicted(job, plan) -> dict[str, float]:
    cats = plan.prediction.bytes_by_category
    return {"activations": float(sum(plan.prediction.activation_bytes_per_layer)),
            "model states": float(sum(cats.get(k, 0) for k in ("parameters", "gradients", "optimizer"))),
            "step time": plan.prediction.step_time_s, "comm": predicted_comm(job, plan)}
