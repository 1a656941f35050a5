"""One decoder layer under a token-wise swap/recompute policy, as a custom autograd function.

Shape legend: B batch, S sequence, H hidden, N query heads, K kv heads, D head dim,
T = B*S tokens. Token-local parts run on the flattened token axis (1, T, ...): the swapped
tokens are the range [0, n) of it, the recomputed ones [n, T), whatever the batch size.

Forward (no autograd graph for the layer as a whole):
  * swapped slice: `qkv` and `post_attention` run with autograd under saved-tensor hooks, so
    every tensor they save goes to the tier's store (asynchronously); the slice's q/k/v go
    there too. Only the graph *nodes* stay in memory, addressed by `GradientEdge`s.
  * recomputed slice: `qkv` and `post_attention` run without autograd; nothing is saved.
  * the attention core (`layer.core`, an `AttentionCore`: local flash, Ulysses or ring) runs
    once over the tokens; its output and `saved` tensors (out + lse for the local core) are
    kept or swapped, and so is the layer input, as the plan says.
Backward:
  1. post_attention backward: swapped slice from its stored graph, recomputed slice by
     rerunning `post_attention` on (x, out) of those tokens -> d(out), dx, dW.
  2. q/k/v of all tokens: swapped from the store, the rest recomputed from x (with a graph).
  3. `layer.core.backward` from the saved tensors (the core's forward is never rerun).
  4. qkv backward per slice -> dx, dW.
With a rebuild tile and no swapped slice the layer runs tiles around the core instead
(`tiled_rebuild.streamed_forward` / `streamed_layer_backward`).
Recomputation runs under the autocast state of the forward. Saved tensors that alias the
layer input, the attention output or the RoPE tables are not copied: they are rebuilt as
views of those ("anchors"); parameters are referenced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge, saved_tensors_hooks

from offload import tiled_rebuild as tiles
from offload.held import Held
from offload.held import dense_span as _dense_span
from offload.held import extent as _extent
from offload.stores import StoredTensor
from offload.tiled_rebuild import core_input as _core_input
from offload.tiled_rebuild import forward_autocast as _forward_autocast
from offload.tiled_rebuild import grad as _grad
from offload.tiled_rebuild import slice_grads as _slice_grads



@dataclass
class CallRecord:
    """State of one forward call of one layer, until its backward ran."""

    index: int
    layer: nn.Module
    plan: object
    store: object | None
    num_swap: int
    """Tokens in the swapped range [0, n) of the flattened (batch x sequence) token axis."""
    num_tokens: int
    """Tokens of the call: batch x sequence."""
    params: list[torch.Tensor]
    x: Held | None = None
    out: Held | None = None
    saved: list[Held] = field(default_factory=list)
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    qkv_sw: list[Held] = field(default_factory=list)
    qkv_dtypes: list[torch.dtype] = field(default_factory=list)
    stored: list[StoredTensor] = field(default_factory=list)
    qkv_out_edges: list[GradientEdge] = field(default_factory=list)
    qkv_in_edge: GradientEdge | None = None
    post_out_edge: GradientEdge | None = None
    post_in_edges: list[GradientEdge] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    wait_s: float = 0.0
    saved_out_index: list[int] = field(default_factory=list)
    autocast: tuple[str, bool, torch.dtype] | None = None
    resident: int = 0
    inflight_bytes: int = 0
    rebuild_tile: int = 0
    """Tokens per tile of the recomputed range's token-local work (0: all at once)."""
    streamed: bool = False
    """The forward ran tiles around the core (`tiled_rebuild.streamed_forward`)."""
    prefetch_next: Callable[[], None] | None = None
    """Starts reading the next layer's stored tensors; a streamed backward calls it once its
    core backward (its largest working set) is done."""
    on_backward: Callable[["CallRecord"], None] | None = None
    done_backward: Callable[["CallRecord"], None] | None = None

    def anchor(self, name: str) -> torch.Tensor:
        """The tensor a saved view was taken of: 'x', 'out', 'cos' or 'sin'."""
        if name in ("cos", "sin"):
            return getattr(self, name)
        return self.x.get(self) if name == "x" else self.attention_output()

    def attention_output(self) -> torch.Tensor:
        """Token-major (1, N, T, D) attention output, as post_attention saw it."""
        if self.out is not None:
            return self.out.get(self)
        return _token_major(self.saved[self.saved_out_index[0]].get(self))

    def fetch(self, stored: StoredTensor) -> torch.Tensor:
        """The stored tensor's data, waiting for its copy if needed (the wait is timed)."""
        t0 = time.perf_counter()
        t = self.store.get(stored)
        self.wait_s += time.perf_counter() - t0
        return t


