"""The GPU side of `planner.hardware.probe`: what a node with CUDA devices measures instead of
taking the `cpu-local` preset's numbers.

- NVML (nvidia-ml-py) names the devices and their memory (torch's device properties when NVML
  is missing or fails: an `NVMLError` never escapes);
- pinned host<->device copies timed with CUDA events give `host_link_bw` (the slower of H2D and
  D2H, the cost model's one host link);
- NCCL collectives between the node's GPUs (one process per GPU, loopback rendezvous) give the
  intra-node latency and bandwidth per collective kind, fitted like the CPU probe's gloo ones;
- peak FLOP/s come from the datasheet of a known device (the cluster presets), else from a
  timed matmul per dtype (achieved, so below the datasheet peak); inter-node bandwidth cannot be
  measured on one node: the known device's preset value, else `DEFAULT_INTER_NODE_GBPS`.

Nothing here runs without a GPU; planner.hardware calls `gpu_fields` only when one exists.
"""

from __future__ import annotations

import statistics

GB = 10**9
DEFAULT_INTER_NODE_GBPS = 12.5
"""One 100 Gb/s NIC per GPU, stated default for an unknown device's inter-node bandwidth."""
COPY_BYTES = 256 * 2**20
NCCL_SIZES = (64 * 2**10, 512 * 2**10, 4 * 2**20, 64 * 2**20)


def nvml_devices() -> list[tuple[str, int]]:
    """(name, total bytes) per GPU through NVML; [] without the library, a driver or a GPU
    (any NVMLError included)."""
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
    except pynvml.NVMLError:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def timed_pinned_copies(num_bytes: int = COPY_BYTES, repeats: int = 5) -> tuple[float, float]:
    """(host->device, device->host) bytes/s between pinned host memory and cuda:0, timed with
    CUDA events (median of `repeats`)."""
    import torch

    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    rates = []
    for copy in (lambda: device.copy_(host, non_blocking=True),
                 lambda: host.copy_(device, non_blocking=True)):
        copy()  # warm-up
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates.append(num_bytes / statistics.median(times))
    return rates[0], rates[1]


def timed_matmul_flops(dtype_name: str, n: int = 4096, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n matmul on cuda:0 in `dtype_name` ('fp32' | 'bf16')."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(n, n, device="cuda:0", dtype=dtype)
    b = torch.randn(n, n, device="cuda:0", dtype=dtype)
    a @ b  # warm-up (cuBLAS handles, kernels)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return repeats * 2 * n**3 / (start.elapsed_time(end) / 1e3)


def _nccl_worker(rank: int, world: int, port: int, sizes: tuple[int, ...], repeats: int,
                 queue) -> None:
    """One rank of `timed_nccl`: median seconds per (kind, input bytes); rank 0 reports."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from planner.hardware import median_collective_seconds

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=120))
        out = {}
        for size in sizes:
            numel = size // 4 // world * world
            full, other = torch.ones(numel, device="cuda"), torch.empty(numel, device="cuda")
            part = torch.ones(numel // world, device="cuda")
            ops = {"all_to_all": lambda: dist.all_to_all_single(other, full),
                   "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
                   "all_gather": lambda: dist.all_gather_into_tensor(other, part),
                   "all_reduce": lambda: dist.all_reduce(full)}
            for kind, op in ops.items():
                out[(kind, numel * 4)] = median_collective_seconds(op, repeats,
                                                                   torch.cuda.synchronize)
        dist.barrier()
        if rank == 0:
            queue.put(("ok", out))
        dist.destroy_process_group()
    except Exception as exc:  # reported to the caller, which keeps the fallback numbers
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def timed_nccl(world: int, *, sizes: tuple[int, ...] = NCCL_SIZES, repeats: int = 5,
               timeout_s: float = 300.0) -> dict:
    """NCCL collectives between `world` local GPUs: {"latency_s", "bandwidth", "by_kind":
    {kind: (latency_s, bytes one rank sends per second)}} (fits as planner.hardware's)."""
    from planner.hardware import fit_collective_samples, run_collective_workers

    payload = run_collective_workers(_nccl_worker, world, (tuple(sizes), repeats), timeout_s,
                                     "timed NCCL collectives")
    latency, bandwidth, by_kind = fit_collective_samples(payload, world)
    return {"latency_s": latency, "bandwidth": bandwidth, "by_kind": by_kind}


def _known_device(name: str) -> dict | None:
    """The preset of a device whose model number appears in the NVML name (e.g. 'NVIDIA
    A800-SXM4-80GB' -> the A800 preset), or None."""
    from planner.hardware import CLUSTER_PRESETS

    upper = name.upper().replace(" ", "")
    for preset in CLUSTER_PRESETS.values():
        model = preset.device_name.split("-")[0].upper()
        if preset.device_name != "cpu" and model in upper:
            return preset.to_dict()
    return None


def gpu_fields(name: str, num_devices: int, *, collectives: bool = True) -> dict:
    """HardwareSpec fields measured on this GPU node (see the module docstring)."""
    import logging

    from planner.costmodel import CostParams  # lazy: costmodel imports planner.hardware

    h2d, d2h = timed_pinned_copies()
    known = _known_device(name)
    if known is not None:
        flops, inter = known["peak_flops"], known["inter_node_bw"]
    else:
        flops = {dtype: timed_matmul_flops(dtype) for dtype in ("fp32", "bf16")}
        inter = DEFAULT_INTER_NODE_GBPS * GB
    fields = dict(peak_flops=dict(flops), host_link_bw=min(h2d, d2h), inter_node_bw=inter,
                  intra_node_bw=known["intra_node_bw"] if known else inter,
                  intra_node_latency_s=0.0, intra_node_collective_bw={})
    if collectives and num_devices > 1:
        try:
            fit = timed_nccl(num_devices)
        except (RuntimeError, OSError, ValueError) as exc:
            logging.getLogger(__name__).warning("probe: NCCL collectives not measured (%s)", exc)
        else:
            fields.update(intra_node_bw=fit["bandwidth"] / CostParams().comm_efficiency,
                          intra_node_latency_s=fit["latency_s"],
                          intra_node_collective_bw={k: bw for k, (_, bw) in fit["by_kind"].items()})
    return fields
