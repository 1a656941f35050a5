"""Timed gloo collectives between local processes on loopback (what `planner.hardware.probe`
measures on a CPU node, and `planner.probe_gpu` reuses for NCCL): the workers, the medians
and one latency + bandwidth fit per collective kind. Re-exported by `planner.hardware`.
"""

from __future__ import annotations

COLLECTIVE_KINDS = ("all_to_all", "reduce_scatter", "all_gather", "all_reduce")
"""The collectives the runtime issues (Ulysses, ZeRO, data parallel), timed by `probe`."""
COLLECTIVE_SIZES = (64 * 2**10, 512 * 2**10, 4 * 2**20, 16 * 2**20)
"""Input bytes per call of the timed collectives: from latency-bound to bandwidth-bound."""
BUSY_SIZES = (16 * 2**10, 256 * 2**10, 2 * 2**20)
"""Input bytes per call of the collectives timed between compute segments (`busy_collectives`):
the sizes a small job's Ulysses all-to-alls and ZeRO chunks have."""
BUSY_SEGMENT_N = 160
"""Side of the square fp32 matmul each rank runs before every call of `busy_collectives`
(~8 MFLOP: about a millisecond on one core, the compute between a Ulysses layer's
all-to-alls at a few hundred tokens)."""


def collective_sent_bytes(kind: str, num_bytes: int, world: int) -> float:
    """Bytes one rank sends in one call on `num_bytes` of (full) input, as the cost model
    counts them: (w-1)/w of the input, twice that for an all-reduce (reduce-scatter +
    all-gather)."""
    share = num_bytes * (world - 1) / world
    return 2 * share if kind == "all_reduce" else share


def fit_latency_bandwidth(sent: list[float], seconds: list[float]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of t = latency + sent / bandwidth, both >= 0, fitted by
    least squares on relative error (small calls weigh as much as large ones)."""
    import numpy as np
    x, t = np.asarray(sent, float), np.asarray(seconds, float)
    if len(x) == 0 or (t <= 0).any():
        raise ValueError("fit_latency_bandwidth: need positive times")
    w = 1.0 / t
    best, best_res = None, np.inf
    for cols in ((0, 1), (1,), (0,)):
        design = np.stack([np.ones_like(x), x], axis=1)[:, cols] * w[:, None]
        sol, *_ = np.linalg.lstsq(design, t * w, rcond=None)
        if (sol < 0).any():
            continue
        coef = [0.0, 0.0]
        for c, v in zip(cols, sol):
            coef[c] = float(v)
        res = float((((coef[0] + coef[1] * x) - t) * w) @ (((coef[0] + coef[1] * x) - t) * w))
        if res < best_res:
            best, best_res = coef, res
    latency, per_byte = best
    big = int(x.argmax())
    if per_byte * x[big] < 0.05 * t[big]:
        # the fit gives the largest call almost no transfer time (noise on a busy host can make
        # it look free): the samples cannot resolve a bandwidth, so take the largest call's own
        # rate with its latency included, a lower bound rather than an unbounded guess
        latency, per_byte = min(latency, float(t.min())), float(t[big]) / float(x[big])
    return latency, 1.0 / per_byte


def median_collective_seconds(op, repeats: int, sync=None) -> float:
    """Median wall seconds of the collective `op` over `repeats` calls after one warm-up
    (connections, buffers), every call started together (a barrier) and, where `sync` is
    given (CUDA: `torch.cuda.synchronize`), timed from an idle to a finished device."""
    import statistics
    import time

    import torch.distributed as dist

    sync = sync or (lambda: None)
    op()
    sync()
    times = []
    for _ in range(repeats):
        dist.barrier()
        sync()
        start = time.perf_counter()
        op()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _collective_worker(rank: int, world: int, port: int, threads: int, sizes: tuple[int, ...],
                       repeats: int, queue) -> None:
    """One rank of `timed_collectives`: median seconds per (kind, input bytes), rank 0 reports."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")   # loopback only
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        out = {}
        for size in sizes:
            numel = size // 4 // world * world
            full, other = torch.ones(numel), torch.empty(numel)
            part = torch.ones(numel // world)
            ops = {"all_to_all": lambda: dist.all_to_all_single(other, full),
                   "reduce_scatter": lambda: dist.reduce_scatter_single(part, full),
                   "all_gather": lambda: dist.all_gather_single(other, part),
                   "all_reduce": lambda: dist.all_reduce(full)}
            for kind in COLLECTIVE_KINDS:
                out[(kind, numel * 4)] = median_collective_seconds(ops[kind], repeats)
        dist.barrier()
        if rank == 0:
            queue.put(("ok", out))
        dist.destroy_process_group()
    except Exception as exc:  # reported to the caller, which falls back
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))



