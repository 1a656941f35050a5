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
the backward (cheap next to the core). That is the path of a layer with a swapped slice; a
layer with none runs tiles around the core as well (`streamed_forward`, below), so its
whole-sequence tensors are only the core's own inputs and outputs. Every op here is token-local, so the results equal
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
    """Vector-Jacobian product: d(outputs . grads)/d(inputs), None for an unused input.

    Tensor outputs go through the scalar sum(output * grad), whose gradient reaching each
    output is 1 * grad, bit for bit: `torch.autograd.grad` with explicit output gradients
    imports torch.fx.experimental.symbolic_shapes and sympy for a shape check (~33 MiB of
    RSS per process, measured). Gradient edges (the swapped slice's stored graph) cannot be
    multiplied, so they take `torch.autograd.grad`."""
    if any(not isinstance(o, torch.Tensor) for o in outputs):
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    total = None
    with torch.enable_grad():  # a Function's backward runs without grad mode
        for o, g in zip(outputs, grads):
            if g.shape != o.shape:
                raise ValueError(f"grad: output gradient shape {tuple(g.shape)} != output "
                                 f"{tuple(o.shape)}")
            term = (o * g.detach()).sum()
            total = term if total is None else total + term
    return torch.autograd.grad(total, inputs, allow_unused=True)


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


# -- streamed layer: tiles around the attention core ------------------------------------------
# With no swapped slice the whole layer runs tile by tile except the core itself: q, k, v are
# built per tile straight into the core's gathered buffers (`AttentionCore.gather_tile`; under
# Ulysses each tile is exchanged as it is built), the core runs once on those, and its output
# is handed back a tile at a time (`scatter_tile`). Whole-sequence tensors are then only the
# core's inputs and outputs in its own layout (q, k, v, out, lse, and in backward dout and
# dq, dk, dv), plus x, dy and dx:
#
#     forward   per tile: qkv(x[t]) -> gathered q, k, v        core forward (once)
#               per tile: out[t] <- scatter(out); y[t] = post_attention(x[t], out[t])
#     backward  per tile: out[t] <- scatter(out); post_attention with a graph -> dx[t],
#                         d(out[t]) -> gathered dout;         per tile: qkv(x[t]) -> gathered
#               core backward (once) -> gathered dq, dk, dv; the saved out/lse are freed
#               per tile: dq[t], dk[t], dv[t] <- scatter; qkv(x[t]) with a graph -> dx[t] +=
#
# The core keeps (or swaps) its output in its own layout, so Ulysses never holds the
# sequence-layout output at all.


def row_tiles(batch: int, seq: int, tile: int):
    """(row, start, stop, flat start) of every tile: token ranges within one batch row."""
    for row in range(batch):
        for s in range(0, seq, tile):
            yield row, s, min(s + tile, seq), row * seq + s


def gathered_qkv(call: "CallRecord", x_1TH, cos, sin, batch: int, seq: int, tile: int):
    """q, k, v of every token in the core's gathered layout, a tile at a time, no graph."""
    layer, core = call.layer, call.layer.core
    bufs = None
    with torch.no_grad(), forward_autocast(call):
        for row, s, e, f in row_tiles(batch, seq, tile):
            g = slice(f, f + e - s)
            parts = [core_input(call, t) for t in layer.qkv(x_1TH[:, g], cos[g], sin[g])]
            if bufs is None:
                bufs = core.tile_buffers(batch, seq, parts)
            core.gather_tile(bufs, row, s, e, parts)
            del parts
    return bufs


def streamed_forward(call: "CallRecord", x_1TH, cos, sin, batch: int, seq: int, tile: int):
    """(y (1, T, H), the core's `saved`) of a layer with no swapped slice."""
    layer, core = call.layer, call.layer.core
    q, k, v = gathered_qkv(call, x_1TH, cos, sin, batch, seq, tile)
    with torch.no_grad():
        out, saved = core.forward_gathered(q, k, v)
        del q, k, v
        y = torch.empty_like(x_1TH)
        for row, s, e, f in row_tiles(batch, seq, tile):
            (out_t,) = core.scatter_tile([out], row, s, e)
            y[:, f:f + e - s] = layer.post_attention(x_1TH[:, f:f + e - s], out_t)
    return y, saved


