"""Pipeline stages cut from the unmodified model: the layer ranges of the stages
(`split_stages`, evenly or minimising the bottleneck stage's cost) and the module each stage
runs (`StageModule`, sharing the model's submodules under the model's parameter names).
`disttrain.parallel.pipeline` runs the schedule over them.

Shape legend: B batch, S sequence (local shard under sequence parallelism), H hidden, V vocab.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.model.documents import documents_scope
from disttrain.model.llama import embed_tokens, rope_tables


def split_stages(num_layers: int, pp: int,
                 layer_costs: Sequence[float] | None = None) -> tuple[tuple[int, int], ...]:
    """Half-open contiguous layer ranges, one per stage, each with at least one layer.

    Without costs the ranges differ in length by at most one, the earlier stages taking the
    extra layers (the last stage also runs the head and the loss). With `layer_costs` (one
    non-negative number per layer) the ranges minimise the largest stage cost, the
    pipeline's bottleneck; among equally good splits the one with the longest early stages
    is returned, so the result is deterministic.
    """
    if pp < 1:
        raise ValueError(f"pp: must be >= 1, got {pp}")
    if num_layers < pp:
        raise ValueError(f"pp: each of the {pp} stages needs at least one layer, "
                         f"but num_layers is {num_layers}")
    if layer_costs is None:
        base, extra = divmod(num_layers, pp)
        sizes = [base + (stage < extra) for stage in range(pp)]
    else:
        costs = [float(c) for c in layer_costs]
        if len(costs) != num_layers:
            raise ValueError(f"layer_costs: need {num_layers} entries, got {len(costs)}")
        if any(not c >= 0.0 for c in costs):  # also rejects NaN
            raise ValueError(f"layer_costs: must be non-negative numbers, got {costs}")
        sizes = _min_bottleneck_sizes(costs, pp)
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return tuple(zip(bounds[:-1], bounds[1:]))


def _min_bottleneck_sizes(costs: list[float], pp: int) -> list[int]:
    """Stage sizes minimising the maximum stage cost (dynamic programme over suffixes)."""
    num_layers = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[k][i]: smallest bottleneck splitting layers i.. into k stages; take[k][i]: first size.
    best = [[inf] * (num_layers + 1) for _ in range(pp + 1)]
    take = [[0] * (num_layers + 1) for _ in range(pp + 1)]
    best[0][num_layers] = 0.0
    for k in range(1, pp + 1):
        for i in range(num_layers - k, -1, -1):
            for size in range(num_layers - i - (k - 1), 0, -1):  # longest first wins ties
                value = max(prefix[i + size] - prefix[i], best[k - 1][i + size])
                if value < best[k][i]:
                    best[k][i], take[k][i] = value, size
    sizes, start = [], 0
    for k in range(pp, 0, -1):
        sizes.append(take[k][start])
        start += sizes[-1]
    return sizes


class LayerRange(nn.Module):
    """Decoder layers of one or more stages, registered under their global layer index (so
    parameter names match the full model) and iterated in layer order (as `model.layers`
    is, e.g. by `parallel.chunks.execution_units`)."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for index in sorted(layers):
            self.add_module(str(index), layers[index])

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class StageModule(nn.Module):
    """The part of a `Llama` one pipeline stage runs, with the model's parameter names.

    First stage: tokens_BS -> embedding -> its layers -> x_BSH.  Middle: x_BSH -> layers.
    Last: x_BSH -> layers -> final norm -> head -> logits_BSV (the loss is the schedule's);
    with `loss_chunk_tokens` it stops at the final norm (the loss applies the head in tiles).
    Submodules are shared with the model, not copied, and named as in the model.
    """

    def __init__(self, model: nn.Module, stage_index: int, stages: Sequence[tuple[int, int]]):
        super().__init__()
        start, end = stages[stage_index]
        self.is_first = stage_index == 0
        self.is_last = stage_index == len(stages) - 1
        self.shape = model.shape  # for RoPE; no reference to the rest of the model is kept
        self.embed = model.embed if self.is_first or (self.is_last and model.head is None) else None
        self.pos_embed = model.pos_embed if self.is_first else None
        self.layers = LayerRange({i: model.layers[i] for i in range(start, end)})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.tensor_parallel = getattr(model, "tensor_parallel", None)
        """Under tensor parallelism the last stage returns the normed hidden shard and the
        loss function applies the vocabulary-parallel head."""
        self.positions_S: torch.Tensor | None = None
        """Absolute positions of this rank's tokens; set by the runner before each step."""
        self.documents: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        """Packed documents: (positions_S, doc_ids) of each microbatch of the step, in order;
        set by the runner (a stage runs its microbatches' forwards in microbatch order)."""
        self._next_microbatch = 0
        self.loss_chunk_tokens = 0
        """> 0: the last stage returns hidden states; the loss tiles the head (the runner)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions, doc_ids = self.positions_S, None
        if self.documents is not None:
            index = self._next_microbatch
            if x.device.type != "meta":  # the schedule's shape inference is not a microbatch
                self._next_microbatch += 1
            positions, doc_ids = self.documents[min(index, len(self.documents) - 1)]
        if positions is None:
            raise RuntimeError("StageModule: positions_S must be set before the forward")
        if self.is_first:
            x = embed_tokens(self.embed, self.pos_embed, x, positions)
        cos, sin = rope_tables(self.shape, positions.to(x.device), x.dtype)
        with documents_scope(doc_ids):
            for layer in self.layers:
                x = layer(x, cos, sin)
        if not self.is_last:
            return x
        if self.tensor_parallel is not None or self.loss_chunk_tokens:
            return self.norm(x)
        return F.linear(self.norm(x), self.output_weight)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight


def build_stage_module(model: nn.Module, stage_index: int,
                       stages: Sequence[tuple[int, int]]) -> StageModule:
    """Cut stage `stage_index` of `stages` (half-open layer ranges covering every layer of
    `model` in order) out of an unmodified (or layer-wrapped) Llama."""
    num_layers = len(model.layers)
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"stage_index: must be in [0, {len(stages)}), got {stage_index}")
    expected = 0
    for start, end in stages:
        if start != expected or end <= start:
            raise ValueError(f"parallel.stages: ranges must be contiguous, non-empty and start "
                             f"at 0, got {tuple(stages)}")
        expected = end
    if expected != num_layers:
        raise ValueError(f"parallel.stages: ranges must cover all {num_layers} layers, "
                         f"got {tuple(stages)}")
    return StageModule(model, stage_index, stages)


def _union(stage_modules: list[StageModule]) -> nn.Module:
    """One module holding every local stage's submodules under the full model's names."""
    union = nn.Module()
    layers: dict[int, nn.Module] = {}
    for module in stage_modules:
        for name in ("embed", "pos_embed", "norm", "head"):
            if getattr(module, name) is not None:
                union.add_module(name, getattr(module, name))
        layers.update((int(key), layer) for key, layer in module.layers.named_children())
    union.add_module("layers", LayerRange(layers))
    return union
