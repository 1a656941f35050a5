"""Per-step metrics: one JSON object per optimizer step in `metrics.jsonl`, flushed each line."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

REQUIRED_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_bytes")


def peak_rss_bytes() -> int:
    """High-water mark of this process's own resident memory: VmHWM of /proc/self/status.

    Not `ru_maxrss` where /proc exists: Linux carries that across exec, so a spawned rank or
    a benchmark's child process would report its parent's high-water mark when larger.
    Without /proc (not Linux), `ru_maxrss` it is (KiB on Linux, bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class MetricsWriter:
    def __init__(self, path: Path, *, start_step: int):
        """Open `path` for appending after `start_step` (0 for a new run): lines of later steps,
        left by an interrupted run, are dropped since those steps are redone."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        assert not missing, f"metrics record lacks {missing}"
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
