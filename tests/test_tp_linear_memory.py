"""The row-parallel linear's backward (`disttrain.parallel.tp_linear._RowParallel`) in bytes:
its gathers fill one (T, H) output gradient block by block, so the weight gradient's single
GEMM needs no concatenated copy and the backward's peak is the same for any
`tp_overlap_chunks`; and the gather into a given buffer is the plain gather.

Run on a real `TensorParallel` of 2 ranks on torch's fake process group (collectives are
no-ops, allocations are the runtime's) in one process; the bytes live at any moment are
tracked per storage."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T, H, I = 64, 32, 24
"""Tokens, hidden (the gathered output gradient's width), this rank's input features."""
FP32 = 4


@pytest.fixture
def fake_tp2():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from disttrain.parallel.tp_comm import TensorParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield lambda chunks: TensorParallel(dist.group.WORLD, overlap_chunks=chunks)
    finally:
        dist.destroy_process_group()


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages the ops under it allocated that are still alive, and their peak
    (a storage is counted when an op first returns it, and released when it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                storage = t.untyped_storage()
                seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, storage.nbytes())
        return out


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_row_parallel_backward_peak_is_the_same_for_any_token_blocks(fake_tp2, chunks):
    from disttrain.parallel.tp_linear import _RowParallel

    tp = fake_tp2(chunks)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, I, generator=gen, requires_grad=True)
    w = torch.randn(H, I, generator=gen, requires_grad=True)
    y = _RowParallel.apply(tp, x, w)
    seed = torch.randn(y.shape, generator=gen)
    with _LiveBytes() as bytes_:
        y.backward(seed)
    # at most: the gathers' staging (T x H over all blocks, issued up front), the gathered
    # (T, H) gradient and the input gradient; then the (H, I) weight gradient once the
    # staging is released. Concatenating K > 1 gathered blocks added another T x H (and the
    # blocks' staging was held to the end); K = 1 held its staging to the end too.
    assert bytes_.peak == FP32 * max(2 * T * H + T * I, T * H + T * I + H * I)
    assert bytes_.live == FP32 * (T * I + H * I)      # what is left: the two gradients


def test_gather_into_a_buffer_is_the_plain_gather(fake_tp2, monkeypatch):
    # the staging is rank-major (rank r's (T, h) shard at r): both forms interleave it into
    # (T, H) with rank r's features at [r h, (r + 1) h)
    import disttrain.parallel.tp_comm as tp_comm

    class _Done:
        def wait(self):
            pass

    def gather(out, shard, group=None, async_op=False):
        out.copy_(torch.cat([shard, shard + 100]))   # rank 1's shard: rank 0's + 100
        return _Done()

    monkeypatch.setattr(tp_comm.dist, "all_gather_single", gather)
    tp = fake_tp2(1)
    shard = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    expected = torch.cat([shard, shard + 100], dim=-1)
    torch.testing.assert_close(tp.start_gather(shard).wait(), expected, rtol=0, atol=0)
    buffer = torch.zeros(10, 8)
    got = tp.start_gather(shard, out=buffer[2:8]).wait()
    assert got.data_ptr() == buffer[2:8].data_ptr()
    torch.testing.assert_close(buffer[2:8], expected, rtol=0, atol=0)
    assert not buffer[:2].any() and not buffer[8:].any()
