"""Training on packed documents through the trainer: the loss is the mean over the valid tokens
of the global batch on any layout (dp x sp, ranks whose tokens are all masked included), a
run resumes on another layout, pp2 trains the same, and TensorBoard gets the step metrics."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ROOT, TINY_JOB, merge
from disttrain.parallel.spawn import spawn_ranks
from disttrain.planning import fixed_plan
from disttrain.spec import job_from_dict
from disttrain.trainer import Trainer
from planner.plan import LayerActivationPlan, Plan

STEPS = 4
TOL = dict(rel=1e-5)


def _spec(tmp, name, world, **parallel):
    return merge(TINY_JOB, {
        "train": {"seq_len": 64, "steps": STEPS, "global_batch_size": 4, "micro_batch_size": 1,
                  "checkpoint_every": 2, "warmup_steps": 0, "eval_every": 2,
                  "log_to": ["jsonl", "tensorboard"]},
        # every document padded to a whole row: short ones leave ring shards all masked
        "data": {"kind": "documents", "path": str(tmp / "corpus.jsonl"),
                 "cache_dir": str(tmp / "cache"), "pad_to_multiple_of": 64,
                 "valid_fraction": 0.15},
        "cluster": {"devices_per_node": world},
        "parallel": parallel,
        "launch": {"launcher": "torchrun" if world > 1 else "local"},
        "output_dir": str(tmp / name)})


def _write_corpus(tmp) -> None:
    """The example corpus plus short documents (under 16 tokens: a ring rank's shard of
    their padded row is all padding)."""
    short = "".join(json.dumps({"text": f"Note {i}."}) + "\n" for i in range(24))
    (tmp / "corpus.jsonl").write_text(
        (ROOT / "examples" / "data" / "corpus.jsonl").read_text() + short)


def _masked_ring_shards(spec: dict) -> int:
    """(step, row) pairs of the run whose sp=2 ring shard of rank 1 has no valid target."""
    from disttrain.data.packing import IGNORE, build_document_batches
    from disttrain.parallel.sequence import sequence_positions

    batches, _ = build_document_batches(job_from_dict(spec), progress=False)
    index = sequence_positions(64, 1, 2, "ring")
    return sum(int((batches.get_packed(step, g).targets[0, index] == IGNORE).all())
               for step in range(STEPS) for g in range(4))


def _full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    states = trainer.runtime.states
    if hasattr(states, "full_state_dict"):
        return states.full_state_dict()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _run(spec: dict, plan: Plan, *, max_steps=None, resume=False):
    trainer = Trainer(job_from_dict(spec), plan)
    result = trainer.run(max_steps=max_steps, resume=resume)
    valid = [r.get("valid_loss") for r in map(json.loads, trainer.metrics_path.read_text()
                                               .splitlines())]
    return result.losses, _full_params(trainer), valid


def _worker(rank, world, spec, plan_dict, max_steps=None, resume=False):
    return _run(spec, Plan.from_dict(plan_dict), max_steps=max_steps, resume=resume)


def _swap_plan(spec: dict, world: int) -> Plan:
    """The fixed plan with every layer swapping half its tokens (per-layer activation bytes)."""
    base = fixed_plan(job_from_dict(spec), world).to_dict()
    base["activations"] = [LayerActivationPlan(swap_fraction=0.5).__dict__] * 2
    return Plan.from_dict(base)


def _assert_params(params, ref):
    for name, value in ref.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.slow
def test_documents_loss_on_layouts_resume_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_corpus(tmp_path)
    ref_spec = _spec(tmp_path, "ref", 1)
    assert _masked_ring_shards(ref_spec) > 0  # the all-masked-rank case is exercised
    ref_losses, ref_params, ref_valid = _run(ref_spec, _swap_plan(ref_spec, 1))
    assert all(loss == loss for loss in ref_losses)  # no NaN
    assert ref_valid[1] is not None and ref_valid[0] is None  # eval_every 2

    # TensorBoard holds what metrics.jsonl holds
    events = EventAccumulator(str(tmp_path / "ref" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu",
                "memory/peak_bytes", "valid/loss", "activations/layer0/bytes_kept",
                "activations/layer1/bytes_swapped_cpu"):
        assert tag in tags, tag
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(ref_losses, rel=1e-6)
    assert [e.step for e in events.Scalars("valid/loss")] == [2, 4]
    assert events.Scalars("activations/layer1/bytes_swapped_cpu")[0].value > 0

    # dp2 x sp2 ring on 4 ranks (some ring shards hold only padding): the same losses
    spec = _spec(tmp_path, "dp2sp2", 4, dp=2, sp=2, pp=1, sp_kind="ring", zero_stage=1)
    for losses, params, valid in spawn_ranks(_worker, 4, spec,
                                             fixed_plan(job_from_dict(spec), 4).to_dict()):
        assert losses == pytest.approx(ref_losses, **TOL)
        assert valid[1] == pytest.approx(ref_valid[1], **TOL)
        _assert_params(params, ref_params)

    # pp2 (1F1B over 4 microbatches; validation is not supported with a pipeline)
    spec = _spec(tmp_path, "pp2", 2, dp=1, sp=1, pp=2, zero_stage=1)
    spec["train"]["eval_every"] = 0
    for losses, _, _ in spawn_ranks(_worker, 2, spec,
                                    fixed_plan(job_from_dict(spec), 2).to_dict()):
        assert losses == pytest.approx(ref_losses, **TOL)

    # trained 2 steps on dp2 (ZeRO-2), resumed on 1 rank and on sp2 (Ulysses)
    spec = _spec(tmp_path, "dp2", 2, dp=2, sp=1, pp=1, zero_stage=2)
    first = spawn_ranks(_worker, 2, spec, fixed_plan(job_from_dict(spec), 2).to_dict(), 2)
    assert first[0][0] == pytest.approx(ref_losses[:2], **TOL)
    for name, world, parallel in (("on1", 1, {}),
                                  ("sp2", 2, dict(dp=1, sp=2, pp=1, sp_kind="ulysses",
                                                  zero_stage=3))):
        shutil.copytree(tmp_path / "dp2" / "checkpoints", tmp_path / name / "checkpoints")
        spec = _spec(tmp_path, name, world, **parallel)
        plan = fixed_plan(job_from_dict(spec), world)
        if world == 1:
            results = [_run(spec, plan, resume=True)]
        else:
            results = spawn_ranks(_worker, world, spec, plan.to_dict(), None, True)
        for losses, params, valid in results:
            assert losses == pytest.approx(ref_losses[2:], **TOL), name
            assert valid[-1] == pytest.approx(ref_valid[-1], **TOL), name  # ZeRO-3 eval
            _assert_params(params, ref_params)
