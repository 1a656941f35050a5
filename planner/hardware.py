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
