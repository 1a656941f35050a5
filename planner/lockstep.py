"""Profiling in lockstep with twins: the ranks that will share this machine's cores.

One rank alone on a 2-core machine runs a layer up to 2x faster than each of two ranks side
by side, so the profiler (`planner.profiler.profile_layer`) times its measurements while
`concurrent - 1` forked twins run the same steps, barrier by barrier.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any, Callable


def _lockstep_child(steps: Callable[[Any], Any], barrier: Any) -> None:
    """A forked twin of the profiling process: the same measurements, barrier by barrier."""
    try:
        steps(barrier)
    except threading.BrokenBarrierError:             # the profiling process gave up
        pass
    except BaseException:                            # e.g. out of memory: do not make the
        barrier.abort()                              # others wait for the timeout
        raise


class Lockstep:
    """`count` forked twins that run the same profiling steps as this process, starting each
    one together (a `multiprocessing` barrier): the other ranks that will share this
    machine's cores, computing the same thing at the same time, as SPMD ranks do.
    `count` 0, or a platform without fork, runs no twin; `active` says how many run."""

    def __init__(self, count: int, steps: Callable[[Any], Any], *, timeout_s: float = 120.0):
        self.count, self.steps, self.timeout_s = count, steps, timeout_s
        self.procs: list[Any] = []
        self.barrier: Any = None

    @property
    def active(self) -> int:
        return len(self.procs)

    def __enter__(self) -> "Lockstep":
        if self.count <= 0 or "fork" not in mp.get_all_start_methods():
            return self
        ctx = mp.get_context("fork")
        self.barrier = ctx.Barrier(self.count + 1, timeout=self.timeout_s)
        for _ in range(self.count):
            proc = ctx.Process(target=_lockstep_child, args=(self.steps, self.barrier), daemon=True)
            proc.start()
            self.procs.append(proc)
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None and self.barrier is not None:
            self.barrier.abort()                     # release twins waiting for us
        for proc in self.procs:
            proc.join(timeout=self.timeout_s)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self.procs = []


class Solo:
    """The barrier of a process measuring alone."""

    def wait(self) -> None:
        return None
