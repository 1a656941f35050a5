"""The Llama model: shapes, parameter counts, meta-device build, equivalence, a tiny overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import disttrain.model.llama as llama
from disttrain.model import build_model
from disttrain.model.attention import attention
from planner.shapes import MODEL_PRESETS, ModelShape

SHAPE = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, vocab_size=300, max_seq_len=128)


GPT = SHAPE.replace(mlp="gelu", positions="learned", ffn_hidden_size=4 * SHAPE.hidden_size)
"""GPT's block: GeLU MLP of 4 x hidden, learned absolute positions."""


@pytest.mark.parametrize("shape", [SHAPE, GPT, GPT.replace(positions="rope")],
                         ids=["llama", "gpt", "gpt-rope"])
def test_shapes_and_param_count(shape):
    model = build_model(shape, seed=0)
    tokens = torch.randint(0, shape.vocab_size, (3, 17))
    assert model(tokens).shape == (3, 17, shape.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == shape.num_params()
    tied = build_model(shape.replace(tie_embeddings=True), seed=0)
    assert sum(p.numel() for p in tied.parameters()) == shape.replace(
        tie_embeddings=True).num_params()


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_gpt_block_matches_plain_pytorch():
    """The GPT model against the same maths written out with torch functions on its weights:
    token + position embedding, per layer RMSNorm -> q, k, v (no RoPE) -> causal SDPA -> o,
    residual, RMSNorm -> up -> GeLU -> down, residual; final norm, head. fp32, forward and
    gradients."""
    model = build_model(GPT, seed=1)
    tokens = torch.randint(0, GPT.vocab_size, (2, 24))
    p = dict(model.named_parameters())
    eps, n, k, d = GPT.norm_eps, GPT.num_heads, GPT.num_kv_heads, GPT.head_dim

    def reference():
        x = p["embed.weight"][tokens] + p["pos_embed.weight"][:tokens.shape[1]]
        for i in range(GPT.num_layers):
            w = lambda name: p[f"layers.{i}.{name}"]  # noqa: E731
            hn = _rms(x, w("attn_norm.weight"), eps)
            split = lambda t, heads: t.view(2, 24, heads, d).transpose(1, 2)  # noqa: E731
            q, kk, v = (split(hn @ w(f"attn.{m}_proj.weight").t(), heads)
                        for m, heads in (("q", n), ("k", k), ("v", k)))
            out = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=True)
            x = x + out.transpose(1, 2).reshape(2, 24, -1) @ w("attn.o_proj.weight").t()
            hn = _rms(x, w("mlp_norm.weight"), eps)
            x = x + F.gelu(hn @ w("mlp.up_proj.weight").t()) @ w("mlp.down_proj.weight").t()
        return _rms(x, p["norm.weight"], eps) @ p["head.weight"].t()

    targets = torch.randint(0, GPT.vocab_size, (2, 24))
    grads = []
    for logits in (model(tokens), reference()):
        torch.autograd.backward(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
        grads.append({name: q.grad.clone() for name, q in p.items()})
        model.zero_grad()
    torch.testing.assert_close(model(tokens), reference(), rtol=1e-5, atol=1e-5)
    assert "layers.0.mlp.gate_proj.weight" not in p
    for name in p:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,billions", [("llama2-7b", 6.74), ("llama2-13b", 13.02),
                                           ("llama-30b", 32.53), ("llama2-70b", 68.98),
                                           ("llama3-8b", 8.03),
                                           # model cards: Qwen2.5 7.61B / 72.7B (q/k/v
                                           # biases included), Mistral-7B-v0.3 7.25B
                                           ("qwen2.5-7b", 7.61), ("qwen2.5-72b", 72.7),
                                           ("mistral-7b", 7.25)])
def test_published_param_counts(name, billions):
    assert MODEL_PRESETS[name].num_params() / 1e9 == pytest.approx(billions, abs=0.01)


def test_meta_build_of_a_big_preset_allocates_nothing():
    with torch.device("meta"):
        model = llama.Llama(MODEL_PRESETS["llama2-70b"])
    assert all(p.is_meta for p in model.parameters())


def test_seeded_init_is_deterministic():
    a, b = build_model(SHAPE, seed=3), build_model(SHAPE, seed=3)
    c = build_model(SHAPE, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].attn.q_proj.weight, c.layers[0].attn.q_proj.weight)


def test_layer_parts_compose_to_forward():
    model = build_model(SHAPE, seed=0)
    layer = model.layers[0]
    x = torch.randn(2, 16, SHAPE.hidden_size)
    cos, sin = model.rope(torch.arange(16), x.dtype)
    q, k, v = layer.qkv(x, cos, sin)
    assert q.shape == (2, SHAPE.num_heads, 16, SHAPE.head_dim)
    assert k.shape == v.shape == (2, SHAPE.num_kv_heads, 16, SHAPE.head_dim)
    assert torch.equal(layer(x, cos, sin), layer.post_attention(x, layer.attention_core(q, k, v)))


def test_attention_matches_sdpa_forward_and_backward():
    q = torch.randn(2, 4, 32, 16, requires_grad=True)
    k = torch.randn(2, 2, 32, 16, requires_grad=True)
    v = torch.randn(2, 2, 32, 16, requires_grad=True)
    out = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rope_positions_shift_matches_slice():
    """Hidden states of a suffix computed with absolute positions equal the full run's
    causal-free token-local part: RoPE at position p depends only on p."""
    model = build_model(SHAPE, seed=0)
    cos_full, sin_full = model.rope(torch.arange(32), torch.float32)
    cos_tail, sin_tail = model.rope(torch.arange(16, 32), torch.float32)
    torch.testing.assert_close(cos_full[16:], cos_tail)
    torch.testing.assert_close(sin_full[16:], sin_tail)


def test_tiny_overfit():
    torch.manual_seed(0)
    model = build_model(SHAPE, seed=0)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.1, (first, loss.item())
