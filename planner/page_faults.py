"""Page faults of a memory-bound plan on a CPU node: the price of giving freed memory back.

On a CPU node the "device" is host RAM. A plan that trades time for memory (some layer not
kept whole, a model-state chunk off the device, or a predicted peak above `HEADROOM` of the
memory) runs with glibc's mmap and trim thresholds fixed at `MMAP_THRESHOLD_BYTES`
(offload/host_memory.py: `memory_bound`, `return_freed_host_memory`): every block of that
size or more is mapped fresh and unmapped when freed, so each of its pages faults and is
zeroed by the kernel at its first touch. A plan that keeps everything with room to spare
runs with no block mapped and the heap never trimmed (`keep_freed_host_memory`), so its heap
recycles the same blocks step after step and faults none after the first.

Measured on this 2-core machine (4K tokens, bench/peers.py's model, 2 ranks): the kernel
time of a step went from 0.05-0.08 s (keep-all sp2) to 0.47-0.50 s (any memory-bound plan),
and fresh pages filled at ~1 GB/s against ~8 GB/s for reused ones. So the cost model charges
a memory-bound plan `page_fault_s_per_byte` (measured by the profile: fresh mapping vs
reused buffer) for every byte the step allocates in blocks at or above the threshold (the
profile records each allocation of a layer's forward + backward and of the head + loss,
fitted linear in tokens, so the threshold is applied to each block at the target's size).

Pure functions: no torch (the planner runs without it).
"""

from __future__ import annotations

import math
from typing import Sequence

MMAP_THRESHOLD_BYTES = 1 << 20
"""glibc's mmap / trim threshold the runtime sets under a memory-bound plan (the same value as
`offload.host_memory.DEFAULT_THRESHOLD_BYTES`; a test keeps them equal)."""
HEADROOM = 0.9
"""A plan whose predicted peak exceeds this share of the device memory is memory-bound (the
default of `offload.host_memory.memory_bound`; a test keeps them equal)."""


def bytes_in_mapped_blocks(fit: Sequence[Sequence[float]], tokens: float,
                           threshold: int = MMAP_THRESHOLD_BYTES) -> float:
    """Bytes of the allocations (each `a + b * tokens`, as the profile fitted them) that are
    `threshold` or larger at `tokens` tokens: the blocks glibc maps fresh each time."""
    total = 0.0
    for a, b in fit:
        size = round(a + b * tokens)   # whole bytes: a block of exactly the threshold is mapped
        if size >= threshold:
            total += size
    return total


def microbatch_mapped_bytes(layer_fit: Sequence[Sequence[float]],
                            head_fit: Sequence[Sequence[float]], *, tokens: float, layers: int,
                            with_head: bool, loss_chunk_tokens: int = 0) -> float:
    """Bytes one microbatch of a stage allocates in freshly mapped blocks: `layers` decoder
    layers' forward + backward at `tokens` local tokens, and on the last stage the head +
    loss, one call per loss chunk of `loss_chunk_tokens` (0: the whole microbatch)."""
    total = layers * bytes_in_mapped_blocks(layer_fit, tokens)
    if with_head and head_fit:
        chunk = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
        total += math.ceil(tokens / chunk) * bytes_in_mapped_blocks(head_fit, chunk)
    return total


def memory_bound(*, any_layer_not_kept: bool, any_chunk_off_device: bool, peak_bytes: float,
                 capacity_bytes: float, headroom: float = HEADROOM) -> bool:
    """The runtime's rule (`offload.host_memory.memory_bound`) from the planner's numbers."""
    return (any_layer_not_kept or any_chunk_off_device
            or (capacity_bytes > 0 and peak_bytes > headroom * capacity_bytes))


def stage_state_chunks(shape, *, layers: int, first: bool, last: bool, tp: int = 1,
                       zero_stage: int = 0) -> dict[str, list[float]]:
    """Elements of a stage's model-state chunks as the runtime packs them
    (`disttrain.parallel.chunks.pack_chunks`, a chunk per layer): the token embedding (and
    learned positions) on the first stage, one per decoder layer, on the last stage the final
    norm and the head (one chunk under stages 0-2, whose packing is by execution unit; two
    under ZeRO-3's layer-sized chunks). tp splits the vocabulary and the layers."""
    vocab = shape.vocab_size * shape.hidden_size / tp
    positions = shape.input_embedding_params() - shape.vocab_size * shape.hidden_size
    head = vocab if (not shape.tie_embeddings or not first) else 0.0
    norm = shape.embedding_params() - shape.input_embedding_params() - (
        0 if shape.tie_embeddings else shape.vocab_size * shape.hidden_size)
    tail = ([norm, head] if zero_stage == 3 else [norm + head]) if last else []
    return {"embedding": ([vocab] + ([positions] if positions else [])) if first else [],
            "layers": [shape.layer_params_per_tp_rank(tp)] * layers,
            "tail": [n for n in tail if n]}


