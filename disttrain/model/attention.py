"""The attention core: softmax(QK^T)V with its log-sum-exp, as one autograd unit.

Shape legend: B batch, S sequence, N query heads, K key/value heads, D head dim.

On CPU this calls the flash kernel pair `_scaled_dot_product_flash_attention_for_cpu` /
`..._backward` directly, on CUDA the flash (bf16/fp16) or memory-efficient (fp32) SDPA kernel
pair, so the forward's output and log-sum-exp (lse) are explicit tensors: the activation
runtime keeps or swaps exactly these two and never recomputes the core, and ring attention
merges blocks with the lse. On other devices the core falls back to PyTorch's SDPA (the lse
is then not exposed: `flash_attention_forward` raises there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disttrain.model.documents import current_documents, document_bounds, piece_blocks

_aten = torch.ops.aten


def flash_attention_forward(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                            causal: bool, scale: float | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out_BNSD, lse_BNS fp32). Grouped-query attention (K < N) is native on the CPU;
    on CUDA k and v are repeated to N heads for the kernel (flash for bf16/fp16, the
    memory-efficient kernel for fp32, whose lse is padded to 32 rows and cut back here)."""
    if q_BNSD.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q_BNSD, k_BKSD, v_BKSD, 0.0, causal, scale=scale)
        return out, lse
    if q_BNSD.device.type != "cuda":
        raise NotImplementedError(f"flash_attention_forward: no lse-exposing kernel on "
                                  f"{q_BNSD.device.type}")
    k_BNSD, v_BNSD = _repeat_kv(k_BKSD, q_BNSD.shape[1]), _repeat_kv(v_BKSD, q_BNSD.shape[1])
    if q_BNSD.dtype in _FLASH_DTYPES:
        out, lse = _aten._scaled_dot_product_flash_attention(
            q_BNSD, k_BNSD, v_BNSD, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    out, lse = _aten._scaled_dot_product_efficient_attention(
        q_BNSD, k_BNSD, v_BNSD, None, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., :q_BNSD.shape[2]].contiguous()


def flash_attention_backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, out_BNSD, lse_BNS,
                             causal: bool, scale: float | None = None):
    """Gradients (dq, dk, dv) from the saved output and lse; the forward is not rerun."""
    if q_BNSD.device.type == "cpu":
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_BNSD.contiguous(), q_BNSD, k_BKSD, v_BKSD, out_BNSD, lse_BNS, 0.0, causal,
            scale=scale)
        return dq, dk, dv
    num_heads, num_kv = q_BNSD.shape[1], k_BKSD.shape[1]
    k_BNSD, v_BNSD = _repeat_kv(k_BKSD, num_heads), _repeat_kv(v_BKSD, num_heads)
    seq_q, seq_k = q_BNSD.shape[2], k_BKSD.shape[2]
    # No dropout: the RNG state the kernels take is unused (any tensor of the right kind).
    if q_BNSD.dtype in _FLASH_DTYPES:
        seed = torch.zeros(2, dtype=torch.uint64, device=q_BNSD.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q_BNSD.device)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout_BNSD.contiguous(), q_BNSD, k_BNSD, v_BNSD, out_BNSD, lse_BNS.contiguous(),
            None, None, seq_q, seq_k, 0.0, causal, seed, offset, scale=scale)
    else:
        padded = -(-seq_q // 32) * 32
        lse = torch.nn.functional.pad(lse_BNS, (0, padded - seq_q)).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=q_BNSD.device)
        offset = torch.zeros((), dtype=torch.int64, device=q_BNSD.device)
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout_BNSD.contiguous(), q_BNSD, k_BNSD, v_BNSD, None, out_BNSD, lse, seed, offset,
            0.0, [True, True, True, False], causal, scale=scale)
    return dq, _sum_kv_groups(dk, num_kv), _sum_kv_groups(dv, num_kv)


_FLASH_DTYPES = (torch.bfloat16, torch.float16)


