"""The plan is a function of the request (and profile), not of the machine's load: the search
stops on work limits (MIP nodes, a count of stage MIPs, LP-relaxation bounds that prove the
layouts left out cannot win), and wall-clock limits are only safety caps, reported when hit."""

from __future__ import annotations

import threading
import time

import planner.search as search_module
from planner.hardware import CLUSTER_PRESETS
from planner.request import PlanRequest
from planner.search import plan_job
from planner.shapes import MODEL_PRESETS

REQUEST = PlanRequest(model=MODEL_PRESETS["llama3-8b"], hardware=CLUSTER_PRESETS["8xa100-40g"],
                      dtype="bf16", seq_len=1 << 12, global_batch_size=16)
"""Small enough to plan in about a second, with more than one layout worth a MIP."""


def _comparable(plan) -> dict:
    data = plan.to_dict()
    data["solver"].pop("solve_time_s")
    return data


class _SlowClock:
    """The search's clock running 10x fast: a machine 10x slower, as wall-clock limits see it
    (the former 5 s search budget would have run out after 0.5 s)."""

    @staticmethod
    def perf_counter() -> float:
        return 10.0 * time.perf_counter()


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():       # half of the interpreter's time, so the test stays short
        sum(range(2_000))
        time.sleep(2e-4)


def test_same_plan_on_a_busy_machine(monkeypatch):
    quiet = plan_job(REQUEST)
    assert quiet.feasible
    monkeypatch.setattr(search_module, "time", _SlowClock)
    stop = threading.Event()
    burner = threading.Thread(target=_spin, args=(stop,))   # competes for the interpreter
    burner.start()
    try:
        busy = plan_job(REQUEST)
    finally:
        stop.set()
        burner.join()
    assert _comparable(busy) == _comparable(quiet)
    # complete: every layout left out was proven unable to win, none cut by a budget
    reasons = [r["reason"] for r in quiet.rejected]
    assert any(r.startswith("pruned: LP-relaxation lower bound") for r in reasons)
    assert sum(r.startswith("not chosen") for r in reasons) >= 1
    assert not any(r.startswith("not solved") for r in reasons)
    assert not any("safety cap" in n for n in quiet.notes)


def test_wall_clock_safety_cap_is_reported(monkeypatch):
    monkeypatch.setattr(search_module, "SEARCH_SAFETY_S", 0.0)
    plan = plan_job(REQUEST, with_layout=False)
    assert plan.feasible    # the first plan is always completed
    assert any("wall-clock safety cap" in n for n in plan.notes), plan.notes
    assert any(r["reason"].startswith("not solved: wall-clock safety cap") for r in plan.rejected)