class _Attach(torch.autograd.Function):
    """Start a side graph at `value` without a leaf that would pin its memory."""

    @staticmethod
    def forward(ctx, root, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):  # never reached: gradients are captured at this node's edge
        raise AssertionError("_Attach.backward must not run")


class Packer:
    """Saved-tensor hooks of the swapped slice: params by reference, anchors as views, the rest stored."""

    def __init__(self, call: CallRecord, anchors: dict[str, torch.Tensor]):
        self.call = call
        self.anchors = {name: (t.untyped_storage().data_ptr(), _extent(t), t)
                        for name, t in anchors.items()}
        self.params = {p.untyped_storage().data_ptr()
                       for p in (*call.layer.parameters(), *call.layer.buffers())}
        self.seen: dict[tuple, tuple] = {}  # holds the source tensor: its address stays unique

    def pack(self, t: torch.Tensor):
        """Called by autograd for every tensor the swapped slice's ops save."""
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.params:
            return ("ref", t)
        first, last = _extent(t)
        for name, (aptr, (afirst, alast), anchor) in self.anchors.items():
            if ptr == aptr and afirst <= first and last <= alast:
                return ("anchor", name, t.shape, t.stride(), t.storage_offset() - anchor.storage_offset())
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in self.seen:
            stored = self.call.store.put(t.detach())
            self.call.stored.append(stored)
            self.seen[key] = (("stored", stored), t)
        return self.seen[key][0]

    def unpack(self, packed):
        """Called by autograd in backward: the tensor back (a view, a reference or the store's copy)."""
        kind = packed[0]
        if kind == "ref":
            return packed[1]
        if kind == "anchor":
            _, name, shape, stride, rel = packed
            base = self.call.anchor(name)
            return base.as_strided(shape, stride, base.storage_offset() + rel)
        return self.call.fetch(packed[1])


