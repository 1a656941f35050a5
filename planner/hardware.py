"""Hardware description: what the planner plans for.

All bandwidths are in bytes per second and capacities in bytes internally; the job spec
and presets speak GiB and GB/s (10^9 bytes/s). A `HardwareSpec` may describe a cluster that
is not here: planning never needs the devices it describes. `probe` measures this machine
(the timed collectives live in `planner.collective_probe`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from planner.collective_probe import (  # noqa: F401  (re-exported: callers import them from here)
    COLLECTIVE_KINDS, COLLECTIVE_SIZES, collective_sent_bytes, fit_collective_samples,
    fit_latency_bandwidth, median_collective_seconds, run_collective_workers, timed_collectives)
from planner.efficiency import check_attention_kernel

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
    intra_node_latency_s: float = 0.0
    """Fixed cost of one collective call between devices of one node, seconds (what a call
    of a few bytes takes; 0: not measured / negligible)."""
    intra_node_collective_bw: dict[str, float] = field(default_factory=dict)
    """Achieved bandwidth (bytes one rank sends per second) by collective kind
    ('all_to_all', 'reduce_scatter', 'all_gather', 'all_reduce') between devices of one
    node, where measured; empty: `intra_node_bw` for every kind."""
    intra_node_collective_latency_s: dict[str, float] = field(default_factory=dict)
    """Fixed seconds of one call by collective kind between devices of one node, where
    measured (the per-kind fit of `probe`, or a CPU profile's calls between compute segments:
    `planner.collective_probe.busy_collectives`); empty: `intra_node_latency_s` for every kind."""
    attention_kernel: str | None = None
    """The attention kernel generation the job's software stack runs on these devices, a key of
    `planner.efficiency.ATTENTION_KERNEL_TFLOPS` (e.g. 'flash-attn-1' to price a published run
    that ran FlashAttention v1); None: the device family's own curve (FlashAttention-2-class,
    what disttrain's runtime runs). Pricing only: a profile's measured layer times replace it."""

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node", "device_memory_bytes", "host_memory_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("host_link_bw", "intra_node_bw", "inter_node_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.intra_node_latency_s < 0:
            raise ValueError(f"intra_node_latency_s: must be >= 0, got {self.intra_node_latency_s}")
        bad = {k: v for k, v in self.intra_node_collective_bw.items() if v <= 0}
        if bad:
            raise ValueError(f"intra_node_collective_bw: must be positive, got {bad}")
        bad = {k: v for k, v in self.intra_node_collective_latency_s.items() if v < 0}
        if bad:
            raise ValueError(f"intra_node_collective_latency_s: must be >= 0, got {bad}")
        if self.nvme_capacity_bytes < 0:
            raise ValueError(f"nvme_capacity_bytes: must be >= 0, got {self.nvme_capacity_bytes}")
        if self.nvme_capacity_bytes and (self.nvme_read_bw <= 0 or self.nvme_write_bw <= 0):
            raise ValueError("nvme: read and write bandwidth must be positive when capacity > 0")
        if not self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            raise ValueError(f"peak_flops: need a positive value per dtype, got {self.peak_flops}")
        check_attention_kernel(self.attention_kernel, self.device_name)

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
        """The fields as a dict; `attention_kernel` only when set, so that a plan of a job
        that does not set it is the same as before the field existed."""
        data = dataclasses.asdict(self)
        if data["attention_kernel"] is None:
            del data["attention_kernel"]
        return data

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
_CPU_LOCAL_COLLECTIVES = {"all_to_all": 1.2 * GB, "reduce_scatter": 0.35 * GB,
                          "all_gather": 0.7 * GB, "all_reduce": 1.0 * GB}
"""gloo between 2 local 1-thread processes (`timed_collectives`, 64 KiB-16 MiB, 5 runs): bytes
one rank sends per second. One fit over all kinds gives ~0.95 GB/s (= intra_node_bw 1.2 x
comm_efficiency 0.8) and ~0.25 ms per call; gloo's CPU reduce-scatter is ~3x slower."""
_A800 = _device("A800-80G", 80, 19.5, 312, 25)
_A100_40 = _device("A100-40G", 40, 19.5, 312, 25)
_A100_80 = _device("A100-80G", 80, 19.5, 312, 25)
_H100 = _device("H100-80G", 80, 67, 989, 50)
_H100_96 = _device("H100-96G-HBM2e", 96, 67, 989, 50)
_H200 = _device("H200-141G", 141, 67, 989, 50)
_B200 = _device("B200-180G", 180, 80, 2250, 50)
_RTX4090 = _device("RTX4090-24G", 24, 82.6, 165, 25)


