"""Host allocator setting for CPU nodes: freed tensors go back to the OS.

glibc's malloc serves large blocks from mmap only above a threshold that it raises
dynamically (up to 32 MiB) each time such a block is freed; after that, blocks below the
threshold come from the heap, and freed heap memory stays mapped (it counts in the process's
resident set) until the top of the heap is trimmed. A training step allocates and frees
many MiB-sized activation tensors, so on a CPU node, where host memory *is* the device
memory, that cache adds to the peak. Fixing both thresholds (which also stops the dynamic
adjustment) returns every freed block of `threshold_bytes` or more at once. The price is a
page fault (and zeroing) per page of every such block at its next use: a low threshold buys
the lowest peak with the most CPU time. 1 MiB keeps the large per-token tensors (activations,
logits tiles) out of the heap while small ones are still recycled: between a 64 KiB
threshold (lower peak, more CPU per step) and no mmap at all (higher peak, less CPU).

That price is only worth paying when memory binds (`memory_bound`). A plan that keeps every
activation with room to spare does the opposite (`keep_freed_host_memory`): no block is
mapped, none is trimmed, so every freed block stays in the heap for the next step, as the
CUDA caching allocator keeps a GPU's. glibc's defaults would not: they map every block above
32 MiB afresh (the dynamic threshold's ceiling on 64-bit; e.g. the fp32 logits of 1K tokens
over a 8K vocabulary) and trim the heap's top whenever twice the threshold is free there,
so a keep-all step faulted pages the planner never priced, varying from run to run
(tests/test_host_memory.py counts them for a 40 MiB block).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
DEFAULT_THRESHOLD_BYTES = 1 << 20
DEFAULT_MMAP_MAX = 65536
"""glibc's default cap on the number of mmap-served blocks (restored when blocks are mapped
again after `keep_freed_host_memory` set it to 0)."""
NEVER_TRIM_BYTES = 2**31 - 1
"""The largest trim threshold `mallopt` takes (an int): the heap's top is never given back."""


def _mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def return_freed_host_memory(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap and trim thresholds to `threshold_bytes` (and allow mapped blocks);
    False where the C library has no `mallopt` (not glibc), True when all were set."""
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes: must be positive, got {threshold_bytes}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return (bool(mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX))
            and bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
            and bool(mallopt(M_TRIM_THRESHOLD, threshold_bytes)))


def keep_freed_host_memory() -> bool:
    """No block mapped, the heap never trimmed: freed blocks are reused by the next step
    without faulting. False where the C library has no `mallopt`, True when both were set."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES))


def memory_bound(plan, headroom: float = 0.9) -> bool:
    """Whether `plan` trades step time for memory, so freed blocks should go back to the OS:
    some layer does not keep its activations, some model-state chunk lives off the device, or
    the predicted peak leaves less than `1 - headroom` of the device memory free (the share
    the planner keeps free when it sizes rebuild tiles)."""
    if any(not a.keep_all for a in plan.activations) or plan.model_states.cpu_chunks:
        return True
    capacity = plan.prediction.hardware.get("device_memory_bytes", 0)
    return bool(capacity) and plan.prediction.per_rank_peak_bytes > headroom * capacity
