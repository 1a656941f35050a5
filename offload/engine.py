"""The async copy engine front end: the C++ extension (`csrc/copy_engine.cpp`) or Python threads.

Every request returns a handle with `wait()` (raises on failure, with the file path for I/O),
`done()` and `nbytes`. The backend is chosen by `CopyEngineConfig.backend` and reported as
`engine.backend` ("cpp" | "python") plus `engine.fallback_reason` when "auto" fell back, so a
run log always says which one ran.

Loading order for the C++ backend: the module built at install (`offload._copy_engine`,
setup.py's `CppExtension`), else a JIT build of the same source with
`torch.utils.cpp_extension.load` into `CopyEngineConfig.build_dir` (cached after the first
build, which takes ~20 s).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

ABI_VERSION = 2
"""Must equal `kAbiVersion` in csrc/copy_engine.cpp; a stale prebuilt module is not used."""
BACKENDS = ("auto", "cpp", "python")
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "copy_engine.cpp"
CUDA_BINDING = SOURCE.with_name("copy_engine_cuda.cpp")
CUDA_SOURCES = (SOURCE.with_name("copy_engine.cu"),)
DEFAULT_BUILD_DIR = (Path.home() / ".cache" / "disttrain" /
                     f"copy_engine-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")
MIB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class CopyEngineConfig:
    """How the copy engine is chosen and sized."""

    backend: str = "auto"
    """'cpp' (the extension, error if unavailable), 'python' (threads) or 'auto' (cpp, else python, logged)."""
    num_threads: int = 2
    """Worker threads that run copies and file I/O."""
    chunk_bytes: int = 4 * MIB
    """Large requests are split into parts of this many bytes, shared among the workers."""
    direct_align: int = 4096
    """Alignment (address, offset, length) at which file I/O goes through O_DIRECT."""
    build_dir: str = str(DEFAULT_BUILD_DIR)
    """Where the C++ source is JIT-built when no prebuilt module is importable."""
    allow_jit: bool = True
    """Build the extension on first use when it was not built at install."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"copy_engine.backend: must be one of {BACKENDS}, got {self.backend!r}")
        if self.num_threads < 1:
            raise ValueError(f"copy_engine.num_threads: must be >= 1, got {self.num_threads}")
        if self.direct_align < 1 or self.direct_align & (self.direct_align - 1):
            raise ValueError(f"copy_engine.direct_align: must be a power of two, got {self.direct_align}")
        if self.chunk_bytes < self.direct_align or self.chunk_bytes % self.direct_align:
            raise ValueError(f"copy_engine.chunk_bytes: must be a positive multiple of "
                             f"direct_align ({self.direct_align}), got {self.chunk_bytes}")


