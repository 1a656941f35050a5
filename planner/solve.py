"""Run a pulp model on HiGHS (CBC as fallback) and read back what the solver really said.

At a time limit CBC still reports LpStatus "Optimal"; only `problem.sol_status` tells
"Solution Found" from "Optimal Solution Found", so that is what is read here. The gap comes
from HiGHS' own `mip_gap`; for CBC it is measured against the LP relaxation (a valid
lower bound), which the caller's builder produces with `relax=True`.

A solve is a function of the model and its work limits, not of the machine's load: HiGHS runs
on one thread with a fixed random seed and stops on a node limit (`max_nodes`); the time
limit is only a wall-clock safety cap, and `SolveResult.stopped_by` says when it was hit.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pulp

BACKENDS = ("auto", "highs", "cbc")
SOLUTION_FOUND = (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)


@dataclass(frozen=True, kw_only=True)
class SolveResult:
    """What one solve returned."""

    backend: str
    """'highs' or 'cbc'."""
    status: str
    """pulp.LpSolution text of `problem.sol_status`, e.g. 'Solution Found'."""
    has_solution: bool
    """A feasible integer solution is available (optimal or not)."""
    proven_optimal: bool
    """The solver proved optimality (within its gap tolerance)."""
    infeasible: bool
    """The solver proved there is no solution."""
    objective: float
    """Objective of the returned solution (inf when none)."""
    gap: float
    """Relative gap to the best bound (0 when proven optimal at gap 0; inf when unknown)."""
    solve_time_s: float
    """Wall time of the solve (including the relaxation bound for CBC)."""
    stopped_by: str = ""
    """'' (the solver finished), 'node limit' (the deterministic work limit) or 'time limit'
    (the wall-clock safety cap: the result may then depend on the machine's load)."""
    note: str = ""
    """Why the backend differs from the one asked for (HiGHS failing over to CBC), if it does."""


def highs_available() -> bool:
    return pulp.HiGHS(msg=False).available()


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"solver: must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "highs" if highs_available() else "cbc"
    if backend == "highs" and not highs_available():
        raise ValueError("solver: 'highs' requested but highspy is not importable")
    return backend


class _HiGHS(pulp.HiGHS):
    """pulp's HiGHS that also reads HiGHS' node-limit status (pulp has no entry for
    kSolutionLimit and raises KeyError): a solution found before the limit is kept; and takes
    a MIP start (`start`: variable name -> value), which HiGHS checks and uses as its first
    incumbent when it is feasible."""

    def __init__(self, *args, start: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = start

    def buildSolverModel(self, lp):
        if hasattr(lp, "pass_to_highs"):   # planner.lp_fast: the same model in one call
            lp.pass_to_highs(lp.solverModel, self.mip)
        else:
            super().buildSolverModel(lp)
        if self.start and self.mip:
            import highspy
            solution = highspy.HighsSolution()
            solution.col_value = [float(self.start.get(v.name, 0.0)) for v in lp.variables()]
            solution.value_valid = True
            lp.solverModel.setSolution(solution)

    def findSolutionValues(self, lp):
        try:
            return super().findSolutionValues(lp)
        except KeyError:
            import highspy
            if lp.solverModel.getModelStatus() != highspy.HighsModelStatus.kSolutionLimit:
                raise
            found = lp.solverModel.getInfo().primal_solution_status == 2   # feasible
            return (pulp.LpStatusOptimal if found else pulp.LpStatusNotSolved,
                    pulp.LpSolutionIntegerFeasible if found else pulp.LpSolutionNoSolutionFound)


def _solver(backend: str, time_limit_s: float, gap_rel: float, gap_abs: float | None,
            max_nodes: int | None = None, start: dict[str, float] | None = None, mip: bool = True):
    if backend == "highs":
        limits = {} if max_nodes is None else {"mip_max_nodes": int(max_nodes)}
        return _HiGHS(mip=mip, msg=False, timeLimit=time_limit_s, gapRel=gap_rel, gapAbs=gap_abs,
                      threads=1, random_seed=0, start=start, **limits)
    limits = {} if max_nodes is None else {"maxNodes": int(max_nodes)}
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, math.ceil(time_limit_s)),
                             gapRel=gap_rel, gapAbs=gap_abs, threads=1, **limits)