def _blocks(sizes, threshold: int) -> float:
    return sum(s for s in (round(x) for x in sizes) if s >= threshold)


def _padded(numel: float, group: int) -> int:
    return -(-round(numel) // group) * group


def _gloo_reduce_scatter(numel: int, group: int, elem_bytes: int) -> list[int]:
    """Blocks gloo allocates inside a reduce-scatter of `numel` elements over `group` ranks.
    Measured (fresh pages per call under the 1 MiB thresholds, 4 MiB fp32 input, 2 and 4
    ranks): a reduce-scatter maps the input's size plus the output's, an all-gather its
    output's (a flat buffer it then copies out), an all-reduce 1/group of its tensor."""
    return [numel * elem_bytes, numel // group * elem_bytes]


def zero_microbatch_mapped_bytes(chunks: dict[str, list[float]], *, zero_stage: int, group: int,
                                 compute_bytes: int, reduce_bytes: int,
                                 threshold: int = MMAP_THRESHOLD_BYTES) -> float:
    """Bytes one microbatch maps fresh outside the profiled layers and head: the embeddings'
    weight gradients (autograd, in the compute dtype); stages 2-3 reducing each
    chunk's gradient (`ZeroModelStates._reduce_chunk`: a zeroed flat buffer in the reduce
    dtype, its shard when the group has 2+ ranks, an fp32 copy of a 16-bit result); stage 3
    gathering each chunk's compute-dtype buffer (`_gather`): the decoder layers' in the
    forward and again in the backward, the embedding's and the tail's once. With 2+ ranks,
    the collectives' own buffers too (gloo: `_gloo_reduce_scatter`)."""
    sizes = [n * compute_bytes for n in chunks["embedding"]]
    shard = 1 if zero_stage == 0 else group
    for name in ("embedding", "layers", "tail"):
        for numel in chunks[name]:
            n = _padded(numel, shard)
            if zero_stage >= 2:
                sizes.append(n * reduce_bytes)
                if group > 1:
                    sizes += [n // group * reduce_bytes] + _gloo_reduce_scatter(n, group, reduce_bytes)
                if reduce_bytes != 4:
                    sizes.append((n // group if group > 1 else n) * 4)
            if zero_stage == 3:
                gather = [n * compute_bytes] * (2 if group > 1 else 1)   # + gloo's flat output
                sizes += gather * (2 if name == "layers" else 1)
    return _blocks(sizes, threshold)


def step_mapped_bytes(chunks: dict[str, list[float]], *, zero_stage: int, group: int,
                      compute_bytes: int, reduce_bytes: int,
                      threshold: int = MMAP_THRESHOLD_BYTES) -> float:
    """Bytes the step maps fresh once after its microbatches, per chunk shard: stages 0-1
    reducing the full gradient (`grad_reduce.py`: a 16-bit copy to send, stage 1's received
    shard); the gradient norm (`clip_grad_norm`: the shard cast to fp64 and squared, 8 B per
    element each); AdamW (`adamw_`: the second moment's square root and its division by the
    bias correction, 4 B each); stages 0-2 in a 16-bit compute dtype, the master cast for the
    re-gather; with 2+ ranks the collectives' own buffers (gloo: `_gloo_reduce_scatter`)."""
    shard = 1 if zero_stage == 0 else group
    sizes = []
    for numel in (n for name in ("embedding", "layers", "tail") for n in chunks[name]):
        n = _padded(numel, shard)
        local = n // shard
        if zero_stage <= 1 and group > 1:
            sizes += [n * reduce_bytes] if reduce_bytes != 4 else []
            sizes += ([local * reduce_bytes] + _gloo_reduce_scatter(n, group, reduce_bytes)
                      if zero_stage == 1 else [n // group * reduce_bytes])   # gloo's all-reduce
        sizes += [local * 8, local * 8, local * 4, local * 4]
        if zero_stage <= 2 and compute_bytes != 4:
            sizes.append(local * compute_bytes)
        if zero_stage in (1, 2) and group > 1:
            sizes.append(n * compute_bytes)          # the re-gather: gloo's flat output
    return _blocks(sizes, threshold)


def state_mapped_bytes(shape, *, layers: int, first: bool, last: bool, tp: int, zero_stage: int,
                       group: int, compute_bytes: int, reduce_bytes: int) -> tuple[float, float]:
    """(per microbatch, per step) bytes a stage's model states map fresh under a memory-bound
    plan (`zero_microbatch_mapped_bytes`, `step_mapped_bytes`)."""
    chunks = stage_state_chunks(shape, layers=layers, first=first, last=last, tp=tp,
                                zero_stage=zero_stage)
    kw = dict(zero_stage=zero_stage, group=group, compute_bytes=compute_bytes,
              reduce_bytes=reduce_bytes)
    return zero_microbatch_mapped_bytes(chunks, **kw), step_mapped_bytes(chunks, **kw)
