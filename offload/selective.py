"""Op-level selective activation checkpointing of one decoder layer (`planner.selective`).

`selective_forward(layer, x, cos, sin)` runs the layer under `torch.utils.checkpoint`
(non-reentrant) with a selective-checkpoint context whose policy keeps the output of every
other matmul (`aten.mm` / `aten.addmm`: the 1st, 3rd, 5th, ... of the layer's forward, as
torchtitan's "selective op" policy counts them) and recomputes every other op in the
backward. The attention core is never rerun: it runs once, outside the policy's view, and
the recompute gets its output and saved tensors (out, log-sum-exp) back, whatever the core
(local, Ulysses or ring: their collectives are not repeated either). The layer's input is
held by the checkpoint for the recompute. Parameters, names and state dicts are untouched.

Returns the output, the bytes the layer holds for its backward (input, kept matmul outputs,
attention output + lse; once per storage, parameters and RoPE tables left out) and an object
that lives as long as the checkpoint holds them (for the runtime's resident-bytes
bookkeeping).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily
from torch.utils.checkpoint import (CheckpointPolicy, _CachingTorchDispatchMode, checkpoint,
                                    create_selective_checkpoint_contexts)

from disttrain.model.attention import AttentionCore

_aten = torch.ops.aten
MATMUL_OPS = frozenset({_aten.mm.default, _aten.addmm.default})
"""What counts as a matmul (nn.Linear lowers to mm, or addmm with a bias)."""


class _SavedCore(AttentionCore):
    """The layer's core, run once: the backward's recompute gets the forward's results back."""

    def __init__(self, core: AttentionCore):
        self.core = core
        self.result: tuple | None = None
        """Detached (out, saved) of the forward, until the recompute takes them."""
        self.running = False
        """Inside the core's forward: the policy leaves its ops alone."""

    def forward(self, q, k, v):
        if self.result is not None:  # the recompute: the core is not rerun
            out, saved = self.result
            self.result = None
            return out, saved
        # The core's ops are not cached: step out of the caching mode (other modes, e.g. a
        # profiler's, stay); `running` covers a mode pushed above it.
        top = _get_current_dispatch_mode()
        outside = (_pop_mode_temporarily() if isinstance(top, _CachingTorchDispatchMode)
                   else contextlib.nullcontext())
        self.running = True
        try:
            with outside:
                out, saved = self.core.forward(q, k, v)
        finally:
            self.running = False
        self.result = (out.detach(), tuple(t.detach() for t in saved))
        return out, saved

    def backward(self, dout_BNSD, q_BNSD, k_BKSD, v_BKSD, saved):
        return self.core.backward(dout_BNSD, q_BNSD, k_BKSD, v_BKSD, saved)


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def selective_forward(layer: nn.Module, x_BSH: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, int, object]:
    """(y, bytes held for the backward, an object alive as long as they are held)."""
    core = _SavedCore(layer.core)
    counts = {False: 0, True: 0}  # matmuls seen in the forward / in a recompute
    kept: dict[int, int] = {}

    def policy(ctx, func, *args, **kwargs):
        if func not in MATMUL_OPS or core.running:
            return CheckpointPolicy.PREFER_RECOMPUTE
        counts[ctx.is_recompute] += 1
        if counts[ctx.is_recompute] % 2 == 0:
            return CheckpointPolicy.PREFER_RECOMPUTE
        output = getattr(ctx, "op_output", None)
        if not ctx.is_recompute and output is not None:
            kept.update(_storages([output]))
        return CheckpointPolicy.MUST_SAVE

    anchor = _GraphAnchor()

    def run(x, cos, sin):  # the checkpoint holds it (and `anchor`) until its graph is freed
        anchor.calls += 1
        q, k, v = layer.qkv(x, cos, sin)
        return layer.post_attention(x, core(q, k, v))

    y = checkpoint(run, x_BSH, cos, sin, use_reentrant=False, preserve_rng_state=False,
                   context_fn=lambda: create_selective_checkpoint_contexts(policy))
    if core.result is not None:
        out, saved = core.result
        kept.update(_storages([out, *saved]))
    kept.update(_storages([x_BSH]))
    skip = _storages([*layer.parameters(), *layer.buffers(), cos, sin])
    return y, sum(n for ptr, n in kept.items() if ptr not in skip), anchor


class _GraphAnchor:
    """Lives as long as the checkpoint's recompute function: until the layer's saved
    tensors are released (its backward ran, or its graph was dropped)."""

    def __init__(self) -> None:
        self.calls = 0
