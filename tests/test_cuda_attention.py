"""The attention core's CUDA kernels (flash for bf16, memory-efficient for fp32) against PyTorch's
SDPA under autograd: output, log-sum-exp and gradients, with grouped-query attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disttrain.model.attention import flash_attention_backward, flash_attention_forward

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv", [4, 2])
def test_cuda_core_matches_sdpa_autograd(dtype, causal, num_kv):
    torch.manual_seed(0)
    b, n, s, d = 2, 4, 80, 64  # s not a multiple of 32: the efficient kernel's lse is padded
    q = torch.randn(b, n, s, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, num_kv, s, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, num_kv, s, d, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(b, n, s, d, device="cuda", dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=num_kv != n)
    ref.backward(dout)
    out, lse = flash_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.detach().float(), atol=tol, rtol=tol)
    kk = k.detach().float().repeat_interleave(n // num_kv, 1)
    scores = q.detach().float() @ kk.transpose(-1, -2) / d ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, device="cuda").triu(1).bool(), float("-inf"))
    assert lse.shape == (b, n, s) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=tol * 10, rtol=tol)
    dq, dk, dv = flash_attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse,
                                          causal=causal)
    assert dk.shape == k.shape and dv.shape == v.shape
    for mine, theirs in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=tol * 5, rtol=tol * 5)
