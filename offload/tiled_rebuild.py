"""Sequence-tiled rebuild: a non-kept layer's token-local work, a tile of tokens at a time.

`offload.layer_fn.LayerFunction` recomputes the token-local parts of a layer (`qkv`,
`post_attention`) for the recomputed token range [start, stop). Done at once, their
intermediates (norm outputs, projections, RoPE temporaries, the autograd graph of the
recompute) exist for the whole range: a working set that grows with the sequence. Here the
same work runs over tiles of `tile` tokens, so only one tile's intermediates are alive:

    forward   qkv(x[t]) -> rows t of q, k, v buffers      (no graph; core runs once on all)
              post_attention(x[t], out[t]) -> rows t of y
    backward  post_attention(x[t], out[t]) with a graph -> d(x[t]), d(out[t]), dW += ...
              qkv(x[t]) without a graph -> rows t of q, k, v (the core's backward needs all)
              core backward (once, all tokens) -> dq, dk, dv
              qkv(x[t]) with a graph -> d(x[t]) += ..., dW += ...

The attention core is still never rerun; the price is one extra `qkv` forward per tile in
the backward (cheap next to the core). Every op here is token-local, so the results equal
the untiled path up to float rounding (tests/test_offload_equivalence.py).

Shape legend: T tokens (batch x sequence, flattened), H hidden, N heads, D head dim.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from offload.layer_fn import CallRecord


def forward_autocast(call: "CallRecord") -> torch.autocast:
    """The autocast state the layer's forward ran under, for recomputing it exactly."""
    device, enabled, dtype = call.autocast
    return torch.autocast(device_type=device, dtype=dtype, enabled=enabled)


def grad(outputs, inputs, grads):
    return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


def core_input(call: "CallRecord", t: torch.Tensor) -> torch.Tensor:
    """What the core is fed, as `AttentionCore.__call__` does: one dtype under autocast
    (RoPE may have promoted q and k to fp32)."""
    _, enabled, dtype = call.autocast
    return t.to(dtype) if enabled else t


def slice_grads(grads, start: int, stop: int, dtypes) -> list[torch.Tensor]:
    """Token range [start, stop) of token-major (dq, dk, dv), in the qkv outputs' dtypes."""
    return [g[:, :, start:stop].to(dtype) for g, dtype in zip(grads, dtypes)]


def _tiles(start: int, stop: int, tile: int):
    for s in range(start, stop, tile):
        yield s, min(s + tile, stop)


def qkv_no_grad(call: "CallRecord", x_1TH: torch.Tensor, cos, sin, start: int, stop: int,
                tile: int, head_parts: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Token-major (1, heads, T', D) q, k, v of tokens [start, stop), tile by tile, without a
    graph, in the core's dtype; `head_parts` (q, k, v of tokens [0, start), token-major) are
    copied in front, so the result covers [0, stop) in the model's own (1, T, heads, D) layout."""
    layer = call.layer
    out: list[torch.Tensor] = []
    lead = 0 if head_parts is None else head_parts[0].shape[2]
    with torch.no_grad(), forward_autocast(call):
        for s, e in _tiles(start, stop, tile):
            parts = [core_input(call, t) for t in layer.qkv(x_1TH[:, s:e], cos[s:e], sin[s:e])]
            if not out:
                for i, p in enumerate(parts):
                    _, heads, _, d = p.shape
                    buf = torch.empty(1, lead + stop - start, heads, d, dtype=p.dtype,
                                      device=p.device)
                    if head_parts is not None:
                        buf[:, :lead] = head_parts[i].transpose(1, 2)
                    out.append(buf)
            for buf, p in zip(out, parts):
                buf[:, lead + s - start:lead + e - start] = p.transpose(1, 2)
            del parts
    return [buf.transpose(1, 2) for buf in out]


def post_attention_no_grad(call: "CallRecord", x_1TH, out_1NTD, start: int, stop: int,
                           tile: int) -> torch.Tensor:
    """post_attention of tokens [start, stop), tile by tile, without a graph: (1, T', H)."""
    y = torch.empty(1, stop - start, x_1TH.shape[2], dtype=x_1TH.dtype, device=x_1TH.device)
    for s, e in _tiles(start, stop, tile):
        y[:, s - start:e - start] = call.layer.post_attention(x_1TH[:, s:e], out_1NTD[:, :, s:e])
    return y


def post_attention_backward(call: "CallRecord", x, out, dy, dx, dout, add, start: int, stop: int,
                            tile: int) -> float:
    """Rebuild post_attention per tile and backpropagate `dy`: writes dx and dout rows,
    accumulates parameter gradients through `add`. Returns the seconds of recompute."""
    seconds = 0.0
    params = call.params
    for s, e in _tiles(start, stop, tile):
        t0 = time.perf_counter()
        with torch.enable_grad(), forward_autocast(call):
            x_t = x[:, s:e].detach().requires_grad_()
            out_t = out[:, :, s:e].detach().requires_grad_()
            y_t = call.layer.post_attention(x_t, out_t)
        seconds += time.perf_counter() - t0
        dx_t, dout_t, *gp = grad([y_t], [x_t, out_t, *params], [dy[:, s:e]])
        del y_t
        dx[:, s:e] = dx_t
        dout[:, :, s:e] = dout_t
        add(gp)
    return seconds


def qkv_backward(call: "CallRecord", x, cos, sin, grads, dx, add, start: int, stop: int,
                 tile: int) -> float:
    """Rebuild qkv per tile with a graph and backpropagate the core's (dq, dk, dv) rows:
    dx rows += ..., parameter gradients through `add`. Returns the seconds of recompute."""
    seconds = 0.0
    params = call.params
    for s, e in _tiles(start, stop, tile):
        t0 = time.perf_counter()
        with torch.enable_grad(), forward_autocast(call):
            x_t = x[:, s:e].detach().requires_grad_()
            qkv_t = call.layer.qkv(x_t, cos[s:e], sin[s:e])
        seconds += time.perf_counter() - t0
        dx_t, *gp = grad(list(qkv_t), [x_t, *params],
                          slice_grads(grads, s, e, [t.dtype for t in qkv_t]))
        del qkv_t
        dx[:, s:e] += dx_t
        add(gp)
    return seconds
