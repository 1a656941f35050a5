"""The profile's measure of one more tile of the tiled loss (`planner.loss_tiles`).

The runtime's tiled loss costs a fixed time per tile beyond its share of the per-token work
(its calls, small GEMMs, its own weight-gradient product added into the accumulated one).
Timed as the difference between the same few tokens as one tile and as several: the
per-token work is the same, so what differs is the extra tiles' fixed cost.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

LOSS_TILE_TOKENS = 64
"""Tokens of the timed microbatch (few: the per-token work is not what is measured)."""
LOSS_TILE_SPLIT = 8
"""Tiles of the tiled run (of LOSS_TILE_TOKENS / LOSS_TILE_SPLIT tokens each)."""


def measure_loss_tile_s(head: Any, hidden_size: int, torch_dtype: torch.dtype, *,
                        repeats: int = 5, median: bool = False) -> float:
    """Seconds one more tile of `head`'s tiled loss costs (forward + backward): `head(x,
    chunk_tokens=c)` on LOSS_TILE_TOKENS tokens as one tile and as LOSS_TILE_SPLIT tiles,
    the fastest (or `median`) of `repeats` each, the difference over the extra tiles.
    0 when `head` does not tile (no `tiles_loss` attribute)."""
    if not getattr(head, "tiles_loss", False):
        return 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, LOSS_TILE_TOKENS, hidden_size, generator=gen).to(torch_dtype).requires_grad_()

    def run(chunk: int) -> float:
        start = time.perf_counter()
        head(x, chunk_tokens=chunk).backward()
        return time.perf_counter() - start

    one_tile, split = LOSS_TILE_TOKENS, LOSS_TILE_TOKENS // LOSS_TILE_SPLIT
    run(one_tile), run(split)                                  # warm-up
    ones, many = [], []
    for _ in range(max(1, repeats)):
        ones.append(run(one_tile))
        many.append(run(split))
    pick = statistics.median if median else min
    return max(0.0, pick(many) - pick(ones)) / (LOSS_TILE_SPLIT - 1)
