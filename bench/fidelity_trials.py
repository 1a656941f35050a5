"""Planner fidelity, the `disttrain plan --trial K` part (split from `bench/fidelity.py`).

The trial plans of the sweep's job (`top_plans`: the planner's choice, then one per other
layout family), measured in the sweep's rounds; the fastest kept (target: within 5% of the
sweep's fastest); the corrections those trials store (`corrections_from`: a factor per step
part, per layout family) applied part by part to every grid row's prediction (target: step
time within 15% for every row); and the next plan of the sweep's job made with them.
"""

from __future__ import annotations

from disttrain.spec import job_from_dict
from docs_sections import md_table
from planner.trial import corrected_parts, layout_key

TRIAL_K = 5
"""Plans `--trial` runs in the planner-choice check: one per layout family of 2 ranks (dp,
Ulysses, ring, tp, pp), so that every row's layout family has measured factors."""
CHOICE_TARGET = 0.05
"""Largest gap of the trial choice to the fastest layout of the sweep."""


def trial_plans(free_spec: dict, free_plan, profile, trial_k: int) -> list:
    """The plans `disttrain plan --trial K` runs (`top_plans`: the planner's choice, then one
    per other layout family)."""
    from planner.search import plan_job
    from planner.trial import top_plans

    return top_plans(job_from_dict(free_spec).plan_request(), trial_k,
                     lambda r: plan_job(r, profile, with_layout=False), first=free_plan)


def trial_choice(plans: list, by_key: dict, times: dict, trial_k: int = TRIAL_K) -> dict:
    """`disttrain plan --trial K` on the sweep: its plans measured (in the sweep's rounds,
    `by_key`: layout key -> measured median), the fastest kept; its gap to the fastest
    layout of the sweep, and the corrections the trials store (`corrections_from`)."""
    from planner.trial import corrections_from

    measured = {layout_key(p.parallel): (p.prediction.step_time_s, by_key[layout_key(p.parallel)])
                for p in plans}
    chosen = min(measured, key=lambda k: measured[k][1])
    corrections = corrections_from(plans, [measured[layout_key(p.parallel)][1] for p in plans])
    return {"trial_k": trial_k, "trial_rows": measured, "trial": chosen,
            "trial_parts": {layout_key(p.parallel): dict(p.prediction.time_breakdown) for p in plans},
            "trial_s": measured[chosen][1], "trial_gap": measured[chosen][1] / min(times.values()) - 1,
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
    rows = md_table(["layout", "predicted s", "measured s", "error"],
                    [[k, f"{p:.3f}", f"{m:.3f}", f"{p / m - 1:+.0%}"]
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
    return (f"\n\nWith `disttrain plan --trial {choice['trial_k']}` (the planner's choice and "
            f"the best plan of each other layout family, then the next best, measured; the "
            f"fastest kept):\n\n{rows}\n\n- trial "
            f"choice {choice['trial']}: {choice['trial_s']:.3f} s, {choice['trial_gap']:+.1%} vs the "
            f"fastest of the sweep — {verdict} (target within 5%)\n- corrections stored per step "
            f"part (fitted over these trials, `planner/trial_fit.py`; parts no trial exercised "
            f"stay x1): {factors or 'none'}\n- per layout family: {families or 'none'}{nxt}")
