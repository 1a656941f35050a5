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
