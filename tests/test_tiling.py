"""Token tiling of the loss and the MLP equals the untiled maths (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disttrain.model import build_model
from disttrain.tiling import apply_mlp_tiling, chunked_lm_loss
from planner.shapes import MODEL_PRESETS

SHAPE = MODEL_PRESETS["tiny"].replace(vocab_size=300)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_matches_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(2, 32, 48, requires_grad=True)
    weight = torch.randn(300, 48, requires_grad=True)
    targets = torch.randint(0, 300, (2, 32))
    ref = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = chunked_lm_loss(hidden, weight, targets, chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_loss_is_one_pass_and_scales_by_the_incoming_gradient():
    """The logits matmul runs once per tile (forward only); a loss scale applied after the
    loss (gradient accumulation) still reaches both gradients."""
    torch.manual_seed(1)
    hidden = torch.randn(1, 40, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (1, 40))
    ref = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten()) * 0.25
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    calls = []
    orig = F.linear
    try:
        F.linear = lambda *a: calls.append(1) or orig(*a)
        loss = chunked_lm_loss(hidden, weight, targets, 16) * 0.25
        forward_calls = len(calls)
        grads = torch.autograd.grad(loss, (hidden, weight))
    finally:
        F.linear = orig
    assert forward_calls == len(calls) == 3  # ceil(40 / 16) tiles, none rerun in backward
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, 16) * 0.25, ref)


def test_chunked_loss_runs_its_gemms_in_the_compute_dtype():
    """bf16: every matmul of the tiled loss reads bf16 operands, as autograd's untiled path
    does (an fp32 GEMM runs at the fp32 rate on a GPU), and the gradients match that path's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.dtypes.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(2)
    hidden = torch.randn(1, 48, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (1, 48))
    ref = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    with Matmuls() as seen:
        loss = chunked_lm_loss(hidden, weight, targets, 16)
        grads = torch.autograd.grad(loss, (hidden, weight))
    assert len(seen.dtypes) == 3 * 3 and set(seen.dtypes) == {torch.bfloat16}  # logits, dh, dW
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_chunked_loss_keeps_no_full_logits():
    hidden = torch.randn(1, 256, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        chunked_lm_loss(hidden, weight, torch.randint(0, 300, (1, 256)), 32)
    assert max(saved) < 256 * 300  # the (tokens x vocab) logits were never saved


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_mlp_tiling_matches_untiled_model(mlp):
    shape = SHAPE.replace(mlp=mlp)
    tokens = torch.randint(0, shape.vocab_size, (2, 40))
    plain, tiled = build_model(shape, seed=0), build_model(shape, seed=0)
    apply_mlp_tiling(tiled, 9)
    apply_mlp_tiling(tiled, 9)  # idempotent
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in tiled.named_parameters()]
    losses = []
    for model in (plain, tiled):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_mlp_tiling_saves_less():
    def saved_bytes(model):
        total = []
        x = torch.randint(0, SHAPE.vocab_size, (1, 128))
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
            model(x).sum()
        return sum(total)
    plain, tiled = build_model(SHAPE, seed=0), build_model(SHAPE, seed=0)
    apply_mlp_tiling(tiled, 16)
    ffn_bytes = 3 * 128 * SHAPE.ffn_hidden_size * 4 * SHAPE.num_layers
    assert saved_bytes(plain) - saved_bytes(tiled) >= ffn_bytes  # gate, up, silu product gone
