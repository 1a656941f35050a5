"""disttrain's rank for bench/peers.py, with a per-category breakdown of its peak RSS.

Categories (bytes, rank 0 reports them):
  interpreter        resident set after the imports, before the runtime is built (Python,
                     torch's libraries, disttrain's modules)
  model states       parameters, gradients and AdamW moments the runtime holds
                     (`states.bytes_by_place()`)
  saved activations  peak of the activation runtime's resident saved bytes (kept tensors,
                     swap copies in flight, NVMe read buffers)
  stores             the CPU store's arena high-water mark (touched pages stay resident);
                     the NVMe tier lives in the page cache, which is not in a process's RSS
  allocator caches   free bytes glibc keeps mapped in its heaps (`mallinfo2().fordblks`),
                     largest after any step
  working set        the rest of the peak: the live temporaries of the step (residual
                     stream, tiles, gradients in flight, communication buffers)
"""

from __future__ import annotations

import ctypes
import time

CATEGORIES = ("interpreter", "model states", "saved activations", "stores",
              "allocator caches", "working set")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_free_bytes() -> int:
    """Free bytes held in glibc's heaps (0 where mallinfo2 is missing)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return 0
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def disttrain_worker(rank: int, world: int, spec: dict, plan) -> dict:
    """disttrain's runtime under `plan`; returns losses, gradient norms, step times, peak RSS
    and the breakdown of it."""
    from disttrain.engine import build_runtime
    from disttrain.data import build_batches
    from disttrain.metrics import peak_rss_bytes
    from disttrain.spec import job_from_dict

    interpreter = _rss_bytes()
    job = job_from_dict(spec)
    tr = job.spec.train
    runtime = build_runtime(job, plan, rank=rank)
    batches = build_batches("synthetic", None, vocab_size=job.shape.vocab_size,
                            seq_len=tr.seq_len, micro_batch_size=1, seed=tr.seed)
    losses, norms, times = [], [], []
    states = saved = caches = 0
    try:
        for step in range(tr.steps):
            t0 = time.perf_counter()
            loss, norm = runtime.train_step(step, batches, tr.lr)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            norms.append(norm)
            stats = runtime.activation_stats()
            states = max(states, sum(sum(v.values())
                                     for v in runtime.states.bytes_by_place().values()))
            saved = max(saved, stats["peak_resident_bytes"] if stats is not None else 0)
            caches = max(caches, malloc_free_bytes())
        stores = 0
        if runtime.activations is not None and "cpu" in runtime.activations.stores:
            stores = runtime.activations.stores["cpu"].arena.peak
    finally:
        runtime.close()
    peak = peak_rss_bytes()
    parts = {"interpreter": interpreter, "model states": states, "saved activations": saved,
             "stores": stores, "allocator caches": caches}
    parts["working set"] = peak - sum(parts.values())
    return {"losses": losses, "grad_norms": norms, "step_times": times, "peak_rss": peak,
            "breakdown": parts}
