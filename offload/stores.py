"""Where swapped activations live between a layer's forward and its backward.

`CpuStore`: one pre-allocated host arena sized from the plan (pinned when the store serves a
CUDA device; refused up front when the host has less memory available), sub-allocated
first-fit and reused across steps; a request beyond the byte budget raises `StoreBudgetError`.
`NvmeStore`: one sparse file per run and rank under a directory, written and read through
the copy engine; a pre-flight check refuses to start without the free space the plan needs;
the directory is removed by `close()`, at interpreter exit, on SIGTERM, and swept by the next
run if the owning process died. Any I/O failure raises with the file path when the data is
waited on, and a released or failed slot can never be read: no stale data.

Both stores share one interface: `put(tensor) -> StoredTensor` (asynchronous),
`prefetch(stored)`, `get(stored) -> tensor` (waits), `release(stored)`. Given a CUDA `device`
(`disttrain.device.Device`), they take CUDA tensors: copies run on the device's copy stream
with events (`offload.cuda_copies`), `get` returns a new CUDA tensor the compute stream may
use at once, and the NVMe tier writes and reads through pinned staging buffers.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload.arena import (Arena, StoreBudgetError, align_up,  # noqa: F401 (re-exported)
                           check_host_memory)
from offload.cuda_copies import ThenHandle, copy_to_device, copy_to_host, wait_ready
from offload.engine import CopyEngine, CopyHandle
from offload.nvme_files import (DIR_PREFIX, check_free_space, register_for_cleanup, sweep_stale,
                                 unregister, write_owner)



class StoreIOError(RuntimeError):
    """A swap read or write failed; the message names the file."""


@dataclass(eq=False)
class StoredTensor:
    """One tensor held by a store (valid until `release`)."""

    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    offset: int
    tier: str
    write: CopyHandle | None = None
    read: CopyHandle | None = None
    buffer: torch.Tensor | None = field(default=None, repr=False)
    device_buffer: torch.Tensor | None = field(default=None, repr=False)
    """CUDA stores: the tensor read back to the device (valid until `release`)."""
    upload: CopyHandle | None = None
    """CUDA NVMe store: the host-to-device copy out of `buffer` (which lives until it ran)."""
    released: bool = False


def _typed_view(raw_u8: torch.Tensor, nbytes: int, shape: torch.Size, dtype: torch.dtype):
    return raw_u8[:nbytes].view(dtype).view(shape)


def _wait(handle: CopyHandle, where: str) -> None:
    try:
        handle.wait()
    except (RuntimeError, OSError) as err:
        raise StoreIOError(f"{where}: {err}") from err


def _check_device(t: torch.Tensor, device, what: str) -> None:
    expected = "cuda" if _on_cuda(device) else "cpu"
    if t.device.type != expected:
        raise ValueError(f"{what}: serves {expected} tensors, got one on {t.device}")


def _on_cuda(device) -> bool:
    return device is not None and device.is_cuda


@dataclass(frozen=True, kw_only=True)
class CpuStoreConfig:
    """Host-memory tier."""

    budget_bytes: int
    """Bytes the store may hold at once (the plan's host bytes for activations)."""
    alignment: int = 64
    """Alignment of every allocation in the arena."""
    pin_memory: bool | None = None
    """Pin the arena; None pins exactly when the store serves a CUDA device."""

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"cpu_store.budget_bytes: must be >= 0, got {self.budget_bytes}")
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ValueError(f"cpu_store.alignment: must be a power of two, got {self.alignment}")


