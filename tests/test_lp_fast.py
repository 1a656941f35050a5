"""`planner.lp_fast` builds the stage MIP that pulp builds, bit for bit: the HiGHS models
(costs, bounds, integrality, rows) are equal and so are the optima, the relaxations and the
solved stages; a non-HiGHS solver (CBC) gets the same model through pulp."""

from __future__ import annotations

import dataclasses

import numpy as np
import pulp
import pytest

from planner import lp_fast
from planner.mip import build_stage_model, solve_stage
from planner.solve import _solver, highs_available
from test_stage_mip_tight import _problem

pytestmark = pytest.mark.skipif(not highs_available(), reason="highspy not installed")


def highs_model(model, mip: bool):
    """The HiGHS model `model` (pulp or lp_fast) hands the solver: its arrays, colwise."""
    solver = _solver("highs", 10.0, 0.0, None, mip=mip)
    solver.createAndConfigureSolver(model)
    solver.buildSolverModel(model)
    lp = model.solverModel.getLp()
    arrays = {name: np.array(getattr(lp, name), dtype=np.float64) for name in (
        "col_cost_", "col_lower_", "col_upper_", "row_lower_", "row_upper_")}
    arrays["integrality_"] = np.array([int(k) for k in lp.integrality_], dtype=np.int64)
    matrix = lp.a_matrix_
    arrays["format_"] = np.array([int(matrix.format_)], dtype=np.int64)
    for name in ("start_", "index_", "value_"):
        arrays[name] = np.array(getattr(matrix, name), dtype=np.float64)
    return arrays


def assert_same_model(problem, relax: bool, mip: bool) -> None:
    ours, theirs = (build_stage_model(problem, relax, lp=lp) for lp in (lp_fast, pulp))
    assert [v.name for v in ours[0].variables()] == [v.name for v in theirs[0].variables()]
    a, b = highs_model(ours[0], mip), highs_model(theirs[0], mip)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert ours[0].objective.constant == theirs[0].objective.constant


@pytest.mark.parametrize("seed", [0, 1, 2, 6])
def test_same_highs_model_as_pulp(seed):
    problem = dataclasses.replace(_problem(seed, count=4), token_chunks=4, num_chunks=3,
                                  chunk_device_bytes=2**30, chunk_host_bytes=2**30,
                                  chunk_link_bytes=2**30, chunk_buffer_bytes=2**29)
    for relax, mip in ((False, True), (True, False), (False, False)):
        assert_same_model(problem, relax, mip)


def test_same_optimum_as_pulp():
    problem = _problem(2, count=4)
    results = []
    for lp in (lp_fast, pulp):
        model, variables = build_stage_model(problem, lp=lp)
        model.solve(_solver("highs", 10.0, 0.0, None))
        results.append((model.sol_status, pulp.value(model.objective),
                        [v.value() for v in model.variables()]))
    assert results[0] == results[1]
    assert results[0][0] == pulp.LpSolutionOptimal


def test_cbc_solves_the_same_model():
    problem = _problem(6, count=3)
    values = []
    for lp in (lp_fast, pulp):
        model, _ = build_stage_model(problem, lp=lp)
        model.solve(_solver("cbc", 10.0, 0.0, None))
        values.append((model.sol_status, round(pulp.value(model.objective), 6)))
    assert values[0] == values[1]
    assert solve_stage(problem, backend="cbc", gap_rel=0.0).evaluation.objective_s == pytest.approx(
        solve_stage(problem, backend="highs", gap_rel=0.0).evaluation.objective_s, rel=1e-6)