def streamed_backward(call: "CallRecord", x, cos, sin, dy, dx, add, batch: int, seq: int,
                      tile: int, release_saved) -> float:
    """Backward of a `streamed_forward` layer: writes dx, accumulates parameter gradients
    through `add`, calls `release_saved()` once the core's saved tensors are spent. Returns
    the seconds of recompute."""
    layer, core, params = call.layer, call.layer.core, call.params
    saved = tuple(h.get(call) for h in call.saved)
    seconds, dout = 0.0, None
    for row, s, e, f in row_tiles(batch, seq, tile):
        g = slice(f, f + e - s)
        (out_t,) = core.scatter_tile([saved[0]], row, s, e)
        t0 = time.perf_counter()
        with torch.enable_grad(), forward_autocast(call):
            x_t = x[:, g].detach().requires_grad_()
            out_t = out_t.detach().requires_grad_()
            y_t = layer.post_attention(x_t, out_t)
        seconds += time.perf_counter() - t0
        dx_t, dout_t, *gp = grad([y_t], [x_t, out_t, *params], [dy[:, g]])
        del y_t, out_t
        dx[:, g] = dx_t
        add(gp)
        if dout is None:
            dout = core.tile_buffers(batch, seq, [dout_t], dtype=saved[0].dtype)
        core.gather_tile(dout, row, s, e, [dout_t])
        del dout_t
    t0 = time.perf_counter()
    q, k, v = gathered_qkv(call, x, cos, sin, batch, seq, tile)
    seconds += time.perf_counter() - t0
    grads = core.backward_gathered(dout[0], q, k, v, saved)  # the core is never rerun
    del q, k, v, dout, saved
    release_saved()
    if call.prefetch_next is not None:  # the next layer's reads overlap the qkv backward
        call.prefetch_next()
        call.prefetch_next = None
    for row, s, e, f in row_tiles(batch, seq, tile):
        g = slice(f, f + e - s)
        d_t = core.scatter_grads_tile(grads, row, s, e)
        t0 = time.perf_counter()
        with torch.enable_grad(), forward_autocast(call):
            x_t = x[:, g].detach().requires_grad_()
            qkv_t = layer.qkv(x_t, cos[g], sin[g])
        seconds += time.perf_counter() - t0
        dx_t, *gp = grad(list(qkv_t), [x_t, *params],
                         [d.to(t.dtype) for d, t in zip(d_t, qkv_t)])
        del qkv_t, d_t
        dx[:, g] += dx_t
        add(gp)
    return seconds


def streamed_layer_backward(call: "CallRecord", x: torch.Tensor, dy_BSH: torch.Tensor):
    """LayerFunction.backward of a layer whose forward ran `tiled_rebuild.streamed_forward`."""
    params = call.params
    param_grads: list[torch.Tensor | None] = [None] * len(params)

    def add(grads) -> None:
        for i, g in enumerate(grads):
            if g is not None:
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g

    def release_saved() -> None:  # the core's out/lse: free them before the qkv backward
        for h in call.saved:
            if h.stored is not None:
                call.store.release(h.stored)
                call.stored.remove(h.stored)
        call.saved = []

    dx = torch.empty_like(x)
    batch, seq = dy_BSH.shape[:2]
    dy = dy_BSH.contiguous().view(1, batch * seq, -1)
    call.stats["recompute_s"] = streamed_backward(
        call, x, call.cos, call.sin, dy, dx, add, batch, seq, call.rebuild_tile, release_saved)
    call.done_backward(call)
    return (None, dx.view(dy_BSH.shape), None, None, *param_grads)
