"""The profile is taken the way ranks run: their thread count, side by side with the other
ranks (forked twins in lockstep), with the head + loss and the clip + AdamW update timed;
all of it in the cache key and recorded in the profile."""

from __future__ import annotations

import json
import os

import pytest
import torch

from disttrain.model import build_model
from disttrain.profiling import describe, profile_job_layer, rank_conditions
from disttrain.spec import job_from_dict
from planner.profiler import (LayerMeasurement, LayerProfile, fit_profile,
                              measure_optimizer_s_per_param, profile_key, profile_layer)
from planner.shapes import ModelShape

SHAPE = ModelShape(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
                   vocab_size=128)
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="lockstep twins need fork")


def _layer():
    model = build_model(SHAPE)
    return model, (model.layers[0], model.rope, SHAPE.hidden_size, [32, 64], "fp32")


def _head(model):
    """Final norm + tied output projection + cross entropy over the layer output."""
    def head(x):
        logits = torch.nn.functional.linear(model.norm(x), model.output_weight)
        targets = torch.zeros(x.shape[0] * x.shape[1], dtype=torch.long)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets)
    return head


def test_cache_key_depends_on_measuring_conditions():
    base = profile_key({"h": 1}, "fp32", "cpu", threads=1, concurrent=1)
    assert base == profile_key({"h": 1}, "fp32", "cpu", threads=1, concurrent=1)
    assert base != profile_key({"h": 1}, "fp32", "cpu", threads=2, concurrent=1)
    assert base != profile_key({"h": 1}, "fp32", "cpu", threads=1, concurrent=2)


def test_threads_are_used_recorded_and_restored(tmp_path):
    model, args = _layer()
    before = torch.get_num_threads()
    profile = profile_layer(*args, threads=1, cache_dir=tmp_path)
    assert torch.get_num_threads() == before
    assert profile.threads == 1 and profile.concurrent == 1
    other = profile_layer(*args, threads=2, cache_dir=tmp_path)
    assert other.key != profile.key and len(list(tmp_path.glob("profile-*.json"))) == 2


@needs_fork
def test_lockstep_twins_run_and_are_recorded(tmp_path):
    model, args = _layer()
    profile = profile_layer(*args, threads=1, concurrent=2, cache_dir=tmp_path, repeats=2)
    assert profile.concurrent == 2 and profile.threads == 1
    alone = profile_layer(*args, threads=1, concurrent=1, cache_dir=tmp_path)
    assert alone.key != profile.key
    cached = json.loads(next(tmp_path.glob(f"profile-{profile.key}.json")).read_text())
    assert cached["concurrent"] == 2
    assert all(m.forward_s > 0 and m.backward_s > 0 for m in profile.measurements)


@needs_fork
def test_a_failing_twin_falls_back_to_measuring_alone(tmp_path):
    model, args = _layer()
    parent = os.getpid()

    def head(x):
        if os.getpid() != parent:
            raise MemoryError("twin out of memory")
        return x.pow(2).mean()

    profile = profile_layer(*args, threads=1, concurrent=2, head=head, cache_dir=tmp_path,
                            twin_timeout_s=60)
    assert profile.concurrent == 1                   # what was really measured
    assert list(tmp_path.glob("profile-*.json")) == []   # not cached under the twin key


def test_head_and_optimizer_are_timed():
    model, args = _layer()
    profile = profile_layer(*args, threads=1, head=_head(model), optimizer_numel=4096)
    for name in ("head_forward_s", "head_backward_s"):
        c0, c1, c2 = profile.time_coeffs[name]
        assert c0 >= 0 and c1 >= 0 and c2 == 0.0    # token-local: no quadratic term
        assert all(getattr(m, name) > 0 for m in profile.measurements)
    assert 0 < profile.optimizer_s_per_param < 1e-3
    assert measure_optimizer_s_per_param(1000, repeats=1) > 0


