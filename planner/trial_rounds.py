"""`disttrain plan --trial K`: the rounds of trials and the noise-aware choice.

How the K trials are spent (`split_budget`, `run_trials`):

1. **Family round**: the planner's choice, then the best layout of each other layout family
   (`planner.trial.top_plans`), measured. It gives every family measured factors. It takes
   `K - K // 3` trials at most (fewer when there are fewer families): K = 1 measures the
   planner's choice, K = 2 it and the best other family, K = 5 four families and keeps one
   trial for the refinement.
2. **Refinement**: the corrections fitted over the trials so far (`corrections_from`, merged
   with those stored by earlier runs as the next plan would load them) re-rank every candidate
   of the search; the best corrected candidate not yet measured is measured, the fit redone,
   and so on, one at a time, until the K trials are spent or no unmeasured candidate is
   predicted (corrected) faster than the best measured trial plus the trials' step-time
   spread (`noise_spread`): the refinement stops early once the best layout is one already
   measured, beyond the noise. Layouts of one family differ by ZeRO stage or schedule, which
   the family round's factors price but never checked: a third of the budget (`K // 3`, and
   whatever the families leave) is kept for them and for families ranked up by the fit.
3. **Noise-aware choice**: when the two fastest measured trials are within the spread
   (`noise_spread`: from the trials' own per-step times, and from repeated runs where a
   layout has them), they are measured again, alternately (A B B A: a linear drift
   of the machine's load weighs on both alike), `REMEASURE_ROUNDS` more runs each, and the
   pooled per-step medians decide.

Measuring is the caller's (`measure(plan) -> Measurement`): the runtime's spawned ranks for
`disttrain plan --trial`, the fidelity bench's sweep rounds, or a fake in tests. Pure
planner code: no runtime import.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import statistics
from typing import Callable

from planner.trial import (Corrections, _alternatives, _fixed, _cand_key, corrections_from,
                           layout_family, layout_key, merge_corrections, top_plans)

REMEASURE_ROUNDS = 2
"""Extra runs of each of the two fastest trials when they are within the spread (A B B A)."""
SPREAD_Z = 2.0
"""The spread is this many standard deviations of the relative difference of two trials'
medians (about 95% of pure noise falls inside)."""


@dataclasses.dataclass
class Measurement:
    """One trial run: its median step seconds, its per-step seconds (after warm-up), the
    runtime's measured parts of the step, and why it failed ('' when it ran). `rounds`: the
    median of each of several runs pooled into this measurement (the fidelity bench's sweep
    rounds); empty for one run."""
    step_s: float
    times: list[float] = dataclasses.field(default_factory=list)
    parts: dict = dataclasses.field(default_factory=dict)
    failure: str = ""
    rounds: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Trial:
    """A plan measured one or more times; `step_s`: the median of every run's steps pooled."""
    plan: object
    round: str                               # "family" or "refine"
    runs: list[Measurement]

    @property
    def key(self) -> str:
        return layout_key(self.plan.parallel)

    @property
    def failure(self) -> str:
        return self.runs[0].failure

    @property
    def times(self) -> list[float]:
        return [t for r in self.runs for t in r.times]

    @property
    def run_medians(self) -> list[float]:
        """The median of each run (of each sweep round, when a measurement pooled several)."""
        return [m for r in self.runs for m in (r.rounds or [r.step_s])
                if math.isfinite(m) and m > 0]

    @property
    def step_s(self) -> float:
        if self.failure:
            return math.inf
        return statistics.median(self.times) if self.times else self.runs[0].step_s


@dataclasses.dataclass
class TrialOutcome:
    trials: list[Trial]
    chosen: Trial
    corrections: Corrections                 # fitted over the trials that ran (pooled medians)
    spread: float                            # relative step-time spread (`noise_spread`)
    remeasured: list[str]                    # the layouts re-measured by the noise rule
    stopped: str                             # why the refinement ended

    @property
    def run_spread(self) -> float | None:
        """Run-to-run relative standard deviation measured by the re-measurements (and the
        bench's sweep rounds): `run_sd`."""
        return run_sd(self.trials)


