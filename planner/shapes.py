"""Model shapes: the one description of a decoder used by planner and runtime (Llama-style by
default; `mlp='gelu'` and `positions='learned'` give the GPT block).

The planner reasons about shapes only (bytes and FLOPs); the runtime builds the model from
the same object, so a plan and the model it runs on can never disagree about a dimension.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
MLP_KINDS = ("swiglu", "gelu")
"""`ModelShape.mlp` values."""
POSITION_KINDS = ("rope", "learned")
"""`ModelShape.positions` values."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Shape of a decoder-only transformer: Llama's block (SwiGLU MLP, RoPE) by default, or
    GPT's (`mlp='gelu'`: a 2-matrix GeLU MLP, usually ffn = 4 x hidden; `positions='learned'`:
    a learned absolute position table of max_seq_len x hidden added to the token embedding).
    Norms stay RMSNorm and projections carry no bias in either block."""

    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (grouped-query attention when fewer than num_heads)."""
    ffn_hidden_size: int
    """Inner width of the MLP (SwiGLU's gate/up width, GeLU's up width)."""
    vocab_size: int
    """Number of token ids."""
    max_seq_len: int = 4096
    """Longest sequence the RoPE tables are built for by default (training may extend it);
    with learned positions the size of the position table (training may not exceed it)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and output head weights."""
    qkv_bias: bool = False
    """Query, key and value projections carry a bias (Qwen2); the output projection does not."""
    rope_scaling: str = "none"
    """RoPE frequency scaling: 'none', or 'llama3' (Llama 3.1's; parameters below)."""
    rope_scaling_factor: float = 1.0
    """llama3 scaling: low frequencies are divided by this factor."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_max_seq_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_max_seq_len / this are left as they are."""
    rope_original_max_seq_len: int = 0
    """llama3 scaling: the context length the model was pretrained at (0 when unscaled)."""
    mlp: str = "swiglu"
    """MLP block: 'swiglu' (Llama: down(silu(gate(x)) * up(x)), 3 matrices) or 'gelu'
    (GPT: down(gelu(up(x))), 2 matrices)."""
    positions: str = "rope"
    """Position encoding: 'rope' (rotary, in every layer's q and k) or 'learned' (GPT: an
    absolute position embedding added to the token embedding; no RoPE)."""
    head_dim: int | None = None
    """Width of one attention head; None: hidden_size / num_heads (filled in, so the field
    always holds a number). Qwen3 and Mistral-Nemo set it: their q width num_heads x head_dim
    differs from hidden_size."""
    qk_norm: bool = False
    """Qwen3's per-head RMSNorm (weights of head_dim) on q and on k before RoPE."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "ffn_hidden_size", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size: must be divisible by num_heads "
                                 f"({self.num_heads}) when head_dim is not given, "
                                 f"got {self.hidden_size}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        elif self.head_dim <= 0:
            raise ValueError(f"head_dim: must be positive, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: must be divisible by num_kv_heads ({self.num_kv_heads}), "
                             f"got {self.num_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            if self.default_head_dim:
                raise ValueError(f"hidden_size: head dim hidden_size/num_heads must be even "
                                 f"for RoPE, got {self.head_dim}")
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp: must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions: must be one of {', '.join(POSITION_KINDS)}, "
                             f"got {self.positions!r}")
        if self.rope_scaling not in ("none", "llama3"):
            raise ValueError(f"rope_scaling: must be 'none' or 'llama3', got {self.rope_scaling!r}")
        if self.rope_scaling == "llama3":
            if self.rope_scaling_factor <= 0 or self.rope_original_max_seq_len <= 0:
                raise ValueError("rope_scaling: llama3 needs a positive rope_scaling_factor and "
                                 "rope_original_max_seq_len")
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ValueError(f"rope_high_freq_factor: must exceed rope_low_freq_factor "
                                 f"({self.rope_low_freq_factor}), got {self.rope_high_freq_factor}")

    @property
    def default_head_dim(self) -> bool:
        """Whether head_dim is hidden_size / num_heads (every pre-Qwen3 shape)."""
        return self.head_dim * self.num_heads == self.hidden_size

    @property
    def q_dim(self) -> int:
        """Width of q and of the attention output: num_heads x head_dim (hidden_size unless
        head_dim was given)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of the MLP (h x ffn each): 3 for SwiGLU, 2 for GeLU."""
        return 3 if self.mlp == "swiglu" else 2

    @property
    def mlp_saved_per_ffn(self) -> int:
        """(tokens x ffn) tensors autograd saves in the MLP: SwiGLU's gate, silu(gate), up and
        their product; GeLU's up projection and gelu(up)."""
        return 4 if self.mlp == "swiglu" else 2

    @property
    def rope(self) -> bool:
        """Whether the layers rotate q and k (RoPE)."""
        return self.positions == "rope"

    def layer_params(self) -> int:
        """Parameters of one decoder layer (two RMSNorm weights, QKVO, the MLP's matrices,
        with qk_norm the q and k norms' head_dim weights)."""
        h, q = self.hidden_size, self.q_dim
        attn = h * q + 2 * h * self.kv_dim + q * h
        if self.qkv_bias:
            attn += q + 2 * self.kv_dim
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = self.mlp_matrices * h * self.ffn_hidden_size
        return attn + mlp + 2 * h

    @property
    def tp_replicated_layer_params(self) -> int:
        """Parameters of one decoder layer every tensor-parallel rank holds whole: Qwen3's q and
        k norm weights (head_dim each); the others are split over tp."""
        return 2 * self.head_dim if self.qk_norm else 0

    def layer_params_per_tp_rank(self, tp: int) -> float:
        """One decoder layer's parameters one of `tp` tensor-parallel ranks holds."""
        shared = self.tp_replicated_layer_params
        return (self.layer_params() - shared) / tp + shared

    def input_embedding_params(self) -> int:
        """Token embedding plus, with learned positions, the max_seq_len x hidden table: what
        the first pipeline stage holds before its layers."""
        positions = self.max_seq_len * self.hidden_size if self.positions == "learned" else 0
        return self.vocab_size * self.hidden_size + positions

    def embedding_params(self) -> int:
        """Input embedding (+ learned positions) + final norm + output head (shared when tied)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return self.input_embedding_params() + self.hidden_size + head

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params()

    def replace(self, **changes) -> "ModelShape":
        """A copy with `changes`; a derived head_dim (hidden_size / num_heads) is derived
        again from the new sizes unless `changes` sets it."""
        if self.default_head_dim and "head_dim" not in changes:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field, except the options added for imported models (`_OPTIONAL_FIELDS`)
        while they hold their defaults: plans and checkpoints of plain shapes stay as they
        were, and `ModelShape(**shape.to_dict()) == shape` either way."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in _OPTIONAL_FIELDS and out[f.name] == f.default:
                del out[f.name]
        if self.default_head_dim:
            del out["head_dim"]
        return out


_OPTIONAL_FIELDS = ("qkv_bias", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                    "rope_high_freq_factor", "rope_original_max_seq_len", "mlp", "positions", "qk_norm")
"""Fields left out of `to_dict` at their defaults (head_dim too, when hidden / heads)."""


def _shape(**kw) -> ModelShape:
    return ModelShape(**kw)


_LLAMA31_ROPE = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)

# Published shapes (Llama / Llama 2 / Llama 3 papers and released configs) plus two small
# ones that train on a CPU. `vocab_size` 259 = 256 bytes + pad/bos/eos of the byte tokenizer.
MODEL_PRESETS: dict[str, ModelShape] = {
    "tiny": _shape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=352, vocab_size=259, max_seq_len=1024),
    "small": _shape(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                    ffn_hidden_size=1408, vocab_size=32000, max_seq_len=16384),
    "llama2-7b": _shape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        ffn_hidden_size=11008, vocab_size=32000, max_seq_len=4096),
    "llama2-13b": _shape(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                         ffn_hidden_size=13824, vocab_size=32000, max_seq_len=4096),
    "llama-30b": _shape(hidden_size=6656, num_layers=60, num_heads=52, num_kv_heads=52,
                        ffn_hidden_size=17920, vocab_size=32000, max_seq_len=2048,
                        norm_eps=1e-6),
    "llama2-70b": _shape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                         ffn_hidden_size=28672, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": _shape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        ffn_hidden_size=14336, vocab_size=128256, max_seq_len=8192,
                        rope_theta=500000.0),
    "llama3-70b": _shape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                         ffn_hidden_size=28672, vocab_size=128256, max_seq_len=8192,
                         rope_theta=500000.0),
    # Llama 3.1 (meta-llama/Llama-3.1-{8B,70B,405B} config.json): Llama 3's shapes with a
    # 128K context through RoPE scaling "llama3": factor 8, low/high frequency factors 1 and 4,
    # original context 8192
    "llama3.1-8b": _shape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                          ffn_hidden_size=14336, vocab_size=128256, max_seq_len=131072,
                          rope_theta=500000.0, **_LLAMA31_ROPE),
    "llama3.1-70b": _shape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                           ffn_hidden_size=28672, vocab_size=128256, max_seq_len=131072,
                           rope_theta=500000.0, **_LLAMA31_ROPE),
    "llama3.1-405b": _shape(hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                            ffn_hidden_size=53248, vocab_size=128256, max_seq_len=131072,
                            rope_theta=500000.0, **_LLAMA31_ROPE),
    # Qwen2.5 (Qwen/Qwen2.5-{7B,72B} config.json; Qwen2's q/k/v projections carry biases)
    "qwen2.5-7b": _shape(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                         ffn_hidden_size=18944, vocab_size=152064, max_seq_len=32768,
                         rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True),
    "qwen2.5-72b": _shape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                          ffn_hidden_size=29568, vocab_size=152064, max_seq_len=32768,
                          rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True),
    # Mistral 7B v0.3 (mistralai/Mistral-7B-v0.3 config.json: no sliding window, vocab 32768)
    "mistral-7b": _shape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         ffn_hidden_size=14336, vocab_size=32768, max_seq_len=32768,
                         rope_theta=1000000.0),
    # Qwen3 dense (Qwen/Qwen3-8B and Qwen/Qwen3-32B config.json, huggingface.co): per-head
    # RMSNorm on q and k (qk_norm), head_dim 128 (32B: 64 heads x 128 = 8192 > hidden 5120),
    # max_position_embeddings 40960, no biases, untied
    "qwen3-8b": _shape(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                       ffn_hidden_size=12288, vocab_size=151936, max_seq_len=40960,
                       rope_theta=1000000.0, norm_eps=1e-6, head_dim=128, qk_norm=True),
    "qwen3-32b": _shape(hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                        ffn_hidden_size=25600, vocab_size=151936, max_seq_len=40960,
                        rope_theta=1000000.0, norm_eps=1e-6, head_dim=128, qk_norm=True),
    # Mistral NeMo 12B (mistralai/Mistral-Nemo-Base-2407 config.json: head_dim 128 with
    # 32 heads, so q is 4096 wide against hidden 5120; no sliding window; the model card's
    # 128K context, Mistral-Nemo-Instruct-2407's max_position_embeddings 131072)
    "mistral-nemo-12b": _shape(hidden_size=5120, num_layers=40, num_heads=32, num_kv_heads=8,
                               ffn_hidden_size=14336, vocab_size=131072, max_seq_len=131072,
                               rope_theta=1000000.0, head_dim=128),
}
