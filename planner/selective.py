"""Op-level selective activation checkpointing (torchtitan's "selective op" AC): what a
`LayerActivationPlan(selective=True)` layer keeps and what its backward recomputes.

The layer keeps its input, the outputs of every other matmul in execution order (the 1st,
3rd, 5th, ...: q, v, gate and down of a SwiGLU layer; q, v and up of a GeLU layer) and the
attention core's output with its log-sum-exp; everything else (norms, RoPE, SiLU/GeLU,
products, residual sums and the other matmuls: k, o, up of SwiGLU) is recomputed from them
in the backward, the attention core never (offload/selective.py runs it). torchtitan's
policy (torchtitan/distributed/activation_checkpoint.py, December 2024): save `aten.mm` and
the SDPA kernels' outputs except every second mm, counted per checkpointed block. The
recompute stops at the last tensor the backward needs, so a trailing recomputed matmul (a
GeLU layer's down projection) is never rerun.

No torch here (the planner stays importable without the runtime).
"""

from __future__ import annotations

from planner.analytic import FP32
from planner.shapes import DTYPE_BYTES, ModelShape


def matmul_widths(shape: ModelShape) -> list[int]:
    """Output width per token of each of a layer's matmuls, in execution order: q, k, v, o,
    [gate,] up, down (the order of `planner.efficiency.layer_gemms`)."""
    h, f, kv = shape.hidden_size, shape.ffn_hidden_size, shape.kv_dim
    q = shape.q_dim
    return [q, kv, kv, h] + [f] * (shape.mlp_matrices - 1) + [h]


def saved_matmuls(shape: ModelShape) -> list[int]:
    """Indices (0-based) of the matmuls whose outputs are kept: every other one from the first."""
    return list(range(0, len(matmul_widths(shape)), 2))


def recomputed_matmuls(shape: ModelShape) -> list[int]:
    """Indices of the matmuls the backward reruns: the others, except a trailing one whose
    output no backward needs (the recompute stops before it)."""
    count = len(matmul_widths(shape))
    return [i for i in range(1, count, 2) if i != count - 1]


def selective_bytes_per_token(shape: ModelShape, dtype: str) -> float:
    """Saved bytes per local token of a selective layer: its input, the kept matmul outputs
    (in the compute dtype) and the attention output + fp32 log-sum-exp."""
    b = DTYPE_BYTES[dtype]
    widths = matmul_widths(shape)
    kept = sum(widths[i] for i in saved_matmuls(shape))
    attention = shape.q_dim * b + FP32 * shape.num_heads
    return float(b * shape.hidden_size + b * kept + attention)


def recomputed_gemm_share(shape: ModelShape) -> float:
    """Share of the layer's matmul FLOPs the selective backward reruns."""
    widths = matmul_widths(shape)
    k_dims = [shape.hidden_size] * 3 + [shape.q_dim] + (
        [shape.hidden_size] * (shape.mlp_matrices - 1)) + [shape.ffn_hidden_size]
    flops = [w * k for w, k in zip(widths, k_dims)]
    return sum(flops[i] for i in recomputed_matmuls(shape)) / sum(flops)
