"""Predicted vs measured saved-activation bytes of the whole model on CPU.

For the tiny preset at a few sequence lengths: the analytic model's bytes
(`planner.analytic.model_saved_bytes`) against what autograd really saves during a forward +
loss of the full model, seen through saved-tensor hooks and counted once per storage
(parameters excluded). Target: within 2%.

    .venv/bin/python bench/activation_bytes.py [--preset tiny] [--dtype fp32] [--seq 128 512 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disttrain.model import build_model  # noqa: E402
from planner.analytic import model_saved_bytes  # noqa: E402
from planner.shapes import MODEL_PRESETS  # noqa: E402

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measured_saved_bytes(model: torch.nn.Module, batch: int, seq_len: int, vocab: int) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    targets = torch.randint(0, vocab, (batch * seq_len,), generator=gen)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets)
    loss.backward()
    return sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--dtype", default="fp32", choices=sorted(TORCH))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512, 1024])
    args = parser.parse_args()
    shape = MODEL_PRESETS[args.preset]
    model = build_model(shape, dtype=TORCH[args.dtype])
    print(f"{args.preset} ({shape.num_layers} layers, hidden {shape.hidden_size}), {args.dtype}, "
          f"batch {args.batch}")
    print(f"{'seq_len':>8} {'predicted':>14} {'measured':>14} {'error':>8}")
    worst = 0.0
    for seq in args.seq:
        predicted = model_saved_bytes(shape, args.dtype, args.batch, seq)
        measured = measured_saved_bytes(model, args.batch, seq, shape.vocab_size)
        error = (predicted - measured) / measured
        worst = max(worst, abs(error))
        print(f"{seq:>8} {predicted:>14,.0f} {measured:>14,} {error:>+8.3%}")
    print(f"worst |error| {worst:.3%} ({'within' if worst <= 0.02 else 'OUTSIDE'} the 2% target)")
    return 0 if worst <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
