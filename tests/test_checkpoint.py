"""DCP checkpoints: what is on disk, loading into one process, atomicity, refusal, resume.

The multi-rank cases run the real trainer on spawned gloo ranks: a dp2 ZeRO-3 run (chunks cut
parameters mid-row, some chunks on CPU) and a pp2 run (each stage writes its own layers). The
checkpoint they write must load into this process, without a process group, as the full named
parameters and AdamW moments the ranks hold; a resumed run must reproduce the losses bit for bit.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import disttrain.checkpoint as checkpoint
from conftest import TINY_JOB, merge
from disttrain.checkpoint import (flat_range_blocks, latest_checkpoint, load_full_model_state,
                                  load_full_optimizer_state)
from disttrain.model import build_model
from disttrain.parallel.spawn import spawn_ranks
from disttrain.planning import fixed_plan
from disttrain.spec import SpecError, job_from_dict
from disttrain.trainer import Trainer
from planner.plan import ModelStatePlan, Plan


def _trainer(tmp_path, name="run", **changes) -> Trainer:
    return Trainer(job_from_dict(merge(TINY_JOB, {"output_dir": str(tmp_path / name), **changes})))


def test_flat_range_blocks_tile_the_range_in_order():
    rng = random.Random(0)
    for _ in range(2000):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        numel = math.prod(shape)
        start = rng.randint(0, numel)
        stop = rng.randint(start, numel)
        blocks = flat_range_blocks(shape, start, stop)
        index = torch.arange(numel).view(shape)
        covered = [index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].flatten()
                   for offsets, sizes in blocks]
        got = torch.cat(covered) if covered else torch.arange(0)
        assert torch.equal(got, torch.arange(start, stop))
        assert len(blocks) <= 2 * len(shape) - 1  # head, body, tail per level


def test_single_process_checkpoint_holds_named_parameters_and_moments(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.run(max_steps=3)
    step_dir = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert step_dir.name == "step_0000003" and checkpoint.checkpoint_step(step_dir) == 3
    assert sorted(p.name for p in step_dir.iterdir()) == [".metadata", "__0_0.distcp", "meta.json"]
    params = load_full_model_state(step_dir)
    assert params.keys() == dict(trainer.model.named_parameters()).keys()
    moments = load_full_optimizer_state(step_dir)
    optimizer = trainer.runtime.states.optimizer
    for name, param in trainer.model.named_parameters():
        assert torch.equal(params[name], param.detach()), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name][moment], optimizer.state[param][moment]), name


def test_resume_refuses_another_model_shape_and_reshards_another_layout(tmp_path):
    _trainer(tmp_path).run(max_steps=3)
    with pytest.raises(SpecError, match="model shape") as raised:
        _trainer(tmp_path, model={"preset": "tiny", "num_layers": 3}).run(resume=True)
    assert "\n" not in str(raised.value)
    # torch AdamW states -> ZeRO-1 states: resharded from the full-shaped keys; the continued
    # losses equal an uninterrupted ZeRO-1 run's
    full = _trainer(tmp_path, "zero1", parallel={"zero_stage": 1}).run().losses
    resumed = _trainer(tmp_path, parallel={"zero_stage": 1}).run(resume=True).losses
    assert resumed == pytest.approx(full[3:], rel=1e-5)
    old = tmp_path / "run" / "checkpoints" / "step_0000004"  # per-rank torch.save files
    old.mkdir()
    (old / "rank0.pt").write_bytes(b"")
    (old.parent / "latest").write_text(old.name)
    with pytest.raises(SpecError, match="not a complete checkpoint"):
        _trainer(tmp_path).run(resume=True)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """Every rank's data written, DCP's index not yet: the previous checkpoint stays latest."""
    trainer = _trainer(tmp_path)
    trainer.run(max_steps=3)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = latest_checkpoint(ckpt_dir)

    class DyingWriter(checkpoint.FileSystemWriter):
        def finish(self, metadata, results):
            raise OSError("disk vanished")

    monkeypatch.setattr(checkpoint, "FileSystemWriter", DyingWriter)
    with pytest.raises(OSError, match="disk vanished"):  # DCP's wrapper is unwrapped
        trainer.save(6)
    monkeypatch.undo()
    assert latest_checkpoint(ckpt_dir) == before
    assert (ckpt_dir / "step_0000006.partial" / "__0_0.distcp").exists()
    resumed = _trainer(tmp_path)
    assert resumed.run(resume=True, max_steps=1).first_step == 4
    for step in (4, 5, 6):
        resumed.save(step)
    names = ["latest", "step_0000004", "step_0000005", "step_0000006"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == names  # pruned, debris removed
    (ckpt_dir / "step_0000006").rename(ckpt_dir / "gone")  # `latest` now dangles
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "step_0000005"


def _spec(tmp_path, name: str, **parallel) -> dict:
    return merge(TINY_JOB, {
        "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 1,
                  "checkpoint_every": 2},
        "cluster": {"devices_per_node": 2}, "parallel": parallel,
        "launch": {"launcher": "torchrun"}, "output_dir": str(tmp_path / name)})


def _rank_run(rank, world, spec: dict, plan: dict) -> dict:
    """The full run, then the same run stopped after step 3 and resumed from step 2."""
    full = Trainer(job_from_dict(spec), Plan.from_dict(plan))
    losses = full.run().losses
    states = full.runtime.states
    shards = {key: (v.shape, v.start, v.local.clone()) for key, v in states.state_dict().items()
              if key.startswith("optim.") and key != "optim.step"}
    split_spec = {**spec, "output_dir": spec["output_dir"] + "-split"}
    first = Trainer(job_from_dict(split_spec), Plan.from_dict(plan)).run(max_steps=3).losses
    resumed = Trainer(job_from_dict(split_spec), Plan.from_dict(plan)).run(resume=True)
    return {"losses": losses, "params": states.full_state_dict(), "moment_shards": shards,
            "first": first, "resumed": resumed.losses, "resumed_from": resumed.first_step}


def _assemble(shards_of_ranks: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Full moments from every rank's FlatShards (each element written exactly once)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for shards in shards_of_ranks:
        for key, (shape, start, local) in shards.items():
            name, _, moment = key.removeprefix("optim.").rpartition(".")
            full = out.setdefault(name, {}).setdefault(moment, torch.full(shape, math.nan))
            full.view(-1)[start:start + local.numel()] = local
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp2_zero3", "pp2"])
def test_multi_rank_checkpoint_loads_into_one_process_and_resumes(tmp_path, name):
    if name == "dp2_zero3":
        spec = _spec(tmp_path, name, dp=2, sp=1, pp=1, zero_stage=3)
        base = fixed_plan(job_from_dict(spec), 2)  # chunks of 40k elements cut rows in two
        plan = Plan.from_dict({**base.to_dict(), "model_states": ModelStatePlan(
            chunk_size_bytes=4 * 40_000, cpu_chunks=(1,)).__dict__})
    else:
        spec = _spec(tmp_path, name, dp=1, sp=1, pp=2, zero_stage=1)
        plan = fixed_plan(job_from_dict(spec), 2)
    results = spawn_ranks(_rank_run, 2, spec, plan.to_dict())
    step_dir = tmp_path / name / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
    loaded = load_full_model_state(step_dir)
    expected = {**results[0]["params"], **results[1]["params"]}  # pp: each stage its layers
    if name == "dp2_zero3":
        assert all(torch.equal(results[0]["params"][k], v) for k, v in results[1]["params"].items())
    model = build_model(job_from_dict(spec).shape, seed=0)
    assert loaded.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for key, value in expected.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value), key
    moments = _assemble([r["moment_shards"] for r in results])
    loaded_moments = load_full_optimizer_state(step_dir)
    assert loaded_moments.keys() == moments.keys()
    for key, pair in moments.items():
        for moment, value in pair.items():
            assert torch.equal(loaded_moments[key][moment], value), (key, moment)
    for result in results:  # the split run: steps 1-3, then steps 3-4 resumed from step 2
        assert result["losses"] == results[0]["losses"]
        assert result["first"] == result["losses"][:3]
        assert result["resumed_from"] == 3 and result["resumed"] == result["losses"][2:]
