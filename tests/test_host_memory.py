"""The CPU-node allocator setting: freed large blocks leave the resident set at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import sys
from offload.host_memory import return_freed_host_memory
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))
if sys.argv[1] == 'set':
    assert return_freed_host_memory()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = libc.free.argtypes = (ctypes.c_size_t,)
blocks = [libc.malloc(1 << 20) for _ in range(20)]  # 1 MiB blocks, freed once: raises glibc's
libc.free(blocks[0])                                # dynamic mmap threshold above 1 MiB
blocks = [libc.malloc(1 << 20) for _ in range(100)]  # heap blocks under glibc's default
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
before = rss()
for b in blocks[:-1]:  # keep the last one so the heap top cannot be trimmed
    libc.free(b)
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_blocks_leave_the_resident_set_only_with_the_setting():
    def freed_kib(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, text=True,
                             capture_output=True)
        return int(out.stdout)

    assert freed_kib("set") >= 100 * 1024 * 0.9  # ~all 99 MiB returned
    assert freed_kib("default") < 10 * 1024  # glibc's default keeps them cached


def test_bad_threshold():
    from offload.host_memory import return_freed_host_memory

    with pytest.raises(ValueError, match="threshold_bytes"):
        return_freed_host_memory(0)


def test_only_memory_bound_plans_return_freed_blocks():
    """Keep-all with room to spare runs on glibc's defaults; a plan that gives up kept
    activations, or whose predicted peak nears the budget, returns freed blocks."""
    import dataclasses

    from offload.host_memory import memory_bound
    from planner.hardware import CLUSTER_PRESETS
    from planner.plan import LayerActivationPlan
    from planner.request import PlanRequest
    from planner.search import plan_job
    from planner.shapes import MODEL_PRESETS

    hw = CLUSTER_PRESETS["cpu-local"].replace(devices_per_node=2, device_memory_bytes=1 << 30)
    plan = plan_job(PlanRequest(model=MODEL_PRESETS["tiny"], hardware=hw, seq_len=128,
                                micro_batch_size=2, global_batch_size=8), with_layout=False)
    assert plan.feasible and all(a.keep_all for a in plan.activations)
    assert not memory_bound(plan)
    recompute = dataclasses.replace(plan, activations=(LayerActivationPlan(swap_fraction=0.0),)
                                    + plan.activations[1:])
    assert memory_bound(recompute)
    near = dataclasses.replace(plan, prediction=dataclasses.replace(
        plan.prediction, per_rank_peak_bytes=int(0.95 * hw.device_memory_bytes)))
    assert memory_bound(near)


KEEP_CHILD = r"""
import ctypes, resource, sys
from offload.host_memory import keep_freed_host_memory, return_freed_host_memory
if sys.argv[1] in ('keep', 'keep-then-return'):
    assert keep_freed_host_memory()
if sys.argv[1] == 'keep-then-return':
    assert return_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = libc.free.argtypes = (ctypes.c_size_t,)
size = 40 << 20  # above glibc's 32 MiB ceiling of the dynamic mmap threshold (64-bit)
faults = []
for _ in range(3):  # a step's block: allocated, filled, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and getrusage")
def test_kept_blocks_are_reused_without_faulting_and_returning_restores_mapping():
    """A keep-all plan's setting: a 40 MiB block freed and allocated again faults no page
    (glibc's default maps it afresh each time: ~10K faults); a memory-bound plan's setting,
    applied after it in the same process, maps and faults it again."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", KEEP_CHILD, mode], check=True, text=True,
                             capture_output=True)
        return int(out.stdout)

    pages = (40 << 20) // 4096
    assert faults("default") > 0.9 * pages
    assert faults("keep") < 0.01 * pages
    assert faults("keep-then-return") > 0.9 * pages
