"""One device interface: where a rank's tensors live, and the CPU/CUDA differences behind it.

The launcher decides the device: `LOCAL_RANK` under torchrun, the GPU Ray Train assigned to
the worker (it sets `CUDA_VISIBLE_DEVICES`), else the CPU. A job whose cluster describes GPUs
(`cluster.device` / a GPU preset, i.e. `device_name != "cpu"`) trains on CUDA or is refused
before any work (`SpecError`, exit 2): never a silent CPU run. A CPU job trains on the CPU
even where CUDA exists.

CUDA-only machinery (streams, events, pinned host memory, allocator peaks, event timing) is
small and sits here; on the CPU every helper is a no-op or its plain equivalent, so callers
never branch on the device kind themselves:

    device = job_device(job.hardware, local_rank=0)      # or Device.from_launch(...)
    device.set_current()                                  # before init_process_group
    dist.init_process_group(device.backend)               # nccl iff tensors live on CUDA
    stream = device.copy_stream()                         # None on the CPU
    with device.stream(stream):
        host.copy_(x, non_blocking=True)
    done = device.record_event(stream)                    # None on the CPU
    device.wait_event(done)                               # no-op on the CPU
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from disttrain.spec import SpecError

if TYPE_CHECKING:
    from planner.hardware import HardwareSpec

Kind = Literal["cpu", "cuda"]
_COPY_STREAMS: dict[int, "torch.cuda.Stream"] = {}


@dataclass(frozen=True)
class Device:
    """The device one rank computes on."""

    kind: Kind = "cpu"
    """'cpu' or 'cuda'."""
    index: int = 0
    """CUDA device index (as this process sees it); 0 on the CPU."""

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"device.kind: must be 'cpu' or 'cuda', got {self.kind!r}")
        if self.index < 0:
            raise ValueError(f"device.index: must be >= 0, got {self.index}")

    @classmethod
    def from_torch(cls, device: torch.device | str) -> "Device":
        device = torch.device(device)
        if device.type == "cuda":
            return cls("cuda", device.index if device.index is not None else 0)
        if device.type == "cpu":
            return cls("cpu")
        raise ValueError(f"device: only cpu and cuda are supported, got {device}")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self) -> torch.device:
        """The `torch.device` tensors of this rank are created on."""
        return torch.device("cuda", self.index) if self.is_cuda else torch.device("cpu")

    @property
    def backend(self) -> str:
        """The process-group backend for tensors on this device: nccl on CUDA, gloo on CPU."""
        return "nccl" if self.is_cuda else "gloo"

    def __str__(self) -> str:
        return str(self.torch_device)

    # -- process setup -------------------------------------------------------------------------
    def set_current(self) -> None:
        """Make this the current CUDA device (call before `init_process_group`); no-op on CPU."""
        if self.is_cuda:
            torch.cuda.set_device(self.index)

    def synchronize(self) -> None:
        """Wait for all work queued on the device (CUDA); no-op on CPU."""
        if self.is_cuda:
            torch.cuda.synchronize(self.index)

    # -- streams and events --------------------------------------------------------------------
    def copy_stream(self) -> "torch.cuda.Stream | None":
        """The dedicated stream for host<->device copies (one per device, created once); None
        on the CPU, where copies run on the copy engine's threads."""
        if not self.is_cuda:
            return None
        if self.index not in _COPY_STREAMS:
            _COPY_STREAMS[self.index] = torch.cuda.Stream(device=self.index)
        return _COPY_STREAMS[self.index]

    def stream(self, stream: "torch.cuda.Stream | None") -> contextlib.AbstractContextManager:
        """Context in which queued work goes to `stream` (None: the current stream)."""
        if stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(stream)

    def record_event(self, stream: "torch.cuda.Stream | None" = None) -> "torch.cuda.Event | None":
        """An event marking the work queued so far on `stream` (default: the current stream);
        None on the CPU."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.index))
        return event

    def wait_event(self, event: "torch.cuda.Event | None",
                   stream: "torch.cuda.Stream | None" = None) -> None:
        """Make `stream` (default: the current stream) wait for `event` without blocking the
        host; no-op for None (CPU)."""
        if event is None:
            return
        (stream if stream is not None else torch.cuda.current_stream(self.index)).wait_event(event)

    # -- host memory ---------------------------------------------------------------------------
    def pinned_empty(self, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """Host memory of `nbytes` bytes for copies to and from this device: page-locked on CUDA
        (asynchronous DMA), plain on the CPU (pinning raises without CUDA)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if nbytes % itemsize:
            raise ValueError(f"pinned_empty: {nbytes} bytes is not a multiple of {dtype}'s size")
        return torch.empty(nbytes // itemsize, dtype=dtype, pin_memory=self.is_cuda)

    # -- measurement ---------------------------------------------------------------------------
    def max_memory_allocated(self) -> int | None:
        """Peak bytes held by tensors on the device since the last reset; None on the CPU
        (the process RSS is the measure there)."""
        return int(torch.cuda.max_memory_allocated(self.index)) if self.is_cuda else None

    def max_memory_reserved(self) -> int | None:
        """Peak bytes the CUDA caching allocator reserved; None on the CPU."""
        return int(torch.cuda.max_memory_reserved(self.index)) if self.is_cuda else None

    def reset_peak_memory(self) -> None:
        """Start a new peak window (CUDA); no-op on CPU."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.index)

    def memory_record(self) -> dict[str, int]:
        """Device peaks for a metrics record: {} on the CPU, else
        {'device_max_allocated_bytes', 'device_max_reserved_bytes'}."""
        if not self.is_cuda:
            return {}
        return {"device_max_allocated_bytes": self.max_memory_allocated(),
                "device_max_reserved_bytes": self.max_memory_reserved()}

    def timer(self) -> "Timer":
        """A context manager timing the device work queued inside it (CUDA events) or the
        wall time (CPU, `perf_counter`); read `.seconds` after the block."""
        return Timer(self)


class Timer:
    """Elapsed seconds of a block: CUDA events on a GPU (device time, synchronised on read),
    `time.perf_counter` on the CPU."""

    def __init__(self, device: Device):
        self.device = device
        self._start = self._end = None
        self._t0 = self._t1 = 0.0

    def __enter__(self) -> "Timer":
        if self.device.is_cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device.index))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.is_cuda:
            self._end.record(torch.cuda.current_stream(self.device.index))
        else:
            self._t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.device.is_cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return self._t1 - self._t0


CPU = Device("cpu")


def wants_gpu(hardware: "HardwareSpec") -> bool:
    """Whether the job's cluster describes GPUs (any device but the CPU)."""
    return hardware.device_name.lower() != "cpu"  # as the planner reads it


def cuda_device_count() -> int:
    """CUDA devices this process can use (0 without a CUDA build of torch or a driver)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_local_gpus(hardware: "HardwareSpec", count: int, where: str = "cluster") -> None:
    """Refuse (SpecError) a GPU job when this machine has fewer than `count` CUDA devices; a
    CPU job passes."""
    if not wants_gpu(hardware):
        return
    have = cuda_device_count()
    if have >= count:
        return
    what = (f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None
            else "no CUDA device is visible")
    if have == 0:
        raise SpecError(f"{where}: the plan is for GPUs ({hardware.device_name}) but this machine "
                        f"has none ({what}); train on the CPU with cluster.preset: cpu-local or "
                        f"probe")
    raise SpecError(f"{where}: the plan needs {count} GPUs ({hardware.device_name}) on this "
                    f"node, this machine has {have}")


def local_rank_from_env() -> int:
    """This process's rank on its node: `LOCAL_RANK` (torchrun, Ray Train), else 0."""
    value = os.environ.get("LOCAL_RANK", "0")
    if not value.isdigit():
        raise SpecError(f"LOCAL_RANK: must be a non-negative integer, got {value!r}")
    return int(value)


def job_device(hardware: "HardwareSpec", *, local_rank: int | None = None) -> Device:
    """The device of the rank at `local_rank` (default: from the environment) for a job on
    `hardware`: the CPU for a CPU cluster; `cuda:local_rank` for a GPU cluster, refused
    (SpecError) when this machine lacks that GPU."""
    if not wants_gpu(hardware):
        return CPU
    local_rank = local_rank_from_env() if local_rank is None else local_rank
    require_local_gpus(hardware, local_rank + 1)
    return Device("cuda", local_rank)


def ray_worker_device(use_gpu: bool) -> Device:
    """The device Ray Train assigned to this worker: its GPU (Ray sets CUDA_VISIBLE_DEVICES and
    `ray.train.torch.get_device` maps it to the index this process sees) or the CPU."""
    if not use_gpu:
        return CPU
    import ray.train.torch

    device = Device.from_torch(ray.train.torch.get_device())
    if not device.is_cuda:
        raise SpecError("--launcher ray: the worker was given no GPU although the plan is for GPUs")
    return device