def _busy_worker(rank: int, world: int, port: int, threads: int, sizes: tuple[int, ...],
                 rounds: int, repeats: int, queue) -> None:
    """One rank of `busy_collectives`: per (kind, input bytes) the median over `repeats` of
    (rounds of [matmul segment; collective] - rounds of [matmul segment]) / rounds."""
    import os
    import statistics
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        a = torch.randn(BUSY_SEGMENT_N, BUSY_SEGMENT_N)

        def rounds_s(op) -> float:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(rounds):
                torch.mm(a, a)
                if op is not None:
                    op()
            dist.barrier()
            return time.perf_counter() - start

        out = {}
        for size in sizes:
            numel = size // 4 // world * world
            full, other, part = torch.ones(numel), torch.empty(numel), torch.ones(numel // world)
            ops = {"all_to_all": lambda: dist.all_to_all_single(other, full),
                   "reduce_scatter": lambda: dist.reduce_scatter_single(part, full),
                   "all_gather": lambda: dist.all_gather_single(other, part),
                   "all_reduce": lambda: dist.all_reduce(full)}
            for kind in COLLECTIVE_KINDS:
                ops[kind]()                                       # warm-up
                extra = [rounds_s(ops[kind]) - rounds_s(None) for _ in range(repeats)]
                out[(kind, numel * 4)] = statistics.median(extra) / rounds
        if rank == 0:
            queue.put(("ok", out))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # reported to the caller
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def busy_collectives(world: int = 2, *, threads: int = 1, sizes: tuple[int, ...] = BUSY_SIZES,
                     rounds: int = 20, repeats: int = 3, timeout_s: float = 120.0) -> dict:
    """Seconds a blocking gloo collective adds to the ranks' compute on this node, as a step
    sees it: `world` local processes with `threads` torch threads each run `rounds` matmul
    segments (`BUSY_SEGMENT_N`) with a collective after each, and the same segments without;
    the difference per call, by kind and size. Unlike `timed_collectives` (calls back to back
    after a barrier, on idle cores) this includes what a call costs when the ranks arrive from
    compute on shared cores: waking gloo's threads on busy cores, and waiting for the rank
    whose segment ran longer. Returns {"samples": {(kind, input bytes): s per call},
    "by_kind": {kind: (latency_s, bandwidth)}} (`fit_collective_samples`; a call measured
    below zero by noise counts as 1 us)."""
    if world < 2:
        raise ValueError(f"world: need at least 2 processes, got {world}")
    payload = run_collective_workers(_busy_worker, world, (threads, tuple(sizes), rounds, repeats),
                                     timeout_s, "busy collectives")
    samples = {key: max(1e-6, t) for key, t in payload.items()}
    _, _, by_kind = fit_collective_samples(samples, world)
    return {"samples": samples, "by_kind": by_kind}


def run_collective_workers(worker, world: int, args: tuple, timeout_s: float, what: str) -> dict:
    """Run `worker(rank, world, port, *args, queue)` in `world` spawned local processes and
    return the samples rank 0 puts on the queue as ("ok", samples); every process is joined
    (or terminated) before returning. RuntimeError naming `what` when a rank fails or hangs."""
    import multiprocessing as mp
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, daemon=True, args=(r, world, port, *args, queue))
             for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        status, payload = queue.get(timeout=timeout_s)
    except Exception:  # queue.Empty: a rank hung or died
        status, payload = "error", f"no result within {timeout_s:.0f} s"
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    if status != "ok":
        raise RuntimeError(f"{what} failed: {payload}")
    return payload


def fit_collective_samples(samples: dict, world: int
                           ) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """(latency_s, bandwidth, {kind: (latency_s, bandwidth)}) fitted over {(kind, input
    bytes): seconds}; bandwidth is bytes one rank sends per second."""
    sent = [collective_sent_bytes(kind, size, world) for kind, size in samples]
    latency, bandwidth = fit_latency_bandwidth(sent, list(samples.values()))
    per_kind = {}
    for kind in sorted({k for k, _ in samples}):
        rows = [(collective_sent_bytes(k, n, world), t) for (k, n), t in samples.items() if k == kind]
        per_kind[kind] = fit_latency_bandwidth([r[0] for r in rows], [r[1] for r in rows])
    return latency, bandwidth, per_kind

def timed_collectives(world: int = 2, *, threads: int | None = None,
                      sizes: tuple[int, ...] = COLLECTIVE_SIZES, repeats: int = 5,
                      timeout_s: float = 120.0) -> dict:
    """Time gloo collectives between `world` local processes on loopback.

    Each process runs `threads` torch threads (default: this machine's cores / world, as the
    launchers give each rank). Returns {"samples": {(kind, input bytes): median s},
    "latency_s", "bandwidth": one latency + bandwidth (bytes one rank sends per second) fit
    over every kind and size, "by_kind": {kind: (latency_s, bandwidth)}, "threads", "world"}.
    """
    import os
    if world < 2:
        raise ValueError(f"world: need at least 2 processes, got {world}")
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    payload = run_collective_workers(_collective_worker, world, (threads, tuple(sizes), repeats),
                                     timeout_s, "timed collectives")
    latency, bandwidth, per_kind = fit_collective_samples(payload, world)
    return {"samples": payload, "latency_s": latency, "bandwidth": bandwidth,
            "by_kind": per_kind, "threads": threads, "world": world}
