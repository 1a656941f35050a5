"""The stage MIP against brute force on small seeded random instances, and the solver's
time-limit path (status read from `sol_status`, never assumed optimal)."""

from __future__ import annotations

import itertools
from dataclasses import replace
import random

import pulp
import pytest

from planner.costmodel import LayerCost
from planner.mip import NoSolution, StageProblem, evaluate_stage, solve_stage
from planner.plan import LayerActivationPlan
from planner.solve import highs_available, solve_model

K = 2  # token chunks: swap fractions 0, 1/2, 1


GIB = 2**30


def random_problem(seed: int, num_layers: int = 2) -> StageProblem:
    """Bytes in GiB-sized units, as the planner produces them."""
    rng = random.Random(seed)
    layers = []
    for _ in range(num_layers):
        tl = rng.uniform(4, 12) * GIB
        layers.append(LayerCost(
            tokens=1024, input_bytes=rng.uniform(0.5, 1.5) * GIB, attention_output_bytes=rng.uniform(0.5, 1.5) * GIB,
            token_local_bytes=tl, mlp_bytes=tl / 2, plain_bytes=tl + rng.uniform(1, 3) * GIB,
            forward_s=rng.uniform(0.5, 2), backward_s=rng.uniform(1, 4), recompute_s=rng.uniform(0.2, 1)))
    total_plain = sum(lc.plain_bytes for lc in layers)
    return StageProblem(
        layers=tuple(layers), inflight=rng.choice([1, 2]), slots=rng.choice([2, 3]),
        device_capacity_bytes=rng.uniform(0.15, 0.9) * total_plain * 2, fixed_device_bytes=rng.uniform(0, 2) * GIB,
        working_base_bytes=rng.uniform(0, 2) * GIB,
        host_capacity_bytes=rng.uniform(5, 40) * GIB, nvme_capacity_bytes=rng.uniform(0, 60) * GIB,
        host_link_bw=rng.uniform(2, 10) * GIB, nvme_read_bw=rng.uniform(0.5, 3) * GIB,
        nvme_write_bw=rng.uniform(0.5, 3) * GIB,
        tail_forward_window_s=rng.uniform(0, 1), tail_backward_window_s=rng.uniform(0, 1),
        num_chunks=2, chunk_device_bytes=rng.uniform(1, 4) * GIB, chunk_host_bytes=rng.uniform(1, 4) * GIB,
        chunk_link_bytes=rng.uniform(1, 20) * GIB, chunk_buffer_bytes=rng.uniform(0.5, 6) * GIB,
        chunk_cpu_optimizer_s=rng.uniform(0, 5), chunk_device_optimizer_s=rng.uniform(0, 0.5),
        token_chunks=K)


def layer_options():
    yield LayerActivationPlan(keep_all=True)
    for tier, n, swap_in, swap_ao in itertools.product(("cpu", "nvme"), range(K + 1), (False, True), (False, True)):
        yield LayerActivationPlan(swap_fraction=n / K, tier=tier, swap_input=swap_in, swap_attention_output=swap_ao)


def brute_force(problem: StageProblem) -> float:
    best = float("inf")
    options = list(layer_options())
    for acts in itertools.product(options, repeat=len(problem.layers)):
        for persistent in range(problem.num_chunks + 1):
            for buffers in ((1, 2) if persistent < problem.num_chunks else (0,)):
                ev = evaluate_stage(problem, acts, persistent, buffers)
                if ev.feasible:
                    best = min(best, ev.objective_s)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_mip_matches_brute_force(seed):
    problem = random_problem(seed)
    expected = brute_force(problem)
    if expected == float("inf"):
        with pytest.raises(NoSolution) as info:
            solve_stage(problem, gap_rel=0.0)
        assert info.value.result.infeasible
        return
    solution = solve_stage(problem, gap_rel=0.0)
    assert solution.solve.proven_optimal
    assert solution.evaluation.feasible, solution.evaluation.violations
    assert solution.solve.objective == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert solution.evaluation.objective_s == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_random_instances_are_not_trivial():
    # The brute-force comparison is only meaningful if the instances exercise the choices.
    chosen = set()
    for seed in range(12):
        problem = random_problem(seed)
        try:
            solution = solve_stage(problem, gap_rel=0.0)
        except NoSolution:
            chosen.add("infeasible")
            continue
        for act in solution.activations:
            chosen.add("keep" if act.keep_all else f"swap-{act.tier}" if act.swap_fraction or act.swap_input else "recompute")
        chosen.add(f"persistent-{solution.num_persistent_chunks}")
        chosen.add(f"buffers-{solution.num_prefetch_buffers}")
    assert len(chosen) >= 4, chosen


def test_infeasible_memory_is_reported_not_assumed():
    problem = random_problem(3)
    tight = StageProblem(**{**problem.__dict__, "device_capacity_bytes": problem.fixed_device_bytes * 0.5})
    with pytest.raises(NoSolution) as info:
        solve_stage(tight)
    assert info.value.result.infeasible and not info.value.result.has_solution


def _market_split(relax: bool) -> pulp.LpProblem:
    """Cornuejols-Dawande market split (4 rows, 30 binaries): notoriously hard for branch
    and bound, so a short time limit stops the solver before it proves optimality."""
    rng = random.Random(11)
    rows, cols = 4, 30
    weights = [[rng.randint(0, 99) for _ in range(cols)] for _ in range(rows)]
    model = pulp.LpProblem("market_split", pulp.LpMinimize)
    cat = pulp.LpContinuous if relax else pulp.LpBinary
    pick = [model.add_variable(f"pick_{j}", 0, 1, cat) for j in range(cols)]
    over = [model.add_variable(f"over_{i}", 0) for i in range(rows)]
    under = [model.add_variable(f"under_{i}", 0) for i in range(rows)]
    for i in range(rows):
        target = sum(weights[i]) // 2
        model += pulp.lpSum(w * x for w, x in zip(weights[i], pick)) + under[i] - over[i] == target
    model += pulp.lpSum(over) + pulp.lpSum(under) + 0.5
    return model


