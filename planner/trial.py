"""`disttrain plan --trial K`, planner side: layouts as plans (one per layout family first,
`top_plans`), measured step times turned into corrections, corrections applied to the next
search. How the K trials are spent (family round, refinement on the corrected ranking, the
noise-aware choice): `planner/trial_rounds.py`.

The runtime side (`disttrain/trial.py`) runs each plan for a few steps on the target. Its
measured step times correct the cost model per *part* of the step (compute, recompute,
exposed transfer, exposed communication, bubble, optimizer, page faults): a regularised
non-negative least squares over every stored trial (`planner.trial_fit`) finds a factor per
part, and per layout *family* (`layout_family`: which parallel mechanisms run - data
parallel, Ulysses or ring sequence parallelism, tensor parallelism, pipelining) and part, so
a layout never measured starts from its family's factors, else the global ones, and a part
no trial exercised (recompute, when every trial kept its activations) keeps its prediction.
The search scales each part of every candidate by its factor (`part_factors`).

The file also keeps the older whole-step corrections, measured / predicted step time per
layout and per family (`Corrections.get`): a file holding only those (written before the
per-part fit) is still read and applied as before, one factor for every part. They are
stored as JSON beside the profile (`corrections_path`) so the next plan of the same job
starts from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

from planner.plan import Plan
from planner.request import PlanRequest
from planner.trial_fit import PARTS, fit_part_factors

_KEY = re.compile(r"dp(\d+)-tp(\d+)-sp(\d+)-(\w+)-pp(\d+)-")


def layout_key(par) -> str:
    """One string per parallel layout (a ParallelPlan or a Candidate)."""
    schedule = getattr(par, "schedule", "none")
    return (f"dp{par.dp}-tp{par.tp}-sp{par.sp}-{par.sp_kind if par.sp > 1 else 'none'}-pp{par.pp}"
            f"-{schedule}-z{par.zero_stage}")


def layout_family(key: str) -> str:
    """The parallel mechanisms of a layout key, e.g. 'dp', 'sp-ulysses', 'tp+pp' ('single':
    one rank). ZeRO stages and schedules are variants within a family."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"layout key: cannot parse {key!r}")
    dp, tp, sp, kind, pp = match.groups()
    parts = [name for name, on in (("dp", int(dp) > 1), ("tp", int(tp) > 1),
                                   (f"sp-{kind}", int(sp) > 1), ("pp", int(pp) > 1)) if on]
    return "+".join(parts) or "single"


class Corrections(dict):
    """Corrections measured by trials. As a dict: measured / predicted step time by layout
    key, falling back on the layout's family (`families`) in `get` - the whole-step factors
    of the older format. `parts` (part -> factor) and `family_parts` (family -> part ->
    factor): the per-part fit (`planner.trial_fit`), which `factors` prefers when present;
    `observations`: the trials it was fitted on (layout, uncorrected parts, measured s)."""

    def __init__(self, layouts: dict[str, float] | None = None,
                 families: dict[str, float] | None = None, *,
                 parts: dict[str, float] | None = None,
                 family_parts: dict[str, dict[str, float]] | None = None,
                 observations: list[dict] | None = None):
        super().__init__(layouts or {})
        self.families = dict(families or {})
        self.parts = dict(parts or {})
        self.family_parts = {f: dict(v) for f, v in (family_parts or {}).items()}
        self.observations = list(observations or [])

    def get(self, key, default=None):
        if key in self:
            return self[key]
        family = self.families.get(layout_family(key)) if _KEY.match(str(key)) else None
        return family if family is not None else default

    def factors(self, key: str) -> dict[str, float]:
        """Factor per step part for layout `key`: its family's fitted factor, else the
        global one, else 1; without a per-part fit, the whole-step factor (`get`) for every
        part."""
        if not (self.parts or self.family_parts):
            whole = self.get(key, 1.0)
            return dict.fromkeys(PARTS, whole)
        own = self.family_parts.get(layout_family(key), {}) if _KEY.match(str(key)) else {}
        return {p: own.get(p, self.parts.get(p, 1.0)) for p in PARTS}

    def __bool__(self) -> bool:
        return bool(len(self) or self.families or self.parts or self.family_parts)


