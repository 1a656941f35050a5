"""The backward working set of one decoder layer as the runtime holds it, phase by phase.

Bytes one rank allocates during a layer's backward on top of what the layer saved (the saved
tensors are counted elsewhere and not credited when they are freed), the incoming gradient
included: the largest over the backward's phases, each a number of bytes per token plus the
weight gradients alive at that moment (in the compute dtype, before the model states
accumulate them in fp32). Read off the runtime (`disttrain.model.llama`, and with tensor
parallelism `disttrain.parallel.tp_linear` / `tp_comm` / `tensor`), in the order the backward
runs; tests/test_working_set.py measures the runtime's peak on torch's fake process group
and holds this to it.

Legend (per token): H hidden, h = H/tp, A = heads x head_dim, a = A/tp, kv and k = kv/tp the
key/value width, F the MLP width and f = F/tp, n its up projections (SwiGLU 2, GeLU 1); b the
dtype's bytes, fp32 4.

With tp > 1 the residual stream is sharded (h wide) but the linears' backward gathers to
full width: a row-parallel backward (o, down) holds the all-gather's staging and the (T, H)
gradient it fills (2H); a column-parallel backward (q/k/v, gate/up) holds the gathered input
in the all-gather's rank-major staging and the input gradient summed over the siblings in the
reduce-scatter's rank-major layout (2H), for any `tp_overlap_chunks` and either
`tp_column_backward`: 'lean' runs its GEMMs per rank's block of H / tp features, 'whole' runs
them whole on the transposed layouts (the gathered X^T and the input gradient's D^T, (H, T)
each), its transposed shard released before the reduced gradient's (T, h) is allocated, the
transposed copy of that gradient made once the (H, T) buffers are gone. None of these divide
by tp. An RMSNorm backward (`disttrain.model.rmsnorm`) holds its input gradient and fp32 buffers
for `NORM_CHUNK_TOKENS` tokens, not the whole sequence (`norm_backward_bytes`); Qwen3's q norm
is one over T x N rows of head_dim, beside the two H-wide gradients, its incoming (T, A) and
one (T, kv) gradient of k or v.
"""

from __future__ import annotations

FP32 = 4
NORM_CHUNK_TOKENS = 2048
"""Tokens the runtime's RMSNorm backward (`disttrain.model.rmsnorm`) works on at a time."""


def norm_backward_bytes(width: float, b: int, tokens: int, tp: int = 1,
                        chunk_tokens: int = NORM_CHUNK_TOKENS) -> float:
    """Peak bytes an RMSNorm backward (`disttrain.model.rmsnorm`) allocates over `tokens` of
    `width` features (this rank's): its input gradient, one chunk's fp32 (c, width) and
    (c, 1) buffers, the weight gradient's fp32 sum and a chunk's term; sharded (tp > 1), the
    per-token dots of all tokens instead of a chunk's, and their all-reduced copy."""
    c = min(tokens, max(1, chunk_tokens))
    dots = c if tp == 1 else 2 * tokens
    return tokens * b * width + c * FP32 * width + FP32 * dots + 2 * FP32 * width


def layer_backward_working_bytes(shape, b: int, tokens: int, tp: int = 1, overlap_chunks: int = 1,
                                 mlp_chunk_tokens: int = 0,
                                 norm_chunk_tokens: int = NORM_CHUNK_TOKENS,
                                 column_backward: str = "lean") -> float:
    """Peak transient bytes of one layer's backward on one rank (the module docstring), for
    `tokens` local tokens in a dtype of `b` bytes. `mlp_chunk_tokens`: the MLP runs tiled
    over tiles of that many tokens (`disttrain.tiling`), rebuilding a tile's intermediates;
    `norm_chunk_tokens`: the tokens an RMSNorm backward works on at a time.
    `overlap_chunks` and `column_backward` ('lean' or 'whole') do not change the bytes (the
    module docstring; kept for the callers, tests/test_working_set.py measures each)."""
    if column_backward not in ("lean", "whole"):
        raise ValueError(f"column_backward: must be 'lean' or 'whole', got {column_backward!r}")
    t = tokens
    tiled = 0 < mlp_chunk_tokens < t
    c = mlp_chunk_tokens if tiled else t
    n = 2 if shape.mlp == "swiglu" else 1
    H, A, kv, F = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.ffn_hidden_size
    h, a, k, f = H / tp, A / tp, kv / tp, F / tp
    saved = shape.mlp_saved_per_ffn         # a rebuilt tile's intermediates, F wide each
    # MLP phases: (bytes per token / b, weight gradients / b, rebuilt tensors alive in a
    # tiled MLP, whether the down projection's weight gradient is alive then in a tiled MLP)
    if tp == 1:
        mlp = [(H + (n + 1) * F, 0, saved - 1, 1), (2 * H + n * F, H * F, 0, 1)]
        attn = [(H + 3 * A + 2 * kv, 0), (4 * H + A, kv * H), (3 * H + A + kv, kv * H)]
        if shape.rope:
            attn += [(2 * H + A + 3 * kv, 0), (2 * H + 3 * A + kv, 0)]
    else:
        mlp = [(h + 2 * H + f, 0, saved, 0), (h + H + f, H * f, saved, 0),
               (h + (n + 1) * f, 0, saved - 1, 1),
               (2 * h + n * f + 2 * H, n * H * f, 0, 1)]
        attn = [(h + 2 * H + a, 0), (h + H + a, H * a), (h + 3 * a + 2 * k, 0),
                (2 * h + a + 2 * k + 2 * H, (a + 2 * k) * H)]
        if shape.rope:
            attn.append((h + a + 4 * k, 0))
    # an RMSNorm backward beside the incoming and the residual gradients (2 x h)
    norm = t * 2 * b * h + norm_backward_bytes(h, b, t, tp, norm_chunk_tokens)
    peaks = [b * (t * per + w) for per, w in attn] + [norm]
    if shape.qk_norm:   # Qwen3's q norm backward: this rank's N / tp rows of head_dim a token,
        # beside 2H + A + kv (tp 1) or h + a + 2k (tp > 1: the residual gradient, and the q, k
        # and v gradients the column-parallel backward takes together) elements a token of
        # other tensors: the runtime's peak, measured in tests/test_working_set.py
        alive = 2 * H + A + kv if tp == 1 else h + a + 2 * k
        peaks.append(t * b * alive + norm_backward_bytes(
            shape.head_dim, b, t * shape.num_heads // tp, 1, norm_chunk_tokens))
    if not tiled:
        return max(peaks + [b * (t * per + w) for per, w, _, _ in mlp])
    # tiled MLP (`disttrain.tiling`): its incoming and input gradients (T, h) stay whole and
    # its weight gradients are summed over the tiles; a tile rebuilds its intermediates and
    # its output (c, h), then runs the phases above on c tokens, the down projection's weight
    # gradient held (autograd.grad returns it) until the tile is done
    whole = b * (t * 2 * h + (n + 1) * H * f)
    return max(peaks + [whole + b * (c * (per - h + h + alive * f) + w + down * H * f)
                        for per, w, alive, down in mlp])
