"""What each Ray Train worker runs (`launch.ray` starts them): the ordinary `Trainer`, with its
metrics and checkpoints reported to Ray Train.

Checkpoints: the ranks write one DCP checkpoint, `output_dir/checkpoints/step_NNNNNNN/`
(disttrain.checkpoint); each rank then reports a directory holding only the files it wrote
(hard-linked into a staging directory, so nothing is copied twice; rank 0's include DCP's
`.metadata` and `meta.json`), and Ray Train merges the ranks' directories into one
checkpoint directory in its storage. On a restart every worker resumes from
`ray.train.get_checkpoint()` (the last *committed* checkpoint: one reported just before a crash
may be missing, which is harmless since the trainer reads the step from the checkpoint and the
data order is a function of the step). With no Ray checkpoint yet, rank 0 picks the latest
complete checkpoint in `output_dir` (from `--resume`, or from an attempt of this launch that
died before Ray committed anything) and tells the other ranks its name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from disttrain.checkpoint import checkpoint_step, latest_checkpoint, rank_files
from disttrain.device import ray_worker_device
from disttrain.spec import Job, TrainSection
from disttrain.trainer import Trainer
from planner.plan import Plan

WORKERS_FILE = "ray_workers.jsonl"
"""One line per worker start (rank, pid, node id): which process trained which rank where."""
REPORTED_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_bytes")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    job: Job
    """The validated job, paths absolute."""
    plan: dict
    """The plan every rank executes (resolved once on the driver)."""
    use_gpu: bool = False
    """Whether the worker trains on the GPU Ray Train assigned to it (`disttrain.device`)."""
    stop_step: int | None = None
    """Stop after this step (`--max-steps` counted from where the launch began), or run to
    `train.steps`."""


def checkpoints_at(step: int, train: TrainSection) -> bool:
    """Whether the trainer writes a checkpoint after `step` (1-based), as `Trainer.run` does."""
    every = train.checkpoint_every
    return bool(every and step % every == 0) or step == train.steps


class RayReporter:
    """`Trainer` hooks that report to Ray Train. Every rank reports the same number of times
    (Ray Train's `report` is a barrier): every `log_every` steps and at every checkpoint."""

    def __init__(self, train: TrainSection, rank: int, stage_dir: Path):
        self.train, self.rank, self.stage_dir = train, rank, stage_dir
        self.last: dict = {}

    def on_step(self, record: dict) -> None:
        import ray.train

        self.last = {k: record[k] for k in REPORTED_KEYS}
        step = record["step"]
        if step % self.train.log_every == 0 and not checkpoints_at(step, self.train):
            ray.train.report(self.last)

    def on_checkpoint(self, step: int, step_dir: Path) -> None:
        import ray.train

        stage = self.stage_dir / f"rank{self.rank}" / step_dir.name
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        for path in rank_files(step_dir, self.rank):
            try:
                os.link(path, stage / path.name)
            except OSError:  # no hard links here (other filesystem): copy instead
                shutil.copy2(path, stage / path.name)
        try:
            ray.train.report({**self.last, "step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(str(stage)),
                             checkpoint_dir_name=step_dir.name)
        finally:
            shutil.rmtree(stage)


def _record_worker(output_dir: Path, rank: int, world: int) -> None:
    import ray

    output_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"rank": rank, "world_size": world, "pid": os.getpid(),
                       "node_id": ray.get_runtime_context().get_node_id(),
                       "hostname": socket.gethostname()})
    with open(output_dir / WORKERS_FILE, "a") as f:
        f.write(line + "\n")


def _latest_in_output_dir(ckpt_dir: Path, rank: int) -> Path | None:
    """Rank 0's latest complete checkpoint, by name on every rank (a rank on another node
    finds it under the same name: output_dir is on a filesystem every node sees)."""
    name: list = [None]
    if rank == 0:
        latest = latest_checkpoint(ckpt_dir)
        name[0] = latest.name if latest is not None else None
    dist.broadcast_object_list(name, src=0)
    return ckpt_dir / name[0] if name[0] is not None else None


def train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function; the process group is already initialised."""
    import ray.train

    config: WorkerConfig = loop_config["launch"]
    job = config.job
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ray_worker_device(config.use_gpu)
    device.set_current()  # Ray Train created the group; nccl binds at the first collective
    _record_worker(job.output_dir, rank, world)
    reporter = RayReporter(job.spec.train, rank, job.output_dir / ".ray_stage")
    trainer = Trainer(job, Plan.from_dict(config.plan), on_step=reporter.on_step,
                      on_checkpoint=reporter.on_checkpoint, device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        _run(trainer, config, _latest_in_output_dir(trainer.ckpt_dir, rank))
        return
    with checkpoint.as_directory() as path:
        _run(trainer, config, Path(path))


def _run(trainer: Trainer, config: WorkerConfig, resume_from: Path | None) -> None:
    start = 0 if resume_from is None or config.stop_step is None else \
        checkpoint_step(resume_from)
    max_steps = None if config.stop_step is None else max(0, config.stop_step - start)
    trainer.run(resume_from=resume_from, max_steps=max_steps)