def part_factors(corrections, key: str) -> dict[str, float]:
    """Factor per step part for layout `key` from `corrections` (a `Corrections`, or a plain
    layout -> whole-step factor dict, or None)."""
    if corrections is None:
        return dict.fromkeys(PARTS, 1.0)
    if hasattr(corrections, "factors"):
        return corrections.factors(key)
    return dict.fromkeys(PARTS, corrections.get(key, 1.0))


def corrected_parts(parts: dict[str, float], factors: dict[str, float]) -> dict[str, float]:
    """Each predicted part times its factor."""
    return {p: v * factors.get(p, 1.0) for p, v in parts.items()}


def _fixed(request: PlanRequest, cand: dict) -> PlanRequest:
    schedule = cand.get("schedule") or ("1f1b" if cand["pp"] > 1 else None)
    return dataclasses.replace(request, dp=cand["dp"], tp=cand.get("tp", 1), sp=cand["sp"],
                               sp_kind=cand["sp_kind"], pp=cand["pp"], zero_stage=cand["zero_stage"],
                               schedule=schedule)


def _cand_key(cand: dict) -> str:
    """`layout_key` of a candidate as the search lists it (`Candidate.to_dict`)."""
    schedule = cand.get("schedule") or ("1f1b" if cand["pp"] > 1 else "none")
    return layout_key(SimpleNamespace(**{"tp": 1, **cand, "schedule": schedule}))


def _alternatives(plan: Plan) -> list[tuple[int, float, dict]]:
    """The free search's other layouts: (0, time, candidate) for solved ones, (1, lower
    bound, candidate) for pruned or unsolved ones, (2, looser bound, candidate) for those
    pruned before their stages were built; memory rejections are left out."""
    out = []
    for entry in plan.rejected:
        reason = entry.get("reason", "")
        if reason.startswith("not chosen: "):
            out.append((0, float(reason.split()[2]), entry["candidate"]))
        elif reason.startswith("pruned: step-time lower bound "):
            out.append((1, float(reason.split()[4]), entry["candidate"]))
        elif reason.startswith("pruned: layer-time lower bound "):  # looser: ranked after
            out.append((2, float(reason.split()[4]), entry["candidate"]))
        elif reason.startswith("not solved: "):  # the search's work budget or safety cap
            out.append((1, float(re.search(r"lower bound ([0-9.e+-]+) s", reason).group(1)),
                        entry["candidate"]))
    return sorted(out, key=lambda t: t[:2])


def top_plans(request: PlanRequest, k: int, plan_fn, *, first: Plan | None = None) -> list[Plan]:
    """Up to `k` feasible plans, each planned with its layout fixed: the planner's choice,
    then the best layout of every other family (best first), then the next best layouts.
    Near-identical layouts (one family, another ZeRO stage) share their mechanisms' errors,
    so a trial learns most from one layout per family. `plan_fn(request) -> Plan` is the
    planner (with the caller's profile and corrections); `first`: the free plan if known."""
    first = first or plan_fn(request)
    if not first.feasible or k <= 1:
        return [first] if first.feasible else []
    ranked = _alternatives(first)
    families, by_family = {layout_family(layout_key(first.parallel))}, []
    for item in ranked:
        family = layout_family(_cand_key(item[2]))
        if family not in families:
            families.add(family)
            by_family.append(item)
    order = by_family + [item for item in ranked if item not in by_family]
    plans, seen = [first], {layout_key(first.parallel)}
    for _, _, cand in order:
        if len(plans) >= k:
            break
        if _cand_key(cand) in seen:
            continue
        plan = plan_fn(_fixed(request, cand))
        if plan.feasible and layout_key(plan.parallel) not in seen:
            seen.add(layout_key(plan.parallel))
            plans.append(plan)
    return plans