def split_budget(k: int, families: int) -> tuple[int, int]:
    """(family-round trials, refinement trials) of a budget of `k` with `families` layout
    families among the candidates."""
    if k <= 1:
        return max(k, 0), 0
    family = max(1, min(families, k - k // 3))
    return family, k - family


def families_of(first) -> int:
    """Layout families among the free plan's choice and alternatives."""
    keys = {layout_family(layout_key(first.parallel))}
    keys |= {layout_family(_cand_key(cand)) for _, _, cand in _alternatives(first)}
    return len(keys)


def step_spread(trials: list[Trial]) -> float:
    """Relative spread of two trials' medians, from the trials' own per-step times: the
    relative differences between two steps of one run, pooled over the runs, give the
    per-step noise (`s`: their median over sqrt(2) times the normal quartile, robust to a
    stray slow step); the median of n steps varies by about s * sqrt(pi / 2n), the difference
    of two medians by sqrt(2) times that; the spread is `SPREAD_Z` of those. 0 without two
    steps in a trial."""
    diffs, sizes = [], []
    for run in (r for trial in trials if not trial.failure for r in trial.runs):
        times = [t for t in run.times if t > 0 and math.isfinite(t)]
        if len(times) < 2:
            continue
        mid = statistics.median(times)
        diffs += [abs(a - b) / mid for i, a in enumerate(times) for b in times[i + 1:]]
        sizes.append(len(times))
    if not sizes:
        return 0.0
    s = statistics.median(diffs) / (math.sqrt(2) * statistics.NormalDist().inv_cdf(0.75))
    n = statistics.median(sizes)
    return SPREAD_Z * math.sqrt(2) * s * math.sqrt(math.pi / (2 * n))


def run_sd(trials: list[Trial]) -> float | None:
    """Relative standard deviation of one layout's run medians, pooled over the trials run
    more than once (None when none was)."""
    devs, dof = 0.0, 0
    for trial in trials:
        runs = [] if trial.failure else trial.run_medians
        if len(runs) >= 2:
            mean = statistics.fmean(runs)
            devs += sum((r / mean - 1) ** 2 for r in runs)
            dof += len(runs) - 1
    return math.sqrt(devs / dof) if dof else None


def noise_spread(trials: list[Trial]) -> float:
    """The spread two trials' step times must be apart by to tell them apart: from the
    trials' per-step times (`step_spread`) and, where some layout ran more than once, from its
    runs (`SPREAD_Z` x sqrt(2) x `run_sd`: on a shared machine the load shifts between runs,
    which steps within one run do not show), the larger."""
    runs = run_sd(trials)
    by_runs = SPREAD_Z * math.sqrt(2) * runs if runs is not None else 0.0
    return max(step_spread(trials), by_runs)


def next_candidate(request, plan_fn: Callable, ranking: Corrections, measured: dict[str, float],
                   spread: float) -> dict | None:
    """The unmeasured candidate with the best corrected prediction (the search made with
    `ranking`), if it beats the best measured step time (`measured`: layout -> s, inf when
    the runtime refused it) plus `spread`; else None. Candidates the search only bounded are
    planned (layout fixed, corrected) when their bound could still win."""
    best = min((s for s in measured.values() if math.isfinite(s)), default=math.inf)
    threshold = best * (1 + spread)
    free = plan_fn(request, ranking)
    if not free.feasible:
        return None
    heap, order = [], 0
    par = free.parallel
    free_cand = dict(dp=par.dp, tp=getattr(par, "tp", 1), sp=par.sp, sp_kind=par.sp_kind,
                     pp=par.pp, zero_stage=par.zero_stage)
    if par.pp > 1:
        free_cand["schedule"] = par.schedule
    heap.append((free.prediction.step_time_s, 0, order, layout_key(free.parallel), free_cand))
    for kind, time_s, cand in _alternatives(free):
        order += 1
        heap.append((time_s, kind, order, _cand_key(cand), cand))
    heapq.heapify(heap)
    resolved: set[str] = set()
    while heap:
        time_s, kind, _, key, cand = heapq.heappop(heap)
        if time_s >= threshold:
            return None
        if key in measured or (kind != 0 and key in resolved):
            continue
        if kind == 0:
            return cand
        plan = plan_fn(_fixed(request, cand), ranking)  # a bound: its corrected prediction
        resolved.add(key)
        if plan.feasible and layout_key(plan.parallel) not in measured:
            order += 1
            heapq.heappush(heap, (plan.prediction.step_time_s, 0, order, key, cand))
    return None


def trial_noise(trials: list[Trial]) -> list[float | None]:
    """Relative noise of each trial's step time, where the trials measured it: the
    run-to-run spread (`run_sd`, from the layouts run more than once) over the square root
    of the trial's runs (its step time pools them); None without a repeated run."""
    sd = run_sd(trials)
    return [None if sd is None else sd / math.sqrt(max(1, len(t.run_medians))) for t in trials]


def _fit(trials: list[Trial], applied) -> Corrections:
    ran = [t for t in trials if not t.failure]
    return corrections_from([t.plan for t in ran], [t.step_s for t in ran], applied,
                            noise_sd=trial_noise(ran))


def _remeasure(trials: list[Trial], measure: Callable, spread: float) -> list[str]:
    """The noise rule: the two fastest trials within `spread` of each other measured again,
    alternately; the layouts re-measured."""
    ran = sorted((t for t in trials if not t.failure), key=lambda t: t.step_s)
    if len(ran) < 2 or ran[1].step_s > ran[0].step_s * (1 + spread):
        return []
    a, b = ran[0], ran[1]
    for r in range(REMEASURE_ROUNDS):
        for trial in ((a, b) if r % 2 == 0 else (b, a)):
            got = measure(trial.plan)
            if not got.failure:
                trial.runs.append(got)
    return [a.key, b.key]


def run_trials(request, k: int, plan_fn: Callable, measure: Callable, *, first=None,
               applied: Corrections | None = None, remeasure: bool = True) -> TrialOutcome:
    """Spend `k` trials (module docstring): `plan_fn(request, corrections) -> Plan` plans with
    those corrections; `measure(plan) -> Measurement` runs a plan; `first`: the free plan
    under `applied` (the corrections the caller's plans are made with, stored by earlier
    runs). Trial plans are made with `applied` (their predictions comparable, the fit
    divides them out); the refinement ranks with the merged corrections."""
    applied = applied if applied is not None else Corrections()
    first = first or plan_fn(request, applied)
    if not first.feasible or k < 1:
        raise ValueError("--trial: no feasible plan to try")
    n_family, _ = split_budget(k, families_of(first))
    trials = [Trial(p, "family", [measure(p)])
              for p in top_plans(request, n_family, lambda r: plan_fn(r, applied), first=first)]
    stopped = "budget spent" if len(trials) >= k else ""
    tried: set[str] = {t.key for t in trials}
    while len(trials) < k:
        ranking = merge_corrections(applied, _fit(trials, applied))
        measured = {t.key: t.step_s for t in trials}
        measured.update({key: math.inf for key in tried - set(measured)})
        cand = next_candidate(request, plan_fn, ranking, measured, noise_spread(trials))
        if cand is None:
            stopped = ("no unmeasured layout is predicted faster than the best measured (within "
                       "the spread)")
            break
        plan = plan_fn(_fixed(request, cand), applied)
        tried.add(_cand_key(cand))
        if not plan.feasible or layout_key(plan.parallel) in {t.key for t in trials}:
            continue
        tried.add(layout_key(plan.parallel))
        trials.append(Trial(plan, "refine", [measure(plan)]))
    else:
        stopped = stopped or "budget spent"
    if all(t.failure for t in trials):
        raise RuntimeError(f"--trial: no plan ran; first failure: {trials[0].failure}")
    spread = noise_spread(trials)
    remeasured = _remeasure(trials, measure, spread) if remeasure else []
    chosen = min((t for t in trials if not t.failure), key=lambda t: t.step_s)
    return TrialOutcome(trials, chosen, _fit(trials, applied), spread, remeasured, stopped)
