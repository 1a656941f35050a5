"""`disttrain plan --trial K`, runtime side: run each candidate plan for a few steps on this
machine in freshly spawned ranks (as the job would run), and time its steps.

The planner side picks the plans (`planner/trial_rounds.py`: a family round, refinement on
the corrected ranking, the noise-aware choice) and turns the measured times into
corrections per step part (`planner/trial.py`), stored beside the profile.
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


def measure_trial(job: Job, plan: Plan, steps: int = 3):
    """One trial run of `plan` (`planner.trial_rounds.Measurement`): the slowest rank's median
    step seconds, its per-step seconds and measured parts; a plan the runtime refuses or
    crashes on gives a failure (step inf) instead of an exception."""
    from disttrain.parallel.spawn import spawn_ranks
    from planner.trial_rounds import Measurement

    raw = job.spec.model_dump(mode="json")
    try:
        results = spawn_ranks(_trial_worker, plan.parallel.world_size, raw, str(job.base_dir),
                              plan.to_dict(), steps)
    except RuntimeError as exc:  # the runtime refused or crashed on this plan: not kept
        return Measurement(math.inf, failure=str(exc).strip().splitlines()[-1][:300])
    slowest = max(results, key=lambda r: r["step_s"])
    return Measurement(slowest["step_s"], list(slowest["times"]), dict(slowest["parts_s"]))


def run_trial(job: Job, plan: Plan, steps: int = 3, *, parts: dict | None = None) -> float:
    """Measured median step seconds of `plan` (the slowest rank's median); `parts`, when
    given, receives that rank's median seconds per part of the step."""
    got = measure_trial(job, plan, steps)
    if got.failure:
        raise RuntimeError(got.failure)
    if parts is not None:
        parts.update(got.parts)
    return got.step_s


def trial_rows(outcome) -> list[dict]:
    """One row per trial: layout, family, predicted s, measured s (the median of its pooled
    steps), error, the measured and predicted parts of the step, `failure` (why a plan the
    runtime could not run was left out, measured s inf), and - new keys, older readers ignore
    them - `round` (family / refine) and `runs_s` (the median of each run)."""
    from planner.trial import layout_family

    return [{"layout": t.key, "family": layout_family(t.key),
             "predicted_s": t.plan.prediction.step_time_s, "measured_s": t.step_s,
             "error": t.plan.prediction.step_time_s / t.step_s - 1,
             "measured_parts_s": t.runs[0].parts,
             "predicted_parts_s": dict(t.plan.prediction.time_breakdown), "failure": t.failure,
             "round": t.round, "runs_s": [r.step_s for r in t.runs]}
            for t in outcome.trials]


def trial_and_rerank(job: Job, plan: Plan, k: int, *, steps: int, plan_fn, corrections_file,
                     applied: dict[str, float] | None = None, outcome: list | None = None
                     ) -> tuple[Plan, list[dict]]:
    """Spend `k` trials of `steps` steps each (`planner.trial_rounds.run_trials`: a family
    round, then refinement on the corrected ranking, then the noise rule), store the trials
    and the factors per step part fitted over them (and measured/predicted per layout and per
    family) in `corrections_file`; returns the fastest measured plan and one row per trial
    (`trial_rows`). `plan_fn(request, corrections) -> Plan`; `outcome`, when given, receives
    the `TrialOutcome` (spread, re-measured layouts, why the refinement stopped)."""
    from planner.trial import Corrections, save_corrections
    from planner.trial_rounds import run_trials

    applied = applied if isinstance(applied, Corrections) else Corrections(dict(applied or {}))
    result = run_trials(job.plan_request(), k, plan_fn, lambda p: measure_trial(job, p, steps),
                        first=plan, applied=applied)
    rows = trial_rows(result)
    save_corrections(corrections_file, result.corrections, rows)
    if outcome is not None:
        outcome.append(result)
    return result.chosen.plan, rows