def corrections_from(plans: list[Plan], measured_s: list[float],
                     applied: dict[str, float] | None = None,
                     noise_sd: list[float | None] | None = None) -> Corrections:
    """The trials' corrections: measured / predicted step time per layout and per family
    (the geometric mean of its layouts'), and the per-part fit over these trials
    (`planner.trial_fit`). `applied`: the corrections the plans were made with (their
    predictions already include them, so they are divided out, part by part). `noise_sd`:
    each measurement's relative noise where measured (None: the fit's floor)."""
    layouts: dict[str, float] = {}
    observations = []
    noises = list(noise_sd) if noise_sd is not None else [None] * len(plans)
    for plan, measured, noise in zip(plans, measured_s, noises):
        key = layout_key(plan.parallel)
        factors = part_factors(applied, key)
        breakdown = getattr(plan.prediction, "time_breakdown", None) or {}
        raw_parts = {p: v / factors.get(p, 1.0) for p, v in breakdown.items()
                     if v > 0 and factors.get(p, 1.0) > 0}
        if raw_parts:
            raw = sum(raw_parts.values())
        else:  # a plan without a breakdown: its whole step under the whole-step factor
            raw = plan.prediction.step_time_s / ((applied or {}).get(key, 1.0) or 1.0)
        if raw > 0 and measured > 0 and math.isfinite(measured):
            layouts[key] = measured / raw
            if raw_parts:
                observations.append({"layout": key, "parts": raw_parts, "measured_s": measured,
                                     **({"noise_sd": noise} if noise else {})})
    logs: dict[str, list[float]] = {}
    for key, factor in layouts.items():
        logs.setdefault(layout_family(key), []).append(math.log(factor))
    families = {f: math.exp(sum(v) / len(v)) for f, v in logs.items()}
    parts, family_parts = fit_part_factors(observations, layout_family)
    return Corrections(layouts, families, parts=parts, family_parts=family_parts,
                       observations=observations)


def corrections_path(profile_path: str | Path | None, out_dir: str | Path) -> Path:
    """Where a job's corrections live: beside its profile, else in the plan directory."""
    if profile_path:
        path = Path(profile_path)
        return path.with_name(path.stem + ".trials.json")
    return Path(out_dir) / "trials.json"


MAX_OBSERVATIONS = 64
"""Trials a corrections file keeps for the fit (the newest)."""


def load_corrections(path: str | Path) -> Corrections:
    """The corrections at `path` (none if absent); files without the per-part keys (the
    older format) give whole-step corrections."""
    path = Path(path)
    if not path.is_file():
        return Corrections()
    data = json.loads(path.read_text())
    return Corrections({str(k): float(v) for k, v in data.get("corrections", {}).items()},
                       {str(k): float(v) for k, v in data.get("families", {}).items()},
                       parts={str(k): float(v) for k, v in data.get("parts", {}).items()},
                       family_parts={str(f): {str(k): float(v) for k, v in d.items()}
                                     for f, d in data.get("family_parts", {}).items()},
                       observations=list(data.get("observations", [])))


def _same_trial(a: dict, b: dict) -> bool:
    """One layout with the same predicted parts: a re-measurement of one plan."""
    return a["layout"] == b["layout"] and a["parts"].keys() == b["parts"].keys() and all(
        math.isclose(a["parts"][p], b["parts"][p], rel_tol=1e-6) for p in a["parts"])


def merge_corrections(old, new) -> Corrections:
    """`new` corrections (layouts, and families and observations when a `Corrections`)
    merged over `old` (newest measurement wins), the per-part factors refitted over every
    observation (at most `MAX_OBSERVATIONS`, the newest): what `save_corrections` stores and
    the next plan loads."""
    old = old if isinstance(old, Corrections) else Corrections(dict(old or {}))
    families = {**old.families, **getattr(new, "families", {})}
    new_obs = list(getattr(new, "observations", []))
    observations = [o for o in old.observations if not any(_same_trial(o, n) for n in new_obs)]
    observations = (observations + new_obs)[-MAX_OBSERVATIONS:]
    if observations:
        parts, family_parts = fit_part_factors(observations, layout_family)
    else:  # nothing to refit over: the newer factors, else the older
        parts = getattr(new, "parts", None) or old.parts
        family_parts = getattr(new, "family_parts", None) or old.family_parts
    return Corrections({**old, **new}, families, parts=parts, family_parts=family_parts,
                       observations=observations)


def save_corrections(path: str | Path, corrections: dict[str, float], rows: list[dict]) -> Path:
    """Merge `corrections` into the file at `path` (`merge_corrections`) and store them with
    the last trial's `rows`."""
    path = Path(path)
    merged = merge_corrections(load_corrections(path), corrections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"corrections": dict(merged), "families": merged.families,
                                "parts": merged.parts, "family_parts": merged.family_parts,
                                "observations": merged.observations, "last_trial": rows},
                               indent=2))
    return path
