"""Hardware description: what the planner plans for.

All bandwidths are in bytes per second and capacities in bytes internally; the job spec
and presets speak GiB and GB/s (10^9 bytes/s). A `HardwareSpec` may describe a cluster that
is not here: planning never needs the devices it describes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GiB = 1024**3
GB = 10**9


@dataclass(frozen=True, kw_only=True)
class HardwareSpec:
    """A homogeneous cluster: `nodes` × `devices_per_node` identical devices."""

    name: str = "custom"
    """Preset name, or 'custom' / 'probe'."""
    nodes: int = 1
    """Number of nodes."""
    devices_per_node: int = 1
    """Devices (training ranks) per node."""
    device_name: str = "cpu"
    """Device model, e.g. 'A800-80G'; 'cpu' for CPU ranks."""
    device_memory_bytes: int
    """Memory one rank may use on its device."""
    peak_flops: dict[str, float] = field(default_factory=dict)
    """Peak dense FLOP/s per dtype ('fp32', 'bf16')."""
    host_memory_bytes: int
    """Host (CPU) memory per node usable for offloaded state."""
    host_link_bw: float
    """Host<->device copy bandwidth per device, bytes/s."""
    nvme_capacity_bytes: int = 0
    """NVMe capacity per node usable for swap (0: no NVMe tier)."""
    nvme_read_bw: float = 0.0
    """NVMe read bandwidth per node, bytes/s."""
    nvme_write_bw: float = 0.0
    """NVMe write bandwidth per node, bytes/s."""
    nvme_path: str = ""
    """Directory of the NVMe tier's files."""
    intra_node_bw: float
    """Collective bandwidth between devices of one node, bytes/s per device."""
    inter_node_bw: float
    """Collective bandwidth between nodes, bytes/s per device."""

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node", "device_memory_bytes", "host_memory_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("host_link_bw", "intra_node_bw", "inter_node_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.nvme_capacity_bytes < 0:
            raise ValueError(f"nvme_capacity_bytes: must be >= 0, got {self.nvme_capacity_bytes}")
        if self.nvme_capacity_bytes and (self.nvme_read_bw <= 0 or self.nvme_write_bw <= 0):
            raise ValueError("nvme: read and write bandwidth must be positive when capacity > 0")
        if not self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise ValueError(f"peak_flops: need a positive value per dtype, got {self.peak_flops}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def has_nvme(self) -> bool:
        return self.nvme_capacity_bytes > 0

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (falls back to fp32's when the dtype is not listed)."""
        return self.peak_flops.get(dtype, self.peak_flops.get("fp32", min(self.peak_flops.values())))

    def replace(self, **changes) -> "HardwareSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareSpec":
        return cls(**data)


def _device(name, memory_gib, fp32_tflops, bf16_tflops, host_link_gbps):
    return dict(device_name=name, device_memory_bytes=int(memory_gib * GiB),
                peak_flops={"fp32": fp32_tflops * 1e12, "bf16": bf16_tflops * 1e12},
                host_link_bw=host_link_gbps * GB)


# Vendor datasheet peaks (dense, no sparsity); host link = effective PCIe (Gen4 x16 ≈ 25 GB/s,
# Gen5 ≈ 50 GB/s); intra-node = NVLink per-GPU bus bandwidth (A800 capped at 400 GB/s);
# inter-node = one 200 Gb/s (A800) or 400 Gb/s (H100) NIC per GPU. The cpu-local numbers were
# measured on this project's 2-core CI machine (shared/FACTS.md); `probe` measures them anew.
_A800 = _device("A800-80G", 80, 19.5, 312, 25)
_H100 = _device("H100-80G", 80, 67, 989, 50)
_RTX4090 = _device("RTX4090-24G", 24, 82.6, 165, 25)

CLUSTER_PRESETS: dict[str, HardwareSpec] = {
    "cpu-local": HardwareSpec(
        name="cpu-local", nodes=1, devices_per_node=1, device_name="cpu",
        device_memory_bytes=8 * GiB, peak_flops={"fp32": 5e10, "bf16": 2.5e10},
        host_memory_bytes=16 * GiB, host_link_bw=6.8 * GB, nvme_capacity_bytes=20 * GiB,
        nvme_read_bw=0.6 * GB, nvme_write_bw=0.8 * GB, nvme_path="/tmp/disttrain-nvme",
        intra_node_bw=1.2 * GB, inter_node_bw=1.2 * GB),
    "1xa800-80g": HardwareSpec(
        name="1xa800-80g", nodes=1, devices_per_node=1, **_A800,
        host_memory_bytes=1024 * GiB, nvme_capacity_bytes=3500 * GiB, nvme_read_bw=6.5 * GB,
        nvme_write_bw=3.5 * GB, nvme_path="/nvme", intra_node_bw=400 * GB, inter_node_bw=25 * GB),
    "8xa800-80g": HardwareSpec(
        name="8xa800-80g", nodes=1, devices_per_node=8, **_A800,
        host_memory_bytes=1024 * GiB, nvme_capacity_bytes=7000 * GiB, nvme_read_bw=13 * GB,
        nvme_write_bw=7 * GB, nvme_path="/nvme", intra_node_bw=400 * GB, inter_node_bw=25 * GB),
    "8xh100-80g": HardwareSpec(
        name="8xh100-80g", nodes=1, devices_per_node=8, **_H100,
        host_memory_bytes=2048 * GiB, nvme_capacity_bytes=28000 * GiB, nvme_read_bw=25 * GB,
        nvme_write_bw=12 * GB, nvme_path="/nvme", intra_node_bw=900 * GB, inter_node_bw=50 * GB),
    "1xrtx4090-24g": HardwareSpec(
        name="1xrtx4090-24g", nodes=1, devices_per_node=1, **_RTX4090,
        host_memory_bytes=64 * GiB, nvme_capacity_bytes=0, intra_node_bw=25 * GB,
        inter_node_bw=1.25 * GB),
}


def _timed_host_copy(num_bytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Host memcpy bandwidth in bytes/s (unpinned: pinned memory needs CUDA)."""
    import time

    import torch
    src = torch.empty(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)                                   # touch the pages once
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return repeats * num_bytes / (time.perf_counter() - start)


def _timed_nvme(path: str, num_bytes: int = 128 * 2**20) -> tuple[float, float, int]:
    """(write bytes/s, read bytes/s, free bytes) of `path` with an fsync'd temp file, removed after."""
    import os
    import shutil
    import tempfile
    import time
    os.makedirs(path, exist_ok=True)
    block = os.urandom(4 * 2**20)
    fd, name = tempfile.mkstemp(prefix="disttrain-probe-", dir=path)
    try:
        start = time.perf_counter()
        with os.fdopen(fd, "wb") as handle:
            for _ in range(num_bytes // len(block)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        write_bw = num_bytes / (time.perf_counter() - start)
        if hasattr(os, "posix_fadvise"):             # drop the page cache so the read hits the disk
            with open(name, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        with open(name, "rb", buffering=0) as handle:
            while handle.read(len(block)):
                pass
        read_bw = num_bytes / (time.perf_counter() - start)
    finally:
        os.remove(name)
    return write_bw, read_bw, shutil.disk_usage(path).free


def _nvml_devices() -> list[tuple[str, int]]:
    """(name, total bytes) per GPU through NVML; [] without the library or a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append((name.decode() if isinstance(name, bytes) else name,
                            int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return devices
    finally:
        pynvml.nvmlShutdown()


def probe(nvme_path: str = "/tmp/disttrain-nvme", *, nvme_test_bytes: int = 128 * 2**20,
          fallback: str = "cpu-local") -> HardwareSpec:
    """Measure this machine: GPUs via NVML / torch, host copy, NVMe write/read on `nvme_path`.

    FLOP/s and collective bandwidths are not measured here; they come from the `fallback`
    preset (on a GPU the device's datasheet numbers belong in the job spec).
    """
    import os

    import torch
    base = CLUSTER_PRESETS[fallback]
    host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = _nvml_devices()
    if not gpus and torch.cuda.is_available():
        gpus = [(torch.cuda.get_device_properties(i).name, torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())]
    host_link = _timed_host_copy()
    write_bw, read_bw, free = _timed_nvme(nvme_path, nvme_test_bytes) if nvme_path else (0.0, 0.0, 0)
    if gpus:
        name, memory = gpus[0]
        devices = len(gpus)
    else:
        name, memory, devices = "cpu", min(base.device_memory_bytes, host_total // 2), 1
    return base.replace(name="probe", devices_per_node=devices, device_name=name,
                        device_memory_bytes=int(memory), host_memory_bytes=int(host_total),
                        host_link_bw=host_link, nvme_capacity_bytes=int(free) if nvme_path else 0,
                        nvme_read_bw=read_bw, nvme_write_bw=write_bw, nvme_path=nvme_path)
