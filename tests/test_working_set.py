"""The planner's backward working set (`planner.working_set`) against the runtime's: one
decoder layer's backward, tensor parallel with sequence parallelism as the runtime runs it, on
torch's fake process group (collectives are no-ops, every allocation is the runtime's), bytes
live at any moment tracked per storage. The incoming gradient is made inside the measured
region by autograd (as the next layer's backward hands it over); weight gradients are dropped
once accumulated, as the model states do. Exact bytes: what the planner says is what the
runtime's ops allocate (workspace private to a kernel is not visible to either)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from planner.shapes import ModelShape
from planner.working_set import layer_backward_working_bytes
from test_tp_linear_memory import _LiveBytes

GQA = ModelShape(hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=4, ffn_hidden_size=176,
                 vocab_size=64, max_seq_len=512)
GPT = GQA.replace(num_kv_heads=8, ffn_hidden_size=256, mlp="gelu", positions="learned")
WIDE = GQA.replace(ffn_hidden_size=16, head_dim=16)
"""head_dim given: q and the attention output 8 x 16 = 128 wide against hidden 64 (a narrow
MLP, so an attention phase binds)."""
QWEN3 = WIDE.replace(qk_norm=True)
"""With Qwen3's per-head q/k norms: the q norm's backward binds."""
QWEN3_TP = QWEN3.replace(head_dim=32)
"""Heads of 32 (q 256 wide against hidden 64): at tp 2 the q norm's backward over this rank's
4 heads binds."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measured_peak(shape: ModelShape, tp: int, tokens: int, dtype: str, chunks: int = 1,
                  mlp_chunk: int = 0, column: str = "lean") -> int:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from disttrain.model import build_model
    from disttrain.parallel.tensor import apply_tensor_parallel
    from disttrain.tiling import apply_mlp_tiling

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        model = build_model(shape, seed=0)
        apply_tensor_parallel(model, dist.group.WORLD, overlap_chunks=chunks,
                              column_backward=column)
        if mlp_chunk:
            apply_mlp_tiling(model, mlp_chunk)
        torch_dtype = DTYPES[dtype]
        layer = model.layers[0].to(torch_dtype)
        for p in layer.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        cos, sin = model.rope(torch.arange(tokens), torch_dtype)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, tokens, shape.hidden_size // tp, generator=gen).to(torch_dtype)
        y = layer(x.requires_grad_(True), cos, sin)
        loss = (y * torch.randn(y.shape, generator=gen).to(torch_dtype)).sum()
        one = torch.ones((), dtype=loss.dtype)
        with _LiveBytes() as live:
            loss.backward(one)
        return live.peak
    finally:
        dist.destroy_process_group()


CASES = [(GQA, 1, "fp32", 1, 0), (GQA, 1, "bf16", 1, 0), (GQA, 2, "bf16", 1, 0),
         (GQA, 2, "fp32", 2, 0), (GQA, 4, "fp32", 1, 0), (GQA, 4, "bf16", 2, 0),
         (GPT, 1, "bf16", 1, 0), (GPT, 2, "bf16", 2, 0)]
"""tp 1, 2, 4; fp32 and bf16; tp_overlap_chunks 1 and 2 (bulk-overlap column backward);
SwiGLU with grouped KV heads and GeLU with learned positions (each binds a different phase)."""
CASES += [(WIDE, 2, "bf16", 1, 0), (QWEN3, 1, "bf16", 1, 0), (QWEN3, 1, "fp32", 1, 0),
          (QWEN3_TP, 2, "bf16", 1, 0), (QWEN3_TP.replace(num_kv_heads=2), 2, "fp32", 2, 0)]
CASES += [(GQA, 1, "fp32", 1, 32), (GQA, 2, "fp32", 1, 32), (GPT, 2, "fp32", 2, 32)]
"""Tiled MLP (`tiling.mlp_chunk_tokens`): a tile's rebuilt intermediates and its gradients."""


WHOLE_CASES = [(GQA, 2, "bf16", 1, 0), (GQA, 4, "fp32", 2, 0), (GPT, 2, "fp32", 2, 32)]
"""The column-parallel backward with whole GEMMs (`parallel.tp_column_backward` 'whole'):
blocking and bulk-overlapped, SwiGLU and GeLU, untiled and tiled MLP."""


@pytest.mark.parametrize("shape,tp,dtype,chunks,mlp_chunk,column",
                         [c + ("lean",) for c in CASES] + [c + ("whole",) for c in WHOLE_CASES])
def test_planner_working_set_is_the_runtime_backward_peak(shape, tp, dtype, chunks, mlp_chunk,
                                                          column):
    tokens = 128
    got = measured_peak(shape, tp, tokens, dtype, chunks, mlp_chunk, column)
    want = layer_backward_working_bytes(shape, DTYPES[dtype].itemsize, tokens, tp, chunks,
                                        mlp_chunk, column_backward=column)
    assert got == want, (got / tokens, want / tokens)


def test_tensor_parallel_working_set_does_not_shrink_with_tp():
    # the full-width (T, H) buffers of the TP linears' backward: at tp 8 a Llama-70B-shaped
    # layer holds more per rank than 1/8 of its tp = 1 working set, and more than 3 T x H
    # (gate/up's backward: the gathered input and the summed input gradient, 2 T x H, beside
    # the two (T, F/8) incoming gradients and the two h-wide residual gradients)
    from planner.shapes import MODEL_PRESETS

    shape, tokens = MODEL_PRESETS["llama3-70b"], 4096
    tp1 = layer_backward_working_bytes(shape, 2, tokens)
    tp8 = layer_backward_working_bytes(shape, 2, tokens, tp=8)
    assert tp8 > 3 * tokens * 2 * shape.hidden_size > tp1 / 8


@pytest.mark.parametrize("tp,chunks", [(2, 1), (4, 2), (8, None)])
def test_planner_counts_the_tensor_parallel_working_set(tp, chunks):
    # what the stage problems get (planner.candidates.build_stages): the runtime's phases for
    # the candidate's local tokens and overlap chunks, not the tp = 1 estimate divided by tp
    from planner.costmodel import Candidate, CostParams, layer_cost, working_base_bytes
    from planner.hardware import CLUSTER_PRESETS
    from planner.shapes import MODEL_PRESETS

    shape, hw = MODEL_PRESETS["llama3-70b"], CLUSTER_PRESETS["8xh100-80g"]
    cand = Candidate(dp=1, tp=tp, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    lc = layer_cost(shape, "bf16", hw, cand, seq_len=8192, micro_batch_size=1,
                    params=CostParams(), tp_overlap_chunks=chunks)
    want = layer_backward_working_bytes(shape, 2, 8192, tp, lc.tp_overlap_chunks)
    assert working_base_bytes(lc, shape, "bf16", 0, tp) == want
    assert want > working_base_bytes(lc, shape, "bf16", 0) / tp
