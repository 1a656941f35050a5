"""`disttrain report`: predictions beside measurements from a real run directory."""

from __future__ import annotations

import dataclasses

from conftest import TINY_JOB, merge, run_cli
from disttrain.planning import fixed_plan
from disttrain.report import compare
from disttrain.spec import job_from_dict
from disttrain.trainer import Trainer
from planner.plan import Prediction


def test_report_pairs_prediction_and_measurement(tmp_path):
    job = job_from_dict(merge(TINY_JOB, {"train": {"steps": 2},
                                         "output_dir": str(tmp_path / "run")}))
    n = job.shape.num_params()
    plan = dataclasses.replace(fixed_plan(job, 1), prediction=Prediction(
        step_time_s=0.05, tokens_per_s=1000.0,
        bytes_by_category={"parameters": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}))
    Trainer(job, plan).run()
    _, rows = compare(tmp_path / "run")
    by_name = {r.quantity: r for r in rows}
    for category in ("parameters", "gradients", "optimizer"):
        row = by_name[f"model states: {category} (max rank)"]
        assert row.error == 0.0, row  # fp32 AdamW on one rank: exactly 4/4/8 bytes per param
    assert by_name["step time"].measured > 0 and by_name["step time"].predicted == 0.05
    done = run_cli("report", tmp_path / "run")
    assert done.returncode == 0 and "| step time | 50.0 ms |" in done.stdout
    assert (tmp_path / "run" / "report.md").is_file()
    missing = run_cli("report", tmp_path)
    assert missing.returncode == 2 and "has no plan.json" in missing.stderr
