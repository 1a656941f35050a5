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
    assert set(load_corrections(tmp_path / "trials.json")) == {r["layout"] for r in rows}
