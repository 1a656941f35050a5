"""CPU chunks' optimizer step overlapped with the backward: bit-equal to the plain step.

`ZeroModelStates.begin_step` lets a CPU chunk update on the worker thread as soon as its
gradient shard is final; with `overlap_cpu_optimizer=False` (or gradient clipping) every chunk
updates in `step` instead. Both must give the same parameters to the bit (fp32): with
gradient accumulation, at ZeRO stages 1-3 over two ranks, and in a 1F1B pipeline whose
chunks get their last gradient late.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import ROOT, TINY_JOB, merge
from disttrain.data import build_batches
from disttrain.engine import build_runtime
from disttrain.model import build_model
from disttrain.parallel.chunks import pack_chunks
from disttrain.parallel.spawn import spawn_ranks
from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
from disttrain.planning import fixed_plan
from disttrain.spec import job_from_dict
from planner.plan import ModelStatePlan, Plan
from planner.shapes import MODEL_PRESETS
from lm_batches import random_batch

SHAPE = MODEL_PRESETS["tiny"].replace(num_layers=3, vocab_size=128)
LR, WD, STEPS, CHUNK = 1e-2, 0.1, 3, 30_000


def _batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(SHAPE.vocab_size, seed=1000 * step + index, seq_len=32, batch=1)


def _train(rank: int, world: int, *, stage: int, overlap: bool, grad_clip: float,
           num_micro: int, cpu_from: int = 1) -> dict:
    """STEPS steps of ZeRO on this rank (chunks from `cpu_from` on CPU), announced with
    `begin_step` as the engine does; the final master values and what the steps reported."""
    model = build_model(SHAPE, seed=0)
    num_chunks = len(pack_chunks(model, chunk_numel=CHUNK, group_size=max(world, 1)))
    group = dist.group.WORLD if world > 1 else None
    states = ZeroModelStates(model, ZeroConfig(
        stage=stage, chunk_numel=CHUNK, cpu_chunks=tuple(range(cpu_from, num_chunks)),
        weight_decay=WD, overlap_cpu_optimizer=overlap), group=group)
    norms, stats, early = [], [], []
    for step in range(STEPS):
        lr = LR / (step + 1)
        states.begin_step(lr, num_microbatches=num_micro, grad_clip=grad_clip)
        for micro in range(num_micro):
            tokens, targets = _batch(step, micro * world + rank)
            loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()) / num_micro
            loss.backward()
        early.append(states._early.started())  # some CPU chunk started before finish_backward
        states.finish_backward()
        norms.append(states.clip_grad_norm(grad_clip))
        states.step(lr)
        stats.append(states.optimizer_stats())
    masters = [c.master.clone() for c in states.chunks]
    moments = [torch.cat([c.exp_avg, c.exp_avg_sq]) for c in states.chunks]
    return {"masters": masters, "moments": moments, "norms": norms, "stats": stats,
            "early": early}


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert got["norms"] == want["norms"]
    for mine, theirs in zip(got["masters"] + got["moments"], want["masters"] + want["moments"]):
        assert torch.equal(mine, theirs)


def test_single_process_accumulation_overlapped_is_bit_equal():
    on = _train(0, 1, stage=3, overlap=True, grad_clip=0.0, num_micro=3)
    off = _train(0, 1, stage=3, overlap=False, grad_clip=0.0, num_micro=3)
    _assert_bit_equal(on, off)
    assert all(on["early"]) and not any(off["early"])
    for stats in on["stats"]:
        assert stats["overlap"] and stats["cpu_s"] > 0 and stats["device_s"] > 0
        assert 0 <= stats["cpu_overlapped_s"] <= stats["cpu_s"] + 1e-6
        assert stats["exposed_s"] == pytest.approx(stats["cpu_exposed_s"] + stats["device_s"])
    assert not any(s["overlap"] for s in off["stats"])


def test_clipping_falls_back_to_the_plain_step():
    clipped = _train(0, 1, stage=3, overlap=True, grad_clip=0.05, num_micro=2)
    off = _train(0, 1, stage=3, overlap=False, grad_clip=0.05, num_micro=2)
    _assert_bit_equal(clipped, off)
    assert not any(clipped["early"]) and not any(s["overlap"] for s in clipped["stats"])
    assert all(n > 0.05 for n in clipped["norms"])  # the clip did scale the gradients


@pytest.mark.parametrize("stage", [1, 3])  # 1: its step reduction started; 3: CPU updates
def test_more_backward_passes_than_announced_is_an_error(stage):
    model = build_model(SHAPE, seed=0)
    states = ZeroModelStates(model, ZeroConfig(stage=stage, chunk_numel=CHUNK, cpu_chunks=(1, 2)))
    states.begin_step(LR, num_microbatches=1)
    for micro in range(2):
        tokens, targets = _batch(0, micro)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        if micro == 1:
            with pytest.raises(RuntimeError, match="num_microbatches"):
                loss.backward()
        else:
            loss.backward()
    states.step(LR)  # waits for the started updates


def _dp2_worker(rank: int, world: int) -> list[tuple[dict, dict]]:
    pairs = []
    for stage, grad_clip, num_micro in ((3, 0.0, 2), (3, 0.05, 2), (2, 0.0, 2), (1, 0.0, 2)):
        kwargs = dict(stage=stage, grad_clip=grad_clip, num_micro=num_micro)
        pairs.append((_train(rank, world, overlap=True, **kwargs),
                      _train(rank, world, overlap=False, **kwargs)))
    return pairs


@pytest.mark.slow
def test_dp2_stages_1_to_3_overlapped_are_bit_equal():
    for pairs in spawn_ranks(_dp2_worker, 2):
        for index, (on, off) in enumerate(pairs):
            _assert_bit_equal(on, off)
            clipped = index == 1
            assert all(s["overlap"] for s in on["stats"]) is not clipped
            if index in (0, 2):  # stages 2-3 start CPU chunks during the backward
                assert all(on["early"])


def _pipeline_worker(rank: int, world: int, spec: dict, plan_dict: dict, overlap: bool):
    job = job_from_dict(spec)
    runtime = build_runtime(job, Plan.from_dict(plan_dict), rank=rank,
                            overlap_cpu_optimizer=overlap)
    batches = build_batches("synthetic", None, vocab_size=job.shape.vocab_size,
                            seq_len=job.spec.train.seq_len, micro_batch_size=1, seed=0)
    states, early = runtime.states, []
    finish_backward = states.finish_backward

    def finish_and_note() -> None:  # did CPU chunks start inside the 1F1B schedule?
        early.append(states._early.started())
        finish_backward()

    states.finish_backward = finish_and_note
    losses, stats = [], []
    for step in range(STEPS):
        losses.append(runtime.train_step(step, batches, LR / (step + 1)))
        stats.append(runtime.optimizer_stats())
    masters = [c.master.clone() for c in states.chunks]
    runtime.close()
    return losses, masters, stats, early


@pytest.mark.slow
def test_pp2_1f1b_four_microbatches_overlapped_is_bit_equal(tmp_path):
    """Each stage's chunks get their last gradient in the last of four 1F1B backwards."""
    spec = merge(TINY_JOB, {
        "model": {"num_layers": 4}, "data": {"kind": "synthetic"},
        "train": {"seq_len": 32, "micro_batch_size": 1, "global_batch_size": 4,
                  "steps": STEPS, "grad_clip": 0.0, "weight_decay": WD},
        "cluster": {"devices_per_node": 2}, "launch": {"launcher": "torchrun"},
        "parallel": {"dp": 1, "sp": 1, "pp": 2, "zero_stage": 3},
        "output_dir": str(tmp_path / "pp2")})
    base = fixed_plan(job_from_dict(spec), 2)
    assert base.parallel.num_microbatches == 4
    plan = Plan.from_dict({**base.to_dict(), "model_states": ModelStatePlan(
        cpu_chunks=(0, 1, 2, 3)).__dict__}).to_dict()
    on = spawn_ranks(_pipeline_worker, 2, spec, plan, True)
    off = spawn_ranks(_pipeline_worker, 2, spec, plan, False)
    for (losses, masters, stats, early), (losses_off, masters_off, _, _) in zip(on, off):
        assert losses == losses_off
        assert all(torch.equal(a, b) for a, b in zip(masters, masters_off))
        assert all(s["overlap"] and s["cpu_s"] > 0 for s in stats) and all(early)


@pytest.mark.slow
def test_benchmark_smallest_run():
    sys.path.insert(0, str(ROOT / "bench"))
    import cpu_optimizer_overlap as bench

    result = bench.measure(num_layers=1, seq_len=32, steps=2)
    assert result["same_losses"] and result["rows"]["on"]["overlap"]
    assert result["rows"]["off"]["cpu_overlapped_s"] == 0 < result["rows"]["off"]["cpu_exposed_s"]
    assert "step time on/off" in bench.report(result)
