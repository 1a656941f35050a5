"""`disttrain plan --trial K`'s rounds (`planner/trial_rounds.py`) on a fake planner and a
fake machine: the budget split, the refinement on the corrected ranking, its early stop, the
noise rule, and the corrections file staying readable."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from types import SimpleNamespace

import pytest

from planner.trial import (Corrections, corrections_from, layout_key, load_corrections,
                           merge_corrections, save_corrections)
from planner.trial_rounds import (REMEASURE_ROUNDS, Measurement, Trial, next_candidate,
                                  run_trials, split_budget, step_spread)


@dataclasses.dataclass(frozen=True)
class Request:  # what `_fixed` replaces: the layout fields (None: free)
    dp: int | None = None
    tp: int = 1
    sp: int | None = None
    sp_kind: str = "ulysses"
    pp: int | None = None
    zero_stage: int | None = None
    schedule: str | None = None


LAYOUTS = {  # name: (parallel fields, predicted parts, uncorrected)
    "dp z0": (dict(dp=2, sp=1, pp=1, zero_stage=0), {"compute": 1.0, "exposed_communication": 0.10}),
    "dp z3": (dict(dp=2, sp=1, pp=1, zero_stage=3), {"compute": 1.0, "exposed_communication": 0.16}),
    "dp z1": (dict(dp=2, sp=1, pp=1, zero_stage=1), {"compute": 1.0, "exposed_communication": 0.25}),
    "ulysses": (dict(dp=1, sp=2, pp=1, zero_stage=0), {"compute": 1.0, "exposed_communication": 0.20}),
    "ring": (dict(dp=1, sp=2, sp_kind="ring", pp=1, zero_stage=0),
             {"compute": 1.0, "exposed_communication": 0.30}),
    "pp": (dict(dp=1, sp=1, pp=2, zero_stage=0, schedule="1f1b"), {"compute": 1.0, "bubble": 0.35}),
}


def _par(fields: dict):
    return SimpleNamespace(**{"tp": 1, "sp_kind": "ulysses", "schedule": "none", **fields})


def _plan(fields: dict, parts: dict, corrections) -> SimpleNamespace:
    par = _par(fields)
    factors = corrections.factors(layout_key(par)) if corrections else {}
    scaled = {p: v * factors.get(p, 1.0) for p, v in parts.items()}
    return SimpleNamespace(feasible=True, parallel=par, rejected=[], prediction=SimpleNamespace(
        step_time_s=sum(scaled.values()), time_breakdown=scaled))


class Planner:
    """A fake `plan_job`: every layout of `LAYOUTS` priced part by part with the corrections;
    the free search returns the fastest with the others as 'not chosen' alternatives."""

    def __init__(self, layouts=LAYOUTS):
        self.layouts = layouts

    def __call__(self, request: Request, corrections=None):
        if request.dp is not None:  # layout fixed
            for fields, parts in self.layouts.values():
                par = _par(fields)
                if (par.dp, par.sp, par.pp, par.zero_stage) == (request.dp, request.sp, request.pp,
                                                               request.zero_stage) \
                        and (par.sp == 1 or par.sp_kind == request.sp_kind):
                    return _plan(fields, parts, corrections)
            raise AssertionError(f"no such layout {request}")
        plans = sorted((_plan(f, p, corrections) for f, p in self.layouts.values()),
                       key=lambda p: p.prediction.step_time_s)
        best = plans[0]
        best.rejected = [{"candidate": {k: getattr(p.parallel, k) for k in
                                        ("dp", "tp", "sp", "sp_kind", "pp", "zero_stage")},
                          "reason": f"not chosen: {p.prediction.step_time_s:.6g} s per step vs "
                                    f"{best.prediction.step_time_s:.6g} s"} for p in plans[1:]]
        return best


class Machine:
    """A fake measure: step time of each layout = its true seconds x (1 +- jitter) per step."""

    def __init__(self, truth: dict[str, float], jitter: float = 0.0, steps: int = 3, seed: int = 0):
        self.truth, self.jitter, self.steps = truth, jitter, steps
        self.rng = random.Random(seed)
        self.calls: list[str] = []

    def __call__(self, plan) -> Measurement:
        key = layout_key(plan.parallel)
        self.calls.append(key)
        name = next(n for n, (f, _) in LAYOUTS.items() if layout_key(_par(f)) == key)
        if self.truth[name] is None:
            return Measurement(float("inf"), failure="refused")
        times = [self.truth[name] * (1 + self.rng.uniform(-self.jitter, self.jitter))
                 for _ in range(self.steps)]
        return Measurement(statistics.median(times), times)


def key(name: str) -> str:
    return layout_key(_par(LAYOUTS[name][0]))


def test_budget_split_keeps_refinement_trials():
    assert split_budget(1, 5) == (1, 0)
    assert split_budget(2, 5) == (2, 0)
    assert split_budget(3, 5) == (2, 1)
    assert split_budget(5, 5) == (4, 1)
    assert split_budget(7, 5) == (5, 2)
    assert split_budget(9, 3) == (3, 6)              # fewer families: the rest refines
    assert sum(split_budget(6, 5)) == 6


def test_refinement_measures_the_corrected_best_unmeasured_layout(monkeypatch):
    # the fit (stubbed here: `planner.trial_fit` is tested on its own) says the pipeline
    # bubble costs 0.1x its prediction: after the family round (K=4: dp z0, Ulysses, ring)
    # the uncorrected next layout would be dp z3, the corrected one is pipelining
    import planner.trial_rounds as rounds

    fits = []

    def fit(trials, applied):
        fits.append(len(trials))
        return Corrections(parts={"bubble": 0.1})

    monkeypatch.setattr(rounds, "_fit", fit)
    truth = {n: sum(parts.values()) for n, (_, parts) in LAYOUTS.items()}
    truth["pp"] = 1.0
    planner, machine = Planner(), Machine(truth)
    out = run_trials(Request(), 4, planner, machine, remeasure=False)
    assert [t.round for t in out.trials] == ["family"] * 3 + ["refine"]
    assert [t.key for t in out.trials] == [key(n) for n in ("dp z0", "ulysses", "ring", "pp")]
    assert out.chosen.key == key("pp")               # measured fastest
    assert fits == [3, 4]                            # refitted before the refinement and after
    # with a larger budget, once pp (1.0 s) is measured nothing is predicted faster: stop
    machine = Machine(truth)
    out = run_trials(Request(), 6, planner, machine, remeasure=False)
    assert len(out.trials) == split_budget(6, 4)[0] == 4 and "no unmeasured" in out.stopped


def test_refinement_stops_early_when_the_best_is_measured():
    truth = {n: sum(parts.values()) for n, (_, parts) in LAYOUTS.items()}  # the model is right
    machine = Machine(truth)
    out = run_trials(Request(), 6, Planner(), machine)
    assert len(out.trials) == split_budget(6, 4)[0] == 4 and "no unmeasured" in out.stopped
    assert out.chosen.key == key("dp z0") and out.remeasured == []


def test_refinement_respects_k_and_skips_refused_layouts():
    rng = random.Random(3)
    for k in range(1, 8):
        truth = {n: rng.uniform(0.5, 2.0) for n in LAYOUTS}
        truth["ring"] = None                         # the runtime refuses it
        machine = Machine(truth, jitter=0.02, seed=k)
        out = run_trials(Request(), k, Planner(), machine, remeasure=False)
        assert len(out.trials) <= k and len(machine.calls) == len(out.trials)
        assert len({t.key for t in out.trials}) == len(out.trials)
        assert out.chosen.failure == "" and out.chosen.step_s == min(
            t.step_s for t in out.trials)


def test_next_candidate_compares_with_the_best_measured_plus_the_spread():
    ranking = Corrections()
    measured = {key("dp z0"): 1.08}                 # dp z3 predicted 1.16
    assert next_candidate(Request(), Planner(), ranking, measured, 0.0) is None
    cand = next_candidate(Request(), Planner(), ranking, measured, 0.10)
    assert cand is not None and cand["zero_stage"] == 3


def _trial(name: str, times: list[float]) -> Trial:
    fields, parts = LAYOUTS[name]
    return Trial(_plan(fields, parts, None), "family",
                 [Measurement(statistics.median(times), times)])


def test_spread_comes_from_the_trials_own_steps():
    assert step_spread([_trial("dp z0", [1.0, 1.0, 1.0])]) == 0.0
    quiet = step_spread([_trial("dp z0", [1.0, 1.01, 0.99]), _trial("dp z3", [2.0, 2.02, 1.98])])
    loud = step_spread([_trial("dp z0", [1.0, 1.1, 0.9]), _trial("dp z3", [2.0, 2.2, 1.8])])
    assert loud == pytest.approx(10 * quiet) and 0 < quiet < 0.05


def test_spread_covers_pure_noise_between_two_trials():
    # two trials of one layout, 3 noisy steps each: their medians' gap falls within the
    # spread estimated from their own steps most of the time (about 95% for gaussian steps,
    # less with 2 trials' pooled estimate of the noise), and a 3x larger gap rarely does
    rng = random.Random(0)
    inside = far = 0
    for _ in range(2000):
        a, b = ([1 + rng.gauss(0, 0.05) for _ in range(3)] for _ in range(2))
        spread = step_spread([_trial("dp z0", a), _trial("dp z3", b)])
        gap = abs(statistics.median(a) / statistics.median(b) - 1)
        inside += gap <= spread
        far += 3 * gap + 0.15 <= spread
    assert 0.8 <= inside / 2000 <= 0.99 and far / 2000 < 0.1


def test_noise_rule_remeasures_the_two_fastest_only_within_the_spread():
    truth = {n: sum(parts.values()) for n, (_, parts) in LAYOUTS.items()}
    truth["dp z3"] = truth["dp z0"] * 1.01           # within 10% jitter: re-measured
    machine = Machine(truth, jitter=0.10)
    out = run_trials(Request(), 3, Planner(), machine)   # dp z0, Ulysses, then dp z3
    a, b = (t.key for t in sorted(out.trials, key=lambda t: t.runs[0].step_s)[:2])
    assert set(out.remeasured) == {key("dp z0"), key("dp z3")}
    extra = machine.calls[len(out.trials):]
    assert extra == [a, b, b, a][:2 * REMEASURE_ROUNDS]      # alternately, A B B A
    assert all(len(t.runs) == 1 + REMEASURE_ROUNDS for t in out.trials if t.key in out.remeasured)
    assert out.chosen.step_s == min(t.step_s for t in out.trials)  # pooled medians decide
    truth["dp z3"] = truth["dp z0"] * 1.5             # far apart: not re-measured
    machine = Machine(truth, jitter=0.01)
    out = run_trials(Request(), 3, Planner(), machine)
    assert out.remeasured == [] and len(machine.calls) == len(out.trials)


OLD_FILES = [  # corrections files as earlier versions wrote them
    {"corrections": {"dp2-tp1-sp1-none-pp1-none-z0": 1.4}, "families": {"dp": 1.3},
     "last_trial": [{"layout": "dp2-tp1-sp1-none-pp1-none-z0", "predicted_s": 0.2,
                     "measured_s": 0.28, "error": -0.29}]},
    {"corrections": {"dp2-tp1-sp1-none-pp1-none-z0": 1.4}, "families": {"dp": 1.3},
     "parts": {"compute": 1.2}, "family_parts": {"dp": {"compute": 1.25}},
     "observations": [{"layout": "dp2-tp1-sp1-none-pp1-none-z0", "parts": {"compute": 0.2},
                       "measured_s": 0.25}], "last_trial": []},
]


@pytest.mark.parametrize("data", OLD_FILES)
def test_old_corrections_files_still_load_and_merge(tmp_path, data):
    path = tmp_path / "p.trials.json"
    path.write_text(json.dumps(data))
    old = load_corrections(path)
    z3 = "dp2-tp1-sp1-none-pp1-none-z3"
    assert old.factors(z3)["compute"] == pytest.approx(data.get("family_parts", {"dp": {
        "compute": data["families"]["dp"]}})["dp"]["compute"])
    new = corrections_from([_plan(LAYOUTS["ulysses"][0], LAYOUTS["ulysses"][1], None)], [2.4])
    merged = merge_corrections(old, new)
    assert set(merged) == set(data["corrections"]) | set(new)
    save_corrections(path, new, [{"layout": "x", "round": "refine"}])
    stored = json.loads(path.read_text())
    assert set(stored) == {"corrections", "families", "parts", "family_parts", "observations",
                           "last_trial"}
    again = load_corrections(path)
    assert dict(again) == dict(merged) and again.parts == pytest.approx(merged.parts)


def test_spread_shrugs_off_a_stray_slow_step():
    # a shared machine: one step of one trial stalls for 10x; the other trials' steps still
    # say how noisy the machine is
    rng = random.Random(1)
    trials = [_trial("dp z0", [1 + rng.gauss(0, 0.03) for _ in range(3)]) for _ in range(5)]
    calm = step_spread(trials)
    trials[2].runs[0].times[1] *= 10
    assert calm > 0 and step_spread(trials) < 1.5 * calm


@pytest.mark.parametrize("argv, field", [(["--trial", "-1"], "--trial"),
                                         (["--trial", "2", "--trial-steps", "0"], "--trial-steps")])
def test_bad_trial_arguments_are_one_line_errors(argv, field, capsys, tmp_path):
    from pathlib import Path

    from disttrain.cli import EXIT_USER_ERROR, main

    spec = Path(__file__).resolve().parents[1] / "examples" / "quickstart-2rank.yaml"
    assert main(["plan", str(spec), "--out", str(tmp_path), *argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err


def test_the_bench_reads_the_sweep_and_joins_new_layouts_to_it():
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from fidelity_trials import SweepMeasure

    runs = []

    def run(plan, rounds):
        runs.append((layout_key(plan.parallel), rounds))
        return [[2.0, 2.0] for _ in range(rounds)]

    dp = _plan(*LAYOUTS["dp z0"], None)
    pooled = {key("dp z0"): [[1.0, 1.2], [1.1, 0.9]]}
    measure = SweepMeasure(pooled, run, rounds=2)
    first = measure(dp)                              # the sweep's measurement, nothing run
    assert first.times == [1.0, 1.2, 1.1, 0.9] and first.rounds == [1.1, 1.0] and runs == []
    again = measure(dp)                              # a re-measurement: one fresh run, pooled
    assert again.times == [2.0, 2.0] and runs == [(key("dp z0"), 1)]
    assert measure.times(key("dp z0")) == [1.0, 1.2, 1.1, 0.9, 2.0, 2.0]
    assert first.times == [1.0, 1.2, 1.1, 0.9]       # not aliased to the growing sweep
    new = measure(_plan(*LAYOUTS["pp"], None))       # a layout the sweep lacks: its rounds
    assert runs[-1] == (key("pp"), 2) and len(new.times) == 4 and measure.added == [key("pp")]
    assert key("pp") in pooled


def test_remeasured_runs_give_the_run_to_run_spread():
    truth = {n: sum(parts.values()) for n, (_, parts) in LAYOUTS.items()}
    truth["dp z3"] = truth["dp z0"] * 1.01
    out = run_trials(Request(), 3, Planner(), Machine(truth, jitter=0.10))
    assert out.remeasured and 0 < out.run_spread < 0.10
    quiet = run_trials(Request(), 3, Planner(), Machine(truth, jitter=0.0))
    assert quiet.remeasured == [] and quiet.run_spread is None   # exact ties: spread 0


def test_a_layout_the_search_only_bounded_is_planned_and_can_win():
    class Pruning(Planner):  # the free search lists pp only by a (loose) lower bound
        def __call__(self, request, corrections=None):
            plan = super().__call__(request, corrections)
            if request.dp is None:
                for entry in plan.rejected:
                    if entry["candidate"]["pp"] > 1:
                        entry["reason"] = ("pruned: step-time lower bound 0.5 s >= a feasible "
                                           "plan's 1 s")
            return plan

    ranking = Corrections(parts={"bubble": 0.1})  # pp corrected: 1.035 s
    cand = next_candidate(Request(), Pruning(), ranking, {key("dp z0"): 1.1}, 0.0)
    assert cand is not None and cand["pp"] == 2
    # planned, its corrected prediction loses to the measured best: nothing to measure
    assert next_candidate(Request(), Pruning(), ranking, {key("dp z0"): 1.0}, 0.0) is None


def test_runs_of_one_layout_widen_the_spread_when_the_load_shifts_between_them():
    from planner.trial_rounds import SPREAD_Z, noise_spread, run_sd

    steady = _trial("dp z0", [1.0, 1.01, 0.99])      # quiet steps within each run ...
    shifted = Trial(steady.plan, "family", [Measurement(1.0, [1.0, 1.01, 0.99], rounds=[]),
                                            Measurement(1.3, [1.3, 1.31, 1.29])])
    assert noise_spread([steady]) == step_spread([steady])   # one run: the steps decide
    # ... but a second run 30% slower: the runs' spread decides
    assert run_sd([shifted]) == pytest.approx(0.3 / 1.15 / math.sqrt(2), rel=1e-6)
    assert noise_spread([shifted]) == pytest.approx(SPREAD_Z * math.sqrt(2) * run_sd([shifted]))
    assert noise_spread([shifted]) > 10 * step_spread([shifted])


def test_each_trial_is_weighted_by_the_run_to_run_noise_the_trials_measured():
    from planner.trial_rounds import run_sd, trial_noise

    once = _trial("dp z0", [1.0, 1.01, 0.99])
    assert trial_noise([once]) == [None]                      # no repeated run: the fit's floor
    twice = Trial(once.plan, "family", [Measurement(1.0, [1.0]), Measurement(1.2, [1.2])])
    noise = trial_noise([once, twice])
    sd = run_sd([twice])
    assert noise == pytest.approx([sd, sd / math.sqrt(2)])    # pooled runs: sd / sqrt(runs)
    # the observations carry it, and the fit reads it
    c = corrections_from([once.plan, twice.plan], [1.0, 1.1], noise_sd=noise)
    assert [o["noise_sd"] for o in c.observations] == pytest.approx(noise)
