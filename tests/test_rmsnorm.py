"""The lean RMSNorm (`disttrain.model.rmsnorm`) against plain PyTorch autograd of the same
expression: output, input and weight gradients, fp32 (tight) and bf16, whole and chunked."""

from __future__ import annotations

import pytest
import torch

from disttrain.model.rmsnorm import rms_norm


def reference(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 4096), (torch.float32, 7),
                                         (torch.bfloat16, 4096), (torch.bfloat16, 7)])
def test_rms_norm_matches_autograd(dtype, chunk):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 45, 96, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    g = torch.randn(2, 45, 96, generator=gen).to(dtype)
    outs = []
    for fn in (reference, lambda x, w, eps: rms_norm(x, w, eps, chunk_tokens=chunk)):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xr, wr, 1e-5)
        y.backward(g)
        outs.append((y.detach(), xr.grad, wr.grad))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for got, want in zip(outs[1], outs[0]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    if dtype == torch.float32:     # and the tolerance is tight enough to see a wrong term
        assert not torch.allclose(outs[1][1], g * w * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                  + 1e-5), rtol=1e-3)


@pytest.mark.parametrize("dtype,chunk,tp", [(torch.float32, 4096, 1), (torch.bfloat16, 4096, 1),
                                            (torch.bfloat16, 7, 1), (torch.float32, 7, 2),
                                            (torch.bfloat16, 4096, 2)])
def test_rms_norm_backward_bytes_are_the_planners(dtype, chunk, tp):
    # what the backward allocates (the incoming gradient made before), on torch's fake process
    # group when sharded: planner.working_set.norm_backward_bytes, exactly
    import torch.distributed as dist

    from planner.working_set import norm_backward_bytes
    from test_tp_linear_memory import _LiveBytes

    tokens, width = 45, 48
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, width, generator=gen).to(dtype).requires_grad_(True)
    w = torch.ones(width, dtype=dtype, requires_grad=True)
    group = None
    if tp > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        from disttrain.parallel.tp_comm import TensorParallel
        if dist.is_initialized():
            pytest.skip("a process group is already initialised in this process")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
        group = TensorParallel(dist.group.WORLD)
    try:
        y = rms_norm(x, w, 1e-5, width * tp, group, chunk_tokens=chunk)
        g = torch.randn(y.shape, generator=gen).to(dtype)
        with _LiveBytes() as live:
            y.backward(g)
    finally:
        if tp > 1:
            dist.destroy_process_group()
    assert live.peak == norm_backward_bytes(width, dtype.itemsize, tokens, tp, chunk)
