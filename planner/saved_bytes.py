"""What one decoder layer saves for its backward, by kind, and what its forward allocates:
the profiler's byte measurements (`planner.profiler`, which re-exports `measure_saved`).

Saved tensors are seen through `torch.autograd.graph.saved_tensors_hooks` and counted once
per storage; the categories are `planner.profiler`'s (input, attention_output, token_local).
"""

from __future__ import annotations

from typing import Any

import torch

CATEGORIES = ("input", "attention_output", "token_local")
"""Saved-byte kinds of a decoder layer (`LayerMeasurement.saved_bytes` keys)."""


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def measure_saved(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[dict[str, int], int, torch.Tensor]:
    """Run the layer forward under saved-tensor hooks; unique saved bytes per category."""
    excluded = {_storage_id(p) for p in layer.parameters()} | {_storage_id(cos), _storage_id(sin)}
    phase_saved: dict[str, list[torch.Tensor]] = {"qkv": [], "core": [], "post": []}
    current = ["qkv"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        phase_saved[current[0]].append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k, v = layer.qkv(x, cos, sin)
        current[0] = "core"
        out = layer.attention_core(q, k, v)
        current[0] = "post"
        y = layer.post_attention(x, out)
    core_inputs = {_storage_id(t) for t in (q, k, v)}
    attention_ids = {_storage_id(t) for t in phase_saved["core"]} - core_inputs
    sizes: dict[int, tuple[str, int]] = {}
    count = 0
    for tensors in phase_saved.values():
        for t in tensors:
            count += 1
            sid = _storage_id(t)
            if sid in excluded or sid in sizes:
                continue
            if sid == _storage_id(x):
                kind = "input"
            elif sid in attention_ids:
                kind = "attention_output"
            else:
                kind = "token_local"
            sizes[sid] = (kind, _storage_bytes(t))
    totals = {name: 0 for name in CATEGORIES}
    for kind, nbytes in sizes.values():
        totals[kind] += nbytes
    return totals, count, y


class _AllocatedBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every new storage an op returns (allocations; frees not tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                sid = _storage_id(t)
                if sid not in self.live:
                    self.live[sid] = _storage_bytes(t)
        return out

    @property
    def total(self) -> int:
        return sum(self.live.values())