class CopyHandle(Protocol):
    """What every engine request returns."""

    def wait(self) -> None: ...
    def done(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...


class CopyEngine:
    """One engine per process; all requests are asynchronous and return a `CopyHandle`."""

    def __init__(self, impl, backend: str, config: CopyEngineConfig, fallback_reason: str = "",
                 cuda_module=None):
        self._impl = impl
        self._cuda = cuda_module
        self.backend = backend
        """'cpp' or 'python': the implementation actually running."""
        self.config = config
        self.fallback_reason = fallback_reason
        """Why 'auto' did not get the C++ backend ('' when it did or was not asked)."""

    def describe(self) -> str:
        """One line for the run log: backend, threads, and why C++ is missing if it is."""
        text = f"copy engine: {self.backend} backend, {self.config.num_threads} threads"
        if torch.cuda.is_available():
            text += (", CUDA token-slice kernels" if self.cuda_kernels else
                     ", CUDA copies by torch (extension built without CUDA)")
        return text + (f" (C++ unavailable: {self.fallback_reason})" if self.fallback_reason else "")

    def write_file(self, fd: int, direct_fd: int, offset: int, src: torch.Tensor,
                   label: str) -> CopyHandle:
        """Write the bytes of contiguous `src` at `offset`; `direct_fd` (-1: none) is used when aligned."""
        return self._impl.write_file(fd, direct_fd, offset, src, label)

    def write_file_staged(self, fd: int, direct_fd: int, offset: int, src: torch.Tensor,
                          staging: torch.Tensor, label: str) -> CopyHandle:
        """Write `src` through `staging` (aligned, >= src bytes rounded up to direct_align; the
        tail is zero-padded) so the write can use O_DIRECT whatever `src`'s address."""
        return self._impl.write_file_staged(fd, direct_fd, offset, src, staging, label)

    def read_file(self, fd: int, direct_fd: int, offset: int, dst: torch.Tensor,
                  label: str) -> CopyHandle:
        """Fill contiguous `dst` from the file at `offset`; end of file is an error."""
        return self._impl.read_file(fd, direct_fd, offset, dst, label)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> CopyHandle:
        """dst <- src (same shape and dtype, CPU)."""
        return self._impl.copy(src, dst)

    @property
    def cuda_kernels(self) -> bool:
        """Whether the extension was built with the CUDA token-slice copies (csrc/*.cu)."""
        return self._cuda is not None

    def gather(self, src: torch.Tensor, dim: int, starts: list[int], lengths: list[int],
               dst: torch.Tensor) -> CopyHandle:
        """dst <- the ranges [start, start+length) of `src` along `dim`, back to back. With a
        CUDA `src` (pinned host or CUDA `dst`) the copy is queued on the current CUDA stream."""
        if src.is_cuda:
            return self._cuda_slices(src, dim, starts, lengths, dst, to_buffer=True)
        return self._impl.gather(src, dim, list(starts), list(lengths), dst)

    def scatter(self, src: torch.Tensor, dim: int, starts: list[int], lengths: list[int],
                dst: torch.Tensor) -> CopyHandle:
        """The ranges of `dst` along `dim` <- the back-to-back ranges held in `src`. With a
        CUDA `dst` the copy is queued on the current CUDA stream."""
        if dst.is_cuda:
            return self._cuda_slices(dst, dim, starts, lengths, src, to_buffer=False)
        return self._impl.scatter(src, dim, list(starts), list(lengths), dst)

    def _cuda_slices(self, full: torch.Tensor, dim: int, starts: list[int], lengths: list[int],
                     buffer: torch.Tensor, to_buffer: bool) -> CopyHandle:
        """Token slices between CUDA `full` and `buffer` (CUDA: the pack kernel; pinned host:
        DMA), on the current stream; without the kernels, per-range torch copies."""
        from offload.cuda_copies import EventHandle

        starts, lengths = list(starts), list(lengths)
        if self._cuda is not None and buffer.is_cuda:
            self._cuda.pack_slices(full, dim, starts, lengths, buffer, to_buffer)
        elif self._cuda is not None and buffer.is_pinned():
            (self._cuda.gather_d2h(full, dim, starts, lengths, buffer) if to_buffer else
             self._cuda.scatter_h2d(buffer, dim, starts, lengths, full))
        else:
            cum = 0
            for start, length in zip(starts, lengths):
                part_full = full.narrow(dim, start, length)
                part_buf = buffer.narrow(dim, cum, length)
                (part_buf if to_buffer else part_full).copy_(
                    part_full if to_buffer else part_buf, non_blocking=True)
                cum += length
        event = torch.cuda.Event()
        event.record()
        return EventHandle(event, buffer.nbytes, keep=(full, buffer))

    def shutdown(self) -> None:
        """Finish queued requests and stop the workers."""
        self._impl.shutdown()


def create_engine(config: CopyEngineConfig | None = None) -> CopyEngine:
    """Build the engine the config asks for; 'auto' falls back to Python threads with a warning."""
    config = config or CopyEngineConfig()
    args = (config.num_threads, config.chunk_bytes, config.direct_align)
    if config.backend == "python":
        return CopyEngine(PythonEngine(*args), "python", config)
    try:
        module = load_extension(config)
    except (ImportError, OSError, RuntimeError) as err:
        if config.backend == "cpp":
            raise RuntimeError(f"copy_engine.backend 'cpp': the C++ extension is unavailable: {err}") from err
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("copy engine: C++ extension unavailable (%s); using the Python thread backend",
                    reason)
        return CopyEngine(PythonEngine(*args), "python", config, fallback_reason=reason)
    return CopyEngine(module.CopyEngine(*args), "cpp", config,
                      cuda_module=module if getattr(module, "with_cuda", False) else None)


_LOAD_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}


def load_extension(config: CopyEngineConfig):
    """The prebuilt `offload._copy_engine` if current, else a JIT build (cached per build dir)."""
    with _LOAD_LOCK:
        if config.build_dir in _LOADED:
            return _LOADED[config.build_dir]
        try:
            from offload import _copy_engine as module  # built by setup.py at install
            if module.abi_version() != ABI_VERSION:
                raise ImportError(f"prebuilt offload._copy_engine has ABI {module.abi_version()}, "
                                  f"need {ABI_VERSION} (rebuild: pip install --no-build-isolation .)")
        except ImportError as err:
            if not config.allow_jit:
                raise
            log.info("copy engine: no prebuilt module (%s); JIT-building %s", err, SOURCE)
            from torch.utils.cpp_extension import load
            sources, name, flags, build_dir = [str(SOURCE)], "disttrain_copy_engine", ["-O3"], \
                config.build_dir
            if torch.version.cuda and shutil.which("nvcc"):  # as setup.py's CUDAExtension
                sources += [str(p) for p in (*CUDA_SOURCES, CUDA_BINDING)]
                name, flags, build_dir = name + "_cuda", flags + ["-DDISTTRAIN_WITH_CUDA"], \
                    build_dir + "-cuda"
            Path(build_dir).mkdir(parents=True, exist_ok=True)
            module = load(name=name, sources=sources, build_directory=build_dir,
                          extra_cflags=flags, extra_cuda_cflags=["-O3"])
            if module.abi_version() != ABI_VERSION:
                raise ImportError(f"{SOURCE} has ABI {module.abi_version()}, expected {ABI_VERSION}")
        _LOADED[config.build_dir] = module
        return module


