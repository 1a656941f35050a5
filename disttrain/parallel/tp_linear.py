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
    backward overlaps in bulk (`_column_backward_bulk`): the shard's gather beside the whole
    input-gradient GEMM, its reduce-scatter beside the whole weight-gradient GEMM. Same bytes
    as K = 1; K = 1 gathers first and reduce-scatters under the weight gradient."""

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
        dtype = live[0][1].dtype if live else x_Th.dtype
        grad_x = torch.empty((x_Th.numel() // x_Th.shape[-1], x_Th.shape[-1]), dtype=dtype,
                             device=x_Th.device)
        if tp.overlap_chunks > 1 and live:
            grad_w = _column_backward_bulk(tp, x_Th, live, len(weights), grad_x)
            grad_w = [None if gw is None else gw.to(w.dtype) for gw, w in zip(grad_w, weights)]
            return None, grad_x.view(x_Th.shape).to(x_Th.dtype), *grad_w
        gathers = [tp.start_gather(block) for block in _row_blocks(x_Th, tp.overlap_chunks)]
        grad_w: list[torch.Tensor | None] = [None] * len(weights)
        scatters, start = [], 0
        for pending in gathers:
            x_cH = pending.wait()
            stop = start + x_cH.shape[0]
            part = None
            for _, g, w in live:
                term = g[start:stop] @ w.to(g.dtype)
                part = term if part is None else part + term
            if part is None:
                part = torch.zeros(x_cH.shape, dtype=dtype, device=x_cH.device)
            scatters.append(tp.start_reduce_scatter(part, out=grad_x[start:stop]))
            for i, g, _ in live:   # under the reduce-scatter just issued (K = 1: one block)
                grad_w[i] = g[start:stop].t() @ x_cH.to(g.dtype)
            start = stop
        for pending in scatters:
            pending.wait()
        grad_w = [None if gw is None else gw.to(w.dtype) for gw, w in zip(grad_w, weights)]
        return None, grad_x.view(x_Th.shape).to(x_Th.dtype), *grad_w


def _column_backward_bulk(tp: TensorParallel, x_Th: torch.Tensor, live: list, count: int,
                          grad_x: torch.Tensor) -> list[torch.Tensor | None]:
    """A column-parallel backward with its two collectives each beside a whole GEMM (bulk
    overlap, Transformer Engine's default for the qkv / fc1 backward under Megatron's
    `--tp-comm-overlap`): the saved input shard is all-gathered while the input-gradient GEMMs
    run (they do not read it), and that gradient is reduce-scattered into `grad_x` while the
    weight-gradient GEMMs run (they read the gathered input, not the input gradient). Each
    GEMM runs once over all tokens; same bytes as the blocked path. Returns the weight
    gradients by sibling index."""
    gather = tp.start_gather(x_Th)
    part = None
    for _, g, w in live:
        term = g @ w.to(g.dtype)
        part = term if part is None else part + term
    scatter = tp.start_reduce_scatter(part, out=grad_x)
    x_TH = gather.wait().reshape(grad_x.shape[0], -1)
    grad_w: list[torch.Tensor | None] = [None] * count
    for i, g, _ in live:
        grad_w[i] = g.t() @ x_TH.to(g.dtype)
    scatter.wait()
    return grad_w


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
