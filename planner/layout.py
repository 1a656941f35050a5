"""Memory layout: MEMO's bi-level dynamic storage allocation (DSA).

Inner level: the tensors of one layer's forward with their lifetimes get offsets in one
arena that every layer reuses. Outer level: the bytes each layer keeps until its backward
(layer input and attention output, or everything for a plain layer) become blocks beside
that arena. Each level is a DSA instance: place intervals [offset, offset + size) so that
no two tensors live at the same time overlap, minimising the arena's peak.

The MIP decides, for each pair of tensors whose lifetimes overlap, which one sits below
(pairwise no-overlap with big-M); exact integer offsets then follow by a longest path over
that order, so rounding can never create an overlap. Best-fit greedy is the fallback when
the solve stops without a solution, and `check_layout` proves the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulp

from planner.analytic import layer_tensor_lifetimes
from planner.plan import LayerActivationPlan
from planner.selective import selective_bytes_per_token
from planner.shapes import ModelShape
from planner.solve import solve_model


@dataclass(frozen=True, kw_only=True)
class Block:
    """A tensor (or group of tensors) with a size and an inclusive lifetime [start, end]."""

    name: str
    """Unique name."""
    size_bytes: int
    """Bytes."""
    start: int
    """First step it is live."""
    end: int
    """Last step it is live (inclusive)."""

    def overlaps_in_time(self, other: "Block") -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True, kw_only=True)
class Layout:
    offsets: dict[str, int]
    """Byte offset of each block in the arena."""
    arena_bytes: int
    """Peak of the arena: max over blocks of offset + size."""
    max_live_bytes: int
    """Largest sum of sizes live at one step (a lower bound on the arena)."""
    method: str
    """'mip' or 'greedy'."""
    status: str
    """Solver status text, or 'greedy'."""

    @property
    def fragmentation_ratio(self) -> float:
        return self.arena_bytes / self.max_live_bytes if self.max_live_bytes else 1.0

    def to_dict(self) -> dict:
        return dict(offsets=dict(self.offsets), arena_bytes=self.arena_bytes,
                    max_live_bytes=self.max_live_bytes, method=self.method, status=self.status,
                    fragmentation_ratio=self.fragmentation_ratio)


def max_live_bytes(blocks: list[Block]) -> int:
    steps = sorted({b.start for b in blocks} | {b.end for b in blocks})
    return max((sum(b.size_bytes for b in blocks if b.start <= t <= b.end) for t in steps), default=0)


def check_layout(blocks: list[Block], offsets: dict[str, int]) -> list[str]:
    """Every pair of blocks that are live together and share bytes (empty: layout valid)."""
    problems = []
    for i, first in enumerate(blocks):
        if offsets.get(first.name, -1) < 0:
            problems.append(f"{first.name}: no offset")
            continue
        for second in blocks[i + 1:]:
            if first.size_bytes == 0 or second.size_bytes == 0 or not first.overlaps_in_time(second):
                continue
            a, b = offsets[first.name], offsets.get(second.name, -1)
            if b >= 0 and a < b + second.size_bytes and b < a + first.size_bytes:
                problems.append(f"{first.name} [{a}, {a + first.size_bytes}) overlaps "
                                f"{second.name} [{b}, {b + second.size_bytes})")
    return problems


def best_fit(blocks: list[Block]) -> dict[str, int]:
    """Largest blocks first; each at the lowest offset where it clashes with no placed block."""
    placed: list[tuple[Block, int]] = []
    offsets = {}
    for block in sorted(blocks, key=lambda b: (-b.size_bytes, b.start, b.name)):
        busy = sorted((off, off + other.size_bytes) for other, off in placed
                      if other.overlaps_in_time(block))
        candidate = 0
        for low, high in busy:
            if candidate + block.size_bytes <= low:
                break
            candidate = max(candidate, high)
        offsets[block.name] = candidate
        placed.append((block, candidate))
    return offsets


def _offsets_from_order(blocks: list[Block], below: dict[tuple[int, int], bool]) -> dict[str, int]:
    """Exact offsets from a 'who sits below whom' order: longest path in that DAG."""
    offsets = [0] * len(blocks)
    for _ in range(len(blocks)):
        changed = False
        for (i, j), i_below in below.items():
            low, high = (i, j) if i_below else (j, i)
            need = offsets[low] + blocks[low].size_bytes
            if offsets[high] < need:
                offsets[high], changed = need, True
        if not changed:
            break
    return {b.name: off for b, off in zip(blocks, offsets)}


def solve_layout(blocks: list[Block], *, time_limit_s: float = 2.0, backend: str = "auto",
                 max_nodes: int | None = None) -> Layout:
    """Minimum-peak offsets for `blocks` (MIP, greedy fallback / incumbent); `max_nodes`
    bounds the MIP's work, `time_limit_s` is a wall-clock safety cap."""
    if len({b.name for b in blocks}) != len(blocks):
        raise ValueError("blocks: names must be unique")
    live = max_live_bytes(blocks)
    greedy = best_fit(blocks)
    greedy_peak = max((greedy[b.name] + b.size_bytes for b in blocks), default=0)
    pairs = [(i, j) for i in range(len(blocks)) for j in range(i + 1, len(blocks))
             if blocks[i].overlaps_in_time(blocks[j])]
    if greedy_peak <= live or not pairs:
        return Layout(offsets=greedy, arena_bytes=greedy_peak, max_live_bytes=live,
                      method="greedy", status="greedy (equals the live-bytes lower bound)")
    scale = max(b.size_bytes for b in blocks)
    sizes = [b.size_bytes / scale for b in blocks]
    upper = greedy_peak / scale
    holder: dict = {}

    def build(relax: bool) -> pulp.LpProblem:
        model = pulp.LpProblem("memory_layout", pulp.LpMinimize)
        cat = pulp.LpContinuous if relax else pulp.LpBinary
        offset = [model.add_variable(f"offset_{k}", 0, upper - sizes[k]) for k in range(len(blocks))]
        peak = model.add_variable("arena_peak", live / scale, upper)
        below = {}
        for i, j in pairs:
            i_below = model.add_variable(f"below_{i}_{j}", 0, 1, cat)
            model += offset[i] + sizes[i] <= offset[j] + upper * (1 - i_below), f"i_under_j_{i}_{j}"
            model += offset[j] + sizes[j] <= offset[i] + upper * i_below, f"j_under_i_{i}_{j}"
            below[(i, j)] = i_below
        for k in range(len(blocks)):
            model += peak >= offset[k] + sizes[k], f"peak_covers_{k}"
        model += peak
        if not relax:
            holder["below"] = below
        return model

    _, result = solve_model(build, backend=backend, time_limit_s=time_limit_s, gap_rel=1e-4,
                            max_nodes=max_nodes)
    if result.has_solution:
        order = {pair: (var.value() or 0) > 0.5 for pair, var in holder["below"].items()}
        offsets = _offsets_from_order(blocks, order)
        peak = max(offsets[b.name] + b.size_bytes for b in blocks)
        if peak <= greedy_peak and not check_layout(blocks, offsets):
            return Layout(offsets=offsets, arena_bytes=peak, max_live_bytes=live,
                          method="mip", status=result.status)
    return Layout(offsets=greedy, arena_bytes=greedy_peak, max_live_bytes=live,
                  method="greedy", status=f"greedy fallback (MIP: {result.status})")


