"""The attention core: softmax(QK^T)V with its log-sum-exp, as one autograd unit.

Shape legend: B batch, S sequence, N query heads, K key/value heads, D head dim.

On CPU this calls the flash kernel pair `_scaled_dot_product_flash_attention_for_cpu` /
`..._backward` directly, so the forward's output and log-sum-exp (lse) are explicit tensors:
the activation runtime keeps or swaps exactly these two and never recomputes the core, and
ring attention merges blocks with the lse. Elsewhere the core falls back to PyTorch's SDPA
(the lse is then not exposed: `flash_attention_forward` raises on such devices; the GPU
path is a later issue's).
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


class AttentionCore:
    """Causal attention over this rank's tokens as an explicit forward/backward pair.

    `forward(q, k, v)` returns the output and the tensors its backward needs besides q, k, v
    (`saved`: here the output and lse); `backward(dout, q, k, v, saved)` returns (dq, dk, dv)
    without rerunning the forward. Memory policies keep or swap `saved` and recompute q, k, v;
    sequence-parallel cores (Ulysses, ring) subclass this with the same contract. Calling the
    core runs it under autograd.
    """

    def forward(self, q_BNSD, k_BKSD, v_BKSD) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out, lse = flash_attention_forward(q_BNSD, k_BKSD, v_BKSD, causal=True)
        return out, (out, lse)

    def backward(self, dout_BNSD, q_BNSD, k_BKSD, v_BKSD, saved):
        out, lse = saved
        return flash_attention_backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, out, lse, causal=True)

    def __call__(self, q_BNSD, k_BKSD, v_BKSD) -> torch.Tensor:
        device = q_BNSD.device.type
        if torch.is_autocast_enabled(device):
            # RoPE may have promoted q and k to the residual stream's fp32; v is already low
            # precision: give the kernel one dtype.
            dtype = torch.get_autocast_dtype(device)
            q_BNSD, k_BKSD, v_BKSD = (t.to(dtype) for t in (q_BNSD, k_BKSD, v_BKSD))
        if device != "cpu" and type(self) is AttentionCore:  # no lse-exposing kernel here
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
