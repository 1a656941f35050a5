"""Planner fidelity, the `disttrain plan --trial K` part (split from `bench/fidelity.py`).

`disttrain plan --trial K` on the sweep's job, exactly as the command runs it
(`planner.trial_rounds.run_trials`): the family round (the planner's choice, then the best
layout of each other family) measured in the sweep's rounds; the refinement (the best
corrected layout not yet measured, one at a time, until K or none is predicted faster than
the best measured within the spread) reading the sweep's measurement of a layout the sweep
has and running one it lacks in `SWEEP_ROUNDS` fresh runs, which then joins the sweep; the
noise rule's re-measurements (one more fresh run each, alternately) join the sweep's pooled
step times of their layouts. Then the fastest kept (target: within 5% of the sweep's fastest);
the corrections those trials store (`corrections_from`: a factor per step part, per layout
family) applied part by part to every grid row's prediction (target: step time within 15%
for every row); and the next plan of the sweep's job made with them.
"""

from __future__ import annotations

import statistics
from typing import Callable

from disttrain.spec import job_from_dict
from docs_sections import md_table
from planner.trial import corrected_parts, layout_key
from planner.trial_rounds import Measurement

TRIAL_K = 7
"""Plans `--trial` runs in the planner-choice check: with 2 ranks the layouts fall in 5
families (dp, Ulysses, ring, tp, pp), all measured in the family round (`split_budget(7, 5)
== (5, 2)`, so that every grid row's family has measured factors), and up to 2 refinement
trials (the ZeRO stage within the fastest family, which the family round never checks)."""
CHOICE_TARGET = 0.05
"""Largest gap of the trial choice to the fastest layout of the sweep."""


def _plan_fn(profile):
    from planner.search import plan_job

    return lambda request, corrections: plan_job(request, profile, corrections=corrections,
                                                 with_layout=False)


def trial_plans(free_spec: dict, free_plan, profile, trial_k: int) -> list:
    """The family round of `disttrain plan --trial K` (planned before the sweep runs, so that
    its layouts are measured in the sweep's rounds)."""
    from planner.trial import Corrections, top_plans
    from planner.trial_rounds import families_of, split_budget

    n_family, _ = split_budget(trial_k, families_of(free_plan))
    plan_fn = _plan_fn(profile)
    return top_plans(job_from_dict(free_spec).plan_request(), n_family,
                     lambda r: plan_fn(r, Corrections()), first=free_plan)


class SweepMeasure:
    """`measure` for `run_trials` on the bench. `pooled`: layout key -> the sweep's per-step
    seconds of each round; `run(plan, rounds)`: per-step seconds of each of `rounds` fresh
    runs of `plan`. The first measurement of a layout the sweep ran is its sweep measurement
    (its rounds pooled; their medians give the run-to-run spread); a layout the sweep lacks
    runs `rounds` times and joins the sweep (`added`); a re-measurement runs once more and
    joins the layout's rounds."""

    def __init__(self, pooled: dict[str, list[list[float]]], run: Callable, rounds: int):
        self.pooled, self.run, self.rounds = pooled, run, rounds
        self.added: list[str] = []
        self.returned: set[str] = set()

    def times(self, key: str) -> list[float]:
        """Every step time of the layout, all rounds pooled."""
        return [t for r in self.pooled[key] for t in r]

    def __call__(self, plan) -> Measurement:
        key = layout_key(plan.parallel)
        if key in self.pooled and key not in self.returned:
            runs = [list(r) for r in self.pooled[key]]
        else:
            runs = [list(r) for r in self.run(plan, 1 if key in self.pooled else self.rounds)]
            if key not in self.pooled:
                self.added.append(key)
            self.pooled.setdefault(key, []).extend(runs)
        self.returned.add(key)
        times = [t for r in runs for t in r]
        return Measurement(statistics.median(times), times,
                           rounds=[statistics.median(r) for r in runs] if len(runs) > 1 else [])


def bench_trials(free_spec: dict, free_plan, profile, trial_k: int, measure: SweepMeasure):
    """`run_trials` as `disttrain plan --trial K` runs it (no stored corrections yet)."""
    from planner.trial import Corrections
    from planner.trial_rounds import run_trials

    return run_trials(job_from_dict(free_spec).plan_request(), trial_k, _plan_fn(profile),
                      measure, first=free_plan, applied=Corrections())


