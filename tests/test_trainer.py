"""Single-process trainer: bit-identical resume, atomic checkpoints, metrics, accumulation."""

from __future__ import annotations

import json

import pytest
import torch

import disttrain.checkpoint as checkpoint
from conftest import TINY_JOB, merge, run_cli
from disttrain.metrics import REQUIRED_KEYS, read_metrics
from disttrain.optim import lr_at
from disttrain.spec import SpecError, job_from_dict
from disttrain.trainer import Trainer


def make_trainer(tmp_path, name="run", **changes):
    spec = merge(TINY_JOB, {"output_dir": str(tmp_path / name), **changes})
    return Trainer(job_from_dict(spec))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_is_bit_identical(tmp_path, dtype):
    """bf16: the checkpoint holds the fp32 masters; resuming rebuilds the bf16 copies."""
    model = {"model": {"dtype": dtype}}
    full = make_trainer(tmp_path, "full", **model)
    reference = full.run().losses
    assert len(reference) == 6

    first = make_trainer(tmp_path, "split", **model)
    part1 = first.run(max_steps=4).losses   # checkpoint at 3, then one step past it: a "crash"
    second = make_trainer(tmp_path, "split", **model)
    part2 = second.run(resume=True).losses  # resumes from step 3, redoes 4
    assert part1 == reference[:4]
    assert part2 == reference[3:], (part2, reference)
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    logged = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert logged == reference  # the redone step 4 replaced the interrupted run's line


def test_metrics_and_summary(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.run()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert set(REQUIRED_KEYS) <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 10 * 2**20 and r["grad_norm"] > 0
    tr = TINY_JOB["train"]
    expected_lr = [lr_at(s, lr=tr["lr"], min_lr=tr["min_lr"], warmup_steps=tr["warmup_steps"],
                         total_steps=tr["steps"]) for s in range(6)]
    assert [r["lr"] for r in records] == pytest.approx(expected_lr)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["last_loss"] == records[-1]["loss"]


def test_lr_schedule_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=20)
    assert [lr_at(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(12, **kw) == pytest.approx(0.55)
    assert lr_at(20, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_accumulation_matches_one_big_microbatch(tmp_path):
    accum = make_trainer(tmp_path, "a", train={"micro_batch_size": 1, "steps": 2})
    whole = make_trainer(tmp_path, "b", train={"micro_batch_size": 4, "steps": 2})
    # same sequences: build the big batch from the four microbatches of the accumulating run
    tokens, targets = zip(*(accum.batches.get(0, m) for m in range(4)))
    whole.batches.get = lambda step, micro=0, rank=0: (torch.cat(tokens), torch.cat(targets))
    grads = {}
    for name, trainer in (("a", accum), ("b", whole)):
        optimizer = trainer.runtime.states.optimizer
        real_step = optimizer.step

        def capture(name=name, trainer=trainer, real_step=real_step):
            grads[name] = [p.grad.clone() for p in trainer.model.parameters()]
            real_step()

        optimizer.step = capture
    loss_a, norm_a = accum.train_step(0)
    loss_b, norm_b = whole.train_step(0)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert norm_a == pytest.approx(norm_b, rel=1e-5)
    for a, b in zip(grads["a"], grads["b"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_trains(tmp_path):
    losses = make_trainer(tmp_path, model={"dtype": "bf16"}, train={"steps": 8}).run().losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.run(max_steps=3)                       # checkpoint step 3 written
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = checkpoint.latest_checkpoint(ckpt_dir)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)                            # half-written file, then the process dies
        raise OSError("disk vanished")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        trainer.save(6)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest_checkpoint(ckpt_dir) == before
    resumed = make_trainer(tmp_path)
    assert resumed.run(resume=True, max_steps=1).first_step == 4


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    make_trainer(tmp_path).run(max_steps=3)
    with pytest.raises(SpecError, match="already holds a run"):
        make_trainer(tmp_path).run()
    with pytest.raises(SpecError, match="--resume: no checkpoint"):
        make_trainer(tmp_path, "fresh").run(resume=True)


@pytest.mark.slow
def test_cli_train_end_to_end(write_spec):
    spec = write_spec({"train": {"steps": 4, "checkpoint_every": 2}})
    done = run_cli("train", spec)
    assert done.returncode == 0, done.stderr
    assert "first loss" in done.stdout and "last loss" in done.stdout
    again = run_cli("train", spec)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error: output_dir:") and "Traceback" not in again.stderr
