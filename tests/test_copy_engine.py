"""The async copy engine (C++ extension and Python fallback): file I/O including O_DIRECT,
copies, token-slice gather/scatter, errors (the nvcc compile checks: tests/test_cuda_build.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from offload.engine import CopyEngineConfig, create_engine

ROOT = Path(__file__).resolve().parents[1]
ALIGN = 4096
CHUNK = 2 * ALIGN  # small parts: every transfer below is split among the workers


@pytest.fixture(scope="module", params=["cpp", "python"])
def engine(request):
    eng = create_engine(CopyEngineConfig(backend=request.param, chunk_bytes=CHUNK, direct_align=ALIGN))
    assert eng.backend == request.param
    yield eng
    eng.shutdown()


def aligned_empty(nbytes: int) -> torch.Tensor:
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift:shift + nbytes]


def open_pair(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:  # filesystem without O_DIRECT: the engine uses buffered I/O
        direct = -1
    return fd, direct


@pytest.mark.parametrize("nbytes,offset", [(5 * CHUNK + 123, 77), (3 * CHUNK, 2 * ALIGN), (1, 0)])
def test_file_round_trip(engine, tmp_path, nbytes, offset):
    path = tmp_path / "f.bin"
    fd, direct = open_pair(path)
    src = aligned_empty(nbytes)
    src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    engine.write_file(fd, direct, offset, src, str(path)).wait()
    assert path.read_bytes()[offset:offset + nbytes] == bytes(src.numpy())
    dst = aligned_empty(nbytes)
    handle = engine.read_file(fd, direct, offset, dst, str(path))
    handle.wait()
    assert handle.done() and handle.nbytes == nbytes
    assert torch.equal(dst, src)
    os.close(fd)
    if direct >= 0:
        os.close(direct)


def test_typed_tensors_round_trip(engine, tmp_path):
    path = tmp_path / "t.bin"
    fd, direct = open_pair(path)
    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.int64)):
        src = torch.randn(33, 17).to(dtype)
        engine.write_file(fd, direct, i * ALIGN * 4, src, str(path)).wait()
        dst = torch.empty_like(src)
        engine.read_file(fd, direct, i * ALIGN * 4, dst, str(path)).wait()
        assert torch.equal(dst, src)
    os.close(fd)


def test_read_past_end_of_file_raises_with_path(engine, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises((RuntimeError, OSError), match=rf"end of file.*{path}"):
        engine.read_file(fd, -1, 0, torch.empty(1000, dtype=torch.uint8), str(path)).wait()
    os.close(fd)


def test_bad_descriptor_raises_with_label(engine, tmp_path):
    path = tmp_path / "ro.bin"
    path.write_bytes(b"\0" * 64)
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises((RuntimeError, OSError), match=rf"pwrite failed on {path}"):
        engine.write_file(fd, -1, 0, torch.ones(16), str(path)).wait()
    os.close(fd)


def test_copy_contiguous_and_strided(engine):
    src = torch.randn(64, 300)
    dst = torch.empty_like(src)
    engine.copy(src, dst).wait()
    assert torch.equal(dst, src)
    strided = torch.randn(8, 16, 4, 32).transpose(1, 2)
    out = torch.empty(strided.shape)
    engine.copy(strided, out).wait()
    assert torch.equal(out, strided)


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_scatter_token_slices(engine, dim, dtype):
    full = torch.randn(6, 40, 5, 8).to(dtype)
    size = full.shape[dim]
    starts, lengths = [0, size // 2, size - 1], [size // 3, size // 4, 1]
    expected = torch.cat([full.narrow(dim, s, n) for s, n in zip(starts, lengths)], dim=dim)
    buf = torch.empty(expected.shape, dtype=dtype)
    engine.gather(full, dim, starts, lengths, buf).wait()
    assert torch.equal(buf, expected)
    restored = torch.zeros_like(full)
    engine.scatter(buf, dim, starts, lengths, restored).wait()
    for s, n in zip(starts, lengths):
        assert torch.equal(restored.narrow(dim, s, n), full.narrow(dim, s, n))
    untouched = torch.ones(size, dtype=torch.bool)
    for s, n in zip(starts, lengths):
        untouched[s:s + n] = False
    assert restored.index_select(dim, untouched.nonzero().flatten()).abs().sum() == 0


def test_gather_rejects_out_of_bounds(engine):
    full = torch.randn(4, 10)
    with pytest.raises((RuntimeError, IndexError)):
        engine.gather(full, 1, [8], [5], torch.empty(4, 5)).wait()


def test_auto_backend_reports_what_it_chose():
    eng = create_engine(CopyEngineConfig(backend="auto"))
    assert eng.backend in ("cpp", "python")
    assert eng.backend in eng.describe()
    assert (eng.fallback_reason == "") == (eng.backend == "cpp")
    eng.shutdown()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="copy_engine.backend"):
        CopyEngineConfig(backend="gpu")
    with pytest.raises(ValueError, match="copy_engine.chunk_bytes"):
        CopyEngineConfig(chunk_bytes=1000)


def test_staged_write_of_an_unaligned_tensor(engine, tmp_path):
    path = tmp_path / "staged.bin"
    fd, direct = open_pair(path)
    src = torch.randn(5 * CHUNK // 4 + 3)  # bytes not a multiple of the alignment
    src = src[1:]  # and an unaligned address
    padded = -(-src.nbytes // ALIGN) * ALIGN
    staging = aligned_empty(padded)
    handle = engine.write_file_staged(fd, direct, ALIGN, src, staging, str(path))
    handle.wait()
    assert handle.nbytes == src.nbytes
    data = path.read_bytes()
    assert data[ALIGN:ALIGN + src.nbytes] == bytes(src.view(torch.uint8).numpy())
    assert data[ALIGN + src.nbytes:ALIGN + padded] == b"\0" * (padded - src.nbytes)
    with pytest.raises((RuntimeError, ValueError), match="staging"):
        engine.write_file_staged(fd, direct, 0, src, aligned_empty(ALIGN), str(path)).wait()
    os.close(fd)
    if direct >= 0:
        os.close(direct)