def _token_major(t_BHSD: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, D) -> (1, heads, B*S, D): a view for the (B, S, heads, D) memory layout
    the model's q/k/v and the local core's output have, a copy otherwise."""
    b, heads, s, d = t_BHSD.shape
    return t_BHSD.transpose(1, 2).reshape(1, b * s, heads, d).transpose(1, 2)


def _batch_major(t_1HTD: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of `_token_major` (a view)."""
    _, heads, tokens, d = t_1HTD.shape
    return t_1HTD.transpose(1, 2).reshape(batch, tokens // batch, heads, d).transpose(1, 2)


class LayerFunction(torch.autograd.Function):
    """apply(call, x_BSH, cos_T, sin_T, *params) -> y_BSH; see the module docstring.

    Tokens are sliced on the flattened (batch x sequence) axis, so a slice is one contiguous
    range whatever the batch; `cos_T`/`sin_T` hold the RoPE rows of those B*S tokens.
    """

    @staticmethod
    def forward(ctx, call: CallRecord, x_BSH, cos, sin, *params):
        layer, n, store, plan = call.layer, call.num_swap, call.store, call.plan
        batch, seq, hidden = x_BSH.shape
        x = x_BSH.detach().reshape(1, batch * seq, hidden)  # a view: x is contiguous
        num_tokens = x.shape[1]
        device = x.device.type
        call.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        call.cos, call.sin = cos, sin
        call.x = Held(x, store if plan.swap_input else None)
        packer = None
        if n:
            root = torch.empty(0, requires_grad=True)
            packer = Packer(call, {"x": x, "cos": cos, "sin": sin})
            with torch.enable_grad(), saved_tensors_hooks(packer.pack, packer.unpack):
                x_in = _Attach.apply(root, x[:, :n])
                qkv_sw = layer.qkv(x_in, cos[:n], sin[:n])
            call.qkv_in_edge = get_gradient_edge(x_in)
            call.qkv_out_edges = [get_gradient_edge(t) for t in qkv_sw]
            call.qkv_dtypes = [t.dtype for t in qkv_sw]
            qkv_sw = [_core_input(call, t.detach()) for t in qkv_sw]  # only the edges keep the graph
            call.qkv_sw = [Held(t, store) for t in qkv_sw]
            call.stored.extend(h.stored for h in call.qkv_sw)
        tile = call.rebuild_tile
        attn_store = store if plan.swap_attention_output else None
        if tile and not n:  # tiles around the attention core (tiled_rebuild.streamed_*)
            y, saved = tiles.streamed_forward(call, x, cos, sin, batch, seq, tile)
            call.streamed = True
            call.saved = [Held(t, attn_store) for t in saved]
            del saved
        else:
            with torch.no_grad():
                if tile and n < num_tokens:  # token-local work a tile at a time (tiled_rebuild)
                    joined = tiles.qkv_no_grad(call, x, cos, sin, n, num_tokens, tile,
                                               qkv_sw if n else None)
                    q, k, v = (_batch_major(t, batch) for t in joined)
                    del joined
                else:
                    parts = [qkv_sw] if n else []
                    if n < num_tokens:
                        parts.append([_core_input(call, t)
                                      for t in layer.qkv(x[:, n:], cos[n:], sin[n:])])
                    q, k, v = (_batch_major(_cat_tokens([p[i] for p in parts]), batch)
                               for i in range(3))
                    del parts
                out_BNSD, saved = layer.core.forward(q, k, v)  # the attention core: its only run
                del q, k, v
                out = _token_major(out_BNSD)
                y_rc = None
                if n < num_tokens:
                    y_rc = (tiles.post_attention_no_grad(call, x, out, n, num_tokens, tile) if tile
                            else layer.post_attention(x[:, n:], out[:, :, n:]))
            call.saved = [Held(t, attn_store) for t in saved]
            in_saved = [i for i, t in enumerate(saved) if t is out_BNSD]
            if in_saved and out.untyped_storage().data_ptr() == out_BNSD.untyped_storage().data_ptr():
                call.saved_out_index = in_saved[:1]  # out is a view of a saved tensor: hold it once
            call.out = None if call.saved_out_index else Held(out, attn_store)
            if n:
                if _dense_span(out) is not None:  # views of out can be rebuilt from its bytes
                    packer.anchors["out"] = (out.untyped_storage().data_ptr(), _extent(out), out)
                with torch.enable_grad(), saved_tensors_hooks(packer.pack, packer.unpack):
                    x_post = _Attach.apply(root, x[:, :n])
                    out_post = _Attach.apply(root, out[:, :, :n])
                    y_sw = layer.post_attention(x_post, out_post)
                call.post_in_edges = [get_gradient_edge(x_post), get_gradient_edge(out_post)]
                call.post_out_edge = get_gradient_edge(y_sw)
                y = torch.cat([y_sw.detach(), y_rc], dim=1) if y_rc is not None else y_sw.detach()
                del y_sw, x_post, out_post, x_in
                packer.seen.clear()  # the hooks outlive forward: keep no source or anchor alive
                packer.anchors.clear()
            else:
                y = y_rc
        held = [call.x, *call.saved] + ([call.out] if call.out is not None else [])
        call.stored.extend(h.stored for h in held if h.stored is not None)
        call.stats.update(
            tokens_swapped=n, tokens_recomputed=num_tokens - n,
            bytes_kept=sum(h.nbytes for h in held if h.kept is not None),
            bytes_swapped=sum(st.nbytes for st in call.stored))
        ctx.call = call
        return y.view(batch, seq, hidden)

    @staticmethod
    def backward(ctx, dy_BSH):
        call: CallRecord | None = ctx.call
        if call is None:
            raise RuntimeError("activation policy: this layer's backward already ran and freed "
                               "its saved activations (a second backward / retain_graph=True "
                               "is not supported on policy layers)")
        ctx.call = None
        call.on_backward(call)
        layer, n, num_tokens = call.layer, call.num_swap, call.num_tokens
        batch = dy_BSH.shape[0]
        params = call.params
        x = call.x.get(call)
        if call.streamed:
            return tiles.streamed_layer_backward(call, x, dy_BSH)
        saved = tuple(h.get(call) for h in call.saved)
        out = call.attention_output()
        cos, sin = call.cos, call.sin
        param_grads: list[torch.Tensor | None] = [None] * len(params)

        def add(grads) -> None:
            for i, g in enumerate(grads):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g

        dx = torch.empty_like(x)
        _, heads, _, d = out.shape
        dout = torch.empty(1, num_tokens, heads, d, dtype=out.dtype,
                           device=out.device).transpose(1, 2)
        dy = dy_BSH.contiguous().view(1, num_tokens, -1)
        if n:  # swapped slice: stored graph
            dx_sw, dout_sw, *gp = _grad([call.post_out_edge], [*call.post_in_edges, *params],
                                        [dy[:, :n]])
            dx[:, :n] = dx_sw
            dout[:, :, :n] = dout_sw
            add(gp)
        recompute_s = 0.0
        tile = call.rebuild_tile
        if tile and n < num_tokens:  # recomputed slice, a tile at a time (tiled_rebuild)
            recompute_s += tiles.post_attention_backward(call, x, out, dy, dx, dout, add, n,
                                                         num_tokens, tile)
        elif n < num_tokens:  # recomputed slice: rerun post_attention and qkv on those tokens
            t0 = time.perf_counter()
            with torch.enable_grad(), _forward_autocast(call):
                x_rc = x[:, n:].detach().requires_grad_()
                out_rc = out[:, :, n:].detach().requires_grad_()
                y_rc = layer.post_attention(x_rc, out_rc)
            recompute_s += time.perf_counter() - t0
            dx_rc, dout_rc, *gp = _grad([y_rc], [x_rc, out_rc, *params], [dy[:, n:]])
            del y_rc
            dx[:, n:] = dx_rc
            dout[:, :, n:] = dout_rc
            add(gp)
            t0 = time.perf_counter()
            with torch.enable_grad(), _forward_autocast(call):
                x_rc = x[:, n:].detach().requires_grad_()
                qkv_rc = layer.qkv(x_rc, cos[n:], sin[n:])
            recompute_s += time.perf_counter() - t0
        if tile and n < num_tokens:
            t0 = time.perf_counter()
            joined = tiles.qkv_no_grad(call, x, cos, sin, n, num_tokens, tile,
                                       [h.get(call) for h in call.qkv_sw] if n else None)
            recompute_s += time.perf_counter() - t0
            q, k, v = (_batch_major(t, batch) for t in joined)
            del joined
        else:
            parts = [[h.get(call) for h in call.qkv_sw]] if n else []
            if n < num_tokens:
                parts.append([_core_input(call, q.detach()) for q in qkv_rc])
            q, k, v = (_batch_major(_cat_tokens([p[i] for p in parts]), batch) for i in range(3))
            del parts
        grads = layer.core.backward(_batch_major(dout, batch), q, k, v, saved)  # no forward rerun
        grads = [_token_major(g) for g in grads]
        del q, k, v, dout, saved
        if n:
            dx_sw, *gp = _grad(call.qkv_out_edges, [call.qkv_in_edge, *params],
                               _slice_grads(grads, 0, n, call.qkv_dtypes))
            dx[:, :n] += dx_sw
            add(gp)
        if tile and n < num_tokens:
            recompute_s += tiles.qkv_backward(call, x, cos, sin, grads, dx, add, n, num_tokens,
                                              tile)
        elif n < num_tokens:
            dx_rc, *gp = _grad(list(qkv_rc), [x_rc, *params],
                               _slice_grads(grads, n, num_tokens, [q.dtype for q in qkv_rc]))
            dx[:, n:] += dx_rc
            add(gp)
        call.stats["recompute_s"] = recompute_s  # the extra forward work only
        call.done_backward(call)
        return (None, dx.view(dy_BSH.shape), None, None, *param_grads)


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """Join (1, heads, tokens, D) pieces along tokens, in the (1, tokens, heads, D) memory
    layout the model's own q/k/v have (so the core sees the same strides)."""
    if len(parts) == 1:
        return parts[0]
    _, heads, _, d = parts[0].shape
    total = sum(p.shape[2] for p in parts)
    joined = torch.empty(1, total, heads, d, dtype=parts[0].dtype, device=parts[0].device)
    start = 0
    for p in parts:
        joined[:, start:start + p.shape[2]] = p.transpose(1, 2)
        start += p.shape[2]
    return joined.transpose(1, 2)