class CpuStore:
    """Host-memory tier: copies into one pre-allocated arena, reused step after step."""

    tier = "cpu"
    fetch_allocates = False
    """`get` returns a view of the arena: reading back costs no new memory on a CPU device."""

    def __init__(self, config: CpuStoreConfig, engine: CopyEngine, device=None):
        """`device`: the `disttrain.device.Device` whose tensors are stored (None: the CPU)."""
        self.config, self.engine, self.device = config, engine, device
        self.fetch_allocates = _on_cuda(device)  # get() makes a new device tensor on CUDA
        check_host_memory(config.budget_bytes)
        pin = _on_cuda(device) if config.pin_memory is None else config.pin_memory
        self._memory = torch.empty(config.budget_bytes, dtype=torch.uint8, pin_memory=pin)
        self.arena = Arena(config.budget_bytes, config.alignment, "cpu store")

    def put(self, t: torch.Tensor) -> StoredTensor:
        """Start copying `t` into the arena; `t` may be freed once the copy is waited on (on
        CUDA at once: the copy stream holds it)."""
        _check_device(t, self.device, "cpu store")
        offset, size = self.arena.allocate(t.nbytes)
        region = _typed_view(self._memory[offset:offset + size], t.nbytes, t.shape, t.dtype)
        stored = StoredTensor(t.shape, t.dtype, t.nbytes, offset, self.tier, buffer=region)
        if t.is_cuda:
            stored.write = copy_to_host(self.device, self.engine, t, region)
        else:
            stored.write = self.engine.copy(t, region)
        return stored

    def wait_written(self, stored: StoredTensor) -> None:
        """Block until `stored` is fully in the store (its source may then be freed)."""
        self._check(stored)
        _wait(stored.write, "cpu store copy")

    def prefetch(self, stored: StoredTensor) -> None:
        """CUDA: start copying `stored` back to the device (after its write, on the same copy
        stream). Host memory is directly usable on a CPU device: nothing to move."""
        self._check(stored)
        if _on_cuda(self.device) and stored.read is None:
            stored.device_buffer, stored.read = copy_to_device(self.device, self.engine,
                                                               stored.buffer)

    def get(self, stored: StoredTensor) -> torch.Tensor:
        """The stored tensor: a view into the arena (CPU) or a device copy the current stream
        may use at once (CUDA); valid until `release`."""
        self._check(stored)
        if _on_cuda(self.device):
            self.prefetch(stored)
            wait_ready(self.device, stored.read)
            return stored.device_buffer
        _wait(stored.write, "cpu store copy")
        return stored.buffer

    def release(self, stored: StoredTensor) -> None:
        """Give the arena range back; `stored` can no longer be read. (CUDA: a later copy into
        the range is queued on the same copy stream, after this one's: no host wait.)"""
        self._check(stored)
        stored.released = True
        if not _on_cuda(self.device):
            _wait(stored.write, "cpu store copy")
        stored.buffer = stored.device_buffer = None
        self.arena.free(stored.offset)

    def _check(self, stored: StoredTensor) -> None:
        assert not stored.released and stored.tier == self.tier, "stale or foreign StoredTensor"

    def close(self) -> None:
        """Drop the arena."""
        self._memory = torch.empty(0, dtype=torch.uint8)

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the budget currently allocated."""
        return self.arena.in_use


@dataclass(frozen=True, kw_only=True)
class NvmeStoreConfig:
    """File tier (NVMe or any local disk)."""

    path: str
    """Directory for swap files (`cluster.nvme.path`); a per-run, per-rank subdirectory is made."""
    budget_bytes: int
    """Bytes the store may hold at once; the free-space pre-flight checks for this much."""
    run_id: str
    """Names this run's subdirectory, so concurrent runs never share files."""
    rank: int = 0
    """Process rank (one file per rank)."""
    alignment: int = 4096
    """File offsets and read buffers are aligned to this (O_DIRECT needs the block size)."""
    direct_writes: bool = True
    """Write through O_DIRECT (when supported): swapped bytes leave host memory, no page cache."""
    direct_reads: bool = False
    """Read through O_DIRECT; off by default: buffered reads with readahead measured ~2x faster
    here (bench/copy_engine.py), and clean page-cache pages are cheap to reclaim."""
    reserve: bool = False
    """posix_fallocate the whole budget up front, so the disk cannot fill mid-run."""

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"nvme_store.budget_bytes: must be >= 0, got {self.budget_bytes}")
        if self.rank < 0:
            raise ValueError(f"nvme_store.rank: must be >= 0, got {self.rank}")
        if not self.run_id or "/" in self.run_id:
            raise ValueError(f"nvme_store.run_id: must be a non-empty name without '/', got {self.run_id!r}")
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ValueError(f"nvme_store.alignment: must be a power of two, got {self.alignment}")


