"""Entry point of each `torchrun` rank: `torchrun --nproc-per-node N -m launch.torchrun job.yaml`.

Rank 0 resolves the plan (loads `--plan`, or runs the planner) and broadcasts it, so every
rank executes the same plan; then each rank trains its part. The launch decides the launcher
and world size (the spec's `launch.launcher` and a preset's device count do not), and the job
decides the device (`disttrain.device`): gloo on CPU, nccl on GPUs.
User errors exit 2 on every rank with one line (printed by rank 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from disttrain.device import Device, job_device
from disttrain.planning import resolve_plan
from disttrain.spec import Job, LaunchContext, SpecError, load_job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.torchrun")
    parser.add_argument("spec")
    parser.add_argument("--plan", help="plan.json to execute (default: run the planner)")
    parser.add_argument("--no-planner", action="store_true",
                        help="keep every activation; resolve `auto` trivially (dp = world)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=None)
    return parser.parse_args(argv)


def launch_context() -> LaunchContext:
    """The launch as torchrun describes it: world size and processes per node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return LaunchContext("torchrun", nodes=max(1, world // per_node), devices_per_node=per_node)


def run(args: argparse.Namespace, job: Job, device: Device) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    payload: list = [None]
    if rank == 0:
        try:
            payload[0] = ("ok", resolve_plan(job, world, args.plan,
                                             use_planner=not args.no_planner))
        except SpecError as exc:
            payload[0] = ("error", str(exc))
    dist.broadcast_object_list(payload, src=0, device=device.torch_device)
    status, value = payload[0]
    if status == "error":
        if rank == 0:
            print(f"error: {value}", file=sys.stderr)
        return 2
    from disttrain.trainer import Trainer

    try:
        result = Trainer(job, value, device=device).run(resume=args.resume,
                                                        max_steps=args.max_steps)
    except SpecError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0 and result.losses:
        print(f"first loss {result.losses[0]:.4f} (step {result.first_step}), last loss "
              f"{result.losses[-1]:.4f} (step {result.first_step + len(result.losses) - 1})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Validate the job and pick this rank's device before the process group exists: a GPU
    job on a machine without the GPUs exits 2 on every rank (rank 0 says why) without
    starting anything; nccl exactly when the device is CUDA, gloo on the CPU."""
    args = parse_args(argv)
    try:
        job = load_job(args.spec, launch=launch_context())
        device = job_device(job.hardware)
    except SpecError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    device.set_current()
    dist.init_process_group(device.backend, timeout=timedelta(seconds=int(
        os.environ.get("DISTTRAIN_TIMEOUT_S", "600"))))
    try:
        return run(args, job, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
