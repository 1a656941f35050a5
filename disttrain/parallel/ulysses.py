"""Ulysses sequence parallelism: all-to-all from sequence-sharded to head-sharded and back.

Shape legend: B batch, N query heads, K kv heads, S full sequence, s = S/sp local tokens,
D head dim, n = N/sp and k = K'/sp heads per rank (K' = K, or K replicated up to sp), P = sp.

Each rank holds a contiguous slice of the sequence for all heads. One all-to-all turns that
into all tokens for N/sp heads, attention runs locally with the CPU flash kernel, and a
second all-to-all brings the output back to the sequence layout (DeepSpeed-Ulysses).
Grouped-query attention: when K is a multiple of sp each rank gets K/sp whole kv heads;
when K < sp (and sp is a multiple of K) each kv head is replicated sp/K times so every rank
gets the one head its query heads share, and the replicas' gradients are summed back.

`saved` = (out_BNsD, lse_BnS): the output in the *sequence* layout (the same tensor
`forward` returns, so a runtime that keeps the attention output holds it once) and the
log-sum-exp in the *head* layout the kernel produced (+ the document ids of the whole
sequence under `documents_scope`: after the all-to-all a rank holds every token of its heads,
so document masking is the local core's, one causal kernel call per document). The
backward therefore moves dout, q, k, v and out to the head layout in one all-to-all (q, k, v
are recomputed token-wise by the runtime, never kept head-sharded) and dq, dk, dv back in a
second one.

Token tiles (`AttentionCore`'s `gather_tile` / `scatter_tile` / `*_gathered`): a runtime that
builds q, k, v a tile of tokens at a time exchanges each tile as it is built, straight into
head-layout buffers, and reads the output back a tile at a time; `saved` is then the output in
the head layout (out_BnSD, lse_BnS). The bytes exchanged per pass are the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from disttrain.model.attention import (document_attention_backward,
                                       document_attention_forward, flash_attention_backward,
                                       flash_attention_forward)
from disttrain.model.documents import current_documents
from disttrain.parallel.sp_core import SequenceParallelCore, nbytes


def ulysses_kv_repeat(num_heads: int, num_kv_heads: int, sp: int) -> int:
    """How many times each kv head is replicated so every rank holds whole GQA groups.

    Raises ValueError when the head counts cannot be split over `sp` ranks."""
    if num_heads % sp:
        raise ValueError(f"num_heads: Ulysses needs num_heads ({num_heads}) divisible by the "
                         f"sequence-parallel degree sp ({sp})")
    if num_kv_heads % sp == 0:
        return 1
    if sp % num_kv_heads == 0:
        return sp // num_kv_heads
    raise ValueError(f"num_kv_heads: Ulysses needs num_kv_heads ({num_kv_heads}) divisible by "
                     f"sp ({sp}), or sp divisible by num_kv_heads (kv heads are then "
                     f"replicated); choose another sp or use ring attention")


class UlyssesCore(SequenceParallelCore):
    """Causal attention over sequence shards via two all-to-alls per pass (see module doc)."""

    def __init__(self, group: dist.ProcessGroup | None, *, num_heads: int,
                 num_kv_heads: int) -> None:
        super().__init__(group)
        self.kv_repeat = ulysses_kv_repeat(num_heads, num_kv_heads, self.sp)
        """Replication factor of each kv head (1 unless num_kv_heads < sp)."""
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    # -- layout changes -------------------------------------------------------------------

    def _all_to_all(self, send_P: torch.Tensor) -> torch.Tensor:
        """Exchange dim-0 slices: slice j goes to rank j, slice j of the result came from j."""
        recv_P = torch.empty_like(send_P)
        dist.all_to_all_single(recv_P, send_P, group=self.group)
        self._count("all_to_all", nbytes(send_P) * (self.sp - 1) // self.sp)
        return recv_P

    def _seq_to_head(self, tensors_BhsD: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B, h, s, D) sequence shards -> (B, h/P, S, D) head shards, one collective for all."""
        p = self.sp
        b, _, s, d = tensors_BhsD[0].shape
        _check_one_dtype(tensors_BhsD)
        heads = [t.shape[1] // p for t in tensors_BhsD]
        # (B, h, s, D) -> (P, B, h/P, s, D): slice j holds the heads rank j will own
        send = torch.cat([t.reshape(b, p, h, s, d).transpose(0, 1) for t, h in
                          zip(tensors_BhsD, heads)], dim=2).contiguous()
        recv = self._all_to_all(send)  # slice j: my heads for rank j's (= chunk j's) tokens
        full = recv.permute(1, 2, 0, 3, 4).reshape(b, sum(heads), p * s, d)
        return list(full.split(heads, dim=1))

    def _head_to_seq(self, tensors_BhSD: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B, h, S, D) head shards -> (B, h*P, S/P, D) sequence shards, one collective."""
        p = self.sp
        b, _, s_full, d = tensors_BhSD[0].shape
        s = s_full // p
        _check_one_dtype(tensors_BhSD)
        heads = [t.shape[1] for t in tensors_BhSD]
        # (B, h, S, D) -> (P, B, h, s, D): slice j holds rank j's tokens
        send = torch.cat([t.reshape(b, h, p, s, d).permute(2, 0, 1, 3, 4) for t, h in
                          zip(tensors_BhSD, heads)], dim=2).contiguous()
        recv = self._all_to_all(send)  # slice j: my tokens for rank j's heads
        by_rank = recv.transpose(0, 1)  # (B, P, sum h, s, D)
        return [part.reshape(b, p * h, s, d) for part, h in zip(by_rank.split(heads, dim=2), heads)]

    def _expand_kv(self, kv_BKsD: torch.Tensor) -> torch.Tensor:
        if self.kv_repeat == 1:
            return kv_BKsD
        return kv_BKsD.repeat_interleave(self.kv_repeat, dim=1)

    def _reduce_kv(self, grad_BKsD: torch.Tensor) -> torch.Tensor:
        if self.kv_repeat == 1:
            return grad_BKsD
        b, k_rep, s, d = grad_BKsD.shape
        return grad_BKsD.view(b, k_rep // self.kv_repeat, self.kv_repeat, s, d).sum(dim=2)

    def _check(self, q_BNsD: torch.Tensor, k_BKsD: torch.Tensor) -> None:
        if (q_BNsD.shape[1], k_BKsD.shape[1]) != (self.num_heads, self.num_kv_heads):
            raise ValueError(f"q/k heads: UlyssesCore was built for num_heads={self.num_heads}, "
                             f"num_kv_heads={self.num_kv_heads}; got {q_BNsD.shape[1]} and "
                             f"{k_BKsD.shape[1]}")

    # -- the core contract --------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, q_BNsD: torch.Tensor, k_BKsD: torch.Tensor, v_BKsD: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Output (B, N, s, D) of this rank's tokens and saved = (out_BNsD, lse_BnS)."""
        self._check(q_BNsD, k_BKsD)
        q_BnSD, k_BkSD, v_BkSD = self._seq_to_head(
            [q_BNsD, self._expand_kv(k_BKsD), self._expand_kv(v_BKsD)])
        docs = current_documents()
        if docs is None:
            out_BnSD, lse_BnS = flash_attention_forward(q_BnSD, k_BkSD, v_BkSD, causal=True)
        else:
            out_BnSD, lse_BnS = document_attention_forward(q_BnSD, k_BkSD, v_BkSD, docs)
        (out_BNsD,) = self._head_to_seq([out_BnSD])
        return out_BNsD, (out_BNsD, lse_BnS) + ((docs,) if docs is not None else ())

    @torch.no_grad()
    def backward(self, dout_BNsD: torch.Tensor, q_BNsD: torch.Tensor, k_BKsD: torch.Tensor,
                 v_BKsD: torch.Tensor, saved: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of this rank's tokens; kv-replica gradients summed back."""
        out_BNsD, lse_BnS, *docs = saved
        dout_BnSD, q_BnSD, k_BkSD, v_BkSD, out_BnSD = self._seq_to_head(
            [dout_BNsD.to(q_BNsD.dtype), q_BNsD, self._expand_kv(k_BKsD),
             self._expand_kv(v_BKsD), out_BNsD])
        if docs:
            dq, dk, dv = document_attention_backward(dout_BnSD, q_BnSD, k_BkSD, v_BkSD,
                                                     out_BnSD, lse_BnS, docs[0])
        else:
            dq, dk, dv = flash_attention_backward(dout_BnSD, q_BnSD, k_BkSD, v_BkSD, out_BnSD,
                                                  lse_BnS, causal=True)
        dq_BNsD, dk_BKsD, dv_BKsD = self._head_to_seq([dq, dk, dv])
        return dq_BNsD, self._reduce_kv(dk_BKsD), self._reduce_kv(dv_BKsD)

    # -- token tiles (AttentionCore's protocol) ------------------------------------------------
    # The gathered layout is the head layout (B, h, S, D) the kernel reads, filled and emptied
    # by one all-to-all per tile of local tokens: neither a sequence-layout whole-sequence
    # q/k/v/dout/out nor a whole-sequence send/receive pair exists (the tiles carry the exchange).

    def _exchanged_heads(self, heads: int) -> int:
        return heads * (self.kv_repeat if heads == self.num_kv_heads else 1)

    def tile_buffers(self, batch, seq, examples, dtype=None):
        return [torch.empty(batch, self._exchanged_heads(t.shape[1]) // self.sp, self.sp * seq,
                            t.shape[3], dtype=dtype or t.dtype, device=t.device)
                for t in examples]

    def gather_tile(self, bufs, row, start, stop, tiles):
        p, t_len, d = self.sp, stop - start, tiles[0].shape[3]
        _check_one_dtype(bufs)
        parts = [self._expand_kv(t) if t.shape[1] == self.num_kv_heads else t for t in tiles]
        heads = [t.shape[1] // p for t in parts]
        # (1, h, t, D) -> (P, 1, h/P, t, D): slice j holds the heads rank j owns
        send = torch.cat([t.to(bufs[0].dtype).reshape(1, p, h, t_len, d).transpose(0, 1)
                          for t, h in zip(parts, heads)], dim=2).contiguous()
        del parts
        recv = self._all_to_all(send)  # slice j: my heads of rank j's tokens [start, stop)
        del send
        offset = 0
        for buf, h in zip(bufs, heads):  # rank j's tokens sit at j*s + [start, stop)
            buf[row].view(h, p, -1, d)[:, :, start:stop].copy_(
                recv[:, 0, offset:offset + h].transpose(0, 1))
            offset += h

    def scatter_tile(self, gathered, row, start, stop):
        p, d = self.sp, gathered[0].shape[3]
        _check_one_dtype(gathered)
        heads = [g.shape[1] for g in gathered]
        # slice j: tokens j*s + [start, stop) of my heads, which rank j owns
        send = torch.cat([g[row].view(h, p, -1, d)[:, :, start:stop].transpose(0, 1)
                          for g, h in zip(gathered, heads)], dim=1).unsqueeze(1)
        recv = self._all_to_all(send.contiguous())  # slice j: rank j's heads, my tokens
        del send
        out, offset = [], 0
        for h in heads:  # head j*h + i of the model is head i of rank j
            out.append(recv[:, 0, offset:offset + h].reshape(1, p * h, stop - start, d))
            offset += h
        return out

    def scatter_grads_tile(self, grads, row, start, stop):
        dq, dk, dv = self.scatter_tile(list(grads), row, start, stop)
        return dq, self._reduce_kv(dk), self._reduce_kv(dv)

    @torch.no_grad()
    def forward_gathered(self, q_BnSD, k_BkSD, v_BkSD):
        docs = current_documents()
        if docs is None:
            out_BnSD, lse_BnS = flash_attention_forward(q_BnSD, k_BkSD, v_BkSD, causal=True)
        else:
            out_BnSD, lse_BnS = document_attention_forward(q_BnSD, k_BkSD, v_BkSD, docs)
        return out_BnSD, (out_BnSD, lse_BnS) + ((docs,) if docs is not None else ())

    @torch.no_grad()
    def backward_gathered(self, dout_BnSD, q_BnSD, k_BkSD, v_BkSD, saved):
        out_BnSD, lse_BnS, *docs = saved
        if docs:
            return document_attention_backward(dout_BnSD, q_BnSD, k_BkSD, v_BkSD, out_BnSD,
                                               lse_BnS, docs[0])
        return flash_attention_backward(dout_BnSD, q_BnSD, k_BkSD, v_BkSD, out_BnSD, lse_BnS,
                                        causal=True)


def _check_one_dtype(tensors: list[torch.Tensor]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:  # cat would promote silently and change the maths
        raise ValueError(f"q/k/v dtype: Ulysses exchanges them in one buffer and needs one "
                         f"dtype, got {sorted(map(str, dtypes))}")
