"""Report rendering: files written, baselines evaluated, the summary names the numbers."""

from __future__ import annotations

import io

from rich.console import Console

from planner.hardware import CLUSTER_PRESETS
from planner.plan import Plan
from planner.report import evaluate_baselines, render_summary, smallest_shortfall, write_report
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS


def _text(renderable) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(renderable)
    return buffer.getvalue()


def test_feasible_report_writes_files(tmp_path):
    plan = plan_job(PlanRequest(model=MODEL_PRESETS["llama2-7b"], hardware=CLUSTER_PRESETS["8xa800-80g"],
                                dtype="bf16", seq_len=1 << 18))
    paths = write_report(plan, tmp_path / "out")
    assert [p.name for p in paths] == ["plan.json", "report.md", "memory_timeline.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 5000
    assert Plan.load(paths[0]) == plan
    markdown = paths[1].read_text()
    for heading in ("## Memory per rank", "## Step time", "## Baselines on the same layout",
                    "## Rejected layouts", "keep everything", "full CPU swap"):
        assert heading in markdown
    text = _text(render_summary(plan))
    assert "peak" in text and f"{plan.prediction.per_rank_peak_bytes / 2**30:,.2f} GiB" in text


def test_baselines_on_a_long_sequence():
    plan = plan_job(PlanRequest(model=MODEL_PRESETS["llama2-7b"], hardware=CLUSTER_PRESETS["8xa800-80g"],
                                dtype="bf16", seq_len=1 << 20), with_layout=False)
    rows = {r["name"]: r for r in evaluate_baselines(plan)}
    assert set(rows) == {"keep everything", "full recompute (token-local)", "full CPU swap"}
    assert not rows["keep everything"]["fits"]
    assert rows["keep everything"]["device_bytes"] > 80 * 2**30
    # the plan is never slower than a baseline that fits
    for row in rows.values():
        if row["fits"]:
            assert plan.prediction.step_time_s <= row["step_time_s"] * (1 + 1e-3)


def test_infeasible_report_explains_shortfall(tmp_path):
    plan = plan_job(PlanRequest(model=MODEL_PRESETS["llama2-70b"], hardware=CLUSTER_PRESETS["1xrtx4090-24g"],
                                dtype="bf16", seq_len=4096))
    paths = write_report(plan, tmp_path)
    assert [p.name for p in paths] == ["plan.json", "report.md"]
    miss = smallest_shortfall(plan)
    assert "GiB" in miss and "short by" in miss
    assert "No layout fits" in paths[1].read_text()
    assert "closest miss" in _text(render_summary(plan))
