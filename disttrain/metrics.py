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


TENSORBOARD_SCALARS = {"loss": "train/loss", "valid_loss": "valid/loss", "lr": "train/lr",
                       "grad_norm": "train/grad_norm", "tokens_per_s": "perf/tokens_per_s",
                       "mfu": "perf/mfu", "step_time_s": "perf/step_time_s",
                       "peak_bytes": "memory/peak_bytes"}
"""Record key -> TensorBoard tag of the scalars `TensorBoardWriter` writes."""


class TensorBoardWriter:
    """The same records as metrics.jsonl, as TensorBoard scalars (`train.log_to: tensorboard`).

    Per-layer activation bytes (the activation runtime's `bytes_kept` and swapped bytes) go
    to `activations/layer<i>/<name>`."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, tag in TENSORBOARD_SCALARS.items():
            if isinstance(record.get(key), (int, float)):
                self._writer.add_scalar(tag, float(record[key]), step)
        for stats in (record.get("activations") or {}).get("layers", []):
            layer = stats["layer"]
            for name in ("bytes_kept", "bytes_swapped_cpu", "bytes_swapped_nvme",
                         "peak_resident_bytes"):
                if isinstance(stats.get(name), (int, float)):
                    self._writer.add_scalar(f"activations/layer{layer}/{name}",
                                            float(stats[name]), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