def test_fit_of_head_times_is_linear_in_tokens():
    runs = [LayerMeasurement(seq_len=s, batch=1, saved_bytes={"input": s, "attention_output": s,
                                                              "token_local": s},
                             num_saved_tensors=1, forward_s=1e-6 * s, backward_s=2e-6 * s,
                             token_local_forward_s=1e-6 * s, attention_forward_s=1e-9 * s * s,
                             transient_upper_bound_bytes=0, head_forward_s=1e-4 + 3e-6 * s,
                             head_backward_s=6e-6 * s)
            for s in (64, 128, 256)]
    fit = fit_profile(runs, key="k", device="cpu", dtype="fp32", threads=1, concurrent=2)
    assert fit.time_coeffs["head_forward_s"] == pytest.approx([1e-4, 3e-6, 0.0], rel=1e-6, abs=1e-12)
    assert fit.time_coeffs["head_backward_s"] == pytest.approx([0.0, 6e-6, 0.0], rel=1e-6, abs=1e-12)
    assert (fit.threads, fit.concurrent) == (1, 2)
    # runs without a head leave the head out of the fit
    plain = fit_profile([LayerMeasurement(**{**r.__dict__, "head_forward_s": 0.0, "head_backward_s": 0.0})
                         for r in runs], key="k", device="cpu", dtype="fp32")
    assert "head_forward_s" not in plain.time_coeffs


def test_profiles_cached_before_these_fields_still_load():
    old = {"key": "k", "device": "cpu", "dtype": "fp32", "bytes_per_token": {"input": 1.0},
           "time_coeffs": {"forward_s": [0.0, 1e-6, 0.0]},
           "measurements": [{"seq_len": 8, "batch": 1, "saved_bytes": {"input": 8},
                             "num_saved_tensors": 1, "forward_s": 1e-5, "backward_s": 2e-5,
                             "token_local_forward_s": 1e-5, "attention_forward_s": 0.0,
                             "transient_upper_bound_bytes": 0}]}
    profile = LayerProfile.from_dict(old)
    assert profile.threads == 0 and profile.concurrent == 1 and profile.optimizer_s_per_param == 0.0
    assert profile.measurements[0].head_forward_s == 0.0


def _job(devices: int, device: str = "cpu"):
    return job_from_dict({
        "name": "cond", "model": {"dtype": "fp32", **{k: v for k, v in SHAPE.to_dict().items()
                                                      if k in ("hidden_size", "num_layers", "num_heads",
                                                               "num_kv_heads", "ffn_hidden_size",
                                                               "vocab_size")}, "max_seq_len": 256},
        "train": {"seq_len": 64, "micro_batch_size": 1, "global_batch_size": devices, "steps": 1},
        "data": {"kind": "synthetic"},
        "cluster": {"preset": "cpu-local", "devices_per_node": devices,
                    "device": {"name": device, "memory_gib": 1, "peak_tflops": {"fp32": 0.05}}},
        "launch": {"launcher": "torchrun"}})


