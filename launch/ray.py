"""Ray launcher: `disttrain train job.yaml --launcher ray [--address ADDR]` (Ray Train).

The driver resolves the plan (as rank 0 does under torchrun), starts an embedded local Ray
bound to 127.0.0.1 or joins `--address` / `launch.ray_address`, and runs one Ray Train
`TorchTrainer` worker per rank of the plan (1 CPU each, or 1 GPU when the plan is for GPUs:
a cluster with too few GPUs is refused, never run on CPUs instead; gloo on CPU, nccl on GPU).
Each worker runs the ordinary `Trainer` (`launch.ray_worker`): per-rank metrics files and
sharded atomic checkpoints land in `output_dir`, and every checkpoint is also reported to Ray
Train, so when a worker dies Ray Train restarts the worker group from the last
committed checkpoint (`FailureConfig(max_failures=MAX_FAILURES)`). Rank 0's log lines reach the
driver through Ray's log forwarding; metrics are reported every `train.log_every` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from disttrain.checkpoint import latest_checkpoint
from disttrain.planning import resolve_plan
from disttrain.spec import Job, SpecError

if TYPE_CHECKING:  # imported only when Ray is used: the ray package reads env vars on import
    import ray.train

    from planner.profiler import LayerProfile

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Set to "0" before an embedded Ray starts: node IP 127.0.0.1, every listener on loopback."""
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's controller poll; every `ray.train.report` waits about one poll (default 2 s)."""
HEALTH_CHECK_DEFAULT_S = "0.25"
MAX_FAILURES = 2
"""Worker-group restarts Ray Train attempts before the run fails."""
NUM_TO_KEEP = 2
"""Checkpoints Ray Train keeps in its storage (the trainer keeps its own in output_dir)."""
STORAGE_SUBDIR = "ray"
"""Ray Train's storage (run state, committed checkpoints) under output_dir; on a multi-node
cluster output_dir must be on a filesystem every node sees."""


def _import_ray():
    try:
        import ray
        import ray.train  # noqa: F401  (needs ray[train], not plain ray)
    except ImportError as exc:
        raise SpecError(f"--launcher ray: Ray Train is not installed ({exc}); install it with "
                        f"pip install -c constraints.txt '.[ray]'") from None
    return ray


def run_name(job: Job) -> str:
    """A fresh Ray Train run name: reusing one would make Ray Train resume that old run."""
    return f"{job.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` address that refuses connections is a user error; `ray.init` would
    retry for minutes. Other forms (`auto`, `ray://…`) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SpecError(f"--address: no Ray cluster answers at {address} ({exc})") from None


@contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Connect to the cluster at `address`, or start an embedded single-node Ray on loopback
    with at least `num_cpus` CPUs (oversubscribing like torchrun); disconnect (and stop the
    embedded Ray) on exit, whatever happened."""
    if address is None:
        os.environ[LOOPBACK_ENV] = "0"  # read when ray is imported: set it first
    ray = _import_ray()
    from ray._private import ray_constants

    if address is None and ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(f"ray was imported before {LOOPBACK_ENV}=0 was set: the embedded "
                           f"Ray would listen on the machine's external address")
    if ray.is_initialized():
        raise SpecError("--launcher ray: Ray is already initialised in this process")
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:
            raise SpecError(f"--address: cannot join the Ray cluster at {address}: "
                            f"{str(exc).splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _use_gpu(job: Job) -> bool:
    """GPU workers exactly when the plan is for GPUs: a cluster with too few is refused
    (`check_ray_resources`), never run on CPU workers instead."""
    from disttrain.device import wants_gpu

    return wants_gpu(job.hardware)


def check_ray_resources(job: Job, num_workers: int, address: str | None) -> None:
    """Refuse a plan the Ray cluster cannot run: 1 GPU (or CPU) per worker. For an embedded Ray
    (no address) the GPUs are this machine's, so it is checked before Ray starts; a joined
    cluster is checked from its resources once connected (`fit`)."""
    from disttrain.device import require_local_gpus

    if address is None:
        require_local_gpus(job.hardware, num_workers, where="--launcher ray")


def fit(job: Job, plan_dict: dict, *, num_workers: int, max_steps: int | None,
        name: str | None = None, max_failures: int = MAX_FAILURES) -> ray.train.Result:
    """Run the job on `num_workers` Ray Train workers of the connected cluster; returns Ray
    Train's `Result` (its `checkpoint` is the last committed one)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.ray_worker import WorkerConfig, checkpoint_step, train_worker

    use_gpu = _use_gpu(job)
    kind = "GPU" if use_gpu else "CPU"
    have = ray.cluster_resources().get(kind, 0)
    if have < num_workers:
        raise SpecError(f"--launcher ray: the plan needs {num_workers} workers with 1 {kind} "
                        f"each ({job.hardware.device_name}), the Ray cluster has {have:g} {kind}s")
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_DEFAULT_S)  # propagated to controller
    initial = latest_checkpoint(job.output_dir / "checkpoints")
    config = WorkerConfig(job=job, plan=plan_dict, use_gpu=use_gpu,
                          stop_step=None if max_steps is None else
                          (checkpoint_step(initial) if initial else 0) + max_steps)
    trainer = TorchTrainer(
        train_worker, train_loop_config={"launch": config},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={kind: 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name or run_name(job), storage_path=str(job.output_dir / STORAGE_SUBDIR),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=NUM_TO_KEEP)))
    return trainer.fit()


