"""Shared fixtures: small job specs written to a temp dir, the CLI run as a subprocess."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Any Ray a test starts (or imports) binds loopback only: Ray reads this when it is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

TINY_JOB = {
    "name": "t",
    "model": {"preset": "tiny"},
    "train": {"seq_len": 64, "micro_batch_size": 2, "global_batch_size": 4, "steps": 6,
              "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "checkpoint_every": 3,
              "log_every": 1, "seed": 1},
    "data": {"kind": "text"},
    "cluster": {"preset": "cpu-local"},
    "launch": {"launcher": "local"},
}


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where torch sees no CUDA device (never faked)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(changes) -> path of a tiny job spec with `changes` merged in."""
    counter = iter(range(1000))

    def write(changes: dict | None = None, *, raw: dict | None = None) -> Path:
        spec = raw if raw is not None else merge(TINY_JOB, changes or {})
        if raw is None:
            spec.setdefault("output_dir", str(tmp_path / f"run{next(counter)}"))
        path = tmp_path / f"job{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "disttrain.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)
