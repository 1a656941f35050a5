"""Apply the plan's per-layer activation policy to an unmodified model, and measure it.

`apply_activation_policy(model, activations, stores=...)` replaces each decoder layer's
`forward` (an instance attribute: parameter names, state dicts and the module tree are
unchanged) by the runtime's: a `keep_all` layer runs plain autograd, only measured; a
`selective` layer op-level selective checkpointing (`offload.selective`); any other layer
runs `offload.layer_fn.LayerFunction` (token-wise swap of `swap_fraction` of the
tokens, recompute of the rest, attention core never rerun).

The runtime bounds copies in flight during forward to `max_inflight_layers` layers (double
buffering), prefetches the next layer's swapped data at the start of each layer's backward,
and records per layer and step: bytes kept, bytes swapped per tier, tokens recomputed, the
peak of resident saved bytes, copy wait time. `runtime.step_metrics()` returns them.
"""

from __future__ import annotations

import collections
import time
import types
import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from offload.layer_fn import CallRecord, LayerFunction
from offload.selective import selective_forward


@dataclass(frozen=True, kw_only=True)
class ActivationRuntimeConfig:
    """Runtime knobs that are not part of the plan."""

    max_inflight_layers: int = 2
    """Layers whose swap copies may still run while the next layer computes (2 = double buffering)."""
    measure_keep_all: bool = True
    """Count the saved bytes of keep-all layers through a saved-tensor hook (no copies)."""
    rebuild_tile_tokens: int = 0
    """A non-kept layer recomputes its token-local tensors (forward and backward) this many
    tokens at a time (`plan.tiling.rebuild_tile_tokens`; 0: the whole local sequence)."""

    def __post_init__(self) -> None:
        if self.rebuild_tile_tokens < 0:
            raise ValueError(f"tiling.rebuild_tile_tokens: must be >= 0, "
                             f"got {self.rebuild_tile_tokens}")
        if self.max_inflight_layers < 1:
            raise ValueError(f"activation_runtime.max_inflight_layers: must be >= 1, "
                             f"got {self.max_inflight_layers}")


def num_swap_tokens(num_tokens: int, swap_fraction: float) -> int:
    """Tokens (of batch x sequence) in the swapped range: the nearest whole number to
    fraction * num_tokens."""
    return min(num_tokens, int(round(swap_fraction * num_tokens)))


class _LayerTotals:
    """Per-layer counters over one step (several calls when there are microbatches)."""

    FIELDS = ("num_calls", "bytes_kept", "bytes_swapped_cpu", "bytes_swapped_nvme",
              "tokens_swapped", "tokens_recomputed", "peak_resident_bytes", "copy_wait_s",
              "recompute_s")

    def __init__(self) -> None:
        self.values = dict.fromkeys(self.FIELDS, 0)

    def add_call(self, stats: dict) -> None:
        """Fold one call's stats in: bytes as the max over calls, tokens and times summed."""
        v = self.values
        v["num_calls"] += 1
        for name in ("bytes_kept", "bytes_swapped_cpu", "bytes_swapped_nvme"):
            v[name] = max(v[name], stats.get(name, 0))  # per microbatch, as the plan predicts
        for name in ("tokens_swapped", "tokens_recomputed", "copy_wait_s", "recompute_s"):
            v[name] += stats.get(name, 0)


