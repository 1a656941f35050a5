"""AdamW on one chunk's shard, and the CPU chunks' updates that run during the backward.

ZeRO-Offload / ProTrain overlap: a CPU-resident chunk's update needs only its own gradient
shard, so it can start once that shard is final (its last microbatch reduced) while the
backward goes on with earlier layers. One background thread runs those updates in the order
they start; torch ops release the GIL, so they run beside the main thread's backward. Both
paths call the same `adamw_`, which is why an overlapped step is bit-equal to the plain one.

The updates are timed, so a step reports the seconds of CPU optimizer work done while the
main thread did something else (overlapped) and the seconds the main thread then waited for
the rest (exposed): the runtime's counterpart of the cost model's `exposed_cpu_optimizer_s`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch


def adamw_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
           exp_avg_sq: torch.Tensor, decay_ranges: Sequence[tuple[int, int]], *, lr: float,
           step: int, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW update of a flat fp32 shard in place (the same update as torch.optim.AdamW);
    `step` counts from 1; weight decay applies to the [start, stop) element ranges of
    `decay_ranges` (the >= 2-D parameters). `grad` may be on another device than the shard
    (a CPU chunk's gradient reduced on the accelerator): it is copied over first. Reads
    `grad` only, so the gradient norm may be taken concurrently."""
    b1, b2 = betas
    bc1 = 1 - b1 ** step
    bc2_sqrt = math.sqrt(1 - b2 ** step)
    grad = grad.to(master.device)
    if weight_decay:
        for start, stop in decay_ranges:
            master[start:stop].mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / bc1)


class EarlyCpuUpdates:
    """One step's early updates of CPU chunks: counting each chunk's gradient reductions to
    see when its shard is final, running its update on the background thread, timing it."""

    def __init__(self) -> None:
        self.announced: tuple[float, int] | None = None
        """(lr, backward passes per chunk) of the coming step when its CPU chunks update early."""
        self._pool: ThreadPoolExecutor | None = None  # started on first use
        self._jobs: dict[int, tuple[Future, list[float]]] = {}
        self._reductions: dict[int, int] = {}

    def started(self, index: int | None = None) -> bool:
        """Whether chunk `index` (None: any chunk) started its update this step."""
        return bool(self._jobs) if index is None else index in self._jobs

    def reduced(self, index: int) -> bool:
        """Count a reduction of chunk `index`'s gradient; True at the announced step's last."""
        count = self._reductions[index] = self._reductions.get(index, 0) + 1
        return self.announced is not None and count == self.announced[1]

    def start(self, index: int, update: Callable[[float], None]) -> None:
        """Run chunk `index`'s `update(lr)` with the announced lr on the background thread,
        if the step was announced and the chunk has not started already."""
        if self.announced is None or index in self._jobs:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-adam")
        lr, span = self.announced[0], []

        def timed() -> None:
            span.append(time.perf_counter())
            try:
                update(lr)
            finally:
                span.append(time.perf_counter())

        self._jobs[index] = (self._pool.submit(timed), span)

    def finish(self, *, sync_cpu_s: float, device_s: float) -> dict[str, float | bool]:
        """Wait for every started update (re-raising its error), reset for the next step, and
        return the step's optimizer seconds: CPU chunks' updates in all (`cpu_s`), of it done
        before this call began waiting (`cpu_overlapped_s`: during the backward, the norm and
        the device chunks' updates), this wait plus the CPU chunks updated by the caller
        (`sync_cpu_s`) (`cpu_exposed_s`), the other chunks' updates (`device_s`), and
        `exposed_s` = the last two: the measured counterpart of the plan's `optimizer` time.
        `overlap`: some CPU chunk updated early."""
        start = time.perf_counter()
        for future, _ in self._jobs.values():
            future.result()
        waited = time.perf_counter() - start
        spans = [span for _, span in self._jobs.values()]
        stats = {"overlap": bool(spans),
                 "cpu_s": sum(end - begin for begin, end in spans) + sync_cpu_s,
                 "cpu_overlapped_s": sum(max(0.0, min(end, start) - begin)
                                         for begin, end in spans),
                 "cpu_exposed_s": waited + sync_cpu_s, "device_s": device_s,
                 "exposed_s": waited + sync_cpu_s + device_s}
        self._jobs.clear()
        self._reductions.clear()
        self.announced = None
        return stats
