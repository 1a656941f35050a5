"""The host-allocator part of a CPU profile (`planner.page_faults` uses it): what a freshly
mapped page costs, and every allocation a layer's forward + backward (and the head + loss)
makes, so that the planner can tell which blocks a memory-bound plan maps fresh at the
target's size.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch

FAULT_SAMPLE_BYTES = 16 << 20
"""Bytes of each timed mapping: far above the mmap threshold and the caches."""


def _current_cpu() -> int | None:
    """The CPU this thread runs on now (glibc's `sched_getcpu`), None where unknown."""
    try:
        cpu = ctypes.CDLL(ctypes.util.find_library("c") or None).sched_getcpu()
    except (OSError, AttributeError):
        return None
    return cpu if cpu >= 0 else None


@contextlib.contextmanager
def pinned_to_current_cpu():
    """This thread held on the CPU it runs on now, as a busy rank stays on its core (its
    affinity restored after). Where the platform cannot pin, nothing changes."""
    cpu = _current_cpu()
    getter = getattr(os, "sched_getaffinity", None)
    before = getter(0) if getter is not None and cpu is not None else None
    if before is None or cpu not in before:
        yield
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure_page_fault_s_per_byte(num_bytes: int = FAULT_SAMPLE_BYTES, *, repeats: int = 5,
                                  median: bool = False) -> float:
    """Seconds per byte a freshly mapped block costs on top of a recycled one: the same fill
    of `num_bytes` into a new anonymous mapping (each page faults and is zeroed by the
    kernel, as glibc's mmap-served blocks are), unmapped again as glibc returns a freed block
    (the kernel frees its pages: ~0.08 ns/B here, ~15% of the fault), and into an already
    touched buffer. The fastest of `repeats` differences, or the median (`median`: beside
    the profile's twins).

    Timed in this thread's CPU time (user + kernel: the fault is kernel time on the faulting
    thread) with the thread held on one CPU (`pinned_to_current_cpu`), as a busy rank runs.
    The wall clock of an unpinned process that sleeps at the profile's barriers beside its
    twin varied 6e-10 to 2.6e-9 s/B from one sample to the next on this 2-core VM; pinned CPU
    time, 4.5e-10 to 7e-10 (the in-step price of memory-bound plans, from their step time
    with and without the fixed thresholds over their counted minor faults: 4.9e-10 dp2,
    5.7e-10 sp2). One torch thread while it runs (the price of a byte to the thread that
    touches it; the ranks of a CPU node run one thread each, `rank_conditions`)."""
    reused = torch.empty(num_bytes, dtype=torch.uint8)
    reused.fill_(0)
    fresh_s, reused_s = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # every page touched by this thread, whose CPU time is read
    try:
        with pinned_to_current_cpu():
            for _ in range(max(1, repeats)):
                mapping = mmap.mmap(-1, num_bytes)
                block = torch.frombuffer(mapping, dtype=torch.uint8)
                start = time.thread_time()
                block.fill_(1)
                del block
                mapping.close()
                fresh_s.append(time.thread_time() - start)
                start = time.thread_time()
                reused.fill_(1)
                reused_s.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    pick = statistics.median if median else min
    return max(0.0, pick(fresh_s) - pick(reused_s)) / num_bytes


class AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The byte size of every new storage an op returns, in call order: an output whose
    storage is not one of the op's inputs' (views and in-place results share theirs).
    Autograd's backward on the CPU runs on the calling thread under the same mode, so it is
    recorded too."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs and storage.nbytes():
                    inputs.add(storage.data_ptr())
                    self.sizes.append(storage.nbytes())
        return out


def record_allocations(run: Callable[[], None]) -> list[int]:
    """Sizes of the storages `run()` allocates, in order."""
    with AllocationRecorder() as recorder:
        run()
    return recorder.sizes


def fit_allocations(tokens: Sequence[int], sizes: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per allocation [a, b] with size = a + b * tokens, from its size at each measured token
    count (the same code runs the same allocations in the same order at every length); a
    single length, or lengths whose allocation counts differ, scale the largest run's sizes
    with the tokens (b = size / tokens)."""
    if not sizes:
        return []
    counts = {len(s) for s in sizes}
    if len(tokens) >= 2 and len(counts) == 1 and len(set(tokens)) >= 2:
        design = np.stack([np.ones(len(tokens)), np.asarray(tokens, float)], axis=1)
        coef, *_ = np.linalg.lstsq(design, np.asarray(sizes, float), rcond=None)
        return [[float(a), float(b)] for a, b in zip(coef[0], coef[1])]
    largest = int(np.argmax(tokens))
    return [[0.0, size / tokens[largest]] for size in sizes[largest]]