def test_rank_conditions_follow_the_launchers():
    cores = os.cpu_count() or 1
    assert rank_conditions(_job(2)) == (max(1, cores // 2), min(2, cores))
    assert rank_conditions(_job(1)) == (cores, 1)
    assert rank_conditions(_job(2, device="A800-80G")) == (None, 1)


def test_job_profile_has_head_optimizer_and_conditions(tmp_path):
    job = _job(2)
    profile = profile_job_layer(job, (32, 64), cache_dir=tmp_path, with_collectives=False)
    threads, concurrent = rank_conditions(job)
    assert profile.threads == threads
    assert profile.concurrent in (concurrent, 1)     # 1 only where fork is unavailable
    assert "head_forward_s" in profile.time_coeffs and profile.optimizer_s_per_param > 0
    text = describe(profile, 64, 1)
    assert "side by side" in text and "AdamW" in text
    again = profile_job_layer(job, (32, 64), cache_dir=tmp_path, with_collectives=False)
    assert again == profile                          # the cache, keyed by the conditions


def test_optimizer_is_timed_over_the_jobs_chunk_sizes():
    from disttrain.profiling import optimizer_chunk_sizes
    from planner.profile_optimizer import chunk_sample

    sizes = optimizer_chunk_sizes(SHAPE)
    assert sum(sizes) == SHAPE.num_params() and len(sizes) == SHAPE.num_layers + 2
    assert chunk_sample([5, 7, 9], cap=10) == [5, 5] and chunk_sample([3], cap=10) == [3]
    assert measure_optimizer_s_per_param([300, 200], repeats=1, median=True) > 0


def test_cache_expires_and_records_the_load(tmp_path, monkeypatch):
    import planner.profiler as profiler

    _, (layer, rope, hidden, _, dtype) = _layer()
    args, kw = (layer, rope, hidden, [8], dtype), dict(threads=1, cache_dir=tmp_path, repeats=1)
    first = profile_layer(*args, **kw)
    assert first.measured_at > 0 and (first.load_average >= 0 or not hasattr(os, "getloadavg"))
    assert profile_layer(*args, **kw) == first
    later = first.measured_at + 3600
    monkeypatch.setattr(profiler.time, "time", lambda: later)
    assert profile_layer(*args, **kw, max_cache_age_s=7200) == first
    again = profile_layer(*args, **kw, max_cache_age_s=60)
    assert again.measured_at == later                            # measured anew


def test_profiled_tensor_parallel_layer_pays_its_collectives():
    from planner.candidates import bytes_per_token, profiled_layer_cost
    from planner.costmodel import Candidate, CostParams, tp_comm_seconds

    job = _job(2)
    runs = [LayerMeasurement(seq_len=s, batch=1, saved_bytes={"input": s, "attention_output": s,
                                                              "token_local": s},
                             num_saved_tensors=1, forward_s=1e-5 * s, backward_s=2e-5 * s,
                             token_local_forward_s=5e-6 * s, attention_forward_s=5e-6 * s,
                             transient_upper_bound_bytes=0) for s in (32, 64)]
    profile = fit_profile(runs, key="k", device="cpu", dtype="fp32")
    request = job.plan_request()
    costs = {}
    for tp in (1, 2):
        cand = Candidate(dp=2 // tp, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1,
                         zero_stage=0, tp=tp)
        costs[tp] = profiled_layer_cost(request, cand, bytes_per_token(request, cand, None), profile)
    params, hw, tokens = CostParams(), request.hardware, 64
    comm_f = tp_comm_seconds(SHAPE, "fp32", hw, tokens, 2, params, "forward")
    comm_b = tp_comm_seconds(SHAPE, "fp32", hw, tokens, 2, params, "backward")
    assert comm_f > 0 and comm_b > 0
    assert costs[2].forward_s == pytest.approx(costs[1].forward_s / 2 + comm_f)
    assert costs[2].backward_s == pytest.approx(costs[1].backward_s / 2 + comm_b)
    assert costs[2].recompute_s == pytest.approx(costs[1].recompute_s / 2 + comm_f)


def _run(seq: int, forward_s: float, head_s: float = 0.0) -> LayerMeasurement:
    return LayerMeasurement(seq_len=seq, batch=1, saved_bytes={"input": seq}, num_saved_tensors=1,
                            forward_s=forward_s, backward_s=2 * forward_s,
                            token_local_forward_s=forward_s / 2, attention_forward_s=forward_s / 4,
                            transient_upper_bound_bytes=0, head_forward_s=head_s,
                            head_backward_s=2 * head_s)


def test_rounds_pool_every_piece_to_its_median_over_rounds():
    from planner.profiler import pool_rounds

    rounds = [([_run(32, f), _run(64, 2 * f, head_s=h)], opt, fault, tile)
              for f, h, opt, fault, tile in ((1.0, 5.0, 1e-9, 4e-10, 1e-3),
                                             (3.0, 1.0, 9e-9, 9e-10, 3e-3),   # a slow moment
                                             (2.0, 2.0, 2e-9, 5e-10, 2e-3))]
    runs, opt, fault, tile = pool_rounds(rounds)
    assert [r.forward_s for r in runs] == [2.0, 4.0] and [r.backward_s for r in runs] == [4.0, 8.0]
    assert runs[1].head_forward_s == 2.0 and runs[1].head_backward_s == 4.0
    assert runs[0].token_local_forward_s == 1.0 and runs[0].attention_forward_s == 0.5
    assert runs[0].saved_bytes == {"input": 32}      # bytes do not depend on the moment
    assert (opt, fault, tile) == (2e-9, 5e-10, 2e-3)
    assert pool_rounds(rounds[:1]) == rounds[0]


@needs_fork
def test_twins_time_in_rounds_by_default_and_the_rounds_are_in_the_cache_key(tmp_path):
    from planner.profiler import TWIN_ROUNDS

    model, args = _layer()
    one = profile_layer(*args, threads=1, concurrent=2, cache_dir=tmp_path, repeats=1, rounds=1)
    default = profile_layer(*args, threads=1, concurrent=2, cache_dir=tmp_path, repeats=1)
    assert TWIN_ROUNDS > 1 and one.key != default.key
    assert profile_layer(*args, threads=1, concurrent=2, cache_dir=tmp_path, repeats=1,
                         rounds=TWIN_ROUNDS).key == default.key
    assert all(m.forward_s > 0 for m in default.measurements)
