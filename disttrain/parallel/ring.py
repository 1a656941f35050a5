"""Ring attention (context parallelism) over a load-balanced zig-zag sequence split.

Shape legend: B batch, N query heads, K kv heads, D head dim, P = sp ranks, c = S/(2P)
tokens per chunk, s = 2c local tokens, q/k rows of one block (c or 2c).

The sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r (in that order), so
every rank has the same amount of causal work. K and V travel around the ring: at step t
rank r attends its queries to the K/V of rank (r - t) mod P while the next block is already
in flight (`batch_isend_irecv`, started before the block's compute, waited after). Which
(query chunk, key chunk) pairs are visible follows from the chunk indices:

  * step 0, own K/V: causal over the local 2c x 2c block (chunk order makes local causal
    order equal to global order: the late query chunk sees all of the early key chunk);
  * K/V from a lower rank: all local queries see its early chunk only, no mask;
  * K/V from a higher rank: only the late query chunk sees it, both its chunks, no mask.

The kernel's `is_causal` is top-left aligned, so it is only used on the square diagonal
block. Blocks are merged with their log-sum-exps (`l = logaddexp(l1, l2)`) in fp32.
The backward reuses the final out and lse: a block's gradients from the global out/lse are
exactly its share, so dq accumulates locally while dK/dV accumulators (fp32) travel the ring
behind K/V and land on the owning rank after one more hop.

`saved` = (out_BNsD, lse_BNs) of the local tokens, as for the local core.

Packed documents (`documents_scope`): every (query chunk, key chunk) pair of a step is cut by
`piece_blocks`: on the diagonal one causal call per document; across chunks at most one
unmasked call (the document spanning from the key chunk into the query chunk), pairs of
different documents are skipped. A query row untouched by a step merges a -inf lse (no
change); every row sees at least itself, so the final lse is finite and the merge exact.
`saved` then also holds the document ids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from disttrain.model.attention import flash_attention_backward, flash_attention_forward
from disttrain.model.documents import current_documents, document_bounds, piece_blocks
from disttrain.parallel.sp_core import SequenceParallelCore, nbytes

_KV_TAG, _DKV_TAG = 11, 12
"""Distinct tags: the K/V and the dK/dV messages to the same peer are in flight together."""


def zigzag_chunks(sp_rank: int, sp: int) -> tuple[int, int]:
    """The two global chunk indices (of 2*sp) a rank holds, early chunk first."""
    return sp_rank, 2 * sp - 1 - sp_rank


def zigzag_block(sp_rank: int, src_rank: int, chunk: int) -> tuple[slice, slice, bool]:
    """(local query rows, rows of the source's K/V, causal) that rank `sp_rank` computes
    against the K/V of `src_rank`; see the module docstring for why."""
    if src_rank == sp_rank:
        return slice(0, 2 * chunk), slice(0, 2 * chunk), True
    if src_rank < sp_rank:
        return slice(0, 2 * chunk), slice(0, chunk), False
    return slice(chunk, 2 * chunk), slice(0, 2 * chunk), False


class RingCore(SequenceParallelCore):
    """Causal ring attention on zig-zag shards (see module doc); shards from `shard_sequence`."""

    def _ring_exchange(self, send: torch.Tensor, tag: int) -> tuple[torch.Tensor, list]:
        """Start sending `send` to the next rank and receiving the same shape from the previous
        one; returns (receive buffer, requests to wait on)."""
        recv = torch.empty_like(send)
        nxt, prv = (self.sp_rank + 1) % self.sp, (self.sp_rank - 1) % self.sp
        ops = [dist.P2POp(dist.isend, send, group=self.group, group_peer=nxt, tag=tag),
               dist.P2POp(dist.irecv, recv, group=self.group, group_peer=prv, tag=tag)]
        self._count("p2p", nbytes(send))
        return recv, dist.batch_isend_irecv(ops)

    def _blocks(self, src: int, chunk: int, bounds: list[list[int]] | None
                ) -> list[tuple[slice, slice, slice, bool]]:
        """(batch rows, local query rows, source K/V rows, causal) computed against `src`'s
        K/V: one block without documents, the document-masked pieces with them."""
        if bounds is None:
            rows, cols, causal = zigzag_block(self.sp_rank, src, chunk)
            return [(slice(None), rows, cols, causal)]
        mine, theirs = zigzag_chunks(self.sp_rank, self.sp), zigzag_chunks(src, self.sp)
        blocks = []
        for b, row_bounds in enumerate(bounds):
            for qi, qc in enumerate(mine):
                for ki, kc in enumerate(theirs):
                    for blk in piece_blocks(row_bounds, qc * chunk, (qc + 1) * chunk,
                                            kc * chunk, (kc + 1) * chunk):
                        blocks.append((slice(b, b + 1),
                                       slice(qi * chunk + blk.q.start, qi * chunk + blk.q.stop),
                                       slice(ki * chunk + blk.k.start, ki * chunk + blk.k.stop),
                                       blk.causal))
        return blocks

    def _chunk(self, k_BKsD: torch.Tensor) -> int:
        s = k_BKsD.shape[2]
        if s % 2:
            raise ValueError(f"sequence: ring attention needs an even number of local tokens "
                             f"(two zig-zag chunks), got {s}; shard with "
                             f"shard_sequence(kind='ring')")
        return s // 2

    @torch.no_grad()
    def forward(self, q_BNsD: torch.Tensor, k_BKsD: torch.Tensor, v_BKsD: torch.Tensor
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Output (B, N, s, D) of this rank's tokens and saved = (out_BNsD, lse_BNs)."""
        chunk = self._chunk(k_BKsD)
        kv = torch.stack([k_BKsD, v_BKsD]).contiguous()
        docs = current_documents()
        bounds = None if docs is None else [document_bounds(row) for row in docs]
        out_f = lse = None
        if bounds is not None:  # rows a step does not reach merge nothing
            out_f = q_BNsD.new_zeros(q_BNsD.shape, dtype=torch.float32)
            lse = torch.full(q_BNsD.shape[:3], float("-inf"), device=q_BNsD.device)
        for step in range(self.sp):
            src = (self.sp_rank - step) % self.sp
            if step < self.sp - 1:
                kv_next, reqs = self._ring_exchange(kv, _KV_TAG)
            for b, rows, cols, causal in self._blocks(src, chunk, bounds):
                o_blk, l_blk = flash_attention_forward(q_BNsD[b, :, rows], kv[0][b, :, cols],
                                                       kv[1][b, :, cols], causal=causal)
                if out_f is None:  # step 0 covers every query row
                    out_f, lse = o_blk.float(), l_blk
                else:
                    out_f, lse = _merge(out_f, lse, o_blk, l_blk, b, rows)
            if step < self.sp - 1:
                for req in reqs:
                    req.wait()
                kv = kv_next
        out = out_f.to(q_BNsD.dtype)
        return out, (out, lse) + ((docs,) if docs is not None else ())

    @torch.no_grad()
    def backward(self, dout_BNsD: torch.Tensor, q_BNsD: torch.Tensor, k_BKsD: torch.Tensor,
                 v_BKsD: torch.Tensor, saved: tuple[torch.Tensor, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of this rank's tokens."""
        out, lse, *docs = saved
        bounds = [document_bounds(row) for row in docs[0]] if docs else None
        chunk = self._chunk(k_BKsD)
        dout = dout_BNsD.to(q_BNsD.dtype)
        kv = torch.stack([k_BKsD, v_BKsD]).contiguous()
        dq = q_BNsD.new_zeros(q_BNsD.shape, dtype=torch.float32)
        dkv_reqs: list = []
        dkv_recv = None
        for step in range(self.sp):
            src = (self.sp_rank - step) % self.sp
            if step < self.sp - 1:
                kv_next, kv_reqs = self._ring_exchange(kv, _KV_TAG)
            blocks = []
            for b, rows, cols, causal in self._blocks(src, chunk, bounds):
                dq_blk, dk_blk, dv_blk = flash_attention_backward(
                    dout[b, :, rows], q_BNsD[b, :, rows], kv[0][b, :, cols], kv[1][b, :, cols],
                    out[b, :, rows], lse[b, :, rows].contiguous(), causal=causal)
                dq[b, :, rows] += dq_blk
                blocks.append((b, cols, dk_blk, dv_blk))
            # the accumulator of src's dK/dV arrives from the previous rank (none at step 0)
            for req in dkv_reqs:
                req.wait()
            dkv = (k_BKsD.new_zeros((2,) + tuple(k_BKsD.shape), dtype=torch.float32)
                   if dkv_recv is None else dkv_recv)
            for b, cols, dk_blk, dv_blk in blocks:
                dkv[0][b, :, cols] += dk_blk
                dkv[1][b, :, cols] += dv_blk
            # pass it on; after the last step this is the hop home to its owner
            dkv_recv, dkv_reqs = self._ring_exchange(dkv, _DKV_TAG)
            if step < self.sp - 1:
                for req in kv_reqs:
                    req.wait()
                kv = kv_next
        for req in dkv_reqs:
            req.wait()
        return (dq.to(q_BNsD.dtype), dkv_recv[0].to(k_BKsD.dtype), dkv_recv[1].to(v_BKsD.dtype))


def _merge(out_f: torch.Tensor, lse: torch.Tensor, o_blk: torch.Tensor, l_blk: torch.Tensor,
           batch: slice, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's (output, lse) for batch rows `batch`, query rows `rows` into the
    running fp32 pair."""
    l_old = lse[batch, :, rows]
    l_new = torch.logaddexp(l_old, l_blk)
    merged = (out_f[batch, :, rows] * torch.exp(l_old - l_new).unsqueeze(-1)
              + o_blk.float() * torch.exp(l_blk - l_new).unsqueeze(-1))
    out_f[batch, :, rows] = merged  # both are this core's own buffers: update in place
    lse[batch, :, rows] = l_new
    return out_f, lse
