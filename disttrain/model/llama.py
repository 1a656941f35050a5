"""A Llama-style decoder in plain PyTorch (or GPT's block: GeLU MLP, learned positions, as
`ModelShape.mlp` / `.positions` say). The model and nothing else.

Shape legend: B batch, S sequence (local shard when sequence-parallel), H hidden,
N query heads, K kv heads, D head dim (H / N unless the shape sets it), F ffn hidden, V vocab.

Each decoder layer is three addressable parts so memory policies can treat the three kinds
of activation differently without touching this file:
  `qkv(x)`            token-local: norm, projections, [q/k norms,] RoPE (recomputable per token)
  `attention_core()`  the quadratic core; saves out + lse          (never recomputed)
  `post_attention()`  token-local: output projection, residuals, norm, MLP (SwiGLU or GeLU)
`forward(x)` is exactly their composition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from planner.shapes import ModelShape
from planner.working_set import NORM_CHUNK_TOKENS

from disttrain.model.attention import LOCAL_CORE, AttentionCore
from disttrain.model.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    """(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight, x upcast to fp32; the backward runs
    over `chunk_tokens` tokens at a time (`disttrain.model.rmsnorm`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.chunk_tokens = NORM_CHUNK_TOKENS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, chunk_tokens=self.chunk_tokens)


def rope_cos_sin(positions_S: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype, *, inv_freq: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (S, D/2) for the given absolute positions (`inv_freq`: the D/2
    frequencies when they are not theta's plain ones)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_S.device,
                                                 dtype=torch.float32) / head_dim))
    angles = positions_S.float()[:, None] * inv_freq.to(positions_S.device)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def llama3_inv_freq(shape: ModelShape) -> torch.Tensor:
    """Llama 3.1's scaled RoPE frequencies (D/2, fp32): wavelengths longer than
    original/low_freq_factor are stretched by `factor`, shorter than original/high_freq_factor
    kept, and those between interpolated smoothly."""
    d, original = shape.head_dim, shape.rope_original_max_seq_len
    low, high, factor = shape.rope_low_freq_factor, shape.rope_high_freq_factor, \
        shape.rope_scaling_factor
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(shape: ModelShape, positions_S: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (S, D/2) of `shape`'s RoPE, with its frequency scaling."""
    inv_freq = llama3_inv_freq(shape) if shape.rope_scaling == "llama3" else None
    return rope_cos_sin(positions_S, shape.head_dim, shape.rope_theta, dtype, inv_freq=inv_freq)


def apply_rope(x_BSND: torch.Tensor, cos_SD2: torch.Tensor, sin_SD2: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved-by-halves pairs (x1, x2) of the head dim by the position angle."""
    x1, x2 = x_BSND.chunk(2, dim=-1)
    cos, sin = cos_SD2[None, :, None, :], sin_SD2[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        h, d = shape.hidden_size, shape.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, d
        self.q_proj = nn.Linear(h, shape.num_heads * d, bias=shape.qkv_bias)
        self.k_proj = nn.Linear(h, shape.num_kv_heads * d, bias=shape.qkv_bias)
        self.v_proj = nn.Linear(h, shape.num_kv_heads * d, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(shape.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, shape.norm_eps) if shape.qk_norm else None
        """Qwen3's RMSNorm over each head's d features of q (k_norm: of k), before RoPE."""
        self.k_norm = RMSNorm(d, shape.norm_eps) if shape.qk_norm else None


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(shape.ffn_hidden_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """GPT's MLP: down(gelu(up(x))), two matrices (the names keep Llama's up/down)."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.up_proj = nn.Linear(shape.hidden_size, shape.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(shape.ffn_hidden_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.attn_norm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.attn = Attention(shape)
        self.mlp_norm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.mlp = MLP(shape) if shape.mlp == "swiglu" else GeluMLP(shape)
        self.rotary = shape.rope
        """Whether q and k are rotated (RoPE); with learned positions cos/sin are ignored."""
        self.core: AttentionCore = LOCAL_CORE
        """The attention core; sequence parallelism replaces it, the maths stays here."""

    def qkv(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Token-local: returns q_BNSD, k_BKSD, v_BKSD (per-head q/k norms, then RoPE, when
        the shape has them)."""
        a = self.attn
        b, s, _ = x_BSH.shape
        hn = self.attn_norm(x_BSH)
        q = a.q_proj(hn).view(b, s, a.num_heads, a.head_dim)
        k = a.k_proj(hn).view(b, s, a.num_kv_heads, a.head_dim)
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        if self.rotary:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = a.v_proj(hn).view(b, s, a.num_kv_heads, a.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention_core(self, q_BNSD, k_BKSD, v_BKSD) -> torch.Tensor:
        """The quadratic core (causal); returns out_BNSD."""
        return self.core(q_BNSD, k_BKSD, v_BKSD)

    def post_attention(self, x_BSH: torch.Tensor, out_BNSD: torch.Tensor) -> torch.Tensor:
        """Token-local: output projection, residual, MLP, residual."""
        b, _, s, _ = out_BNSD.shape
        h = x_BSH + self.attn.o_proj(out_BNSD.transpose(1, 2).reshape(b, s, -1))
        return h + self.mlp(self.mlp_norm(h))

    def forward(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.post_attention(x_BSH, self.attention_core(*self.qkv(x_BSH, cos, sin)))


def embed_tokens(embed: nn.Module, pos_embed: nn.Module | None, tokens_BS: torch.Tensor,
                 positions_S: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, S, H), plus the learned position embeddings of `positions_S`."""
    x = embed(tokens_BS)
    if pos_embed is not None:
        x = x + pos_embed(positions_S.to(x.device))[None]
    return x


class Llama(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.pos_embed = (nn.Embedding(shape.max_seq_len, shape.hidden_size)
                          if shape.positions == "learned" else None)
        """Learned absolute positions (GPT), added to the token embedding; None with RoPE."""
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.head = None if shape.tie_embeddings else nn.Linear(shape.hidden_size,
                                                                shape.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, H) matrix of the output head (the embedding when tied)."""
        return self.embed.weight if self.head is None else self.head.weight

    def init_weights(self, seed: int) -> None:
        """Deterministic init (normal std 0.02, residual projections scaled by depth; norm
        weights 1, biases 0)."""
        gen = torch.Generator().manual_seed(seed)
        out_std = 0.02 / (2 * self.shape.num_layers) ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:  # norm weights 1, biases 0
                    p.fill_(0.0 if name.endswith(".bias") else 1.0)
                    continue
                std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def rope(self, positions_S: torch.Tensor, dtype: torch.dtype):
        return rope_tables(self.shape, positions_S, dtype)

    def hidden_states(self, tokens_BS: torch.Tensor, positions_S: torch.Tensor | None = None):
        """Final-normed hidden states (B, S, H) for tokens at the given absolute positions."""
        if positions_S is None:
            positions_S = torch.arange(tokens_BS.shape[1], device=tokens_BS.device)
        x = embed_tokens(self.embed, self.pos_embed, tokens_BS, positions_S)
        cos, sin = self.rope(positions_S, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens_BS: torch.Tensor, positions_S: torch.Tensor | None = None):
        """Logits (B, S, V)."""
        return F.linear(self.hidden_states(tokens_BS, positions_S), self.output_weight)


def build_model(shape: ModelShape, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Llama:
    """Build on `device` itself (as the meta device + `to_empty` would: one copy of the model,
    there), then overwrite every parameter with a seeded init. Not through the meta device:
    the default init on meta tensors runs torch's reference kernels, whose first use imports
    torch._dynamo and sympy (~75 MiB of RSS in every process, measured)."""
    with torch.device(device):
        model = Llama(shape)
    model.init_weights(seed)
    return model.to(dtype)
