"""Memory the runtime does not spend on imports: building the model and a token-wise
recompute's vector-Jacobian products pull in neither torch._dynamo nor sympy (together
~75-100 MiB of RSS in every rank), and the product equals torch.autograd.grad's bit for bit."""

from __future__ import annotations

import subprocess
import sys

import torch

from offload.tiled_rebuild import grad


def test_build_and_recompute_grad_import_neither_dynamo_nor_sympy():
    code = ("import sys, torch\n"
            "import disttrain.engine\n"
            "from disttrain.model import build_model\n"
            "from planner.shapes import MODEL_PRESETS\n"
            "from offload.tiled_rebuild import grad\n"
            "build_model(MODEL_PRESETS['tiny'], seed=0)\n"
            "x = torch.randn(3, 4, requires_grad=True)\n"
            "grad([x * 2], [x], [torch.ones(3, 4)])\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_grad_equals_autograd_grad_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, requires_grad=True)
    w = torch.randn(7, 3, generator=gen, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    outs = [torch.tanh(x @ w), (x * x).sum(0)]
    grads = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    want = torch.autograd.grad(outs, [x, w, unused], grads, retain_graph=True,
                               allow_unused=True)
    got = grad(outs, [x, w, unused], grads)
    assert got[2] is None and want[2] is None
    for g, r in zip(got[:2], want[:2]):
        assert torch.equal(g, r)
