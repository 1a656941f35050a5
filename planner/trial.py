"""`disttrain plan --trial K`, planner side: the K best layouts as plans, measured step times
turned into per-layout corrections, and corrections applied to the next search.

The runtime side (`disttrain/trial.py`) runs each plan for a few steps on the target. A
correction is measured / predicted step time of one layout (`layout_key`); the search
multiplies a candidate's predicted step time by its layout's correction, so a layout that
measured slow here ranks by what it measured. Corrections are stored as JSON beside the
profile (`corrections_path`) so the next plan of the same job starts from them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from planner.plan import Plan
from planner.request import PlanRequest


def layout_key(par) -> str:
    """One string per parallel layout (a ParallelPlan or a Candidate)."""
    schedule = getattr(par, "schedule", "none")
    return (f"dp{par.dp}-tp{par.tp}-sp{par.sp}-{par.sp_kind if par.sp > 1 else 'none'}-pp{par.pp}"
            f"-{schedule}-z{par.zero_stage}")


def _fixed(request: PlanRequest, cand: dict) -> PlanRequest:
    schedule = cand.get("schedule") or ("1f1b" if cand["pp"] > 1 else None)
    return dataclasses.replace(request, dp=cand["dp"], tp=cand.get("tp", 1), sp=cand["sp"],
                               sp_kind=cand["sp_kind"], pp=cand["pp"], zero_stage=cand["zero_stage"],
                               schedule=schedule)


def top_plans(request: PlanRequest, k: int, plan_fn, *, first: Plan | None = None) -> list[Plan]:
    """The planner's choice and the next best solved layouts, up to `k` feasible plans, each
    planned with its layout fixed. `plan_fn(request) -> Plan` is the planner (with the caller's
    profile and corrections); `first` is the free plan when the caller already has it."""
    first = first or plan_fn(request)
    if not first.feasible or k <= 1:
        return [first] if first.feasible else []
    timed = []   # solved alternatives by their time, then pruned ones by their lower bound
    for entry in first.rejected:
        reason = entry.get("reason", "")
        if reason.startswith("not chosen: "):
            timed.append((0, float(reason.split()[2]), entry["candidate"]))
        elif reason.startswith("pruned: step-time lower bound "):
            timed.append((1, float(reason.split()[4]), entry["candidate"]))
    plans, seen = [first], {layout_key(first.parallel)}
    for _, _, cand in sorted(timed, key=lambda t: t[:2]):
        if len(plans) >= k:
            break
        plan = plan_fn(_fixed(request, cand))
        if plan.feasible and layout_key(plan.parallel) not in seen:
            seen.add(layout_key(plan.parallel))
            plans.append(plan)
    return plans


def corrections_from(plans: list[Plan], measured_s: list[float],
                     applied: dict[str, float] | None = None) -> dict[str, float]:
    """measured / predicted step time per layout; `applied`: the corrections the plans were
    made with (their predictions already include them, so they are divided out)."""
    applied = applied or {}
    out = {}
    for plan, measured in zip(plans, measured_s):
        key = layout_key(plan.parallel)
        raw = plan.prediction.step_time_s / applied.get(key, 1.0)
        if raw > 0 and measured > 0:
            out[key] = measured / raw
    return out


def corrections_path(profile_path: str | Path | None, out_dir: str | Path) -> Path:
    """Where a job's corrections live: beside its profile, else in the plan directory."""
    if profile_path:
        path = Path(profile_path)
        return path.with_name(path.stem + ".trials.json")
    return Path(out_dir) / "trials.json"


def load_corrections(path: str | Path) -> dict[str, float]:
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {str(k): float(v) for k, v in data.get("corrections", {}).items()}


def save_corrections(path: str | Path, corrections: dict[str, float], rows: list[dict]) -> Path:
    """Merge `corrections` into the file at `path` (newest measurement wins)."""
    path = Path(path)
    merged = {**load_corrections(path), **corrections}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"corrections": merged, "last_trial": rows}, indent=2))
    return path
