"""Offsets for the stores: a first-fit sub-allocator over a fixed byte range; and the check
that a host arena fits the memory the machine has available.

The runtime frees in roughly the reverse order it allocates (backward runs layers in reverse),
so first-fit over a sorted block list stays compact and every step reuses the same ranges.
"""

from __future__ import annotations

from pathlib import Path

GIB = float(1 << 30)


class StoreBudgetError(RuntimeError):
    """A store was asked to hold more bytes than its budget."""


def available_host_bytes() -> int | None:
    """Host memory available for new allocations (MemAvailable of /proc/meminfo); None where
    it cannot be read."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_host_memory(bytes_needed: int, what: str = "cpu store") -> None:
    """Refuse (StoreBudgetError with the numbers) an arena larger than the available host memory."""
    available = available_host_bytes()
    if available is not None and bytes_needed > available:
        raise StoreBudgetError(f"{what}: the plan's host arena needs {bytes_needed} bytes "
                               f"({bytes_needed / GIB:.2f} GiB), this machine has {available} "
                               f"bytes available ({available / GIB:.2f} GiB, MemAvailable); "
                               f"swap less to the CPU or use a larger host")


def align_up(n: int, align: int) -> int:
    """`n` rounded up to a multiple of `align`."""
    return (n + align - 1) // align * align


class Arena:
    """First-fit sub-allocator over [0, capacity): offsets only, no memory of its own."""

    def __init__(self, capacity: int, alignment: int, what: str):
        self.capacity, self.alignment, self.what = capacity, alignment, what
        self._blocks: list[tuple[int, int]] = []  # (offset, size), sorted by offset
        self.in_use = 0
        self.peak = 0

    def allocate(self, nbytes: int) -> tuple[int, int]:
        """(offset, reserved size) of a free aligned range of at least `nbytes`."""
        size = align_up(max(nbytes, 1), self.alignment)
        cursor, index = 0, 0
        for index, (offset, length) in enumerate(self._blocks):
            if offset - cursor >= size:
                break
            cursor = align_up(offset + length, self.alignment)
        else:
            index = len(self._blocks)
        if cursor + size > self.capacity:
            raise StoreBudgetError(
                f"{self.what}: budget exceeded: need {size} more bytes with {self.in_use} of "
                f"{self.capacity} in use ({self.capacity / GIB:.3f} GiB budget); raise the "
                f"budget or swap less")
        self._blocks.insert(index, (cursor, size))
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        return cursor, size

    def free(self, offset: int) -> None:
        """Return the range allocated at `offset`."""
        for index, (start, size) in enumerate(self._blocks):
            if start == offset:
                del self._blocks[index]
                self.in_use -= size
                return
        raise AssertionError(f"{self.what}: free of unknown offset {offset}")
