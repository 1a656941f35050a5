"""Page faults of a memory-bound plan on a CPU node: the price of giving freed memory back.

On a CPU node the "device" is host RAM. A plan that trades time for memory (some layer not
kept whole, a model-state chunk off the device, or a predicted peak above `HEADROOM` of the
memory) runs with glibc's mmap and trim thresholds fixed at `MMAP_THRESHOLD_BYTES`
(offload/host_memory.py: `memory_bound`, `return_freed_host_memory`): every block of that
size or more is mapped fresh and unmapped when freed, so each of its pages faults and is
zeroed by the kernel at its first touch. A plan that keeps everything with room to spare
runs with glibc's defaults, whose heap recycles the same blocks step after step.

Measured on this 2-core machine (4K tokens, bench/peers.py's model, 2 ranks): the kernel
time of a step went from 0.05-0.08 s (keep-all sp2) to 0.47-0.50 s (any memory-bound plan),
and fresh pages filled at ~1 GB/s against ~8 GB/s for reused ones. So the cost model charges
a memory-bound plan `page_fault_s_per_byte` (measured by the profile: fresh mapping vs
reused buffer) for every byte the step allocates in blocks at or above the threshold (the
profile records each allocation of a layer's forward + backward and of the head + loss,
fitted linear in tokens, so the threshold is applied to each block at the target's size).

Pure functions: no torch (the planner runs without it).
"""

from __future__ import annotations

import math
from typing import Sequence

MMAP_THRESHOLD_BYTES = 1 << 20
"""glibc's mmap / trim threshold the runtime sets under a memory-bound plan (the same value as
`offload.host_memory.DEFAULT_THRESHOLD_BYTES`; a test keeps them equal)."""
HEADROOM = 0.9
"""A plan whose predicted peak exceeds this share of the device memory is memory-bound (the
default of `offload.host_memory.memory_bound`; a test keeps them equal)."""


def bytes_in_mapped_blocks(fit: Sequence[Sequence[float]], tokens: float,
                           threshold: int = MMAP_THRESHOLD_BYTES) -> float:
    """Bytes of the allocations (each `a + b * tokens`, as the profile fitted them) that are
    `threshold` or larger at `tokens` tokens: the blocks glibc maps fresh each time."""
    total = 0.0
    for a, b in fit:
        size = round(a + b * tokens)   # whole bytes: a block of exactly the threshold is mapped
        if size >= threshold:
            total += size
    return total


def microbatch_mapped_bytes(layer_fit: Sequence[Sequence[float]],
                            head_fit: Sequence[Sequence[float]], *, tokens: float, layers: int,
                            with_head: bool, loss_chunk_tokens: int = 0) -> float:
    """Bytes one microbatch of a stage allocates in freshly mapped blocks: `layers` decoder
    layers' forward + backward at `tokens` local tokens, and on the last stage the head +
    loss, one call per loss chunk of `loss_chunk_tokens` (0: the whole microbatch)."""
    total = layers * bytes_in_mapped_blocks(layer_fit, tokens)
    if with_head and head_fit:
        chunk = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
        total += math.ceil(tokens / chunk) * bytes_in_mapped_blocks(head_fit, chunk)
    return total


def memory_bound(*, any_layer_not_kept: bool, any_chunk_off_device: bool, peak_bytes: float,
                 capacity_bytes: float, headroom: float = HEADROOM) -> bool:
    """The runtime's rule (`offload.host_memory.memory_bound`) from the planner's numbers."""
    return (any_layer_not_kept or any_chunk_off_device
            or (capacity_bytes > 0 and peak_bytes > headroom * capacity_bytes))
