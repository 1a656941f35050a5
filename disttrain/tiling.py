"""Token tiling: the output head + loss, and the MLP, computed over token chunks.

Once layer inputs are swapped and token-local activations recomputed, the per-layer working set
bounds the longest trainable sequence, and two terms dominate it: the (tokens x vocab) logits of
the output head and the (tokens x ffn) MLP intermediates. Both are token-local, so they can be
computed a chunk of tokens at a time, in the forward and again in the backward, with only the
chunk's intermediates alive. The results equal the untiled maths (tests check fp32 equality to
rounding).

Shape legend: T tokens (batch x sequence flattened), H hidden, V vocab, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


IGNORE = -100
"""Target of a token that predicts nothing (cross_entropy's ignore_index): no loss, no gradient."""


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(h @ W^T, target), IGNORE targets skipped, in one pass
    over the logits.

    Each tile's logits are computed once: the forward takes the tile's loss and, when a
    gradient is wanted, at once its gradients (d/dlogits = softmax - onehot on valid tokens,
    0 on IGNORE ones, then d/dh = dlogits @ W and d/dW += dlogits^T @ h). The backward only
    scales the two stored gradients by the incoming one (a scalar), so it reruns nothing; what
    stays alive between the passes is d/dh (the size of h, which a two-pass version would keep
    instead) and d/dW.
    """

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, chunk, with_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden_TH.device)
        want_h = with_grad and ctx.needs_input_grad[0]
        want_w = with_grad and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden_TH) if want_h else None
        grad_weight = torch.zeros(weight_VH.shape, dtype=torch.float32,
                                  device=weight_VH.device) if want_w else None
        for start in range(0, hidden_TH.shape[0], chunk):
            h = hidden_TH[start:start + chunk]
            t = targets_T[start:start + chunk]
            logits = F.linear(h, weight_VH).float()
            total += F.cross_entropy(logits, t, reduction="sum", ignore_index=IGNORE)
            if not (want_h or want_w):
                continue
            dlogits = torch.softmax(logits, dim=-1)  # d(sum CE)/d(logits) = softmax - onehot
            del logits
            valid = t != IGNORE
            rows = torch.arange(h.shape[0], device=h.device)
            dlogits[rows[valid], t[valid]] -= 1
            dlogits[~valid] = 0
            # the GEMMs in the compute dtype, as autograd's untiled path runs them (the
            # gradient of `.float()` casts back): on a GPU fp32 GEMMs would run at the fp32
            # rate; the weight gradient still sums over tiles in fp32
            dlogits = dlogits.to(h.dtype)
            if want_h:
                grad_hidden[start:start + chunk] = dlogits @ weight_VH
            if want_w:
                grad_weight += dlogits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight_VH.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_lm_loss(hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, targets_BS: torch.Tensor,
                    chunk_tokens: int, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy of `hidden @ weight^T` without materialising the full
    logits: at most `chunk_tokens` x V of them exist at a time, and only in the forward (the
    gradients are taken there, one pass). 'mean' over all tokens, or 'sum' over the tokens
    whose target is not IGNORE."""
    if chunk_tokens <= 0:
        raise ValueError(f"tiling.loss_chunk_tokens: must be positive, got {chunk_tokens}")
    hidden_TH = hidden_BSH.flatten(0, 1)
    targets_T = targets_BS.flatten()
    total = _ChunkedLinearCrossEntropy.apply(hidden_TH, weight_VH, targets_T, chunk_tokens,
                                             torch.is_grad_enabled())
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction: must be 'mean' or 'sum', got {reduction!r}")
    return total / targets_T.numel()


class _TiledFunction(torch.autograd.Function):
    """fn over token chunks; saves only its input and recomputes each chunk in backward."""

    @staticmethod
    def forward(ctx, x_TH, fn, chunk, *params):
        with torch.no_grad():
            out = torch.cat([fn(x_TH[s:s + chunk]) for s in range(0, x_TH.shape[0], chunk)])
        ctx.save_for_backward(x_TH)
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        return out

    @staticmethod
    def backward(ctx, grad_out_TH):
        (x_TH,) = ctx.saved_tensors
        grad_x = torch.empty_like(x_TH)
        grads = [torch.zeros_like(p) for p in ctx.params]
        for s in range(0, x_TH.shape[0], ctx.chunk):
            with torch.enable_grad():
                xc = x_TH[s:s + ctx.chunk].detach().requires_grad_(True)
                out = ctx.fn(xc)
                parts = torch.autograd.grad(out, (xc, *ctx.params), grad_out_TH[s:s + ctx.chunk])
            grad_x[s:s + ctx.chunk] = parts[0]
            for acc, g in zip(grads, parts[1:]):
                acc += g
            del out, parts, g   # not held while the next tile is rebuilt (tests/test_working_set.py)
        return (grad_x, None, None, *grads)


def apply_mlp_tiling(model: nn.Module, chunk_tokens: int) -> None:
    """Run every decoder layer's MLP over chunks of `chunk_tokens` tokens, forward and backward,
    so only one chunk's (tokens x ffn) intermediates are ever alive. The MLP module keeps its
    parameters and names (checkpoints are unaffected); only its forward is replaced."""
    if chunk_tokens <= 0:
        raise ValueError(f"tiling.mlp_chunk_tokens: must be positive, got {chunk_tokens}")
    for layer in model.layers:
        mlp = getattr(layer, "layer", layer).mlp  # an activation-policy wrapper holds `layer`
        if "forward" in vars(mlp):
            continue  # already tiled
        plain = mlp.forward
        params = tuple(mlp.parameters())

        def tiled(x_BSH, plain=plain, params=params):
            b, s, h = x_BSH.shape
            out = _TiledFunction.apply(x_BSH.reshape(b * s, h), plain, chunk_tokens, *params)
            return out.view(b, s, -1)

        mlp.forward = tiled