class ActivationRuntime:
    """Owns the wrapped layers' state; created by `apply_activation_policy`."""

    def __init__(self, layers: dict[int, nn.Module], activations: Sequence,
                 stores: Mapping[str, object], config: ActivationRuntimeConfig):
        self.layers = layers
        """Global decoder-layer index -> layer (a pipeline stage holds a subset)."""
        self.activations, self.stores, self.config = tuple(activations), stores, config
        self._inflight: collections.deque[CallRecord] = collections.deque()
        self._pending: list[CallRecord] = []  # forward order, backward not yet run
        self._totals = {index: _LayerTotals() for index in layers}
        self._resident = 0
        self._peak_resident = 0
        self._layer_resident = dict.fromkeys(layers, 0)
        self._rope_cache: tuple | None = None  # (key, cos rows, sin rows, cos, sin)
        for index, layer in layers.items():
            layer.forward = self._make_forward(index)

    # -- wiring ----------------------------------------------------------------------------
    def _make_forward(self, index: int):
        """A method bound to the layer (a deep copy of the layer rebinds it to the copy)."""
        plan = self.activations[index]
        runtime = self  # a strong reference: the wrapped model keeps its runtime alive

        def forward(layer: nn.Module, x_BSH: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return type(layer).forward(layer, x_BSH, cos, sin)
            if plan.keep_all:
                return runtime._plain(index, layer, x_BSH, cos, sin)
            if plan.selective:
                return runtime._selective(index, layer, x_BSH, cos, sin)
            return runtime._offloaded(index, layer, plan, x_BSH, cos, sin)

        return types.MethodType(forward, self.layers[index])

    def remove(self) -> None:
        """Give every layer back its own forward."""
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)

    # -- resident-bytes bookkeeping -------------------------------------------------------------
    def _resident_add(self, index: int, nbytes: int) -> None:
        self._resident += nbytes
        self._layer_resident[index] += nbytes
        self._peak_resident = max(self._peak_resident, self._resident)
        totals = self._totals[index].values
        totals["peak_resident_bytes"] = max(totals["peak_resident_bytes"], self._layer_resident[index])

    # -- keep-all layers ---------------------------------------------------------------------
    def _plain(self, index, layer, x, cos, sin):
        original = type(layer).forward
        if not self.config.measure_keep_all:
            return original(layer, x, cos, sin)
        skip = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), cos, sin)}
        live: dict[int, list] = {}  # storage address -> [holders alive, bytes]
        runtime = self

        def drop(ptr: int) -> None:
            entry = live[ptr]
            entry[0] -= 1
            if entry[0] == 0:
                runtime._resident_add(index, -entry[1])

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr in skip:
                return t
            holder = _Holder(t)
            if ptr not in live:
                live[ptr] = [0, t.untyped_storage().nbytes()]
                runtime._resident_add(index, live[ptr][1])
            live[ptr][0] += 1
            weakref.finalize(holder, drop, ptr)
            return holder

        def unpack(packed):
            return packed.tensor if isinstance(packed, _Holder) else packed

        with saved_tensors_hooks(pack, unpack):
            y = original(layer, x, cos, sin)
        self._totals[index].add_call({"bytes_kept": sum(e[1] for e in live.values())})
        return y

    # -- selective (op-level checkpointing) layers ------------------------------------------------
    def _selective(self, index, layer, x, cos, sin):
        if "forward" in vars(layer.mlp):
            raise ValueError(f"activations[{index}].selective: not with tiling.mlp_chunk_tokens "
                             f"(a tiled MLP runs its matmuls tile by tile)")
        if type(layer.attn.q_proj) is not nn.Linear:
            raise ValueError(f"activations[{index}].selective: not with tensor parallelism "
                             f"(parallel.tp > 1)")
        if not x.requires_grad and not any(p.requires_grad for p in layer.parameters()):
            return type(layer).forward(layer, x, cos, sin)
        y, kept, graph_anchor = selective_forward(layer, x, cos, sin)
        self._resident_add(index, kept)
        weakref.finalize(graph_anchor, self._resident_add, index, -kept)  # the graph is freed
        self._totals[index].add_call({"bytes_kept": kept,
                                      "tokens_recomputed": x.shape[0] * x.shape[1]})
        return y

    # -- swap / recompute layers ---------------------------------------------------------------
    def _offloaded(self, index, layer, plan, x, cos, sin):
        if cos.requires_grad or sin.requires_grad:
            raise NotImplementedError("activation policy: RoPE tables that require grad")
        params = [p for p in layer.parameters() if p.requires_grad]
        if not params and not x.requires_grad:  # no gradient flows here: nothing to save
            return type(layer).forward(layer, x, cos, sin)
        store = None
        if plan.swap_fraction > 0 or plan.swap_input or plan.swap_attention_output:
            store = self.stores[plan.tier]
        batch, seq = x.shape[0], x.shape[1]
        call = CallRecord(index=index, layer=layer, plan=plan, store=store,
                          num_swap=num_swap_tokens(batch * seq, plan.swap_fraction),
                          num_tokens=batch * seq, params=params,
                          rebuild_tile=self.config.rebuild_tile_tokens,
                          on_backward=self._before_backward, done_backward=self._after_backward)
        self._limit_inflight(call)
        cos_T, sin_T = self._rope_rows(cos, sin, batch)
        y = LayerFunction.apply(call, x.contiguous(), cos_T, sin_T, *call.params)
        stats = call.stats
        stats[f"bytes_swapped_{plan.tier}"] = stats.pop("bytes_swapped")
        # Sources of copies still running stay resident until the copy is done.
        call.inflight_bytes = sum(st.nbytes for st in call.stored if not st.write.done())
        call.resident = stats["bytes_kept"] + call.inflight_bytes
        self._resident_add(index, call.resident)
        self._inflight.append(call)
        self._pending.append(call)
        return y

    def _rope_rows(self, cos: torch.Tensor, sin: torch.Tensor, batch: int):
        """RoPE rows of the flattened (batch x sequence) tokens, shared by the step's layers."""
        if batch == 1:
            return cos, sin
        key = (cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr(), cos.shape, batch)
        if self._rope_cache is None or self._rope_cache[0] != key:
            # cos and sin are held too, so their addresses in the key stay theirs
            self._rope_cache = (key, cos.repeat(batch, 1), sin.repeat(batch, 1), cos, sin)
        return self._rope_cache[1], self._rope_cache[2]

    def _limit_inflight(self, call: CallRecord) -> None:
        """Wait for the copies of older layers so at most `max_inflight_layers` run at once."""
        while len(self._inflight) >= self.config.max_inflight_layers:
            self._settle(self._inflight.popleft(), waiter=call)

    def _settle(self, old: CallRecord, waiter: CallRecord) -> None:
        """Wait for `old`'s writes; its sources are then free, so only its kept bytes stay resident."""
        t0 = time.perf_counter()
        for stored in old.stored:
            old.store.wait_written(stored)
        waiter.wait_s += time.perf_counter() - t0
        old.resident -= old.inflight_bytes
        self._resident_add(old.index, -old.inflight_bytes)
        old.inflight_bytes = 0

    def wait_copies(self) -> None:
        """Block until every swap copy issued so far is done (e.g. before a checkpoint)."""
        while self._inflight:
            call = self._inflight.popleft()
            self._settle(call, waiter=call)

    def discard_pending(self) -> None:
        """Free the store slots of forwards whose backward will not run (a skipped or failed step)."""
        self.wait_copies()
        for call in list(self._pending):
            self._pending.remove(call)
            for stored in call.stored:
                call.store.release(stored)
            self._resident_add(call.index, -call.resident)

    def _before_backward(self, call: CallRecord) -> None:
        if call in self._inflight:
            self._inflight.remove(call)
            self._settle(call, waiter=call)
        position = self._pending.index(call)
        if call.store is not None:
            for stored in call.stored:
                call.store.prefetch(stored)
            if call.store.fetch_allocates:  # read buffers live until the layer's backward ends
                fetched = sum(stored.nbytes for stored in call.stored)
                call.resident += fetched
                self._resident_add(call.index, fetched)
        if position > 0:  # the layer whose backward runs next: start reading it now
            upcoming = self._pending[position - 1]
            if call.streamed:  # ... or once this one's core backward is done (its peak)
                call.prefetch_next = lambda: self._prefetch(upcoming)
            else:
                self._prefetch(upcoming)

    def _prefetch(self, call: CallRecord) -> None:
        if call.store is not None and call in self._pending:
            for stored in call.stored:
                call.store.prefetch(stored)

    def _after_backward(self, call: CallRecord) -> None:
        self._pending.remove(call)
        for stored in call.stored:
            call.store.release(stored)
        self._resident_add(call.index, -call.resident)
        call.stats["copy_wait_s"] = call.wait_s
        self._totals[call.index].add_call(call.stats)

    # -- measurement -------------------------------------------------------------------------
    def step_metrics(self, reset: bool = True) -> dict:
        """Per-layer counters of the step so far, plus the step's peak of resident saved bytes.

        {"peak_resident_bytes": int, "layers": [{"layer": i, "policy": {...}, "num_calls",
        "bytes_kept", "bytes_swapped_cpu", "bytes_swapped_nvme", "tokens_swapped",
        "tokens_recomputed", "peak_resident_bytes", "copy_wait_s", "recompute_s"}, ...]}.
        Bytes are per call (one microbatch); tokens and seconds are summed over calls.
        """
        layers = []
        for index, totals in sorted(self._totals.items()):
            plan = self.activations[index]
            policy = {"keep_all": plan.keep_all, "selective": plan.selective,
                      "swap_fraction": plan.swap_fraction, "tier": plan.tier,
                      "swap_input": plan.swap_input, "swap_attention_output": plan.swap_attention_output}
            layers.append({"layer": index, "policy": policy, **totals.values})
        metrics = {"peak_resident_bytes": self._peak_resident, "layers": layers,
                   "store_bytes_in_use": {tier: store.bytes_in_use for tier, store in self.stores.items()}}
        if reset:
            self._totals = {index: _LayerTotals() for index in self.layers}
            self._peak_resident = self._resident
        return metrics

    def close(self) -> None:
        """Restore the layers and close the stores (NVMe files are deleted)."""
        self.remove()
        for store in self.stores.values():
            store.close()

    def __enter__(self) -> "ActivationRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Holder:
    """Wraps a kept saved tensor so its release (graph freed) can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def apply_activation_policy(model: nn.Module, activations: Sequence, *,
                            stores: Mapping[str, object] | None = None,
                            config: ActivationRuntimeConfig | None = None) -> ActivationRuntime:
    """Wrap each decoder layer of `model.layers` with its policy (a `LayerActivationPlan`).

    `activations[i]` is the plan of decoder layer i. `model.layers` is the model's ModuleList
    (one entry per layer, as many as `activations`) or a pipeline stage's container whose
    children are named by their global layer index. `stores` maps tier name ('cpu', 'nvme')
    to a store (`offload.stores`); every tier a swapping layer names must be present.
    Returns the runtime (metrics, close, remove).
    """
    container = getattr(model, "layers", None)
    if not isinstance(container, nn.Module):
        raise ValueError("model: expected a `layers` module holding the decoder layers")
    layers = {int(name): layer for name, layer in container.named_children()}
    if isinstance(container, nn.ModuleList) and len(activations) != len(layers):
        raise ValueError(f"activations: need one entry per decoder layer ({len(layers)}), "
                         f"got {len(activations)}")
    missing = sorted(i for i in layers if i >= len(activations))
    if missing:
        raise ValueError(f"activations: no entry for decoder layer {missing[0]} "
                         f"(plan has {len(activations)})")
    stores = dict(stores or {})
    for i in layers:
        plan = activations[i]
        swaps = not plan.keep_all and (plan.swap_fraction > 0 or plan.swap_input
                                       or plan.swap_attention_output)
        if swaps and plan.tier not in stores:
            raise ValueError(f"activations[{i}].tier: no store given for tier {plan.tier!r} "
                             f"(stores: {sorted(stores)})")
    for index, layer in layers.items():
        if "forward" in layer.__dict__:
            raise ValueError(f"model.layers[{index}]: already has a replaced forward "
                             f"(policy applied twice?)")
    return ActivationRuntime(layers, activations, stores,
                             ActivationRuntimeConfig() if config is None else config)
