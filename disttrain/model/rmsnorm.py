"""RMSNorm as one autograd Function with a memory-lean backward (same maths as autograd's).

y = (x * r).to(dtype) * w with r = rsqrt(mean(x^2) + eps), x upcast to fp32. The forward saves
what autograd saves for that expression (the fp32 copy of x, r and the normed tensor in the
compute dtype; `planner.analytic` counts them), so only the backward changes: autograd's runs
at full length with five fp32 (T, H) temporaries, this one walks the tokens in chunks of
`chunk_tokens` and holds, beyond the input gradient it returns, only one chunk's fp32
temporaries (`planner.working_set` counts them). With the features sharded over tensor
parallelism (`tp`, `disttrain.parallel.tensor.ShardedRMSNorm`) the sum of squares is
all-reduced per token forward and the per-token dot product <dy * w, x> backward, one fp32 a
token each way as before.

Shape legend: T tokens (any leading dims), H features of this rank, Hf the full hidden size.
"""

from __future__ import annotations

import torch

from planner.working_set import NORM_CHUNK_TOKENS


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, hidden_size: int,
                tp, chunk_tokens: int) -> torch.Tensor:
        xf = x.float()
        if tp is None:
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        else:
            rstd = torch.rsqrt(tp.all_reduce(xf.pow(2).sum(-1, keepdim=True)) / hidden_size + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(xf, rstd, normed, weight)
        ctx.tp, ctx.hidden_size, ctx.chunk, ctx.x_dtype = tp, hidden_size, chunk_tokens, x.dtype
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xf, rstd, normed, weight = ctx.saved_tensors
        width = xf.shape[-1]
        g_TH = grad.reshape(-1, width)
        x_TH, r_T1, n_TH = xf.reshape(-1, width), rstd.reshape(-1, 1), normed.reshape(-1, width)
        tokens = x_TH.shape[0]
        step = max(1, min(ctx.chunk, tokens))
        blocks = [(s, min(s + step, tokens)) for s in range(0, tokens, step)]

        # every buffer up front (one chunk's fp32 (c, H) and (c, 1), or (T, 1) for the
        # all-reduced dots; the weight gradient's sum and a chunk's term), reused per chunk
        grad_x = torch.empty(x_TH.shape, dtype=ctx.x_dtype, device=xf.device)
        buf = torch.empty((step, width), dtype=torch.float32, device=xf.device)
        dots = torch.empty((step if ctx.tp is None else tokens, 1), dtype=torch.float32,
                           device=xf.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=xf.device)
        term_w = torch.empty(weight.shape, dtype=torch.float32, device=xf.device)

        def dot(s: int, e: int) -> torch.Tensor:   # <dy * w, x> per token, fp32 (c, 1)
            gw = torch.mul(g_TH[s:e], weight, out=buf[:e - s])   # (dy * w).float(), no copy
            out = dots[:e - s] if ctx.tp is None else dots[s:e]
            return torch.sum(gw.mul_(x_TH[s:e]), -1, keepdim=True, out=out)

        if ctx.tp is not None:          # the dot spans the ranks' features: all-reduce it first
            for s, e in blocks:
                dot(s, e)
            dots = ctx.tp.all_reduce(dots)
        for s, e in blocks:
            r = r_T1[s:e]
            coeff = dot(s, e) if ctx.tp is None else dots[s:e]
            coeff.mul_(r).mul_(r).mul_(r).div_(-ctx.hidden_size)   # d(x r)/dx's rank-one part
            dx = torch.mul(g_TH[s:e], weight, out=buf[:e - s])
            grad_x[s:e] = dx.mul_(r).addcmul_(x_TH[s:e], coeff)
            grad_w += torch.sum(torch.mul(g_TH[s:e], n_TH[s:e], out=buf[:e - s]), 0, out=term_w)
        del buf, dots, term_w, coeff, dx
        return grad_x.view(xf.shape), grad_w.to(weight.dtype), None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, hidden_size: int | None = None,
             tp=None, chunk_tokens: int = NORM_CHUNK_TOKENS) -> torch.Tensor:
    """RMSNorm of `x` over its last dim (of `hidden_size` features across the `tp` ranks
    when sharded) scaled by `weight`; backward in chunks of `chunk_tokens` tokens."""
    return _RMSNorm.apply(x, weight, eps, hidden_size or x.shape[-1], tp, chunk_tokens)
