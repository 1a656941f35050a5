"""Atomic, sharded checkpoints: one file per rank under `checkpoints/step_NNNNNNN/`.

Each rank writes its own state (model states, optimizer, RNG) to a temporary name, fsyncs and
renames it; once every rank has, rank 0 replaces the `latest` pointer the same way. A crash at
any moment leaves the previous checkpoint loadable. Loading uses `torch.load(weights_only=True)`.
The schedule and the data order are pure functions of the step, so the step is all that is
stored of them.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

LATEST = "latest"
KEEP_LAST = 3


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(ckpt_dir: Path, *, step: int, state: dict, meta: dict, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write this rank's `state` for checkpoint `step` (optimizer steps done); every rank of
    the job calls this, `barrier` synchronises them."""
    step_dir = ckpt_dir / f"step_{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "state": state, "meta": meta,
               "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    path = step_dir / f"rank{rank}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    barrier()
    if rank == 0:
        _fsync_dir(step_dir)
        atomic_write_bytes(ckpt_dir / LATEST, step_dir.name.encode())
        for old in sorted(ckpt_dir.glob("step_*"))[:-KEEP_LAST]:
            shutil.rmtree(old)
    barrier()
    return step_dir


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The directory `latest` points at, or None when no complete checkpoint exists."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(step_dir: Path, *, rank: int = 0) -> dict:
    """This rank's payload ({'step', 'state', 'meta'}); restores the RNG state in place."""
    path = step_dir / f"rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {step_dir} has no shard for rank {rank}; it was "
                                f"written by a job with another number of ranks")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(payload["rng"]["torch"])
    py_state = payload["rng"]["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return payload
