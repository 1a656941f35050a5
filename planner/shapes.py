"""Model shapes: the one description of a Llama-style decoder used by planner and runtime.

The planner reasons about shapes only (bytes and FLOPs); the runtime builds the model from
the same object, so a plan and the model it runs on can never disagree about a dimension.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Shape of a Llama-style decoder-only transformer."""

    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (grouped-query attention when fewer than num_heads)."""
    ffn_hidden_size: int
    """Inner width of the SwiGLU MLP."""
    vocab_size: int
    """Number of token ids."""
    max_seq_len: int = 4096
    """Longest sequence the RoPE tables are built for by default (training may extend it)."""
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

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "ffn_hidden_size", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: must be divisible by num_heads ({self.num_heads}), "
                             f"got {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: must be divisible by num_kv_heads ({self.num_kv_heads}), "
                             f"got {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"hidden_size: head dim hidden_size/num_heads must be even for RoPE, "
                             f"got {self.head_dim}")
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
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer (two RMSNorm weights, QKVO, SwiGLU)."""
        h = self.hidden_size
        attn = h * h + 2 * h * self.kv_dim + h * h
        if self.qkv_bias:
            attn += h + 2 * self.kv_dim
        mlp = 3 * h * self.ffn_hidden_size
        return attn + mlp + 2 * h

    def embedding_params(self) -> int:
        """Input embedding + final norm + output head (shared when tied)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.hidden_size + head

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params()

    def replace(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field, except the options added for imported models (`_OPTIONAL_FIELDS`)
        while they hold their defaults: plans and checkpoints of plain shapes stay as they
        were, and `ModelShape(**shape.to_dict()) == shape` either way."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in _OPTIONAL_FIELDS and out[f.name] == f.default:
                del out[f.name]
        return out


_OPTIONAL_FIELDS = ("qkv_bias", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                    "rope_high_freq_factor", "rope_original_max_seq_len")


def _shape(**kw) -> ModelShape:
    return ModelShape(**kw)


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
    # Llama 3.1: Llama 3's shapes with a 128K context (their RoPE frequency scaling, factor 8,
    # low/high frequency factors 1/4, original context 8192, is not a shape field yet)
    "llama3.1-8b": _shape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                          ffn_hidden_size=14336, vocab_size=128256, max_seq_len=131072,
                          rope_theta=500000.0),
    "llama3.1-70b": _shape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                           ffn_hidden_size=28672, vocab_size=128256, max_seq_len=131072,
                           rope_theta=500000.0),
    "llama3.1-405b": _shape(hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                            ffn_hidden_size=53248, vocab_size=128256, max_seq_len=131072,
                            rope_theta=500000.0),
    # Qwen2.5 (its q/k/v biases are not a shape field yet: ~0.01% of the parameters)
    "qwen2.5-7b": _shape(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                         ffn_hidden_size=18944, vocab_size=152064, max_seq_len=32768,
                         rope_theta=1000000.0, norm_eps=1e-6),
    "qwen2.5-72b": _shape(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                          ffn_hidden_size=29568, vocab_size=152064, max_seq_len=32768,
                          rope_theta=1000000.0, norm_eps=1e-6),
    "mistral-7b": _shape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         ffn_hidden_size=14336, vocab_size=32768, max_seq_len=32768,
                         rope_theta=1000000.0),
}
