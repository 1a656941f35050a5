"""The benchmarks under bench/ run end to end on their smallest configuration (CI catches
breakage; the numbers themselves are not checked here)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import docs_sections  # noqa: E402


def test_sections_are_rewritten_in_place(tmp_path):
    path = tmp_path / "benchmarks.md"
    docs_sections.write_section("fidelity", "first", path)
    docs_sections.write_section("peers", "P", path)
    docs_sections.write_section("fidelity", "second", path)
    text = path.read_text()
    assert "second" in text and "first" not in text and text.count("bench:fidelity:begin") == 1
    assert text.index("bench:peers:begin") < text.index("bench:fidelity:begin")
    with pytest.raises(ValueError, match="name"):
        docs_sections.write_section("nope", "x", path)


@pytest.mark.slow
def test_peers_smallest_run_agrees_on_loss():
    import argparse

    import peers
    from peers_report import report

    # the planner's row, ALST as DeepSpeed wires it and plain DDP; alst-dp2 and the extra rows
    # share these code paths and cost ~50 s more of CI (run by `make bench`)
    systems = ("disttrain", "alst-sp2", "plain")
    rows = peers.measure([256], steps=3, budget_mib=64, systems=systems)  # asserts every step's loss agrees
    assert {r["system"] for r in rows} == set(systems)
    assert all("error" not in r and r["peak_rss"] > 0 and r["step_s"] > 0 for r in rows)
    assert all(len(r["losses"]) == 3 for r in rows)
    text = report(rows, [], argparse.Namespace(rss_budget_mib=1024.0, steps=3, budget_mib=64),
                  1.0)
    assert "| disttrain | 256 |" in text and "| alst-sp2 | 256 |" in text
    assert "MET: losses equal at every step" in text


@pytest.mark.slow
def test_fidelity_smallest_grid():
    import fidelity

    result = fidelity.measure([256], steps=2, layouts={"dp2 z3": fidelity.LAYOUTS["dp2 z3"]},
                              policies={"swap nvme": fidelity.POLICIES["swap nvme"]},
                              sweep={"dp2 z0": fidelity.SWEEP["dp2 z0"]}, trial_k=1,
                              memory_trial=False, rounds=1)   # its more runs: by `make bench`
    errors = {r["quantity"]: r["error"] for r in result["rows"]}
    assert set(errors) == {"activations", "model states", "step time", "comm"}
    assert all(math.isfinite(e) for e in errors.values())
    text = fidelity.report(result, 2)
    assert "Planner choice" in text
    disk = result["disk"]     # the swap rows are planned with this machine's disk, as measured
    assert disk["read_gbps"] > 0 and disk["write_gbps"] > 0 and "swap directory's disk" in text


@pytest.mark.slow
def test_estimators_tables_and_copy_engine_io(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed (extra 'peers')")
    import estimators

    est = estimators.estimator_rows()
    assert all(r["ds3"] > 0 and r["ours3"] > 0 for r in est)
    meas = estimators.measured_rows(stages=(3,))
    assert meas[0]["measured"] > 0
    io, notes = estimators.io_rows(tmp_path, 4 * 2**20, repeats=1, deepspeed_aio=False)
    assert any("copy engine" in what for what, _ in io) or any("skipped" in n for n in notes)
    assert "## Estimators" in estimators.report(est, meas, io, notes, 4 * 2**20, tmp_path)
