"""Analytic model of one decoder layer: saved bytes and FLOPs from the shapes alone.

Used when the target device is not here (planning an A800 cluster on a CPU). The byte
counts mirror what autograd saves for `disttrain.model.DecoderLayer` (RMSNorm upcasts to
fp32, RoPE saves only the cos/sin tables, the flash core saves q, k, v, out and an fp32
log-sum-exp; SwiGLU saves gate, silu, up and their product, GeLU its input and output); tests check them equal to the profiler's measurements. Under `bf16` the
layer is the runtime's mixed-precision layer: bf16 weights and residual stream, fp32 RMSNorm
statistics and log-sum-exp (no autocast: no bf16 weight copies are saved).
The model-state bytes (`model_state_bytes`, `zero3_gather_bytes`) are what the runtime's
states hold; tests/test_precision_bytes.py measures both.

Symbols: H hidden, Q q width (query heads x head dim: H unless the shape sets head_dim), KV
kv width (kv heads x head dim), N query heads, D head dim, F ffn hidden,
V vocab, b bytes per element of the training dtype, S sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.shapes import DTYPE_BYTES, ModelShape

FP32 = 4
INDEX_BYTES = 8


@dataclass(frozen=True, kw_only=True)
class SavedBytesPerToken:
    """Bytes autograd saves per token of one decoder layer, split by kind."""

    input_saved: float
    """Layer-input bytes plain autograd saves (bf16 saves the fp32 upcast instead: 0)."""
    layer_input: float
    """Layer-input bytes a memory policy keeps for recompute (always b*H)."""
    attention_output: float
    """Attention output (b*H) plus the fp32 log-sum-exp (4*N)."""
    token_local: float
    """Everything else: norms, projections, q/k/v, the MLP's intermediates."""
    mlp: float
    """The part of `token_local` inside the MLP block (what MLP tiling bounds)."""

    @property
    def plain_total(self) -> float:
        """Saved bytes of an unmodified layer (autograd keeps everything)."""
        return self.input_saved + self.attention_output + self.token_local


