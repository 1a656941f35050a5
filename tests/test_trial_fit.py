"""Per-part trial corrections (`planner/trial_fit.py`, `planner/trial.py`): the fit recovers
known factors, stays non-negative and at 1 where no trial says otherwise, the search applies
the factors part by part, and files of the older whole-step format still apply."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

from planner.trial import (Corrections, corrections_from, layout_family, layout_key,
                           load_corrections, part_factors, save_corrections)
from planner.trial_fit import FAMILY_SD, PARTS, PRIOR_SD, fit_part_factors, nnls

DP = "dp2-tp1-sp1-none-pp1-none-z1"
ULYSSES = "dp1-tp1-sp2-ulysses-pp1-none-z1"
PP = "dp1-tp1-sp1-none-pp2-1f1b-z0"


def _observations(truth, layouts, n, seed=0, noise=0.0):
    """`n` synthetic trials per layout, parts drawn at random (each part present in about
    two thirds of them; a bubble only with pipelining), measured = sum of parts x the true factor of the layout's family
    (`truth(family, part)`), times 1 +- `noise`."""
    rng = random.Random(seed)
    out = []
    for key in layouts:
        for _ in range(n):
            parts = {p: rng.uniform(0.05, 1.0) for p in PARTS if rng.random() < 0.67
                     and (p != "bubble" or "-pp1-" not in key)} or {"compute": 1.0}
            measured = sum(v * truth(layout_family(key), p) for p, v in parts.items())
            out.append({"layout": key, "parts": parts,
                        "measured_s": measured * (1 + rng.uniform(-noise, noise))})
    return out


def test_fit_recovers_known_global_part_factors():
    true = dict(compute=1.3, recompute=0.8, exposed_transfer=1.6, exposed_communication=2.0,
                bubble=0.5, optimizer=1.1, page_faults=1.4)
    obs = _observations(lambda family, p: true[p], [DP, ULYSSES, PP], n=12)
    parts, families = fit_part_factors(obs, layout_family)
    for family in families.values():  # the factors each measured family gets
        assert family == pytest.approx({p: true[p] for p in family}, rel=0.04)
    # the global factors (for families never measured) are the families' shrunk toward 1 by
    # the prior: with n families pinning a part at t, the hierarchical posterior mean
    for part, value in parts.items():
        n = sum(part in family for family in families.values())
        weight = n / FAMILY_SD**2
        assert value == pytest.approx((1 / PRIOR_SD**2 + weight * true[part])
                                      / (1 / PRIOR_SD**2 + weight), abs=0.03)
    assert len(parts) == len(PARTS) and len(families["pp"]) == len(PARTS)
    assert "bubble" not in families["dp"]                        # no pipeline, no bubble


def test_fit_recovers_a_family_of_its_own():
    def truth(family, part):  # Ulysses' all-to-all 2.5x slower than predicted, the rest 1.2x
        return 2.5 if (family, part) == ("sp-ulysses", "exposed_communication") else 1.2

    obs = _observations(truth, [DP, ULYSSES, PP], n=24, seed=1, noise=0.01)
    parts, families = fit_part_factors(obs, layout_family)
    assert families["sp-ulysses"]["exposed_communication"] == pytest.approx(2.5, rel=0.03)
    for family, factors in families.items():
        rest = {p: f for p, f in factors.items() if (family, p) != ("sp-ulysses", "exposed_communication")}
        assert rest == pytest.approx(dict.fromkeys(rest, 1.2), rel=0.03)
    # a family never measured starts from the global factors: between 1 and the families'
    ring = Corrections(parts=parts, family_parts=families).factors("dp1-tp1-sp2-ring-pp1-none-z1")
    assert 1.2 < ring["exposed_communication"] < 2.5 and 1.0 < ring["compute"] < 1.2


def test_a_part_no_trial_exercised_keeps_its_prediction():
    # every trial keeps its activations and runs 1.2x slower than predicted: the compute
    # factor learns it, a recompute-heavy plan's recompute part is left as predicted
    obs = [{"layout": k, "parts": {"compute": c, "optimizer": 0.02}, "measured_s": 1.2 * (c + 0.02)}
           for k, c in ((DP, 0.3), (ULYSSES, 0.32), (DP, 0.6))]
    c = corrections_from([], [])  # empty: no factor at all
    assert c.factors(DP) == dict.fromkeys(PARTS, 1.0)
    parts, families = fit_part_factors(obs, layout_family)
    c = Corrections(parts=parts, family_parts=families)
    f = c.factors(DP)
    assert f["compute"] == pytest.approx(1.2, rel=0.02) and f["recompute"] == 1.0
    assert f["page_faults"] == 1.0 and "recompute" not in parts


def test_factors_are_non_negative_and_nnls_meets_its_optimality_conditions():
    # the measurement is below what compute alone predicts: unconstrained least squares
    # would price communication negative
    obs = [{"layout": DP, "parts": {"compute": 1.0, "exposed_communication": 0.5}, "measured_s": 0.6},
           {"layout": DP, "parts": {"compute": 0.5, "exposed_communication": 0.5}, "measured_s": 0.3}]
    parts, families = fit_part_factors(obs, layout_family)
    assert min(parts.values()) >= 0 and min(families["dp"].values()) >= 0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 6)), rng.normal(size=12)
    x = nnls(a, b)
    w = a.T @ (b - a @ x)  # KKT: zero gradient where x > 0, none pointing inward where x = 0
    assert (x >= 0).all() and (x == 0).any()
    assert np.abs(w[x > 0]).max() < 1e-8 and (w[x == 0] <= 1e-8).all()


def _request():
    from planner.hardware import CLUSTER_PRESETS
    from planner.request import PlanRequest
    from planner.shapes import MODEL_PRESETS

    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2)
    return PlanRequest(model=MODEL_PRESETS["tiny"], hardware=hw, seq_len=256, micro_batch_size=4,
                       global_batch_size=8, dp=2, sp=1, pp=1, zero_stage=1)


def _plan(corrections=None):
    from planner.search import plan_job

    return plan_job(_request(), corrections=corrections, with_layout=False)


def test_search_scales_each_part_by_its_factor_and_trials_divide_them_out():
    raw = _plan()
    key = layout_key(raw.parallel)
    family = layout_family(key)
    c = Corrections(parts={"compute": 2.0, "exposed_communication": 0.5},
                    family_parts={family: {"optimizer": 3.0}})
    corrected = _plan(c)
    assert layout_key(corrected.parallel) == key
    before, after = raw.prediction.time_breakdown, corrected.prediction.time_breakdown
    want = {"compute": 2.0, "exposed_communication": 0.5, "optimizer": 3.0}
    assert before["compute"] > 0
    for part, value in before.items():
        assert after[part] == pytest.approx(value * want.get(part, 1.0), rel=1e-9)
    assert corrected.prediction.step_time_s == pytest.approx(sum(after.values()))
    # a trial of the corrected plan stores what the uncorrected model predicted
    redo = corrections_from([corrected], [raw.prediction.step_time_s], c)
    assert redo.observations[0]["parts"] == pytest.approx({p: v for p, v in before.items() if v > 0})
    assert redo[key] == pytest.approx(1.0)


def test_a_file_of_the_older_format_still_applies_per_layout(tmp_path):
    raw = _plan()
    key = layout_key(raw.parallel)
    path = tmp_path / "old.trials.json"
    path.write_text(json.dumps({"corrections": {key: 1.5}, "families": {"tp": 2.0}, "last_trial": []}))
    old = load_corrections(path)
    assert old.factors(key) == dict.fromkeys(PARTS, 1.5)
    assert part_factors(old, "dp1-tp2-sp1-none-pp1-none-z0") == dict.fromkeys(PARTS, 2.0)
    assert part_factors({key: 1.5}, key)["compute"] == 1.5      # a plain dict, as before
    corrected = _plan(old)
    assert corrected.prediction.step_time_s == pytest.approx(1.5 * raw.prediction.step_time_s)
    # a trial saved into the old file adds the per-part keys and keeps the old ones
    save_corrections(path, corrections_from([raw], [1.2 * raw.prediction.step_time_s]), [])
    data = json.loads(path.read_text())
    assert data["families"]["tp"] == 2.0 and data["corrections"][key] == pytest.approx(1.2)
    assert data["parts"] and len(data["observations"]) == 1


def _fake_plan(key: str, parts: dict):
    """A plan of layout `key` predicting `parts` (what `corrections_from` reads)."""
    dp, tp, sp, kind, pp, schedule, z = key.split("-")
    par = SimpleNamespace(dp=int(dp[2:]), tp=int(tp[2:]), sp=int(sp[2:]), sp_kind=kind,
                          pp=int(pp[2:]), schedule=schedule, zero_stage=int(z[1:]))
    assert layout_key(par) == key
    return SimpleNamespace(parallel=par, prediction=SimpleNamespace(
        time_breakdown=parts, step_time_s=sum(parts.values())))


def test_save_refits_over_every_stored_trial(tmp_path):
    true = dict(compute=1.3, exposed_communication=2.0, optimizer=1.0, bubble=0.5)

    def trial(key, parts, scale=1.0):
        return _fake_plan(key, parts), scale * sum(v * true[p] for p, v in parts.items())

    first = [trial(DP, {"compute": 0.3, "exposed_communication": 0.05}),
             trial(ULYSSES, {"compute": 0.3, "exposed_communication": 0.1})]
    second = [trial(PP, {"compute": 0.4, "bubble": 0.1, "optimizer": 0.02}),
              trial(DP, {"compute": 0.3, "exposed_communication": 0.05}, scale=1.1)]
    path = tmp_path / "t.json"
    only_first = None
    for batch in (first, second):
        save_corrections(path, corrections_from([p for p, _ in batch], [m for _, m in batch]), [])
        only_first = only_first or load_corrections(path)
    stored = load_corrections(path)
    # the same plan measured again: the newest measurement replaces the older
    assert [o["layout"] for o in stored.observations] == [ULYSSES, PP, DP]
    assert stored.observations[-1]["measured_s"] == pytest.approx(second[1][1])
    assert stored.parts.keys() == {"compute", "exposed_communication", "bubble", "optimizer"}
    # the first batch's Ulysses trial still counts in the refit
    assert stored.factors(ULYSSES)["exposed_communication"] == pytest.approx(
        only_first.factors(ULYSSES)["exposed_communication"], rel=0.1)
    assert stored.factors(PP)["bubble"] < 1.0


def test_trial_alternatives_include_layouts_the_work_budget_left_unsolved(monkeypatch):
    """`--trial` ranks every layout the search did not rule out by memory: one left unsolved
    when the stage-MIP budget ran out comes back with its lower bound (the search's wording
    is parsed, not assumed)."""
    import planner.search as search
    from planner.hardware import CLUSTER_PRESETS
    from planner.request import PlanRequest
    from planner.shapes import MODEL_PRESETS
    from planner.trial import _alternatives

    monkeypatch.setattr(search, "MAX_STAGE_MIPS", 1)
    # a request with two layouts worth a MIP (the LP-relaxation bounds prune the rest)
    request = PlanRequest(model=MODEL_PRESETS["llama3-8b"], hardware=CLUSTER_PRESETS["8xa100-40g"],
                          dtype="bf16", seq_len=4096, micro_batch_size=1, global_batch_size=16)
    plan = search.plan_job(request, with_layout=False)
    unsolved = [r for r in plan.rejected if r["reason"].startswith("not solved: ")]
    assert unsolved
    listed = [cand for _, _, cand in _alternatives(plan)]
    for entry in unsolved:
        assert entry["candidate"] in listed


def test_a_noisy_trial_moves_the_factors_less_than_a_quiet_one():
    # one trial measured 1.5x its prediction: quiet (3%), it sets the factor; on a busy
    # machine whose repeated runs spread by 40%, the prior (1) keeps most of its weight
    obs = {"layout": DP, "parts": {"compute": 1.0}, "measured_s": 1.5}
    quiet = fit_part_factors([obs], layout_family)[1]["dp"]["compute"]
    noisy = fit_part_factors([{**obs, "noise_sd": 0.4}], layout_family)[1]["dp"]["compute"]
    assert quiet == pytest.approx(1.5, abs=0.02)
    assert 1.0 < noisy and noisy - 1 < 0.6 * (quiet - 1)   # the prior spread: 0.5 + 0.5
    # a noise below the floor (`NOISE_SD`) does not weigh a trial more
    assert fit_part_factors([{**obs, "noise_sd": 1e-6}], layout_family)[1]["dp"]["compute"] == quiet
