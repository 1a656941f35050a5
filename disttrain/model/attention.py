"""The attention core: softmax(QK^T)V with its log-sum-exp, as one autograd unit.

Shape legend: B batch, S sequence, N query heads, K key/value heads, D head dim.

On CPU this calls the flash kernel pair `_scaled_dot_product_flash_attention_for_cpu` /
`..._backward` directly, so the forward's output and log-sum-exp (lse) are explicit tensors:
the activation runtime keeps or swaps exactly these two and never recomputes the core, and
ring attention merges blocks with the lse. Elsewhere the core falls back to PyTorch's SDPA
(the lse is then not exposed: `flash_attention_forward` raises on such devices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten


def flash_attention_forward(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                            causal: bool, scale: float | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out_BNSD, lse_BNS fp32). Grouped-query attention (K < N) is native."""
    if q_BNSD.device.type != "cpu":
        raise NotImplementedError("flash_attention_forward: only the CPU kernel exposes the lse")
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        q_BNSD, k_BKSD, v_BKSD, 0.0, causal, scale=scale)
    return out, lse


def flash_attention_backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, out_BNSD, lse_BNS,
                             causal: bool, scale: float | None = None):
    """Gradients (dq, dk, dv) from the saved output and lse; the forward is not rerun."""
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout_BNSD.contiguous(), q_BNSD, k_BKSD, v_BKSD, out_BNSD, lse_BNS, 0.0, causal,
        scale=scale)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = flash_attention_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q_BNSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
              causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Causal attention; saves exactly q, k, v, out and lse for the backward.

    Under autocast the three inputs are cast to the autocast dtype (RoPE may have promoted
    q and k to the residual stream's fp32 while v is already low precision)."""
    device = q_BNSD.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q_BNSD, k_BKSD, v_BKSD = (t.to(dtype) for t in (q_BNSD, k_BKSD, v_BKSD))
    if device == "cpu":
        return _FlashAttention.apply(q_BNSD, k_BKSD, v_BKSD, causal, scale)
    return F.scaled_dot_product_attention(q_BNSD, k_BKSD, v_BKSD, is_causal=causal,
                                          scale=scale, enable_gqa=k_BKSD.shape[1] != q_BNSD.shape[1])
