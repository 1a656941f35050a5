"""Entry point of each `torchrun` rank: `torchrun --nproc-per-node N -m launch.torchrun job.yaml`.

Rank 0 resolves the plan (loads `--plan`, or runs the planner) and broadcasts it, so every
rank executes the same plan; then each rank trains its part. gloo on CPU, nccl on GPUs.
User errors exit 2 on every rank with one line (printed by rank 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from disttrain.planning import resolve_plan
from disttrain.spec import SpecError, load_job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.torchrun")
    parser.add_argument("spec")
    parser.add_argument("--plan", help="plan.json to execute (default: run the planner)")
    parser.add_argument("--no-planner", action="store_true",
                        help="keep every activation; resolve `auto` trivially (dp = world)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=None)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    payload: list = [None]
    if rank == 0:
        try:
            job = load_job(args.spec)
            payload[0] = ("ok", resolve_plan(job, world, args.plan,
                                             use_planner=not args.no_planner))
        except SpecError as exc:
            payload[0] = ("error", str(exc))
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        if rank == 0:
            print(f"error: {value}", file=sys.stderr)
        return 2
    from disttrain.trainer import Trainer

    job = load_job(args.spec)
    try:
        result = Trainer(job, value).run(resume=args.resume, max_steps=args.max_steps)
    except SpecError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0 and result.losses:
        print(f"first loss {result.losses[0]:.4f} (step {result.first_step}), last loss "
              f"{result.losses[-1]:.4f} (step {result.first_step + len(result.losses) - 1})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=int(
        os.environ.get("DISTTRAIN_TIMEOUT_S", "600"))))
    try:
        return run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
