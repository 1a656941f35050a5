"""Copy engine throughput: file write/read and token-slice copies, C++ vs Python threads vs
plain Python file I/O / plain torch copies. Prints GB/s and ratios.

    .venv/bin/python bench/copy_engine.py [--size-mib 256] [--repeats 3] [--dir /path/on/nvme]

Writes are timed to durable (fsync); before each read the file's pages are dropped from the
page cache (posix_fadvise DONTNEED), so reads come from the disk. The engine's buffers are
4 KiB-aligned, so its file I/O goes through O_DIRECT where the filesystem supports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offload.engine import CopyEngineConfig, create_engine  # noqa: E402

ALIGN = 4096


def aligned_empty(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift:shift + nbytes]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def open_engine_file(path: Path) -> tuple[int, int]:
    """(buffered fd, O_DIRECT fd or -1 where the filesystem refuses it) of a new file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return fd, os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return fd, -1


def durable_write(engine, fd: int, direct: int, src: torch.Tensor, path: Path):
    """A callable writing `src` through `engine` and syncing it to the disk."""
    def write() -> None:
        engine.write_file(fd, direct, 0, src, str(path)).wait()
        os.fsync(fd)
    return write


def file_rows(engines: dict, directory: Path, nbytes: int, repeats: int) -> list[tuple[str, float]]:
    src = aligned_empty(nbytes)
    src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    dst = aligned_empty(nbytes)
    rows = []
    for name, engine in engines.items():
        path = directory / f"bench-{name}.bin"
        fd, direct = open_engine_file(path)
        write = durable_write(engine, fd, direct, src, path)

        rows.append((f"file write, {name} engine{' (O_DIRECT)' if direct >= 0 else ''}",
                     nbytes / best_of(repeats, write)))
        for mode, read_fd in (("O_DIRECT", direct), ("buffered", -1)):
            if mode == "O_DIRECT" and direct < 0:
                continue
            read_times = []
            for _ in range(repeats):
                drop_cache(path)
                dst.zero_()
                read_times.append(best_of(1, lambda: engine.read_file(fd, read_fd, 0, dst, str(path)).wait()))
                assert torch.equal(dst, src), f"{name} engine read back different bytes"
            rows.append((f"file read, {name} engine ({mode})", nbytes / min(read_times)))
        os.close(fd)
        if direct >= 0:
            os.close(direct)
        path.unlink()
    path = directory / "bench-python-io.bin"
    view = memoryview(src.numpy())
    out = memoryview(dst.numpy())

    def py_write() -> None:
        with open(path, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())

    def py_read() -> None:
        with open(path, "rb", buffering=0) as f:
            f.readinto(out)

    rows.append(("file write, Python open/write", nbytes / best_of(repeats, py_write)))
    read_times = []
    for _ in range(repeats):
        drop_cache(path)
        read_times.append(best_of(1, py_read))
    rows.append(("file read, Python open/readinto", nbytes / min(read_times)))
    path.unlink()
    return rows


def slice_rows(engines: dict, nbytes: int, repeats: int, hidden: int) -> list[tuple[str, float]]:
    """Gather 30% of the tokens (three ranges) of a (2, S, hidden) fp32 activation."""
    seq = nbytes // (2 * hidden * 4)
    full = torch.randn(2, seq, hidden)
    starts, lengths = [0, seq // 2, seq - seq // 20], [seq // 10, seq // 10, seq // 20]
    moved = 2 * sum(lengths) * hidden * 4
    buf = torch.empty(2, sum(lengths), hidden)
    rows = [("slice gather, torch.cat(out=) of narrows",
             moved / best_of(repeats, lambda: torch.cat([full.narrow(1, s, n) for s, n in
                                                         zip(starts, lengths)], dim=1, out=buf)))]
    for name, engine in engines.items():
        rows.append((f"slice gather, {name} engine",
                     moved / best_of(repeats, lambda: engine.gather(full, 1, starts, lengths, buf).wait())))
    dst = torch.empty_like(full)
    rows.append(("whole copy, torch copy_", full.nbytes / best_of(repeats, lambda: dst.copy_(full))))
    for name, engine in engines.items():
        rows.append((f"whole copy, {name} engine",
                     full.nbytes / best_of(repeats, lambda: engine.copy(full, dst).wait())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per transfer (MiB)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=2, help="copy engine worker threads")
    parser.add_argument("--chunk-mib", type=int, default=4, help="engine request part size (MiB)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the sliced activation")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    nbytes = args.size_mib << 20
    engines = {b: create_engine(CopyEngineConfig(backend=b, num_threads=args.threads,
                                                chunk_bytes=args.chunk_mib << 20))
               for b in ("cpp", "python")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = file_rows(engines, Path(tmp), nbytes, args.repeats)
    rows += slice_rows(engines, nbytes, args.repeats, args.hidden)
    baselines = {"file write": "file write, Python open/write", "file read": "file read, Python open/readinto",
                 "slice gather": "slice gather, torch.cat(out=) of narrows", "whole copy": "whole copy, torch copy_"}
    rates = dict(rows)
    print(f"copy engine benchmark: {args.size_mib} MiB per transfer, {args.threads} engine threads "
          f"({args.chunk_mib} MiB parts), "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'operation':48s} {'GB/s':>8s} {'vs baseline':>12s}")
    for name, rate in rows:
        base = rates[baselines[name.split(',')[0]]]
        print(f"{name:48s} {rate / 1e9:8.2f} {rate / base:11.2f}x")
    for engine in engines.values():
        engine.shutdown()


if __name__ == "__main__":
    main()
