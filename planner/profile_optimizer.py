"""The optimizer part of a layer profile: the runtime's per-chunk clip + AdamW, timed over
chunks of the sizes the rank updates.

A step's update streams every chunk's fp32 master, gradient and both moments once for the
clipping norm and again for AdamW. Timed on one layer-sized shard repeated in place, the
operands stay in the core's cache and the update looks several times faster than the
step's, which walks the embedding, every layer and the head one after the other (measured
on this 2-core machine: ~4 ns per parameter on one 180K-parameter shard, ~25 ns on 1M-
parameter chunks). So the update is timed as the runtime runs it: the clip pass over all
chunks, then AdamW chunk by chunk, over the job's own chunk sizes (up to `SAMPLE_CAP`
parameters of them, in order: beyond the caches the time per parameter no longer depends
on the size).
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

SAMPLE_CAP = 1 << 23
"""Most parameters the timed update allocates (8M: ~200 MiB of fp32 states), far beyond any
core's cache."""


def chunk_sample(sizes: Sequence[int], cap: int = SAMPLE_CAP) -> list[int]:
    """The leading chunks of `sizes` up to `cap` parameters in total (the last one cut)."""
    out, left = [], cap
    for size in sizes:
        take = min(max(1, int(size)), left)
        if take <= 0:
            break
        out.append(take)
        left -= take
    return out or [1]


def measure_optimizer_s_per_param(numel: int | Sequence[int], *, repeats: int = 5,
                                  dtype: str = "fp32", median: bool = False) -> float:
    """Seconds per parameter of the runtime's update over fp32 chunks of `numel` parameters
    (one size, or the job's chunk sizes in update order): each chunk's gradient squared
    norm (for clipping), then per chunk the clip scale, AdamW (moments, bias-corrected step,
    its temporary denominator), the next gradient; in bf16 also the cast of the updated
    master into the bf16 compute copy. The fastest of `repeats` passes, or their median
    (`median`: when other processes share the cores, as the profile's twins do)."""
    from planner.profiler import TORCH_DTYPES

    sizes = chunk_sample([numel] if isinstance(numel, int) else list(numel))
    chunks = []
    for size in sizes:
        p, g, m = (torch.randn(size) for _ in range(3))
        compute = torch.empty(size, dtype=TORCH_DTYPES[dtype]) if dtype != "fp32" else None
        chunks.append((p, g, m, torch.rand(size), compute))

    def update() -> None:
        for _, g, *_ in chunks:                      # the clipping norm reads every chunk first
            g.double().pow(2).sum()
        for p, g, m, v, compute in chunks:
            g.mul_(0.5)
            m.lerp_(g, 0.1)
            v.mul_(0.95).addcmul_(g, g, value=0.05)
            denom = (v.sqrt() / 0.9).add_(1e-8)
            p.addcdiv_(m, denom, value=-1e-3)
            g.copy_(p).mul_(1e-3)                    # the next step's gradient (and reset)
            if compute is not None:
                compute.copy_(p)                     # master -> compute copy

    update()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    return (statistics.median(times) if median else min(times)) / sum(sizes)
