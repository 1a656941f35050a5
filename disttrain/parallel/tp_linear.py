"""Tensor parallelism's linears as autograd Functions: column-parallel (all-gather -> GEMM)
and row-parallel (GEMM -> reduce-scatter), with their collectives pipelined over
`tp.overlap_chunks` token blocks (`disttrain.parallel.tensor` has the layout, tp_comm.py the
tp group).

Collective matmul: a block's collective is issued asynchronously (`async_op=True`; on CUDA
NCCL runs it on its own stream, on gloo a worker thread does), so that it overlaps the GEMMs
of the other blocks and only the first block's gather (or the last block's reduce-scatter) is
waited for; a column-parallel backward instead runs its gather and its reduce-scatter each
beside one whole GEMM (bulk overlap). One block (K = 1) is one blocking collective, as before.
The bytes are the same for any K; each block is one call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from disttrain.parallel.tp_comm import TensorParallel


def _row_blocks(t: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """Up to `chunks` near-equal token blocks (row ranges) of `t` viewed as (T, features)."""
    flat = t.reshape(-1, t.shape[-1])
    return list(flat.tensor_split(max(1, min(chunks, flat.shape[0])), dim=0))


class _ColumnParallel(torch.autograd.Function):
    """outs_i = all_gather(x_Th) @ W_i^T for sibling weights sharing one input (q, k, v or
    gate, up): one all-gather forward; saves only the shard and gathers it again backward.

    With `tp.overlap_chunks` = K > 1 the tokens are split into K blocks and every block's
    all-gather is issued asynchronously up front: block i's GEMMs run while blocks > i are
    still in flight, so only the first block's gather waits (collective matmul). The
    backward overlaps in bulk (Transformer Engine's default for the qkv / fc1 backward under
    Megatron's `--tp-comm-overlap`): the shard's gather beside the input-gradient GEMMs (they
    do not read it), its reduce-scatter beside the weight-gradient GEMMs (they read the
    gathered input, not the input gradient); K = 1 gathers first and reduce-scatters under the
    weight gradient. Either way it holds two (T, H) buffers, in one of two layouts
    (`tp.column_backward`, the plan's `parallel.tp_column_backward`):

    - 'lean': the gather's rank-major staging, which the weight gradients read column block by
      column block, and the input gradient, summed over the siblings in place in the
      reduce-scatter's rank-major layout: each GEMM runs as tp GEMMs of H / tp features.
    - 'whole': one GEMM per input gradient and per weight gradient over all H features, as
      Megatron runs them, on the transposed layouts: the shard is gathered transposed, so the
      staging is X^T (H, T) as it is, and the input gradient is computed transposed, D^T =
      sum_i W_i^T g_i^T (H, T), whose rows r h .. (r + 1) h are rank r's features, the
      reduce-scatter's rank-major layout as it is. Both GEMMs read / write transposed views of
      contiguous matrices (a BLAS transpose flag, no copy); what it costs over 'lean' is two
      (T, h) transposes: the shard before the gather, the reduced gradient after it.

    The two hold the same bytes at their peak (tests/test_working_set.py measures both)."""

    @staticmethod
    def forward(ctx, tp: TensorParallel, x_Th: torch.Tensor, *weights: torch.Tensor):
        ctx.tp = tp
        ctx.save_for_backward(x_Th, *weights)
        gathers = [tp.start_gather(block) for block in _row_blocks(x_Th, tp.overlap_chunks)]
        tokens = x_Th.numel() // x_Th.shape[-1]
        outs = [torch.empty((tokens, w.shape[0]), dtype=x_Th.dtype, device=x_Th.device)
                for w in weights]
        start = 0
        for pending in gathers:
            x_cH = pending.wait()
            stop = start + x_cH.shape[0]
            for out, w in zip(outs, weights):
                torch.mm(x_cH, w.t(), out=out[start:stop])
            start = stop
        return tuple(out.view(*x_Th.shape[:-1], -1) for out in outs)

    @staticmethod
    def backward(ctx, *grads):
        x_Th, *weights = ctx.saved_tensors
        tp = ctx.tp
        live = [(i, g.reshape(-1, g.shape[-1]), w)
                for i, (g, w) in enumerate(zip(grads, weights)) if g is not None]
        if live and tp.column_backward == "whole":
            return None, *_column_backward_whole(tp, x_Th, weights, live)
        dtype = live[0][1].dtype if live else x_Th.dtype
        tokens, h = x_Th.numel() // x_Th.shape[-1], x_Th.shape[-1]
        cols = [slice(r * h, (r + 1) * h) for r in range(tp.size)]
        bulk = tp.overlap_chunks > 1 and bool(live)
        gather = tp.start_gather(x_Th, rank_major=True)
        x_rTh = None if bulk else gather.wait().view(tp.size, tokens, h)   # K = 1: gather first
        # the input gradient, summed over the siblings in place, written straight in the
        # reduce-scatter's rank-major layout: rank r's features are columns r of the weights
        parts = torch.empty((tp.size, tokens, h), dtype=dtype, device=x_Th.device)
        if not live:
            parts.zero_()
        for j, (_, g, w) in enumerate(live):
            w = w.to(g.dtype)
            for r, c in enumerate(cols):
                if j == 0:
                    torch.mm(g, w[:, c], out=parts[r])
                else:
                    parts[r].addmm_(g, w[:, c])
        grad_x = torch.empty((tokens, h), dtype=dtype, device=x_Th.device)
        scatter = tp.start_reduce_scatter(parts, out=grad_x, rank_major=True)
        del parts                       # the collective holds it until it is waited for
        if x_rTh is None:               # bulk: the gather ran beside the input-gradient GEMMs
            x_rTh = gather.wait().view(tp.size, tokens, h)
        # the weight gradients under the reduce-scatter, column block r from rank r's rows
        grad_w: list[torch.Tensor | None] = [None] * len(weights)
        for i, g, w in live:
            gw = torch.empty((w.shape[0], tp.size * h), dtype=g.dtype, device=g.device)
            for r, c in enumerate(cols):
                torch.mm(g.t(), x_rTh[r].to(g.dtype), out=gw[:, c])
            grad_w[i] = gw.to(w.dtype)
        del x_rTh
        scatter.wait()
        return None, grad_x.view(x_Th.shape).to(x_Th.dtype), *grad_w


def _column_backward_whole(tp: TensorParallel, x_Th: torch.Tensor, weights, live):
    """`_ColumnParallel`'s backward with whole GEMMs (its docstring, 'whole'): (input gradient,
    *weight gradients). The gather is waited for before the reduce-scatter is issued (they
    run in that order on the tp group anyway): with K > 1 the gather still runs beside the
    input-gradient GEMMs and the reduce-scatter beside the weight-gradient ones, and the
    transposed shard is released before the reduce-scatter's output is allocated."""
    dtype = live[0][1].dtype
    tokens, h = x_Th.numel() // x_Th.shape[-1], x_Th.shape[-1]
    H = tp.size * h
    # this rank's shard transposed, (h, T): the rank-major staging is then X^T, (H, T)
    x_hT = torch.empty((h, tokens), dtype=x_Th.dtype, device=x_Th.device)
    x_hT.copy_(x_Th.reshape(tokens, h).t())
    gather = tp.start_gather(x_hT, rank_major=True)
    del x_hT                          # the collective holds it until it is waited for
    x_HT = None if tp.overlap_chunks > 1 else gather.wait().view(H, tokens)
    # D^T = sum_i W_i^T g_i^T, one GEMM per sibling, summed in place
    d_HT = torch.empty((H, tokens), dtype=dtype, device=x_Th.device)
    for j, (_, g, w) in enumerate(live):
        w = w.to(g.dtype)
        if j == 0:
            torch.mm(w.t(), g.t(), out=d_HT)
        else:
            d_HT.addmm_(w.t(), g.t())
    if x_HT is None:                  # K > 1: the gather ran beside the input-gradient GEMMs
        x_HT = gather.wait().view(H, tokens)
    grad_hT = torch.empty((h, tokens), dtype=dtype, device=x_Th.device)
    scatter = tp.start_reduce_scatter(d_HT.view(tp.size, h, tokens), out=grad_hT,
                                      rank_major=True)
    del d_HT
    # the weight gradients under the reduce-scatter: g_i^T X, X = (X^T)^T a transposed view
    grad_w: list[torch.Tensor | None] = [None] * len(weights)
    for i, g, w in live:
        grad_w[i] = torch.mm(g.t(), x_HT.t().to(g.dtype)).to(w.dtype)
    del x_HT
    scatter.wait()
    grad_x = torch.empty(x_Th.shape, dtype=x_Th.dtype, device=x_Th.device)
    grad_x.view(tokens, h).copy_(grad_hT.t())
    return grad_x, *grad_w


class _RowParallel(torch.autograd.Function):
    """y_Th = reduce_scatter(x_local @ W_local^T): the input is this rank's heads / ffn slice.

    With `tp.overlap_chunks` = K > 1 each token block's reduce-scatter is issued as soon as
    its GEMM is done and runs under the next block's GEMM (only the last one waits); the
    backward all-gathers the output gradient's blocks up front, each into its rows of one
    (T, H) buffer, and computes block i's input gradient while the later blocks are in
    flight, then the weight gradient as one GEMM over that buffer (as Transformer Engine's
    ring-exchange proj/fc2 dgrad does): no concatenated copy of the blocks, so its peak
    bytes are the same for any K."""

    @staticmethod
    def forward(ctx, tp: TensorParallel, x: torch.Tensor, weight: torch.Tensor):
        ctx.tp = tp
        ctx.save_for_backward(x, weight)
        blocks = _row_blocks(x, tp.overlap_chunks)
        out = torch.empty((x.numel() // x.shape[-1], weight.shape[0] // tp.size),
                          dtype=x.dtype, device=x.device)
        scatters, start = [], 0
        for block in blocks:
            stop = start + block.shape[0]
            scatters.append(tp.start_reduce_scatter(F.linear(block, weight), out=out[start:stop]))
            start = stop
        for pending in scatters:
            pending.wait()
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_Th):
        x, weight = ctx.saved_tensors
        tp = ctx.tp
        x_TI = x.reshape(-1, x.shape[-1])
        # the gathers fill one (T, H) gradient block by block: the weight gradient's single
        # GEMM reads it without a concatenated copy of the blocks
        g_TH = torch.empty((x_TI.shape[0], weight.shape[0]), dtype=grad_Th.dtype,
                           device=grad_Th.device)
        gathers, start = [], 0
        for block in _row_blocks(grad_Th, tp.overlap_chunks):
            stop = start + block.shape[0]
            gathers.append((start, stop, tp.start_gather(block, out=g_TH[start:stop])))
            start = stop
        grad_x = torch.empty(x_TI.shape, dtype=g_TH.dtype, device=x.device)
        for start, stop, pending in gathers:
            g_cH = pending.wait()
            torch.mm(g_cH, weight.to(g_cH.dtype), out=grad_x[start:stop])
        grad_w = g_TH.t() @ x_TI.to(g_TH.dtype)      # one GEMM: no per-block fp32 sums
        return None, grad_x.view(x.shape).to(x.dtype), grad_w.to(weight.dtype)
