"""A tensor a layer's backward needs, kept on the device or in a store (`Held`), and the
memory-layout helpers the activation runtime shares (offload.layer_fn)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from offload.stores import StoredTensor

if TYPE_CHECKING:
    from offload.layer_fn import CallRecord


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def dense_span(t: torch.Tensor) -> torch.Tensor | None:
    """`t`'s memory as a flat 1-D view when `t` covers it densely (any dim order), else None."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] storage offsets (elements) that `t` touches."""
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.storage_offset(), last


class Held:
    """A tensor the layer needs in backward: kept on the device, or in a store."""

    def __init__(self, t: torch.Tensor, store=None):
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype
        self.nbytes = _storage_bytes(t)
        self.kept = t if store is None else None
        self.stored: StoredTensor | None = None
        if store is not None:
            span = dense_span(t)
            if span is None:
                t = t.contiguous()
                self.stride, span = t.stride(), t.reshape(-1)
            self.stored = store.put(span)
            self.nbytes = self.stored.nbytes
        self._restored: torch.Tensor | None = None

    def get(self, call: "CallRecord") -> torch.Tensor:
        """The tensor, as kept or read back from the store (once)."""
        if self.kept is not None:
            return self.kept
        if self._restored is None:
            flat = call.fetch(self.stored)
            self._restored = flat.as_strided(self.shape, self.stride, flat.storage_offset())
        return self._restored
