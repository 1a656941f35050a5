"""Run a function on N local ranks (tests and benchmarks): one helper, a free port each time.

`fn(rank, world_size, *args)` must be importable (module level); each rank's return value is
pickled back to the caller. A rank that raises makes `spawn_ranks` raise with its traceback.
Ranks are gloo/CPU by default; `device_kind="cuda"` gives rank r `cuda:r` (set before the
process group) and nccl, through `disttrain.device` (GPU tests only).

Ranks are started with multiprocessing's "spawn" (a fresh interpreter each: torch and the
caller's modules imported again, 2-4 s per call on 2 cores) unless `use_forkserver(modules)`
was called: then a fork server that imported `modules` once forks every rank (the test suite
does this). The server only imports, it never runs torch ops or starts threads, so its forks
are as clean as spawned interpreters (no OpenMP pool, no CUDA context, no process group).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from disttrain.device import Device, cuda_device_count


_START_METHOD = "spawn"


def use_forkserver(preload: list[str]) -> None:
    """Start later ranks from a fork server that has imported `preload` (module names)."""
    global _START_METHOD
    mp.set_forkserver_preload(list(preload))
    _START_METHOD = "forkserver"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, threads: int,
            device_kind: str, env: dict, fn: Callable, args: tuple) -> None:
    os.environ.clear()  # the caller's environment now, as a spawned rank would inherit it
    os.environ.update(env)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    device = Device(device_kind, rank if device_kind == "cuda" else 0)
    device.set_current()
    dist.init_process_group(device.backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # reported to the parent, which raises
        result = ("error", traceback.format_exc())
    torch.save(result, path)
    try:
        if result[0] == "ok":
            dist.barrier()
    finally:
        dist.destroy_process_group()
    if result[0] == "ok":
        # The result is on disk and every rank got this far: leave without the interpreter's
        # teardown, where a library's still-joinable C++ thread (seen with DeepSpeed ZeRO-3
        # offload) can abort the process ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def spawn_ranks(fn: Callable, world_size: int, *args: Any, threads: int = 1,
                device_kind: str = "cpu", fresh: bool = False) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks (gloo on CPU, or nccl
    with rank r on `cuda:r` for `device_kind="cuda"`); return their results. `fresh=True`
    always starts new interpreters (what a rank does at interpreter start-up, such as glibc
    reading MALLOC_* variables, then sees the caller's environment)."""
    if device_kind == "cuda" and cuda_device_count() < world_size:
        raise RuntimeError(f"spawn_ranks: {world_size} CUDA ranks need {world_size} GPUs, "
                           f"{cuda_device_count()} visible")
    with tempfile.TemporaryDirectory() as out_dir:
        crash = None
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), out_dir, threads,
                                              device_kind, dict(os.environ), fn, args),
                               nprocs=world_size, join=True,
                               start_method="spawn" if fresh else _START_METHOD)
        except ProcessException as exc:  # a rank died; report what every rank said
            crash = exc
        results = [torch.load(p, weights_only=False) if p.exists() else ("error", "no result")
                   for p in (Path(out_dir) / f"rank{r}.pt" for r in range(world_size))]
    errors = [f"rank {r}:\n{payload}" for r, (status, payload) in enumerate(results)
              if status == "error"]
    if errors or crash is not None:
        raise RuntimeError("spawned rank failed\n" + "\n".join(errors) + f"\n{crash or ''}")
    return [payload for _, payload in results]