class _Job:
    """A request split into futures; `wait` re-raises the first failure."""

    def __init__(self, futures: list[cf.Future], nbytes: int):
        self._futures = futures
        self._nbytes = nbytes

    def wait(self) -> None:
        for future in self._futures:
            future.result()

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    @property
    def nbytes(self) -> int:
        return self._nbytes


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype), without copying."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class PythonEngine:
    """The fallback: the same requests on a `ThreadPoolExecutor` (os.pwrite / os.preadv / torch copies)."""

    def __init__(self, num_threads: int, chunk_bytes: int, direct_align: int):
        self._pool = cf.ThreadPoolExecutor(num_threads, thread_name_prefix="copy-engine")
        self.num_threads = num_threads
        self._chunk = chunk_bytes
        self._align = direct_align

    def _parts(self, total: int, body) -> list[cf.Future]:
        return [self._pool.submit(body, begin, min(self._chunk, total - begin))
                for begin in range(0, total, self._chunk)]

    def _transfer(self, write: bool, fd: int, direct_fd: int, view: memoryview, address: int,
                  begin: int, length: int, offset: int, label: str) -> None:
        """pwrite/pread view[begin:begin+length] at offset+begin (O_DIRECT when aligned)."""
        direct = (direct_fd >= 0 and (address + begin) % self._align == 0
                  and (offset + begin) % self._align == 0 and length % self._align == 0)
        use_fd = direct_fd if direct else fd
        done = 0
        while done < length:
            chunk = view[begin + done:begin + length]
            try:
                count = (os.pwrite(use_fd, chunk, offset + begin + done) if write
                         else os.preadv(use_fd, [chunk], offset + begin + done))
            except OSError as err:
                if err.errno == errno.EINVAL and use_fd == direct_fd and fd >= 0:
                    use_fd = fd  # the filesystem refused O_DIRECT here: buffered retry
                    continue
                raise OSError(err.errno, f"{'pwrite' if write else 'pread'} failed on {label}: "
                                         f"{err.strerror}") from err
            if count == 0:
                raise OSError(f"{'pwrite wrote 0 bytes' if write else 'pread hit end of file (truncated?)'}"
                              f" on {label} at offset {offset + begin + done}")
            done += count

    def _file_io(self, write: bool, fd: int, direct_fd: int, offset: int, t: torch.Tensor,
                 label: str) -> _Job:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"file I/O needs a contiguous CPU tensor ({label})")
        view = _bytes_of(t) if t.numel() else memoryview(b"")
        address = t.data_ptr()

        def body(begin: int, length: int) -> None:
            self._transfer(write, fd, direct_fd, view, address, begin, length, offset, label)

        return _Job(self._parts(t.nbytes, body), t.nbytes)

    def write_file(self, fd, direct_fd, offset, src, label) -> _Job:
        return self._file_io(True, fd, direct_fd, offset, src, label)

    def write_file_staged(self, fd, direct_fd, offset, src, staging, label) -> _Job:
        total = src.nbytes
        padded = -(-total // self._align) * self._align
        if staging.nbytes < padded or not (src.is_contiguous() and staging.is_contiguous()):
            raise ValueError(f"staged write needs contiguous tensors and {padded} staging bytes ({label})")
        stage = staging.reshape(-1)[:padded]
        src_u8 = src.reshape(-1).view(torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
        view = _bytes_of(stage) if padded else memoryview(b"")
        address = stage.data_ptr()

        def body(begin: int, length: int) -> None:
            copy_len = max(0, min(length, total - begin))
            stage[begin:begin + copy_len].copy_(src_u8[begin:begin + copy_len])
            stage[begin + copy_len:begin + length].zero_()
            self._transfer(True, fd, direct_fd, view, address, begin, length, offset, label)

        return _Job(self._parts(padded, body), total)

    def read_file(self, fd, direct_fd, offset, dst, label) -> _Job:
        return self._file_io(False, fd, direct_fd, offset, dst, label)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> _Job:
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError("copy: src and dst must have the same shape and dtype")

        def body() -> None:
            with torch.no_grad():
                dst.copy_(src)

        return _Job([self._pool.submit(body)], src.nbytes)

    def _slices(self, full: torch.Tensor, dim: int, starts: list[int], lengths: list[int],
                buffer: torch.Tensor, to_buffer: bool) -> _Job:
        if len(starts) != len(lengths):
            raise ValueError("starts and lengths differ in length")
        dim = dim % full.dim()

        def body() -> None:
            with torch.no_grad():
                cum = 0
                for start, length in zip(starts, lengths):
                    part_full = full.narrow(dim, start, length)
                    part_buf = buffer.narrow(dim, cum, length)
                    (part_buf if to_buffer else part_full).copy_(part_full if to_buffer else part_buf)
                    cum += length

        return _Job([self._pool.submit(body)], buffer.nbytes)

    def gather(self, src, dim, starts, lengths, dst) -> _Job:
        return self._slices(src, dim, starts, lengths, dst, True)

    def scatter(self, src, dim, starts, lengths, dst) -> _Job:
        return self._slices(dst, dim, starts, lengths, src, False)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
