"""`disttrain plan --trial K`, runtime side: run each candidate plan for a few steps on this
machine in freshly spawned ranks (as the job would run), and time its steps.

The planner side (`planner/trial.py`) picks the plans and turns the measured times into
corrections per step part, stored beside the profile.
"""

from __future__ import annotations

import math
import statistics
import time

from disttrain.spec import Job, job_from_dict
from planner.plan import Plan


def _trial_worker(rank: int, world: int, raw_spec: dict, base_dir: str, plan_dict: dict,
                  steps: int) -> dict:
    """Median step seconds of `plan` on this rank (the first step is warm-up), and the
    median seconds of its parts: forward + backward (with the gradient reduction), gradient
    clipping, optimizer update."""
    from pathlib import Path

    from disttrain.data import build_batches
    from disttrain.engine import build_runtime

    job = job_from_dict(raw_spec, base_dir=Path(base_dir))
    plan = Plan.from_dict(plan_dict)
    tr = job.spec.train
    runtime = build_runtime(job, plan, rank=rank)
    batches = build_batches(job.spec.data.kind, job.data_path, vocab_size=job.shape.vocab_size,
                            seq_len=tr.seq_len, micro_batch_size=plan.micro_batch_size,
                            seed=tr.seed)
    times, parts = [], []
    try:
        for step in range(steps + 1):
            start = time.perf_counter()
            runtime.forward_backward(step, batches)
            backward = time.perf_counter()
            if tr.grad_clip:
                runtime.states.clip_grad_norm(tr.grad_clip)
            clipped = time.perf_counter()
            runtime.states.step(tr.lr)
            end = time.perf_counter()
            times.append(end - start)
            parts.append((backward - start, clipped - backward, end - clipped))
    finally:
        runtime.close()
    medians = [statistics.median(p[i] for p in parts[1:]) for i in range(3)]
    return {"step_s": statistics.median(times[1:]), "times": times[1:],
            "parts_s": dict(zip(("forward_backward", "clip", "optimizer"), medians))}


def run_trial(job: Job, plan: Plan, steps: int = 3, *, parts: dict | None = None) -> float:
    """Measured median step seconds of `plan` (the slowest rank's median); `parts`, when
    given, receives that rank's median seconds per part of the step."""
    from disttrain.parallel.spawn import spawn_ranks

    raw = job.spec.model_dump(mode="json")
    results = spawn_ranks(_trial_worker, plan.parallel.world_size, raw, str(job.base_dir),
                          plan.to_dict(), steps)
    slowest = max(results, key=lambda r: r["step_s"])
    if parts is not None:
        parts.update(slowest["parts_s"])
    return slowest["step_s"]


def trial_and_rerank(job: Job, plan: Plan, k: int, *, steps: int, plan_fn, corrections_file,
                     applied: dict[str, float] | None = None) -> tuple[Plan, list[dict]]:
    """Run the K best plans (the planner's choice first, then one per other layout family:
    `planner.trial.top_plans`) `steps` steps each, re-rank them by measured step time, store
    the trials and the factors per step part fitted over them (and measured/predicted per
    layout and per family) in `corrections_file`; returns the fastest
    measured plan and one row per trial (layout, family, predicted s, measured s, the
    measured parts of the step, and `failure`: why a plan the runtime could not run was left
    out, with measured s inf)."""
    from planner.trial import (corrections_from, layout_family, layout_key, save_corrections,
                               top_plans)

    plans = top_plans(job.plan_request(), k, plan_fn, first=plan)
    parts: list[dict] = [{} for _ in plans]
    measured, failures = [], []
    for p, part in zip(plans, parts):
        try:
            measured.append(run_trial(job, p, steps, parts=part))
            failures.append("")
        except RuntimeError as exc:  # the runtime refused or crashed on this plan: not kept
            measured.append(math.inf)
            failures.append(str(exc).strip().splitlines()[-1][:300])
    if all(failures):
        raise RuntimeError(f"--trial: no plan ran; first failure: {failures[0]}")
    rows = [{"layout": layout_key(p.parallel), "family": layout_family(layout_key(p.parallel)),
             "predicted_s": p.prediction.step_time_s, "measured_s": m,
             "error": p.prediction.step_time_s / m - 1, "measured_parts_s": part,
             "predicted_parts_s": dict(p.prediction.time_breakdown), "failure": why}
            for p, m, part, why in zip(plans, measured, parts, failures)]
    ran = [i for i, why in enumerate(failures) if not why]
    save_corrections(corrections_file, corrections_from([plans[i] for i in ran],
                                                        [measured[i] for i in ran], applied), rows)
    best = min(ran, key=lambda i: measured[i])
    return plans[best], rows
