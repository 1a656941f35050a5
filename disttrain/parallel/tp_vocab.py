"""Tensor parallelism's vocabulary-parallel parts: the embedding, the loss over the
vocabulary-parallel head (Megatron's loss parallel), and the vocabulary padded to a multiple
of tp. `disttrain.parallel.tensor` applies them to a model.

Shape legend: T tokens, H hidden, h = H/tp, V vocab, v = V/tp (rows this rank holds).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from disttrain.parallel.tp_comm import TensorParallel, _ReduceScatterHidden


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*v, (rank+1)*v) of the embedding; the partial lookups are summed and
    scattered over the hidden dim (one reduce-scatter)."""

    def __init__(self, tp: TensorParallel, weight: torch.Tensor):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight)
        self.vocab_start = tp.rank * weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return _ReduceScatterHidden.apply(self.tp, rows * inside.unsqueeze(-1).to(rows.dtype))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(all_gather(h_Th) @ W_vH^T, target) with the logits
    split over the vocabulary (Megatron's loss parallel): per token chunk, the max and the
    sum of exponentials and the target logit are all-reduced; only `chunk` x v logits exist
    at a time. Logits of padded vocabulary rows (`_real_rows`) are -inf: they take no
    probability and get no gradient. Saves the hidden shard, W and the per-token log-sum-exp."""

    @staticmethod
    def forward(ctx, tp: TensorParallel, h_Th, weight_vH, targets_T, chunk: int):
        h_TH = tp.gather_hidden(h_Th)
        vocab, real = weight_vH.shape[0], _real_rows(tp, weight_vH.shape[0])
        local_T = targets_T - tp.rank * vocab
        inside_T = (local_T >= 0) & (local_T < vocab)
        lse_T = torch.empty(h_TH.shape[0], dtype=torch.float32, device=h_TH.device)
        total = torch.zeros((), dtype=torch.float32, device=h_TH.device)
        for s in range(0, h_TH.shape[0], chunk):
            logits = F.linear(h_TH[s:s + chunk], weight_vH).float()
            logits[:, real:] = -torch.inf
            peak = tp.all_reduce(logits.max(-1).values, dist.ReduceOp.MAX)
            rows = torch.arange(logits.shape[0], device=logits.device)
            picked = logits[rows, local_T[s:s + chunk].clamp(0, vocab - 1)]
            sums = tp.all_reduce(torch.stack([(logits - peak[:, None]).exp().sum(-1),
                                              torch.where(inside_T[s:s + chunk], picked, 0.0)]))
            lse_T[s:s + chunk] = peak + sums[0].log()
            total += (lse_T[s:s + chunk] - sums[1]).sum()
        ctx.tp, ctx.chunk = tp, chunk
        ctx.save_for_backward(h_Th, weight_vH, local_T, inside_T, lse_T)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_Th, weight_vH, local_T, inside_T, lse_T = ctx.saved_tensors
        h_TH = ctx.tp.gather_hidden(h_Th)
        real = _real_rows(ctx.tp, weight_vH.shape[0])
        grad_h = torch.empty(h_TH.shape, dtype=torch.float32, device=h_TH.device)
        grad_w = torch.zeros(weight_vH.shape, dtype=torch.float32, device=weight_vH.device)
        for s in range(0, h_TH.shape[0], ctx.chunk):
            h = h_TH[s:s + ctx.chunk]
            logits = F.linear(h, weight_vH).float()
            logits[:, real:] = -torch.inf
            dlogits = (logits - lse_T[s:s + ctx.chunk, None]).exp()
            rows = torch.nonzero(inside_T[s:s + ctx.chunk]).flatten()
            dlogits[rows, local_T[s:s + ctx.chunk][rows]] -= 1
            dlogits *= grad_total
            dlogits = dlogits.to(h.dtype)  # GEMMs in the compute dtype (`tiling`); fp32 sums
            grad_h[s:s + ctx.chunk] = dlogits @ weight_vH
            grad_w += dlogits.t() @ h
        grad_h_Th = ctx.tp.reduce_scatter_hidden(grad_h).to(h_Th.dtype)
        return None, grad_h_Th, grad_w.to(weight_vH.dtype), None, None


def vocab_parallel_lm_loss(tp: TensorParallel, hidden_BSh: torch.Tensor, weight_vH: torch.Tensor,
                           targets_BS: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean next-token cross entropy of the sharded final hidden states against the
    vocabulary-parallel head (the same value on every tp rank); `chunk_tokens` tiles it over
    tokens as `tiling.chunked_lm_loss` does (0: all tokens at once)."""
    hidden_Th = hidden_BSh.flatten(0, -2)
    targets_T = targets_BS.flatten()
    chunk = chunk_tokens if chunk_tokens > 0 else max(1, hidden_Th.shape[0])
    total = _VocabParallelCrossEntropy.apply(tp, hidden_Th, weight_vH, targets_T, chunk)
    return total / targets_T.numel()


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, as the embedding and head are held
    under tensor parallelism (Megatron pads to a multiple of 128 x tp for GEMM efficiency,
    `make_vocab_size_divisible_by`; a multiple of tp is what splitting needs)."""
    return -(-vocab_size // tp) * tp


def _real_rows(tp: TensorParallel, rows: int) -> int:
    """How many of this rank's `rows` vocabulary rows are real (not padding)."""
    if tp.vocab_size is None:
        return rows
    return max(0, min(rows, tp.vocab_size - tp.rank * rows))


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (padding of the vocabulary)."""
    extra = rows - weight.shape[0]
    return weight if extra == 0 else torch.cat([weight.detach(), weight.new_zeros(extra, *weight.shape[1:])])