def _hgx(name: str, device: dict, *, host_gib: int, nvme_gib: int, nvme_read_gbps: float,
         nvme_write_gbps: float, nvlink_gbps: float, nic_gbps: float) -> HardwareSpec:
    """An 8-GPU NVLink server: NVLink per-GPU figure (both directions, as datasheets
    quote it), one NIC per GPU (bytes/s one way)."""
    return HardwareSpec(name=name, nodes=1, devices_per_node=8, **device,
                        host_memory_bytes=host_gib * GiB, nvme_capacity_bytes=nvme_gib * GiB,
                        nvme_read_bw=nvme_read_gbps * GB, nvme_write_bw=nvme_write_gbps * GB,
                        nvme_path="/nvme", intra_node_bw=nvlink_gbps * GB, inter_node_bw=nic_gbps * GB)

CLUSTER_PRESETS: dict[str, HardwareSpec] = {
    "cpu-local": HardwareSpec(
        name="cpu-local", nodes=1, devices_per_node=1, device_name="cpu",
        device_memory_bytes=8 * GiB, peak_flops={"fp32": 5e10, "bf16": 2.5e10},
        host_memory_bytes=16 * GiB, host_link_bw=6.8 * GB, nvme_capacity_bytes=20 * GiB,
        nvme_read_bw=0.6 * GB, nvme_write_bw=0.8 * GB, nvme_path="/tmp/disttrain-nvme",
        intra_node_bw=1.2 * GB, inter_node_bw=1.2 * GB, intra_node_latency_s=2.5e-4,
        intra_node_collective_bw=dict(_CPU_LOCAL_COLLECTIVES)),
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
    # DGX A100 (NVLink 3: 600 GB/s, 8 x 200 Gb/s HDR), DGX H100 / H200 (NVLink 4: 900 GB/s,
    # 8 x 400 Gb/s NDR), HGX B200 (NVLink 5: 1.8 TB/s, 8 x 400 Gb/s) datasheets.
    "8xa100-40g": _hgx("8xa100-40g", _A100_40, host_gib=1024, nvme_gib=15000, nvme_read_gbps=25,
                       nvme_write_gbps=12, nvlink_gbps=600, nic_gbps=25),
    "8xa100-80g": _hgx("8xa100-80g", _A100_80, host_gib=2048, nvme_gib=30000, nvme_read_gbps=25,
                       nvme_write_gbps=12, nvlink_gbps=600, nic_gbps=25),
    "8xh100-96g": _hgx("8xh100-96g", _H100_96, host_gib=2048, nvme_gib=28000, nvme_read_gbps=25,
                       nvme_write_gbps=12, nvlink_gbps=900, nic_gbps=50),
    "8xh200-141g": _hgx("8xh200-141g", _H200, host_gib=2048, nvme_gib=28000, nvme_read_gbps=25,
                        nvme_write_gbps=12, nvlink_gbps=900, nic_gbps=50),
    "8xb200-180g": _hgx("8xb200-180g", _B200, host_gib=4096, nvme_gib=28000, nvme_read_gbps=25,
                        nvme_write_gbps=12, nvlink_gbps=1800, nic_gbps=50),
    "8xrtx4090-24g": HardwareSpec(
        name="8xrtx4090-24g", nodes=1, devices_per_node=8, **_RTX4090,
        host_memory_bytes=512 * GiB, nvme_capacity_bytes=4000 * GiB, nvme_read_bw=7 * GB,
        nvme_write_bw=5 * GB, nvme_path="/nvme", intra_node_bw=25 * GB, inter_node_bw=12.5 * GB),
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
    """(write bytes/s, read bytes/s, free bytes) of `path` with a temp file, removed after.
    Written as the swap store writes (`offload.stores`: O_DIRECT from page-aligned buffers,
    so the bytes reach the disk and no page cache; buffered + fsync where the filesystem
    refuses O_DIRECT), read back buffered after dropping its pages from the page cache, as
    the store reads (`bench/copy_engine.py` on this VM's disk: Python's buffered writes +
    fsync ~1.2 GB/s, the copy engine's O_DIRECT writes ~2.2)."""
    import mmap
    import os
    import shutil
    import tempfile
    import time
    os.makedirs(path, exist_ok=True)
    block = mmap.mmap(-1, 4 * 2**20)                 # page-aligned, as O_DIRECT needs
    block.write(os.urandom(len(block)))
    count = max(1, num_bytes // len(block))
    fd, name = tempfile.mkstemp(prefix="disttrain-probe-", dir=path)
    os.close(fd)
    try:
        try:
            fd = os.open(name, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:                              # e.g. tmpfs: no O_DIRECT
            fd = os.open(name, os.O_WRONLY)
        start = time.perf_counter()
        try:
            try:
                for _ in range(count):
                    os.write(fd, block)
            except OSError:                          # O_DIRECT refused at write time
                os.close(fd)
                fd = os.open(name, os.O_WRONLY | os.O_TRUNC)
                start = time.perf_counter()
                for _ in range(count):
                    os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_bw = count * len(block) / (time.perf_counter() - start)
        if hasattr(os, "posix_fadvise"):             # drop the page cache so the read hits the disk
            with open(name, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        with open(name, "rb", buffering=0) as handle:
            while handle.read(len(block)):
                pass
        read_bw = count * len(block) / (time.perf_counter() - start)
    finally:
        os.remove(name)
        block.close()
    return write_bw, read_bw, shutil.disk_usage(path).free


def probe(nvme_path: str = "/tmp/disttrain-nvme", *, nvme_test_bytes: int = 128 * 2**20,
          fallback: str = "cpu-local", collectives: bool = True) -> HardwareSpec:
    """Measure this machine: GPUs via NVML / torch, host copy, NVMe write/read on `nvme_path`,
    and (`collectives`, CPU only) gloo collectives between 2 local processes on loopback.

    On the CPU, FLOP/s and inter-node bandwidth are not measured; they come from the `fallback`
    preset. On a GPU node `planner.probe_gpu` replaces them and the host link with GPU numbers
    (datasheet or timed matmul, pinned H2D/D2H, NCCL between the GPUs). The measured collective
    fit sets `intra_node_latency_s`, `intra_node_collective_bw` (achieved, per kind) and
    `intra_node_bw` (nominal: the achieved all-kinds bandwidth / the cost model's default
    `comm_efficiency`, so the cost model's effective bandwidth is the measured one). When the
    timed collective fails, the fallback preset's collective numbers stay (logged).
    """
    import logging
    import os

    import torch
    base = CLUSTER_PRESETS[fallback]
    host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from planner.probe_gpu import gpu_fields, nvml_devices  # GPU-only measurements

    gpus = nvml_devices()
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
    comm = {}
    if collectives and not gpus:
        from planner.costmodel import CostParams     # lazy: costmodel imports this module
        try:
            fit = timed_collectives(2)
        except (RuntimeError, OSError, ValueError) as exc:
            logging.getLogger(__name__).warning("probe: collectives not measured (%s); "
                                                "keeping %s's", exc, fallback)
        else:
            comm = dict(intra_node_bw=fit["bandwidth"] / CostParams().comm_efficiency,
                        intra_node_latency_s=fit["latency_s"],
                        intra_node_collective_bw={k: bw for k, (_, bw) in fit["by_kind"].items()},
                        intra_node_collective_latency_s={k: lat for k, (lat, _) in fit["by_kind"].items()})
    fields = dict(name="probe", devices_per_node=devices, device_name=name,
                  device_memory_bytes=int(memory), host_memory_bytes=int(host_total),
                  host_link_bw=host_link, nvme_capacity_bytes=int(free) if nvme_path else 0,
                  nvme_read_bw=read_bw, nvme_write_bw=write_bw, nvme_path=nvme_path, **comm)
    if gpus and torch.cuda.is_available():  # FLOP/s, pinned copies, NCCL: measured on the GPUs
        fields.update(gpu_fields(name, devices, collectives=collectives))
    return base.replace(**fields)
