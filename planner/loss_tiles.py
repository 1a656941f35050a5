"""The output head + loss of one microbatch as the runtime computes it, tile by tile.

The runtime has three ways to compute the loss (`disttrain.engine.lm_loss`):

- untiled, no tensor parallelism: norm, head GEMM and cross entropy over all tokens, the
  backward through autograd. The profile times exactly this (`head_forward_s`,
  `head_backward_s`), and the analytic model prices it (`costmodel.head_seconds`).
- tiled, no tensor parallelism (`disttrain.tiling.chunked_lm_loss`): the forward runs each
  tile's logits, loss and gradients at once (one pass: nothing is recomputed), the backward
  only scales the gradients it kept. Same work as untiled, moved into the forward.
- tensor parallelism, tiled or not (`disttrain.parallel.tp_vocab`, one tile of all tokens
  when untiled): each rank holds V/tp vocabulary rows; the forward gathers the hidden states
  and per tile computes its logits and all-reduces the max and the sums (two calls); the
  backward gathers the hidden states again, recomputes every tile's logits and
  reduce-scatters the hidden gradient.

Each tile costs a fixed time beyond its share of the per-token work: its calls (Python and
autograd on a CPU, kernel launches on a GPU), and its own weight-gradient product
(`dlogits^T h`, V/tp x H) added into the accumulated gradient. The profile measures that
per-tile time on the target (`LayerProfile.loss_tile_s`: the runtime's tiled loss on a few
tokens, one tile against many); without a profile it is the weight-gradient traffic over the
device's memory bandwidth. Under tensor parallelism each tile also pays its all-reduces'
latency (`planner.collectives`, measured on CPU nodes).

On a CPU node planned as one pool, a memory-bound plan maps each block of 1 MiB or more fresh
(`planner.page_faults`): `head_mapped_bytes` counts the blocks of a tiled loss as the runtime
allocates them (`TILE_BLOCKS`; tests/test_loss_tiles.py checks the counts against the runtime).

Pure functions: no torch (the planner runs without it).
"""

from __future__ import annotations

import math

from planner.collectives import call_latency, collective_bw, collective_seconds
from planner.costmodel import head_seconds
from planner.costtypes import CostParams
from planner.efficiency import MEMORY_EFFICIENCY, device_family
from planner.hardware import HardwareSpec
from planner.page_faults import MMAP_THRESHOLD_BYTES
from planner.shapes import DTYPE_BYTES, ModelShape

FP32 = 4
LOSS_ALL_REDUCES_PER_TILE = 2
"""All-reduces the vocabulary-parallel loss issues per tile in its forward: the logits' max,
then the sum of exponentials stacked with the target logit (fp32, 1 and 2 floats per token).
Its backward issues none per tile."""
HEAD_TP_COLLECTIVES = {"forward": {"all_gather": 1}, "backward": {"all_gather": 1, "reduce_scatter": 1}}
"""Hidden-wide collectives of the vocabulary-parallel loss per microbatch: the forward gathers
the hidden states, the backward gathers them again (for the recompute) and reduce-scatters
their fp32 gradient."""
TILE_BLOCKS = {"vocab_parallel": (6, 1, 1), "chunked": (3, 1, 2)}
"""Blocks the tiled loss allocates, as (tokens x V/tp fp32 blocks per tile, V/tp x H fp32
blocks per tile, V/tp x H fp32 blocks per call): the vocabulary-parallel loss (logits, shifted
logits and exponentials in the forward and again in the backward; each tile's weight
gradient; the accumulated gradient) and `chunked_lm_loss` (logits, their exponentials, the
logit gradient; each tile's weight gradient; the accumulated and the returned gradient)."""


def num_tiles(tokens: int, chunk: int) -> int:
    """Tiles of `chunk` tokens over `tokens` (an untiled loss is one tile)."""
    return max(1, math.ceil(tokens / chunk)) if chunk and chunk < tokens else 1


def head_comm_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, tokens: int, tp: int,
                      tiles: int, params: CostParams) -> tuple[float, float]:
    """(forward, backward) seconds of the vocabulary-parallel loss's collectives for one
    microbatch of `tokens` tokens in `tiles` tiles over the intra-node tp group: the
    hidden-wide ones once (`HEAD_TP_COLLECTIVES`), the all-reduces once per tile
    (`LOSS_ALL_REDUCES_PER_TILE`, one latency each)."""
    if tp <= 1:
        return 0.0, 0.0
    share = (tp - 1) / tp
    hidden = {"all_gather": tokens * shape.hidden_size * DTYPE_BYTES[dtype] * share,
              "reduce_scatter": tokens * shape.hidden_size * FP32 * share}

    def seconds(kind: str, sent: float, calls: float) -> float:
        return collective_seconds(hw, kind, sent, tp, 1, calls,
                                  intra_bw=collective_bw(hw, tp, params, kind),
                                  inter_bw=hw.inter_node_bw * params.comm_efficiency,
                                  latency_s=call_latency(hw, params.gpu_collective_latency_s),
                                  inter_latency_s=0.0)

    forward, backward = (sum(count * seconds(kind, hidden[kind], 1) for kind, count
                             in HEAD_TP_COLLECTIVES[d].items()) for d in ("forward", "backward"))
    reduced = 3 * tokens * FP32 * 2 * share        # max + (sum, target) per token, all-reduced
    forward += seconds("all_reduce", reduced, LOSS_ALL_REDUCES_PER_TILE * tiles)
    return forward, backward


