"""Stores and copies on CUDA (marked `gpu`, skipped without CUDA): a pinned host arena and the
NVMe tier round-trip device tensors on the copy stream, the engine's token-slice copies match
the CPU reference; and on the CPU, the host-memory check of the arena."""

from __future__ import annotations

import pytest
import torch

import offload.arena
from disttrain.device import Device
from offload.engine import CopyEngineConfig, create_engine
from offload.stores import CpuStore, CpuStoreConfig, NvmeStore, NvmeStoreConfig, StoreBudgetError

MIB = 1 << 20


def test_cpu_arena_larger_than_available_host_memory_is_refused_with_the_numbers(monkeypatch):
    engine = create_engine(CopyEngineConfig(backend="python"))
    monkeypatch.setattr(offload.arena, "available_host_bytes", lambda: 3 * MIB)
    with pytest.raises(StoreBudgetError, match=rf"cpu store: the plan's host arena needs "
                                               rf"{4 * MIB} bytes .* {3 * MIB} bytes available"):
        CpuStore(CpuStoreConfig(budget_bytes=4 * MIB), engine)
    store = CpuStore(CpuStoreConfig(budget_bytes=2 * MIB), engine)  # fits: no error, not pinned
    assert not store._memory.is_pinned()
    engine.shutdown()


@pytest.fixture(scope="module")
def cuda_engine():
    engine = create_engine(CopyEngineConfig(backend="auto"))
    yield engine
    engine.shutdown()


@pytest.mark.gpu
def test_cpu_store_round_trips_cuda_tensors_through_a_pinned_arena(cuda_engine):
    device = Device("cuda", 0)
    store = CpuStore(CpuStoreConfig(budget_bytes=8 * MIB), cuda_engine, device)
    assert store._memory.is_pinned() and store.fetch_allocates
    x = torch.randn(64, 33, device="cuda")
    strided = torch.randn(64, 40, device="cuda")[:, 3:20]  # not dense: copied contiguous
    expected = (x.clone(), strided.clone())
    held = [store.put(x), store.put(strided)]
    x.zero_()  # after put: the copy stream waited for the source to be final
    for stored, want in zip(held, expected):
        store.prefetch(stored)
        got = store.get(stored)
        assert got.is_cuda and torch.equal(got, want)
        store.release(stored)
    assert store.bytes_in_use == 0


@pytest.mark.gpu
def test_nvme_store_round_trips_cuda_tensors_through_pinned_staging(cuda_engine, tmp_path):
    device = Device("cuda", 0)
    with NvmeStore(NvmeStoreConfig(path=str(tmp_path), budget_bytes=16 * MIB, run_id="g"),
                   cuda_engine, device) as store:
        values = [torch.randn(1000, 7, device="cuda", dtype=dtype)
                  for dtype in (torch.float32, torch.bfloat16)]
        held = [store.put(v) for v in values]
        for stored in held:
            store.wait_written(stored)
        for stored, want in zip(held, values):
            got = store.get(stored)
            assert got.is_cuda and got.dtype == want.dtype and torch.equal(got, want)
            store.release(stored)


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["pinned", "cuda"])
def test_engine_token_slices_on_cuda_match_the_cpu(cuda_engine, target):
    full = torch.randn(3, 50, 24, device="cuda")
    starts, lengths = [0, 10, 31], [4, 9, 19]
    total = sum(lengths)
    buffer = (torch.empty(3, total, 24, pin_memory=True) if target == "pinned"
              else torch.empty(3, total, 24, device="cuda"))
    cuda_engine.gather(full, 1, starts, lengths, buffer).wait()
    reference = torch.cat([full.cpu()[:, s:s + n] for s, n in zip(starts, lengths)], 1)
    assert torch.equal(buffer.cpu(), reference)
    restored = torch.zeros_like(full)
    cuda_engine.scatter(buffer, 1, starts, lengths, restored).wait()
    for s, n in zip(starts, lengths):
        assert torch.equal(restored[:, s:s + n], full[:, s:s + n])