def _repeat_kv(kv_BKSD: torch.Tensor, num_heads: int) -> torch.Tensor:
    """K key/value heads repeated to the N query heads (query head h reads kv head h // (N/K))."""
    num_kv = kv_BKSD.shape[1]
    return kv_BKSD if num_kv == num_heads else kv_BKSD.repeat_interleave(num_heads // num_kv, 1)


def _sum_kv_groups(d_BNSD: torch.Tensor, num_kv: int) -> torch.Tensor:
    """The gradient of `_repeat_kv`: each kv head gets the sum over the query heads it served."""
    b, n, s, d = d_BNSD.shape
    return d_BNSD if n == num_kv else d_BNSD.view(b, num_kv, n // num_kv, s, d).sum(2)


def document_attention_forward(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor,
                               v_BKSD: torch.Tensor, doc_ids_BS: torch.Tensor,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention where a token sees only earlier tokens of its own document.

    `doc_ids_BS` labels every token of the (whole, global-order) sequence; each document is
    a contiguous run. The CPU flash kernel has no variable-length mode, so every document of
    every row is one causal kernel call: memory stays O(document), never O(S^2)."""
    out = torch.empty_like(q_BNSD)
    b, n, s, _ = q_BNSD.shape
    lse = None  # the kernel's lse dtype (fp32, or fp64 for fp64 inputs)
    for row in range(b):
        r = slice(row, row + 1)
        for blk in piece_blocks(document_bounds(doc_ids_BS[row]), 0, s, 0, s):
            o, l = flash_attention_forward(q_BNSD[r, :, blk.q], k_BKSD[r, :, blk.k],
                                           v_BKSD[r, :, blk.k], causal=True, scale=scale)
            if lse is None:
                lse = torch.empty(b, n, s, dtype=l.dtype, device=l.device)
            out[r, :, blk.q] = o
            lse[r, :, blk.q] = l
    return out, lse


def document_attention_backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, out_BNSD, lse_BNS,
                                doc_ids_BS: torch.Tensor, scale: float | None = None):
    """(dq, dk, dv) of `document_attention_forward`, one kernel call per document."""
    dq, dk, dv = (torch.zeros_like(t) for t in (q_BNSD, k_BKSD, v_BKSD))
    s = q_BNSD.shape[2]
    for row in range(q_BNSD.shape[0]):
        r = slice(row, row + 1)
        for blk in piece_blocks(document_bounds(doc_ids_BS[row]), 0, s, 0, s):
            g = flash_attention_backward(dout_BNSD[r, :, blk.q], q_BNSD[r, :, blk.q],
                                         k_BKSD[r, :, blk.k], v_BKSD[r, :, blk.k],
                                         out_BNSD[r, :, blk.q],
                                         lse_BNS[r, :, blk.q].contiguous(), causal=True,
                                         scale=scale)
            dq[r, :, blk.q], dk[r, :, blk.k], dv[r, :, blk.k] = g
    return dq, dk, dv


class AttentionCore:
    """Causal attention over this rank's tokens as an explicit forward/backward pair.

    `forward(q, k, v)` returns the output and the tensors its backward needs besides q, k, v
    (`saved`: here the output and lse); `backward(dout, q, k, v, saved)` returns (dq, dk, dv)
    without rerunning the forward. Memory policies keep or swap `saved` and recompute q, k, v;
    sequence-parallel cores (Ulysses, ring) subclass this with the same contract. Calling the
    core runs it under autograd.

    Packed documents: inside `documents_scope(doc_ids)` (see `disttrain.model.documents`)
    every core masks across document boundaries; the document ids join `saved` (a small int
    tensor, kept or swapped with the rest), so the backward needs no ambient state.
    """

    def forward(self, q_BNSD, k_BKSD, v_BKSD) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        docs = current_documents()
        if docs is not None:
            out, lse = document_attention_forward(q_BNSD, k_BKSD, v_BKSD, docs)
            return out, (out, lse, docs)
        out, lse = flash_attention_forward(q_BNSD, k_BKSD, v_BKSD, causal=True)
        return out, (out, lse)

    def backward(self, dout_BNSD, q_BNSD, k_BKSD, v_BKSD, saved):
        if len(saved) == 3:
            out, lse, docs = saved
            return document_attention_backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, out, lse, docs)
        out, lse = saved
        return flash_attention_backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, out, lse, causal=True)

    # -- token tiles: a runtime that builds q, k, v (and dout) a tile of tokens at a time --------
    # The core's inputs are "gathered" into buffers in whatever layout its kernel wants (here
    # the local tokens themselves; Ulysses: all tokens of its heads, exchanged tile by tile),
    # so no whole-sequence copy of q, k, v exists besides those buffers. Tiles are token
    # ranges [start, stop) of one batch row; every rank of a group walks the same tiles.

    def tile_buffers(self, batch: int, seq: int, examples, dtype=None) -> list[torch.Tensor]:
        """Empty gathered buffers for tensors shaped like the (1, heads, t, D) `examples`."""
        bufs = []
        for t in examples:  # (B, S, heads, D) memory, as the model's own q/k/v
            _, heads, _, d = t.shape
            bufs.append(torch.empty(batch, seq, heads, d, dtype=dtype or t.dtype,
                                    device=t.device).transpose(1, 2))
        return bufs

    def gather_tile(self, bufs, row: int, start: int, stop: int, tiles) -> None:
        """Write (1, heads, t, D) tiles of tokens [start, stop) of batch row `row`."""
        for buf, t in zip(bufs, tiles):
            buf[row:row + 1, :, start:stop].copy_(t)

    def scatter_tile(self, gathered, row: int, start: int, stop: int) -> list[torch.Tensor]:
        """Tokens [start, stop) of row `row` of gathered tensors, as (1, heads, t, D)."""
        return [g[row:row + 1, :, start:stop] for g in gathered]

    def scatter_grads_tile(self, grads, row: int, start: int, stop: int) -> list[torch.Tensor]:
        """(dq, dk, dv) of tokens [start, stop) of row `row`, from `backward_gathered`'s."""
        return self.scatter_tile(grads, row, start, stop)

    def forward_gathered(self, q, k, v) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`forward` on gathered buffers: (gathered out, saved)."""
        return self.forward(q, k, v)

    def backward_gathered(self, dout, q, k, v, saved):
        """`backward` on gathered buffers: gathered (dq, dk, dv)."""
        return self.backward(dout, q, k, v, saved)

    def __call__(self, q_BNSD, k_BKSD, v_BKSD) -> torch.Tensor:
        device = q_BNSD.device.type
        if torch.is_autocast_enabled(device):
            # RoPE may have promoted q and k to the residual stream's fp32; v is already low
            # precision: give the kernel one dtype.
            dtype = torch.get_autocast_dtype(device)
            q_BNSD, k_BKSD, v_BKSD = (t.to(dtype) for t in (q_BNSD, k_BKSD, v_BKSD))
        if (device not in ("cpu", "cuda") and type(self) is AttentionCore  # no lse kernel
                and current_documents() is None):
            return F.scaled_dot_product_attention(q_BNSD, k_BKSD, v_BKSD, is_causal=True,
                                                  enable_gqa=k_BKSD.shape[1] != q_BNSD.shape[1])
        return _CoreFunction.apply(self, q_BNSD, k_BKSD, v_BKSD)


class _CoreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core, q, k, v):
        out, saved = core.forward(q, k, v)
        ctx.core, ctx.num_saved = core, len(saved)
        ctx.save_for_backward(q, k, v, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, *saved = ctx.saved_tensors
        dq, dk, dv = ctx.core.backward(dout, q, k, v, tuple(saved))
        return None, dq, dk, dv


LOCAL_CORE = AttentionCore()


def attention(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor) -> torch.Tensor:
    """Causal attention on this rank's tokens; saves exactly q, k, v, out and lse."""
    return LOCAL_CORE(q_BNSD, k_BKSD, v_BKSD)
