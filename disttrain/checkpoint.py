"""Atomic single-process checkpoints: model, optimizer, schedule position, data position, RNG.

A checkpoint is written to a temporary name, fsync'd, then renamed, and the `latest` pointer is
replaced the same way, so a crash at any moment leaves the previous checkpoint loadable.
Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

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


def save_checkpoint(ckpt_dir: Path, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write checkpoint `step` (number of optimizer steps done) and point `latest` at it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:07d}.pt"
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": step},
        "data": {"next_step": step},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "meta": meta,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atomic_write_bytes(ckpt_dir / LATEST, path.name.encode())
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-KEEP_LAST]:
        old.unlink()
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    return path if path.is_file() else None


def load_checkpoint(path: Path, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG state in place; returns the checkpoint's metadata."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    py_state = state["rng"]["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return {"step": state["step"], "meta": state["meta"]}