def trial_choice(outcome, times: dict, trial_k: int = TRIAL_K) -> dict:
    """`disttrain plan --trial K` on the sweep (`outcome` of `bench_trials`; `times`: the
    sweep's medians, re-measurements and added layouts included): its trials, the one kept,
    its gap to the fastest layout of the sweep, and the corrections the trials store."""
    trials = [t for t in outcome.trials if not t.failure]
    measured = {t.key: (t.plan.prediction.step_time_s, t.step_s) for t in trials}
    chosen, corrections = outcome.chosen, outcome.corrections
    return {"trial_k": trial_k, "trial_rows": measured, "trial": chosen.key,
            "trial_rounds": {t.key: t.round for t in trials},
            "trial_runs": {t.key: t.run_medians for t in trials},
            "trial_parts": {t.key: dict(t.plan.prediction.time_breakdown) for t in trials},
            "trial_spread": outcome.spread, "remeasured": outcome.remeasured,
            "run_spread": outcome.run_spread,
            "refine_stopped": outcome.stopped,
            "trial_s": chosen.step_s, "trial_gap": chosen.step_s / min(times.values()) - 1,
            "parts": {k: round(v, 3) for k, v in corrections.parts.items()},
            "family_parts": {f: {k: round(v, 3) for k, v in d.items()}
                             for f, d in corrections.family_parts.items()},
            "corrections": corrections}


def after_trials(plan, corrections) -> float:
    """`plan`'s predicted step time with each part times the factor the trials stored for
    its layout (family, else global, else 1)."""
    factors = corrections.factors(layout_key(plan.parallel))
    return sum(corrected_parts(dict(plan.prediction.time_breakdown), factors).values())


def next_plan(free_spec: dict, profile, corrections, by_key: dict) -> dict:
    """The sweep's job planned again with the stored corrections (as the next `disttrain
    plan` starts): its layout, corrected prediction, and measured time when the sweep ran
    that layout."""
    from planner.search import plan_job

    plan = plan_job(job_from_dict(free_spec).plan_request(), profile, corrections=corrections,
                    with_layout=False)
    key = layout_key(plan.parallel) if plan.feasible else "infeasible"
    return {"next": key, "next_predicted_s": plan.prediction.step_time_s if plan.feasible else None,
            "next_measured_s": by_key.get(key)}


def trial_text(choice: dict) -> str:
    if "trial" not in choice:
        return ""
    rounds = choice.get("trial_rounds", {})
    rows = md_table(["layout", "round", "predicted s", "measured s", "error"],
                    [[k, rounds.get(k, ""), f"{p:.3f}", f"{m:.3f}", f"{p / m - 1:+.0%}"]
                     for k, (p, m) in choice["trial_rows"].items()])
    verdict = "MET" if choice["trial_gap"] <= CHOICE_TARGET else "NOT MET"
    factors = ", ".join(f"{k} x{v:.2f}" for k, v in choice.get("parts", {}).items())
    families = "; ".join(f"{f}: " + ", ".join(f"{k} x{v:.2f}" for k, v in d.items())
                         for f, d in choice.get("family_parts", {}).items())
    best = min(choice["times"].values())
    measured = choice.get("next_measured_s")
    nxt = "" if "next" not in choice else (
        f"\n- the next plan of this job, made with them: {choice['next']}"
        + (f", predicted {choice['next_predicted_s']:.3f} s" if choice["next_predicted_s"] else "")
        + (f", measured {measured:.3f} s in the sweep, {measured / best - 1:+.1%} vs its fastest"
           if measured else " (a layout the sweep did not run)"))
    runs = choice.get("trial_runs", {})
    run_sd = choice.get("run_spread")
    noise = (f"\n- step-time spread of the trials (`planner.trial_rounds.noise_spread`: from "
             f"their own per-step times or, when larger, from the run-to-run spread of the "
             f"layouts' runs" + (f", relative sd {run_sd:.1%}" if run_sd is not None else "")
             + f"): {choice.get('trial_spread', 0):.1%}; "
             + ("the two fastest within it, re-measured alternately (one more fresh run each "
                "per round), run medians (the sweep's rounds, then the re-measurements): "
                + "; ".join(f"{k} " + "/".join(f"{r:.3f}" for r in runs.get(k, []))
                            for k in choice["remeasured"])
                if choice.get("remeasured") else "the two fastest apart by more, not re-measured")
             + f"\n- refinement: {choice.get('refine_stopped', '')}")
    return (f"\n\nWith `disttrain plan --trial {choice['trial_k']}` (family round: the planner's "
            f"choice and the best plan of each other layout family; refinement: the best layout "
            f"by the corrections fitted so far, one at a time; the fastest kept):\n\n{rows}\n\n"
            f"- trial choice {choice['trial']}: {choice['trial_s']:.3f} s, "
            f"{choice['trial_gap']:+.1%} vs the fastest of the sweep — {verdict} (target within "
            f"5%){noise}\n- corrections stored per step part (fitted over these trials, "
            f"`planner/trial_fit.py`; parts no trial exercised stay x1): {factors or 'none'}\n"
            f"- per layout family: {families or 'none'}{nxt}")


