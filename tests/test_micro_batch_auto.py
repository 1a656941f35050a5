"""`train.micro_batch_size: auto` at run time: a job runs the plan's micro-batch size, exactly as
if the spec had said it (data, gradient accumulation, loss scaling, packed documents, resume
record), and a plan that disagrees with a size the spec fixes is refused."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import ROOT, TINY_JOB, merge
from disttrain.checkpoint import latest_checkpoint, read_checkpoint_meta
from disttrain.planning import check_plan, fixed_plan, resolve_plan
from disttrain.spec import SpecError, job_from_dict
from disttrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = {"steps": 2, "checkpoint_every": 0, "warmup_steps": 0}


def _job(tmp_path, name, size, **changes):
    spec = merge(TINY_JOB, {"output_dir": str(tmp_path / name),
                            "train": {"micro_batch_size": size, **STEPS}})
    return job_from_dict(merge(spec, changes))


def test_auto_trains_as_the_size_the_planner_chose(tmp_path):
    auto = _job(tmp_path, "auto", "auto")
    plan = resolve_plan(auto, 1)
    assert plan.micro_batch_size in (1, 2, 4)     # divisors of the per-rank batch 4
    assert any("chosen by the planner" in note for note in plan.notes)
    fixed = _job(tmp_path, "fixed", plan.micro_batch_size)
    fixed_plan_ = resolve_plan(fixed, 1)
    assert fixed_plan_.parallel == plan.parallel
    assert fixed_plan_.micro_batch_size == plan.micro_batch_size
    assert Trainer(auto, plan).run().losses == Trainer(fixed, fixed_plan_).run().losses


@pytest.mark.parametrize("data", [{"kind": "text"}, {"kind": "documents"}])
def test_a_plan_of_two_sequences_per_microbatch_runs_as_the_spec_saying_two(tmp_path, data):
    """The planner on this CPU picks 1 (the tie-break), the fallback of auto elsewhere; a plan
    of 2 sequences checks that no consumer reads the spec instead of the plan."""
    if data["kind"] == "documents":
        data = dict(data, path=str(ROOT / "examples" / "data" / "corpus.jsonl"),
                    cache_dir=str(tmp_path / "cache"))
    fixed = _job(tmp_path, "fixed", 2, data=data)
    plan = fixed_plan(fixed, 1)
    assert plan.micro_batch_size == 2 and plan.parallel.num_microbatches == 2
    auto = _job(tmp_path, "auto", "auto", data=data)
    assert fixed_plan(auto, 1).micro_batch_size == 1           # --no-planner under auto
    trainer = Trainer(auto, check_plan(auto, plan, 1))
    assert trainer.runtime.accum_steps == 2
    losses = trainer.run().losses
    assert losses == Trainer(fixed, plan).run().losses
    last = latest_checkpoint(tmp_path / "auto" / "checkpoints")
    assert read_checkpoint_meta(last)["meta"]["micro_batch_size"] == 2


def test_plan_batch_sizes_must_match_the_spec(tmp_path):
    fixed = _job(tmp_path, "fixed", 2)
    plan = fixed_plan(fixed, 1)
    with pytest.raises(SpecError, match="spec fixes train.micro_batch_size = 4"):
        check_plan(_job(tmp_path, "four", 4), plan, 1)
    with pytest.raises(SpecError, match="planned for global_batch_size 4, the spec trains 8"):
        check_plan(_job(tmp_path, "big", "auto", train={"global_batch_size": 8}), plan, 1)
    with pytest.raises(SpecError, match="not a multiple of micro_batch_size x dp"):
        check_plan(_job(tmp_path, "auto", "auto"),
                   dataclasses.replace(plan, micro_batch_size=3), 1)
    assert check_plan(_job(tmp_path, "auto", "auto"), plan, 1) is plan