def kv_heads_per_rank(shape: ModelShape, sp: int) -> int:
    """KV heads each Ulysses rank holds: K/sp, or 1 (replicated) when K < sp."""
    return max(1, shape.num_kv_heads // sp) if sp > 1 else shape.num_kv_heads


def norm_saved_bytes(width: float, dtype: str) -> float:
    """Bytes one RMSNorm (`disttrain.model.rmsnorm`) saves per row of `width` features
    beyond its input: [the fp32 copy of the input, when the dtype is not fp32], the fp32
    rsqrt, the normed tensor. In fp32 the "copy" is the input itself, counted by whoever
    owns the input. Used for the layer norms and for Qwen3's per-head q/k norms alike."""
    b = DTYPE_BYTES[dtype]
    upcast = 0 if b == FP32 else FP32 * width    # RMSNorm's fp32 copy of its input
    return upcast + FP32 + b * width             # [fp32 copy], rsqrt, normed


def qk_norm_saved_bytes_per_token(shape: ModelShape, dtype: str) -> float:
    """Saved bytes per token of Qwen3's q and k norms (0 without them): one RMSNorm row per
    query head and per kv head, over head_dim (before Ulysses' all-to-all: no replicas); in
    fp32 each also saves its input, the q / k projection's output, which nothing else keeps
    (RoPE saves only its tables)."""
    if not shape.qk_norm:
        return 0.0
    b, d = DTYPE_BYTES[dtype], shape.head_dim
    rows = shape.num_heads + shape.num_kv_heads
    own_input = b * d if b == FP32 else 0
    return rows * (norm_saved_bytes(d, dtype) + own_input)


def layer_saved_bytes_per_token(shape: ModelShape, dtype: str, sp: int = 1) -> SavedBytesPerToken:
    """Saved bytes per (local) token; with Ulysses sp, replicated KV heads cost extra."""
    b = DTYPE_BYTES[dtype]
    h, f, q = shape.hidden_size, shape.ffn_hidden_size, shape.q_dim
    kv = kv_heads_per_rank(shape, sp) * sp * shape.head_dim if sp > 1 else shape.kv_dim
    kv = max(kv, shape.kv_dim)
    norm = norm_saved_bytes(h, dtype)            # [fp32 copy], rsqrt, normed
    residual = b * h if b == FP32 else 0         # mlp_norm saves its fp32 input (h itself)
    # norm, normed*w, [h], then SwiGLU's gate, silu, up, product or GeLU's up, gelu
    mlp = norm + b * h + residual + shape.mlp_saved_per_ffn * b * f
    # norm, normed*w, q, k, v (+ the q/k norms' own saves)
    qkv = norm + b * h + b * q + 2 * b * kv + qk_norm_saved_bytes_per_token(shape, dtype)
    return SavedBytesPerToken(
        input_saved=b * h if b == FP32 else 0.0, layer_input=float(b * h),
        attention_output=float(b * q + FP32 * shape.num_heads),
        token_local=float(qkv + mlp), mlp=float(mlp))


def head_saved_bytes_per_token(shape: ModelShape, dtype: str) -> float:
    """Final norm, output head and cross-entropy (fp32 log-softmax) per token, + targets."""
    b = DTYPE_BYTES[dtype]
    h = shape.hidden_size
    norm_input = b * h if b == FP32 else FP32 * h
    return norm_input + FP32 + b * h + b * h + FP32 * shape.vocab_size + INDEX_BYTES


def model_saved_bytes(shape: ModelShape, dtype: str, batch: int, seq_len: int) -> float:
    """Saved bytes of a plain forward + loss of the whole model on `batch` x `seq_len`."""
    tokens = batch * seq_len
    per_layer = layer_saved_bytes_per_token(shape, dtype)
    rope_tables = 2 * seq_len * (shape.head_dim // 2) * DTYPE_BYTES[dtype] if shape.rope else 0
    # token ids; learned positions add the embedding lookup's position ids
    embedding = INDEX_BYTES * (tokens + (0 if shape.rope else seq_len))
    # In bf16 nobody saves a layer's input, so a layer's output is dropped unless the next
    # layer is fp32; the final norm's input is counted in the head term.
    return (shape.num_layers * per_layer.plain_total * tokens + embedding
            + head_saved_bytes_per_token(shape, dtype) * tokens + rope_tables + FP32)


def model_state_bytes(num_params: float, dtype: str, zero_stage: int, group: int
                      ) -> dict[str, float]:
    """Per-rank bytes of `num_params` parameters' states, as the runtime holds them
    (disttrain.parallel.zero, disttrain.optim) under ZeRO over `group` ranks:
    `parameters` the compute parameters in the training dtype (a 1/group shard at stage 3,
    where fp32's shard is its master); `gradients` fp32 whatever the dtype (bf16 gradients
    are accumulated in fp32; sharded from stage 2); `optimizer` the fp32 Adam moments and,
    in bf16, the fp32 master (sharded from stage 1)."""
    b = DTYPE_BYTES[dtype]
    g = max(1, group)
    per_param_optimizer = 2 * FP32 + (FP32 if b != FP32 else 0)
    return {"parameters": num_params * b / (g if zero_stage >= 3 else 1),
            "gradients": num_params * FP32 / (g if zero_stage >= 2 else 1),
            "optimizer": num_params * per_param_optimizer / (g if zero_stage >= 1 else 1)}


def zero3_gather_bytes(shape: ModelShape, dtype: str, prefetch: int = 1, *,
                       num_layers: int | None = None, first: bool = True, last: bool = True
                       ) -> float:
    """Peak bytes of the full (gathered) parameters ZeRO-3 holds at once, with one chunk per
    execution unit or smaller (the plan's one-layer chunks): the unit running and the next
    `prefetch` units (0 or 1) in execution order, forward and backward — embedding, decoder
    layers, final norm + head. A tied embedding is also the head: gathered from the first
    unit to the head's backward. A pipeline stage holds `num_layers` decoder layers, the
    embedding only if `first` and the norm + head only if `last`."""
    h, vocab_h = shape.hidden_size, shape.vocab_size * shape.hidden_size
    layers = shape.num_layers if num_layers is None else num_layers
    positions = shape.input_embedding_params() - vocab_h  # learned positions: own unit
    units = (([vocab_h] + ([positions] if positions else []) if first else [])
             + [shape.layer_params()] * layers
             + ([h + (0 if shape.tie_embeddings else vocab_h)] if last else []))
    tied = shape.tie_embeddings and first and last
    window = min(prefetch + 1, len(units))
    peak = 0
    for start in range(len(units) - window + 1):
        held = sum(units[start:start + window])
        if tied and start > 0:
            held += vocab_h
        peak = max(peak, held)
    return float(DTYPE_BYTES[dtype] * peak)


@dataclass(frozen=True, kw_only=True)
class FlopsPerToken:
    """Forward FLOPs per token of one layer (backward is 2x for matmuls)."""

    token_local: float
    """Projections and MLP: 2 x layer parameters (what recompute re-runs)."""
    attention: float
    """Causal attention core: 2*S*N*D (QK^T and AV, half the square; N*D = H unless the
    shape sets head_dim)."""


def layer_flops_per_token(shape: ModelShape, seq_len: int) -> FlopsPerToken:
    return FlopsPerToken(token_local=2.0 * shape.layer_params(),
                         attention=2.0 * seq_len * shape.q_dim)


def model_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward + backward model FLOPs per token (no recompute), the MFU numerator."""
    per_layer = layer_flops_per_token(shape, seq_len)
    head = 2.0 * shape.vocab_size * shape.hidden_size
    return 3.0 * (shape.num_layers * (per_layer.token_local + per_layer.attention) + head)


def noncausal_flops_ratio(shape: ModelShape, seq_len: int) -> float:
    """Model FLOPs per token counting full (non-causal) attention over the causal count."""
    causal = model_flops_per_token(shape, seq_len)
    return (causal + 3.0 * shape.num_layers * layer_flops_per_token(shape, seq_len).attention) / causal


@dataclass(frozen=True, kw_only=True)
class TensorLife:
    """One tensor of a layer's forward: bytes and the op steps it is live over [start, end]."""

    name: str
    """What the tensor is."""
    size_bytes: int
    """Bytes of the tensor at the planned token count."""
    start: int
    """Op step that allocates it."""
    end: int
    """Last op step it is live at (inclusive)."""
    kind: str
    """'input', 'attention_output', 'token_local' (saved, leaves at layer end) or 'transient'."""


def layer_tensor_lifetimes(shape: ModelShape, dtype: str, tokens: int) -> list[TensorLife]:
    """Tensors of one layer's forward in op order, with the step each is last used at.

    Saved token-local tensors live to the layer's end (then they are swapped or dropped);
    transients die after their last consumer. The layout planner packs them into one arena.
    """
    b, h, f = DTYPE_BYTES[dtype], shape.hidden_size, shape.ffn_hidden_size
    kv, q = shape.kv_dim, shape.q_dim
    end = 14
    rows = [  # name, bytes per token, start, end, kind
        ("input", b * h, 0, end, "input"),
        ("norm1_rsqrt", FP32, 0, end, "token_local"),
        ("norm1_normed", b * h, 1, end, "token_local"),
        ("norm1_out", b * h, 2, end, "token_local"),
        *((("q_proj", b * q, 3, 4, "transient"),
           ("q_rope", b * q, 4, end, "token_local"),
           ("k_proj", b * kv, 4, 5, "transient"),
           ("k_rope", b * kv, 5, end, "token_local")) if shape.rope else
          (("q_proj", b * q, 3, end, "token_local"),  # no RoPE: the core saves q, k as made
           ("k_proj", b * kv, 4, end, "token_local"))),
        # Qwen3's q/k norms' saves (in fp32 their inputs, the projections, among them)
        *((("qk_norms", qk_norm_saved_bytes_per_token(shape, dtype), 4, end, "token_local"),)
          if shape.qk_norm else ()),
        ("v_proj", b * kv, 5, end, "token_local"),
        ("attn_out", b * q, 6, end, "attention_output"),
        ("attn_lse", FP32 * shape.num_heads, 6, end, "attention_output"),
        ("o_proj", b * h, 7, 8, "transient"),
        ("residual1", b * h, 8, end, "token_local"),
        ("norm2_rsqrt", FP32, 8, end, "token_local"),
        ("norm2_normed", b * h, 9, end, "token_local"),
        ("norm2_out", b * h, 9, end, "token_local"),
        *((("gate", b * f, 10, end, "token_local"),
           ("up", b * f, 10, end, "token_local"),
           ("silu", b * f, 11, end, "token_local"),
           ("product", b * f, 12, end, "token_local")) if shape.mlp == "swiglu" else
          (("up", b * f, 10, end, "token_local"),
           ("gelu", b * f, 11, end, "token_local"))),
        ("down_proj", b * h, 13, 14, "transient"),
        ("output", b * h, 14, end, "transient"),
    ]
    return [TensorLife(name=name, size_bytes=int(per_token * tokens), start=start,
                       end=stop, kind=kind) for name, per_token, start, stop, kind in rows]