def plan_memory_layout(shape: ModelShape, dtype: str, tokens: int,
                       activations: tuple[LayerActivationPlan, ...], *,
                       time_limit_s: float = 2.0, backend: str = "auto",
                       max_nodes: int | None = None) -> dict:
    """Bi-level layout for one microbatch of a stage: inner layer arena, then layers."""
    tensors = layer_tensor_lifetimes(shape, dtype, tokens)
    kept_kinds = ("input", "attention_output")
    inner_blocks = [Block(name=t.name, size_bytes=t.size_bytes, start=t.start, end=t.end)
                    for t in tensors if t.kind not in kept_kinds]
    inner = solve_layout(inner_blocks, time_limit_s=time_limit_s, backend=backend,
                         max_nodes=max_nodes)
    kept = {kind: sum(t.size_bytes for t in tensors if t.kind == kind) for kind in kept_kinds}
    plain = sum(t.size_bytes for t in tensors if t.kind != "transient")
    count = len(activations)
    outer_blocks = [Block(name="layer_arena", size_bytes=inner.arena_bytes, start=0, end=2 * count)]
    for index, act in enumerate(activations):
        size = plain if act.keep_all else int(selective_bytes_per_token(shape, dtype) * tokens) \
            if act.selective else (
            (0 if act.swap_input else kept["input"])
            + (0 if act.swap_attention_output else kept["attention_output"]))
        outer_blocks.append(Block(name=f"layer_{index}_kept", size_bytes=size, start=index,
                                  end=2 * count - 1 - index))
    outer = solve_layout(outer_blocks, time_limit_s=time_limit_s, backend=backend,
                         max_nodes=max_nodes)
    for level, layout, blocks in (("inner", inner, inner_blocks), ("outer", outer, outer_blocks)):
        problems = check_layout(blocks, layout.offsets)
        assert not problems, f"{level} layout overlaps: {problems[:3]}"
    return dict(inner=inner.to_dict(), outer=outer.to_dict(), arena_bytes=outer.arena_bytes,
                fragmentation_ratio=outer.fragmentation_ratio,
                inner_fragmentation_ratio=inner.fragmentation_ratio, tokens=tokens)