def analytic_tile_s(shape: ModelShape, dtype: str, tp: int, params: CostParams,
                    memory_bw: float | None = None) -> float:
    """Fixed seconds of one more tile without a profile: its weight-gradient product (V/tp x H
    in the compute dtype, written and read once) added into the fp32 accumulated gradient
    (read and written) at the device's memory bandwidth. Kernel launches are not counted."""
    rows = -(-shape.vocab_size // tp)
    per_element = 2 * DTYPE_BYTES[dtype] + 2 * FP32
    return per_element * rows * shape.hidden_size / (memory_bw or params.device_memory_bw)


def loss_head_seconds(untiled_fwd: float, untiled_bwd: float, *, tokens: int, chunk: int, tp: int,
                      tile_s: float, comm: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """(forward, backward) seconds of the head + loss of one microbatch as the runtime runs it
    (see the module doc). `untiled_fwd` / `untiled_bwd`: the untiled loss on this rank's
    share of the vocabulary; `tile_s`: fixed seconds per tile beyond the first; `comm`: the
    vocabulary-parallel collectives (`head_comm_seconds`)."""
    tiles = num_tiles(tokens, chunk)
    extra = (tiles - 1) * tile_s
    if tp > 1:   # the backward recomputes every tile's logits; per-tile costs both ways
        return (untiled_fwd + extra / 2 + comm[0],
                untiled_bwd + untiled_fwd + extra / 2 + comm[1])
    if chunk:   # chunked_lm_loss: gradients taken in the forward
        return untiled_fwd + untiled_bwd + extra, 0.0
    return untiled_fwd, untiled_bwd


def head_mapped_bytes(shape: ModelShape, *, tokens: int, chunk: int, tp: int,
                      threshold: int = MMAP_THRESHOLD_BYTES) -> float | None:
    """Bytes one microbatch's tiled or vocabulary-parallel loss allocates in blocks of
    `threshold` or more (`TILE_BLOCKS`); None for the untiled loss without tensor parallelism
    (the profile's head allocations price that one)."""
    if tp <= 1 and not chunk:
        return None
    per_tile_logits, per_tile_weight, per_call_weight = TILE_BLOCKS["vocab_parallel" if tp > 1 else "chunked"]
    rows = -(-shape.vocab_size // tp)
    tiles = num_tiles(tokens, chunk)
    weight = rows * shape.hidden_size * FP32
    weight = weight if weight >= threshold else 0.0
    total = (tiles * per_tile_weight + per_call_weight) * weight
    step = min(tokens, chunk) if chunk else tokens
    for count, size in ((tokens // step, step), (1 if tokens % step else 0, tokens % step)):
        block = size * rows * FP32                  # full tiles, then a shorter last one
        total += count * per_tile_logits * block if block >= threshold else 0.0
    return total


def stage_head_seconds(shape: ModelShape, dtype: str, hw: HardwareSpec, *, tokens: int, tp: int,
                       chunk: int, params: CostParams,
                       measured: tuple[float, float, float] | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of one microbatch's head + loss on a rank of the last
    stage. `measured`: the profile's untiled (forward, backward) over the whole vocabulary
    and its per-tile seconds (0: not measured), else the analytic model; tensor parallelism
    splits the vocabulary over tp."""
    if measured is not None:
        fwd, bwd = measured[0] / tp, measured[1] / tp
        tile_s = measured[2]
    else:
        fwd, bwd = head_seconds(shape, dtype, hw, tokens, tp, params)
        tile_s = 0.0
    if not tile_s:
        family = device_family(hw.device_name)
        tile_s = analytic_tile_s(shape, dtype, tp, params,
                                 family.hbm_bw * MEMORY_EFFICIENCY if family else None)
    comm = head_comm_seconds(shape, dtype, hw, tokens, tp, num_tiles(tokens, chunk), params)
    return loss_head_seconds(fwd, bwd, tokens=tokens, chunk=chunk, tp=tp, tile_s=tile_s, comm=comm)


def loss_tile_options(tokens: int, chunk: int) -> list[int]:
    """Loss tiles a one-pool plan weighs by time: untiled (0), then from the largest power of
    two below `tokens` down to `chunk` (the largest within the memory budget)."""
    options, tile = [0], chunk
    while tile and tile < tokens:
        options.insert(1, tile)
        tile *= 2
    return options