def _stopped_by(problem: pulp.LpProblem, backend: str, elapsed_s: float, time_limit_s: float) -> str:
    """Which limit ended the solve ('' when the solver finished on its own)."""
    if backend == "highs":
        import highspy
        status = problem.solverModel.getModelStatus()
        return {highspy.HighsModelStatus.kTimeLimit: "time limit",
                highspy.HighsModelStatus.kSolutionLimit: "node limit"}.get(status, "")
    # CBC does not say: an unproven result after the time cap is the cap's doing
    finished = problem.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionInfeasible)
    return "" if finished or elapsed_s < time_limit_s else "time limit"


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send file descriptor 1 to stderr for the solve: highspy >= 1.16 prints a banner from C++
    when a solver is created, even with output off, and stdout may carry JSON (`plan --json`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def solve_model(build: Callable[[bool], pulp.LpProblem], *, backend: str = "auto",
                time_limit_s: float = 10.0, gap_rel: float = 1e-4, gap_abs: float | None = None,
                max_nodes: int | None = None,
                warm_start: Callable[[pulp.LpProblem, Callable[[bool], pulp.LpSolver]],
                                     dict[str, float] | None] | None = None
                ) -> tuple[pulp.LpProblem, SolveResult]:
    """Build the model (`build(relax=False)`), solve it and report status, objective, gap.

    pulp hands HiGHS the objective without its constant term, so HiGHS' own relative gap is
    relative to the variable part; the gap reported here is (objective - bound) over the
    whole objective, and `gap_abs` (seconds, say) lets the solve stop on that scale.
    `max_nodes` bounds the branch-and-bound work; `time_limit_s` is a wall-clock safety cap.
    `warm_start(model, solver)` may return a feasible solution (variable name -> value) for
    HiGHS to start from; it may solve `model` with `solver(mip)` (HiGHS on the same settings,
    mip=False: the LP relaxation) as long as it leaves its bounds as they were. CBC solves
    without one.
    """
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s: must be positive, got {time_limit_s}")
    name = resolve_backend(backend)
    start = time.perf_counter()
    problem, note = build(False), ""
    try:
        with _stdout_to_stderr():
            first = None
            if warm_start is not None and name == "highs":
                first = warm_start(problem, lambda mip: _solver(name, time_limit_s, gap_rel, gap_abs,
                                                                max_nodes, None, mip))
            problem.solve(_solver(name, time_limit_s, gap_rel, gap_abs, max_nodes, first))
    except pulp.PulpSolverError as exc:
        if backend != "auto" or name != "highs":
            raise
        note, name = f"HiGHS failed ({exc}); solved with CBC", "cbc"
        problem = build(False)
        problem.solve(_solver(name, time_limit_s, gap_rel, gap_abs, max_nodes))
    code = problem.sol_status
    stopped_by = _stopped_by(problem, name, time.perf_counter() - start, time_limit_s)
    has_solution = code in SOLUTION_FOUND
    objective = pulp.value(problem.objective) if has_solution else math.inf
    objective = float(objective or 0.0) if has_solution else math.inf
    gap = math.inf
    if has_solution and name == "highs":
        info = problem.solverModel.getInfo()
        gap = 0.0
        if problem.isMIP():
            distance = float(info.objective_function_value) - float(info.mip_dual_bound)
            gap = max(0.0, distance) / max(abs(objective), 1e-12) if math.isfinite(distance) else math.inf
    elif has_solution:
        relaxed = build(True)
        relaxed.solve(_solver(name, time_limit_s, gap_rel, gap_abs, max_nodes))
        if relaxed.sol_status == pulp.LpSolutionOptimal:
            bound = float(pulp.value(relaxed.objective) or 0.0)
            gap = max(0.0, objective - bound) / max(abs(objective), 1e-12)
    return problem, SolveResult(
        backend=name, status=pulp.LpSolution[code], has_solution=has_solution,
        proven_optimal=code == pulp.LpSolutionOptimal,
        infeasible=code == pulp.LpSolutionInfeasible, objective=objective, gap=gap,
        solve_time_s=time.perf_counter() - start, stopped_by=stopped_by, note=note)