def _profile_task(job: Job) -> dict:
    from disttrain.profiling import profile_job_layer

    return profile_job_layer(job).to_dict()


def profile_on_ray(job: Job, address: str | None = None) -> LayerProfile:
    """Profile one layer of the job's model in a Ray task with the resources a training
    worker gets (1 GPU, or 1 CPU), i.e. on a node that will train; returns the
    `planner.profiler.LayerProfile` (`disttrain plan --profile` takes the same, saved).
    `disttrain.profiling` measures on the CPU today, also on a GPU worker."""
    from planner.profiler import LayerProfile

    check_ray_resources(job, 1, address)
    with ray_session(address, num_cpus=max(os.cpu_count() or 1, 1)):
        import ray

        use_gpu = _use_gpu(job)
        if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise SpecError(f"--launcher ray: the plan is for GPUs ({job.hardware.device_name}), "
                            f"the Ray cluster has none to profile on")
        task = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0,
                          max_retries=0)(_profile_task)
        data = ray.get(task.remote(_absolute(job)))
    return LayerProfile.from_dict(data)


def _absolute(job: Job) -> Job:
    """Workers may run in another directory: make the job's paths absolute first."""
    job.output_dir = job.output_dir.resolve()
    if job.data_path is not None:
        job.data_path = job.data_path.resolve()
    return job


def _check_output_dir(job: Job, resume: bool) -> None:
    """The trainer's own checks, made once on the driver before any Ray starts (a worker
    would see checkpoints that earlier attempts of this very launch wrote)."""
    latest = latest_checkpoint(job.output_dir / "checkpoints")
    if not resume and latest is not None:
        raise SpecError(f"output_dir: {job.output_dir} already holds a run (checkpoint "
                        f"{latest.name}); pass --resume to continue it or choose another "
                        f"output_dir")
    if resume and latest is None:
        raise SpecError(f"--resume: no checkpoint under {job.output_dir / 'checkpoints'}")


def _spec_error_in(exc: BaseException) -> SpecError | None:
    """A user error raised by a worker (e.g. resuming a checkpoint of another layout), found
    among Ray Train's per-worker failures and their causes."""
    todo = list(getattr(exc, "worker_failures", {}).values())
    while todo:
        error = todo.pop()
        if isinstance(error, SpecError):
            return error
        todo += [e for e in (error.__cause__, getattr(error, "cause", None))
                 if isinstance(e, BaseException)]
    return None


def run_ray(job: Job, args: argparse.Namespace) -> int:
    """`disttrain train --launcher ray`: exit 0 on success, 1 when training failed after Ray
    Train's retries; user errors raise SpecError (exit 2)."""
    world = args.nproc or job.hardware.world_size
    address = args.address or job.spec.launch.ray_address
    check_ray_resources(job, world, address)  # before planning or starting Ray
    plan = resolve_plan(job, world, args.plan, use_planner=not args.no_planner)
    if plan.parallel.world_size != world:
        raise SpecError(f"parallel: the plan runs dp*sp*pp*tp = {plan.parallel.world_size} ranks "
                        f"but {world} were asked for (--nproc or the cluster's devices)")
    job = _absolute(job)
    _check_output_dir(job, args.resume)
    with ray_session(address, num_cpus=max(os.cpu_count() or 1, world)):
        from ray.train.v2.api.exceptions import TrainingFailedError

        try:
            result = fit(job, plan.to_dict(), num_workers=world, max_steps=args.max_steps)
        except TrainingFailedError as exc:
            user_error = _spec_error_in(exc)
            if user_error is not None:
                raise user_error from None
            print(f"error: training failed on Ray (after up to {MAX_FAILURES} restarts; "
                  f"worker logs above): {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            return 1
    _print_result(job, result)
    return 0


def _print_result(job: Job, result: ray.train.Result) -> None:
    """Last step and loss: from rank 0's summary.json when this machine sees it (Ray Train's
    last metrics can miss a metrics-only report made just before the workers finished)."""
    summary_path = job.output_dir / "summary.json"
    metrics = result.metrics or {}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        metrics = {"step": summary["steps"], "loss": summary["last_loss"]}
    if "loss" in metrics:
        print(f"last loss {metrics['loss']:.4f} (step {metrics['step']}); Ray Train checkpoint "
              f"{result.checkpoint.path if result.checkpoint else 'none'}; metrics in "
              f"{job.output_dir / 'metrics.jsonl'}")
