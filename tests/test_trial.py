"""`disttrain plan --trial K`: the K best layouts as plans, corrections from measured step
times, and the next search ranking by them."""

from __future__ import annotations

import pytest

from planner.hardware import CLUSTER_PRESETS
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS
from planner.trial import (corrections_from, layout_key, load_corrections, save_corrections,
                           top_plans)


def _request() -> PlanRequest:
    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2)
    return PlanRequest(model=MODEL_PRESETS["tiny"], hardware=hw, seq_len=256, micro_batch_size=4,
                       global_batch_size=8, sp=1, pp=1)


def plan_fn(request, corrections=None):
    return plan_job(request, corrections=corrections, with_layout=False)


def test_top_plans_are_distinct_feasible_layouts_best_first():
    plans = top_plans(_request(), 3, plan_fn)
    assert 2 <= len(plans) <= 3 and all(p.feasible for p in plans)
    keys = [layout_key(p.parallel) for p in plans]
    assert len(set(keys)) == len(keys)
    assert plans[0].prediction.step_time_s <= min(p.prediction.step_time_s for p in plans[1:]) * (1 + 1e-3)


def test_corrections_rerank_the_next_search(tmp_path):
    plans = top_plans(_request(), 2, plan_fn)
    first, second = plans
    # measured: the planner's first choice 3x slower than predicted, the second as predicted
    measured = [3 * first.prediction.step_time_s, second.prediction.step_time_s]
    corrections = corrections_from(plans, measured)
    assert corrections[layout_key(first.parallel)] == pytest.approx(3.0)
    path = save_corrections(tmp_path / "p.trials.json", corrections, [])
    again = plan_fn(_request(), load_corrections(path))
    assert layout_key(again.parallel) == layout_key(second.parallel)
    # measured against a corrected prediction, the stored correction is still measured/raw
    redo = corrections_from([again], [second.prediction.step_time_s], load_corrections(path))
    assert redo[layout_key(second.parallel)] == pytest.approx(1.0)


@pytest.mark.slow
def test_trial_runs_plans_on_this_machine(tmp_path):
    from disttrain.spec import job_from_dict
    from disttrain.trial import trial_and_rerank

    raw = {"name": "trial", "model": {"preset": "tiny", "dtype": "fp32"},
           "train": {"seq_len": 128, "micro_batch_size": 2, "global_batch_size": 4, "steps": 2,
                     "lr": 1e-3, "min_lr": 1e-3},
           "data": {"kind": "synthetic"}, "cluster": {"preset": "cpu-local", "devices_per_node": 2},
           "parallel": {"sp": 1, "pp": 1}, "launch": {"launcher": "torchrun"},
           "output_dir": str(tmp_path / "run")}
    job = job_from_dict(raw)
    plan = plan_fn(job.plan_request())
    best, rows = trial_and_rerank(job, plan, 2, steps=1, plan_fn=plan_fn,
                                  corrections_file=tmp_path / "trials.json")
    assert len(rows) == 2 and all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows)
    assert layout_key(best.parallel) == min(rows, key=lambda r: r["measured_s"])["layout"]
    ran = {r["layout"] for r in rows if not r["failure"]}
    assert ran and set(load_corrections(tmp_path / "trials.json")) == ran
    # a plan the runtime refuses (here tp2 of a 259-token vocabulary) is reported, not kept
    assert all(r["measured_s"] == float("inf") for r in rows if r["failure"])


def test_layout_family_names_the_mechanisms():
    from planner.trial import layout_family

    assert layout_family("dp2-tp1-sp1-none-pp1-none-z3") == "dp"
    assert layout_family("dp1-tp1-sp2-ring-pp1-none-z0") == "sp-ring"
    assert layout_family("dp2-tp2-sp2-ulysses-pp2-1f1b-z1") == "dp+tp+sp-ulysses+pp"
    assert layout_family("dp1-tp1-sp1-none-pp1-none-z0") == "single"
    with pytest.raises(ValueError, match="layout key"):
        layout_family("nonsense")


def test_corrections_fall_back_on_the_family(tmp_path):
    from planner.trial import Corrections

    c = Corrections({"dp2-tp1-sp1-none-pp1-none-z0": 1.5}, {"dp": 1.2, "tp": 2.0})
    assert c.get("dp2-tp1-sp1-none-pp1-none-z0", 1.0) == 1.5     # measured layout: its own
    assert c.get("dp2-tp1-sp1-none-pp1-none-z3", 1.0) == 1.2     # same family, not measured
    assert c.get("dp1-tp2-sp1-none-pp1-none-z3", 1.0) == 2.0
    assert c.get("dp1-tp1-sp2-ring-pp1-none-z0", 1.0) == 1.0     # family never measured
    assert Corrections({}, {"dp": 1.1}) and not Corrections()
    path = save_corrections(tmp_path / "t.json", c, [])
    again = load_corrections(path)
    assert dict(again) == dict(c) and again.families == c.families
    # a later trial of other families keeps the earlier ones
    save_corrections(path, Corrections({}, {"pp": 3.0}), [])
    assert load_corrections(path).families == {"dp": 1.2, "tp": 2.0, "pp": 3.0}


def test_corrections_from_gives_each_family_the_mean_of_its_layouts():
    from types import SimpleNamespace

    from planner.trial import Corrections

    def plan(dp, sp, z, predicted):
        par = SimpleNamespace(dp=dp, tp=1, sp=sp, sp_kind="ulysses", pp=1, schedule="none",
                              zero_stage=z)
        return SimpleNamespace(parallel=par, prediction=SimpleNamespace(step_time_s=predicted))

    plans = [plan(2, 1, 0, 1.0), plan(2, 1, 3, 1.0), plan(1, 2, 0, 2.0)]
    c = corrections_from(plans, [2.0, 0.5, 3.0])
    assert c.families["dp"] == pytest.approx(1.0)                # geometric mean of 2 and 0.5
    assert c.families["sp-ulysses"] == pytest.approx(1.5)
    # predictions made with corrections: the stored factor is still measured / raw
    applied = Corrections({}, {"sp-ulysses": 2.0})
    redo = corrections_from([plan(1, 2, 0, 4.0)], [3.0], applied)
    assert redo["dp1-tp1-sp2-ulysses-pp1-none-z0"] == pytest.approx(1.5)


def test_top_plans_cover_the_layout_families_first():
    from planner.trial import layout_family

    first = plan_fn(_request())
    others = {layout_family(layout_key(_layout_of(e["candidate"])))
              for e in first.rejected if e["reason"].startswith(("not chosen", "pruned"))}
    first_family = layout_family(layout_key(first.parallel))
    assert others - {first_family}                               # the request has 2 families
    for k in (2, 4):
        plans = top_plans(_request(), k, plan_fn, first=first)
        families = [layout_family(layout_key(p.parallel)) for p in plans]
        assert layout_key(plans[0].parallel) == layout_key(first.parallel)
        # every other family before a second layout of any family
        assert len(set(families[:1 + len(others - {first_family})])) == min(k, 1 + len(others - {first_family}))


def _layout_of(cand: dict):
    from types import SimpleNamespace

    schedule = cand.get("schedule") or ("1f1b" if cand["pp"] > 1 else "none")
    return SimpleNamespace(**{"tp": 1, **cand, "schedule": schedule})