MEMORY_TRIAL = {"seq": 512, "budget_mib": 40, "k": 7}
"""The second `disttrain plan --trial K` run: the grid's smaller length under its tight
budget, a job whose memory binds, so its plans recompute or swap and run memory-bound
(`offload.host_memory.memory_bound`: the fixed allocator thresholds and their fresh pages).
The sweep's job has room for everything: its trials keep every activation and never pay
the recompute, swap or page-fault parts, which would then keep x1 while the compute factor
lifts the rest. Its corrections are merged with the sweep's as the stored file holds them
after both runs (`merge_corrections`: the per-part factors refitted over every trial).
K = 7: a family round of all five families (`split_budget(7, 5) == (5, 2)`: the planner's
choice and the best plan of dp, Ulysses, ring, pp and tp on this job) and two refinements,
so that every family's memory-bound rows are corrected by memory-bound observations of
their own. With K = 2 Ulysses had none and its memory-bound rows took the keep-all trials'
compute factor alone; with K = 4 (dp, Ulysses, ring) tp had none, and its memory-bound rows
took the page-fault factor dp's and Ulysses' trials set, though a tp rank's faults partly
fill its waits at the blocking all-reduces (docs/design.md): +15% to +33% after trials in
the runs of 2026-12-06. The family round is planned before the grid runs so that its trials
are measured in the sweep's alternating rounds, in the same stretch of the machine's load
as the rows; the refinement runs after them."""


def memory_trial_plans(spec_for, profile):
    """(spec, free plan, family-round plans) of the memory-bound job (`MEMORY_TRIAL`;
    `spec_for(seq, budget_mib) -> spec`); no plans when it is infeasible."""
    from planner.search import plan_job

    spec = spec_for(MEMORY_TRIAL["seq"], MEMORY_TRIAL["budget_mib"])
    first = plan_job(job_from_dict(spec).plan_request(), profile, with_layout=False)
    if not first.feasible:
        return spec, first, []
    return spec, first, trial_plans(spec, first, profile, MEMORY_TRIAL["k"])


def memory_trials(spec: dict, first, plans: list, profile, measured: dict, run: Callable,
                  rounds: int):
    """`disttrain plan --trial K` on the memory-bound job as the command runs it: its
    family round (`plans`) read from the sweep rounds (`measured`: name -> the bench's
    result, "memory trial <layout>" holding their per-round step times); a layout it did not
    plan ahead runs `rounds` fresh times (`run(name, plan, rounds)`); no re-measurements
    (the bench checks this job's corrections, not its choice)."""
    from planner.trial import Corrections
    from planner.trial_rounds import run_trials

    def name(plan) -> str:
        return f"memory trial {layout_key(plan.parallel)}"

    pooled = {layout_key(p.parallel): [list(r) for r in measured[name(p)]["round step times"]]
              for p in plans}
    measure = SweepMeasure(pooled, lambda plan, n: run(name(plan), plan, n), rounds)
    return run_trials(job_from_dict(spec).plan_request(), MEMORY_TRIAL["k"], _plan_fn(profile),
                      measure, first=first, applied=Corrections(), remeasure=False)


def memory_trial_text(choice: dict) -> str:
    rows = choice.get("memory_trial_rows")
    if not rows:
        return ""
    table = md_table(["layout", "plan", "predicted s", "measured s", "error"],
                     [[k, plan, f"{p:.3f}", f"{m:.3f}", f"{p / m - 1:+.0%}"]
                      for k, (plan, p, m) in rows.items()])
    return (f"\n\nWith `disttrain plan --trial {MEMORY_TRIAL['k']}` on a job whose memory binds "
            f"(seq {MEMORY_TRIAL['seq']}, {MEMORY_TRIAL['budget_mib']} MiB per rank: its plans "
            f"recompute or swap and run memory-bound, so the recompute, swap and page-fault "
            f"parts are exercised; its family round measured in the sweep's alternating rounds, "
            f"a refinement in fresh runs after them):\n\n{table}\n\n- corrections "
            f"stored after both `--trial` runs (refitted over all their trials), per step "
            f"part: " + ", ".join(f"{k} x{v:.2f}" for k, v in choice["merged_parts"].items())
            + "\n- per layout family: " + "; ".join(
                f"{f}: " + ", ".join(f"{k} x{v:.2f}" for k, v in d.items())
                for f, d in choice["merged_family_parts"].items()))
