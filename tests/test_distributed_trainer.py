"""The trainer on gloo ranks vs the single-process trainer: same losses and parameters.

Ranks are spawned with the shared helper (fast); one test goes through `disttrain train
--launcher torchrun` end to end, with a sharded checkpoint and a resume.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_JOB, merge, run_cli
from disttrain.parallel.spawn import spawn_ranks
from disttrain.planning import fixed_plan, resolve_plan
from disttrain.spec import job_from_dict
from disttrain.trainer import Trainer
from planner.plan import ModelStatePlan, Plan

STEPS = 3
ADAM_EPS = 1e-5
"""Adam turns a gradient that is zero up to fp32 rounding into a +-lr step when eps is 1e-8:
ring attention's blockwise softmax and a split batch round differently from one process (and
differently again on CPUs with other vector units), so a few such elements part the parameters
by ~lr. eps 1e-5 bounds that amplification to lr * 1e-9 / 1e-5 per step; a real bug still moves
the losses compared at every step and gradients that are not near zero."""


def _spec(tmp, name, world, **parallel):
    return merge(TINY_JOB, {
        "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 1,
                  "checkpoint_every": 0, "adam_eps": ADAM_EPS},
        "cluster": {"devices_per_node": world},
        "parallel": parallel,
        "launch": {"launcher": "torchrun" if world > 1 else "local"},
        "output_dir": str(tmp / name)})


def _full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    states = trainer.runtime.states
    if hasattr(states, "full_state_dict"):
        return states.full_state_dict()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _worker(rank, world, spec, plan_dict):
    job = job_from_dict(spec)
    trainer = Trainer(job, Plan.from_dict(plan_dict))
    losses = trainer.run().losses
    return losses, _full_params(trainer)


def _reference(tmp_path):
    job = job_from_dict(_spec(tmp_path, "ref", 1))
    trainer = Trainer(job, fixed_plan(job, 1))
    return trainer.run().losses, _full_params(trainer)


def _compare(result, ref):
    losses, params = result
    assert losses == pytest.approx(ref[0], rel=1e-5)
    for name, value in ref[1].items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.slow
def test_dp2_zero3_with_cpu_chunks_matches_single_process(tmp_path):
    """Layer chunks and the final norm + head (an outer chunk) on the CPU, the embedding not."""
    ref = _reference(tmp_path)
    spec = _spec(tmp_path, "dp2", 2, dp=2, sp=1, pp=1, zero_stage=3)
    job = job_from_dict(spec)
    base = fixed_plan(job, 2)
    plan = Plan.from_dict({**base.to_dict(), "model_states": ModelStatePlan(
        chunk_size_bytes=4 * 40_000, cpu_chunks=(1, 2), cpu_outer=("head",)).__dict__})
    for result in spawn_ranks(_worker, 2, spec, plan.to_dict()):
        _compare(result, ref)


@pytest.mark.slow
def test_pp2_1f1b_four_microbatches_matches_single_process(tmp_path):
    ref = _reference(tmp_path)
    spec = _spec(tmp_path, "pp2", 2, dp=1, sp=1, pp=2, zero_stage=1)
    plan = fixed_plan(job_from_dict(spec), 2)
    assert plan.parallel.num_microbatches == 4 and plan.parallel.schedule == "1f1b"
    results = spawn_ranks(_worker, 2, spec, plan.to_dict())
    assert results[0][0] == results[1][0]  # both stages report the same step loss
    merged = {**results[0][1], **results[1][1]}  # each stage holds its own layers
    _compare((results[0][0], merged), ref)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_sp2_matches_single_process(tmp_path, kind):
    ref = _reference(tmp_path)
    spec = _spec(tmp_path, kind, 2, dp=1, sp=2, pp=1, sp_kind=kind, zero_stage=2)
    for result in spawn_ranks(_worker, 2, spec, fixed_plan(job_from_dict(spec), 2).to_dict()):
        _compare(result, ref)


@pytest.mark.slow
def test_dp2_sp2_and_pp2_sp2_on_four_ranks_match_single_process(tmp_path):
    ref = _reference(tmp_path)
    for name, parallel in (("dp2sp2", dict(dp=2, sp=2, pp=1, sp_kind="ring", zero_stage=3)),
                           ("pp2sp2", dict(dp=1, sp=2, pp=2, sp_kind="ulysses",
                                           zero_stage=3))):
        spec = _spec(tmp_path, name, 4, **parallel)
        results = spawn_ranks(_worker, 4, spec, fixed_plan(job_from_dict(spec), 4).to_dict())
        if parallel["pp"] == 1:
            for result in results:
                _compare(result, ref)
        else:  # ranks (pp, sp): stage 0 holds ranks 0-1, stage 1 ranks 2-3
            merged = {**results[0][1], **results[2][1]}
            _compare((results[0][0], merged), ref)


@pytest.mark.slow
def _uninterrupted_worker(rank, world, spec):
    """What a `launch.torchrun` rank runs for `--no-planner`: the fixed plan, the trainer."""
    job = job_from_dict(spec)
    return Trainer(job, resolve_plan(job, world, use_planner=False)).run().losses


def test_torchrun_cli_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    """3 steps through `disttrain train --launcher torchrun`, then `--resume` to step 4: the
    losses equal an uninterrupted run of the same 2 ranks (one thread each, as torchrun's) bit
    for bit, and the last checkpoint is one DCP checkpoint with both ranks' files."""
    import yaml

    changes = {"train": {"steps": 4, "checkpoint_every": 2},
               "cluster": {"devices_per_node": 2},
               "parallel": {"dp": 2, "sp": 1, "pp": 1, "zero_stage": 2},
               "launch": {"launcher": "torchrun"}}
    full = spawn_ranks(_uninterrupted_worker, 2,
                       merge(TINY_JOB, {**changes, "output_dir": str(tmp_path / "full")}))
    assert full[0] == full[1] and len(full[0]) == 4
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump(merge(TINY_JOB, {**changes,
                                                     "output_dir": str(tmp_path / "split")})))
    for args in ((split, "--max-steps", "3"), (split, "--resume")):
        done = run_cli("train", *args, "--no-planner")
        assert done.returncode == 0, done.stderr[-3000:]
    read = lambda p: [json.loads(l)["loss"] for l in p.read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "split" / "metrics.jsonl") == read(tmp_path / "full" / "metrics.jsonl")
    assert read(tmp_path / "split" / "metrics.jsonl") == full[0]
    assert len(read(tmp_path / "split" / "metrics.rank1.jsonl")) == 4
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "step_0000004").iterdir()) \
        == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]  # one DCP checkpoint