def test_cbc_time_limit_status_read_from_sol_status():
    # A hard instance with a 1 s limit: CBC stops early. LpStatus would still say 'Optimal';
    # the result must carry sol_status's text and a positive gap.
    problem, result = solve_model(_market_split, backend="cbc", time_limit_s=1, gap_rel=0.0)
    assert result.backend == "cbc"
    if result.proven_optimal:
        pytest.skip("CBC proved this instance within 1 s on this machine")
    assert pulp.LpStatus[problem.status] == "Optimal"   # the trap: LpStatus hides the limit
    assert result.status == "Solution Found" and not result.proven_optimal
    assert result.has_solution and result.gap > 0


@pytest.mark.skipif(not highs_available(), reason="highspy not importable")
def test_highs_reports_its_gap():
    _, result = solve_model(_market_split, backend="highs", time_limit_s=0.05, gap_rel=0.0)
    assert result.backend == "highs"
    assert result.status in ("Solution Found", "Optimal Solution Found", "No Solution Found")
    if result.status == "Solution Found":
        assert result.gap > 0 and not result.proven_optimal


def test_highs_failure_falls_back_to_cbc(monkeypatch):
    import planner.solve as solve_module
    original = solve_module._solver

    class BrokenHighs:
        def actualSolve(self, lp, **kwargs):
            raise pulp.PulpSolverError("simulated HiGHS crash")

    def solver(backend, *args):
        return BrokenHighs() if backend == "highs" else original(backend, *args)

    monkeypatch.setattr(solve_module, "_solver", solver)
    monkeypatch.setattr(solve_module, "highs_available", lambda: True)
    problem = next(p for p in map(random_problem, range(12)) if brute_force(p) < float("inf"))
    solution = solve_stage(problem, backend="auto", gap_rel=0.0)
    assert solution.solve.backend == "cbc" and "simulated HiGHS crash" in solution.solve.note
    assert solution.solve.objective == pytest.approx(brute_force(problem), rel=1e-6)
    with pytest.raises(pulp.PulpSolverError):
        solve_stage(problem, backend="highs")


def test_working_set_counts_what_a_layer_rebuilds_not_what_it_keeps():
    problem = random_problem(0)
    first, second = problem.layers
    keep = LayerActivationPlan(keep_all=True)
    swap = LayerActivationPlan(swap_fraction=0.5, tier="cpu", swap_input=True)
    base = problem.working_base_bytes
    assert evaluate_stage(problem, (keep, keep), 0, 1).working_bytes == base
    swapped_first = 0.5 * first.token_local_bytes + first.input_bytes
    ev = evaluate_stage(problem, (swap, keep), 0, 1)
    assert ev.working_bytes == pytest.approx(base + max(first.token_local_bytes + first.input_bytes,
                                                        swapped_first))  # 2nd: 1st's prefetch
    ev = evaluate_stage(problem, (swap, swap), 0, 1)
    second_rebuilt = second.token_local_bytes + second.input_bytes
    assert ev.working_bytes == pytest.approx(base + max(first.token_local_bytes + first.input_bytes,
                                                        second_rebuilt + swapped_first))


@pytest.mark.parametrize("allowed", ["cpu", "nvme"])
def test_tier_restrictions_hold(allowed):
    # With plenty of both tiers, a tight device forces swapping: only the allowed tier is used.
    problem = random_problem(1)
    problem = replace(problem, allow_cpu=allowed == "cpu", allow_nvme=allowed == "nvme",
                      host_capacity_bytes=1000 * GIB, nvme_capacity_bytes=1000 * GIB,
                      allow_keep=False, allow_recompute=False,
                      device_capacity_bytes=problem.fixed_device_bytes + 40 * GIB)
    solution = solve_stage(problem, gap_rel=0.0)
    assert solution.evaluation.feasible, solution.evaluation.violations
    assert {a.tier for a in solution.activations} == {allowed}
    assert all(a.swap_fraction == 1.0 for a in solution.activations)


def test_cpu_optimizer_is_exposed_when_it_cannot_overlap():
    problem = replace(random_problem(2), chunk_cpu_optimizer_s=3.0)
    keep = (LayerActivationPlan(keep_all=True),) * 2
    backward = sum(lc.backward_s for lc in problem.layers)
    overlapped = evaluate_stage(problem, keep, 0, 2).optimizer_s
    assert overlapped == pytest.approx(max(0.0, 2 * 3.0 - backward))
    serial = evaluate_stage(replace(problem, cpu_optimizer_overlap=False), keep, 0, 2).optimizer_s
    assert serial == pytest.approx(2 * 3.0) and serial > overlapped


@pytest.mark.skipif(not highs_available(), reason="highspy not importable")
def test_highs_node_limit_is_deterministic_and_reported():
    # the work limit, not the clock, ends the solve: the same answer twice, and it says so
    runs = [solve_model(_market_split, backend="highs", time_limit_s=60, gap_rel=0.0, max_nodes=3)[1]
            for _ in range(2)]
    assert runs[0].stopped_by == runs[1].stopped_by == "node limit"
    assert runs[0].has_solution and not runs[0].proven_optimal and runs[0].status == "Solution Found"
    assert runs[0].objective == runs[1].objective and runs[0].gap == runs[1].gap
    _, capped = solve_model(_market_split, backend="highs", time_limit_s=0.05, gap_rel=0.0)
    assert capped.stopped_by == "time limit"