class NvmeStore:
    """File tier: one sparse swap file per run and rank, written and read by the copy engine."""

    tier = "nvme"
    fetch_allocates = True
    """`prefetch` allocates a host buffer per tensor, alive until `release`."""

    def __init__(self, config: NvmeStoreConfig, engine: CopyEngine, device=None):
        """`device`: the `disttrain.device.Device` whose tensors are stored (None: the CPU)."""
        self.config, self.engine, self.device = config, engine, device
        # CUDA: a file write starts once the device-to-host copy of its data ran
        self._after_copy = (cf.ThreadPoolExecutor(1, thread_name_prefix="nvme-after-d2h")
                            if _on_cuda(device) else None)
        root = Path(config.path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable")
        except OSError as err:
            raise StoreBudgetError(
                f"nvme store: cannot write to {root} ({err.strerror or err}); the plan swaps "
                f"up to {config.budget_bytes} bytes there") from None
        sweep_stale(root)
        check_free_space(root, config.budget_bytes)
        self.directory = root / f"{DIR_PREFIX}{config.run_id}-rank{config.rank}"
        self.file = self.directory / "activations.swap"
        self._fd = self._direct_fd = -1
        self._closed = False
        self._lock = threading.Lock()
        self.directory.mkdir(exist_ok=False)
        register_for_cleanup(self)  # from here on, exit paths remove the directory
        try:
            write_owner(self.directory)
            self._open_file(config)
        except BaseException:
            self.close()
            raise
        self.arena = Arena(config.budget_bytes, config.alignment, f"nvme store {self.file}")

    def _open_file(self, config: NvmeStoreConfig) -> None:
        self._fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.direct_io_reason = "disabled by config"
        if (config.direct_writes or config.direct_reads) and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.file, os.O_RDWR | os.O_DIRECT)
                self.direct_io_reason = ""
            except OSError as err:  # e.g. tmpfs: O_DIRECT unsupported; buffered I/O is used
                self.direct_io_reason = f"O_DIRECT unsupported: {err.strerror}"
        self._write_direct_fd = self._direct_fd if config.direct_writes else -1
        self._read_direct_fd = self._direct_fd if config.direct_reads else -1
        if config.reserve:
            os.posix_fallocate(self._fd, 0, config.budget_bytes)
        # Sparse up to the budget so aligned reads past the last written byte never hit EOF;
        # a file shrunk behind our back still reads short and raises.
        os.ftruncate(self._fd, config.budget_bytes)

    @property
    def direct_io(self) -> bool:
        """Whether an O_DIRECT descriptor is open (see `direct_io_reason` when not)."""
        return self._direct_fd >= 0

    def put(self, t: torch.Tensor) -> StoredTensor:
        """Start writing `t` to the swap file at a free aligned offset (CUDA: through a pinned
        staging buffer filled on the copy stream)."""
        _check_device(t, self.device, "nvme store")
        self._check_open()
        offset, _ = self.arena.allocate(t.nbytes)
        src = t.detach().contiguous()
        stored = StoredTensor(t.shape, t.dtype, t.nbytes, offset, self.tier)
        if src.is_cuda:
            staging = self._aligned_buffer(stored.nbytes)  # pinned, whole aligned blocks
            d2h = copy_to_host(self.device, self.engine, src,
                               _typed_view(staging, src.nbytes, src.shape, src.dtype))

            def write() -> None:
                d2h.wait()
                self.engine.write_file(self._fd, self._write_direct_fd, offset, staging,
                                       str(self.file)).wait()

            stored.write = ThenHandle(self._after_copy.submit(write), stored.nbytes)
        elif self._write_direct_fd >= 0:  # through an aligned staging buffer: O_DIRECT applies
            staging = self._aligned_buffer(stored.nbytes)
            stored.write = self.engine.write_file_staged(self._fd, self._write_direct_fd, offset,
                                                         src, staging, str(self.file))
        else:
            stored.write = self.engine.write_file(self._fd, -1, offset, src, str(self.file))
        return stored

    def _aligned_buffer(self, nbytes: int) -> torch.Tensor:
        """Host bytes at an aligned address, `nbytes` rounded up to the alignment."""
        align = self.config.alignment
        size = align_up(max(nbytes, 1), align)
        raw = torch.empty(size + align, dtype=torch.uint8, pin_memory=_on_cuda(self.device))
        shift = (-raw.data_ptr()) % align
        return raw[shift:shift + size]

    def wait_written(self, stored: StoredTensor) -> None:
        """Block until `stored` is on disk (from the engine's view; its source may then be freed)."""
        self._check(stored)
        _wait(stored.write, "nvme store write")

    def prefetch(self, stored: StoredTensor) -> None:
        """Start reading `stored` back (after its write finished) into an aligned host buffer."""
        self._check(stored)
        if stored.read is not None:
            return
        _wait(stored.write, "nvme store write")
        stored.buffer = self._aligned_buffer(stored.nbytes)
        stored.read = self.engine.read_file(self._fd, self._read_direct_fd, stored.offset,
                                            stored.buffer, str(self.file))

    def get(self, stored: StoredTensor) -> torch.Tensor:
        """The stored tensor read back (starts the read if `prefetch` did not); on CUDA then
        copied to the device on the copy stream, usable by the current stream at once."""
        self.prefetch(stored)
        _wait(stored.read, "nvme store read")
        host = _typed_view(stored.buffer, stored.nbytes, stored.shape, stored.dtype)
        if not _on_cuda(self.device):
            return host
        if stored.device_buffer is None:
            stored.device_buffer, stored.upload = copy_to_device(self.device, self.engine, host)
            wait_ready(self.device, stored.upload)
        return stored.device_buffer

    def release(self, stored: StoredTensor) -> None:
        """Give the file range back; `stored` can no longer be read."""
        self._check(stored)
        stored.released = True
        # the pinned read buffer goes back to torch's host cache: no copy may still read it
        for handle in (stored.write, stored.read, stored.upload):
            if handle is not None:
                _wait(handle, "nvme store")
        stored.buffer = stored.device_buffer = None
        self.arena.free(stored.offset)

    def _check(self, stored: StoredTensor) -> None:
        self._check_open()
        assert not stored.released and stored.tier == self.tier, "stale or foreign StoredTensor"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreIOError(f"nvme store {self.file} is closed")

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the budget currently allocated."""
        return self.arena.in_use

    def close(self) -> None:
        """Close the descriptors and delete this run's directory (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if getattr(self, "_after_copy", None) is not None:
                self._after_copy.shutdown(wait=True)  # no write may run on a closed file
            for fd in (self._fd, self._direct_fd):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(self.directory, ignore_errors=False)
            unregister(self)

    def __enter__(self) -> "NvmeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def open_stores(activations, *, engine: CopyEngine, cpu_budget_bytes: int = 0,
                nvme_path: str | None = None, nvme_budget_bytes: int = 0, run_id: str = "run",
                rank: int = 0, device=None) -> dict[str, "CpuStore | NvmeStore"]:
    """The stores the plan's swapping layers name (tier -> store), each with its byte budget,
    for the tensors of `device` (`disttrain.device.Device`; None: the CPU)."""
    tiers = {a.tier for a in activations if not a.keep_all and
             (a.swap_fraction > 0 or a.swap_input or a.swap_attention_output)}
    stores: dict[str, CpuStore | NvmeStore] = {}
    if "cpu" in tiers:
        stores["cpu"] = CpuStore(CpuStoreConfig(budget_bytes=cpu_budget_bytes), engine, device)
    if "nvme" in tiers:
        if not nvme_path:
            raise ValueError("cluster.nvme.path: the plan swaps activations to nvme but no path is set")
        stores["nvme"] = NvmeStore(NvmeStoreConfig(path=nvme_path, budget_bytes=nvme_budget_bytes,
                                                   run_id=run_id, rank=rank), engine, device)
    return stores
