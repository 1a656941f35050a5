"""Held-out published GPU runs at short sequences (<= 16K tokens): rows the planner was never
calibrated on (issue 14), checked by bench/heldout.py. Specs: bench/heldout_specs/short-*.yaml.

Every throughput here is published directly as tokens/s/GPU, so no FLOP convention is needed:
- MosaicML llm-foundry, scripts/train/benchmarking/README.md, column "Throughput (T/s/GPU)"
  (tables added in 5e85bd6 "Shashank/new benchmarks (#838)", 2024-01-06, unchanged at 8c8dd48).
  Layout columns: "Sharding Strategy" FULL_SHARD = ZeRO-3, SHARD_GRAD_OP = ZeRO-2 (torch FSDP's
  ShardingStrategy docs), DP over all GPUs (Composer FSDP, no TP/PP), "Activation
  Checkpointing" True = every MPT block checkpointed whole (attention core recomputed),
  MicroBatchSize and GlobalBatchSize as published (in the specs).
- torchtitan, docs/performance.md (TPS/GPU) and benchmarks/*.md (tokens/sec, per GPU: the same
  run's Float8 figure, 809.8, is Table 4's 829 TPS/GPU class).
"""

from __future__ import annotations

from published import _row  # noqa: F401  (bench/ is on sys.path when run from bench/heldout.py)

_FSDP_NOTE = "llm-foundry T/s/GPU"
_WHOLE_LAYER = dict(recompute_attention=True)
"""Whole-block activation checkpointing: the published run recomputed the attention core too."""
TRITON_KERNEL = "flash-attn-1"
"""The attention kernel of the llm-foundry tables: its harness sets every model's
attn_config.attn_impl to `--attn_impl`, default 'triton' (scripts/train/benchmarking/
submit_benchmarks.py at b2a43a1, which brought the H100 80GB / A100 tables, and at 5e85bd6,
the large-scale H100 table; sweep.sh, which "lists all benchmarks in the tables", never passes
it): llmfoundry/models/layers/flash_attn_triton.py, "Copied from" FlashAttention's
flash_attn_triton.py at eff9fe6 (v1 era), whose docstring says its forward + backward is
"slightly slower than CUDA" (FlashAttention v1) and that it "has only been tested on A100". The
nearest published figure is FlashAttention v1's on an A100 (planner.efficiency.
ATTENTION_KERNEL_TFLOPS): the A100 specs say `cluster.attention_kernel: flash-attn-1`, so
every plan of those rows is priced with it. There is none for H100 (refused off SM80): those
rows are priced with the planner's FlashAttention-2-class H100 curve."""


def _mpt(tok_s: int, gpus: int, *, zero_stage: int = 3, ac: bool, ampere: bool,
         note: str = _FSDP_NOTE):
    strategy = "FULL_SHARD" if zero_stage == 3 else "SHARD_GRAD_OP"
    layout = dict(tp=1, pp=1, dp=gpus, sp=1, zero_stage=zero_stage,
                  recompute="full" if ac else "none")
    return _row(tok_s, layout, f"FSDP{gpus} {strategy}" + (", full AC" if ac else "")
                + ", Triton FlashAttention (v1 era)",
                note=note + ("; attention priced as FlashAttention v1 (the spec's "
                             "cluster.attention_kernel)" if ampere else ""),
                as_published=_WHOLE_LAYER if ac else None)


_VANILLA_TP = dict(tp_overlap_chunks=1)
"""torchtitan's vanilla TP (no async TP: its asyncTP benchmark's "Vanilla TP" column; the 405B
row's "Optimizations: None", Float8 and Async TP being the listed ones) issues each TP
all-gather / reduce-scatter before / after its matmul: blocking collectives, the planner's
tp_overlap_chunks = 1."""

_LLMF = ("mosaicml/llm-foundry@8c8dd48 scripts/train/benchmarking/README.md (tables of 5e85bd6, "
         "2024-01-06), table ")
_H100 = _LLMF + "'H100 80GB BF16'"
_H100L = _LLMF + "'H100 80GB BF16 (Large Scale, >= 128 GPUs)'"
_A80 = _LLMF + "'A100 80GB with 1600 Gbps node-node interconnect (RoCE)'"
_A40 = _LLMF + "'A100 40GB with 1600 Gbps node-node interconnect (RoCE)'"

ROWS = {
    "short-llmfoundry-mpt7b-8xh100": _mpt(10643, 8, ac=False, ampere=False),
    "short-llmfoundry-mpt7b-128xh100": _mpt(10475, 128, ac=False, ampere=False),
    "short-llmfoundry-mpt3b-128xh100": _mpt(23422, 128, zero_stage=2, ac=False, ampere=False),
    "short-llmfoundry-mpt70b-64xh100": _mpt(1039, 64, ac=True, ampere=False),
    "short-llmfoundry-mpt30b-8xh100-8k": _mpt(1384, 8, ac=True, ampere=False),
    "short-llmfoundry-mpt1b-8xh100-16k": _mpt(19649, 8, ac=False, ampere=False),
    "short-llmfoundry-mpt13b-64xh100": _mpt(4800, 64, ac=False, ampere=False),
    "short-llmfoundry-mpt7b-8xa100-80g": _mpt(4641, 8, ac=False, ampere=True),
    "short-llmfoundry-mpt13b-8xa100-80g-4k": _mpt(2060, 8, ac=True, ampere=True),
    "short-llmfoundry-mpt30b-8xa100-80g": _mpt(916, 8, ac=True, ampere=True),
    "short-llmfoundry-mpt70b-128xa100-40g": _mpt(376, 128, ac=True, ampere=True),
    "short-llmfoundry-mpt7b-64xa100-40g": _mpt(3665, 64, ac=True, ampere=True),
    "short-llmfoundry-mpt1b-8xa100-40g-8k": _mpt(13474, 8, ac=False, ampere=True),
    "short-llmfoundry-mpt1b-128xa100-40g": _mpt(18647, 128, ac=False, ampere=True),
    "short-torchtitan-llama31-8b-8xh100": _row(
        5762, dict(tp=1, pp=1, dp=8, sp=1, zero_stage=3, recompute="selective"),
        "FSDP8 (eager), selective op AC", note="torchtitan TPS/GPU"),
    "short-torchtitan-llama3-70b-64xa100": _row(
        331, dict(tp=1, pp=1, dp=64, sp=1, zero_stage=3, recompute="full"), "FSDP64, full AC",
        note="torchtitan WPS (per GPU)", as_published=_WHOLE_LAYER),
    "short-torchtitan-llama31-405b-128xh100": _row(
        109, dict(tp=8, pp=1, dp=16, sp=1, zero_stage=3, recompute="full", **_VANILLA_TP),
        "FSDP16 TP8, full AC", note="torchtitan WPS; its toml sets compile = true",
        as_published=_WHOLE_LAYER),
    "short-torchtitan-llama3-70b-256xh100": _row(
        597, dict(tp=8, pp=1, dp=32, sp=1, zero_stage=3, recompute="full", **_VANILLA_TP),
        "FSDP32 TP8 (vanilla TP), full AC, torch.compile",
        note="597.3 tokens/sec; torch.compile", as_published=_WHOLE_LAYER),
    # op-level selective AC is not offered with tensor parallelism (planner.costmodel: the
    # runtime does not run it), so the fixed layout leaves recompute to the planner
    "short-torchtitan-llama3-8b-64xh100": _row(
        4378, dict(tp=8, pp=1, dp=8, sp=1, zero_stage=3, **_VANILLA_TP),
        "FSDP8 TP8 (vanilla TP), per-op SAC, torch.compile",
        note="torch.compile; SAC with TP not expressible: recompute left to the planner"),
}

SOURCES = {
    "short-llmfoundry-mpt7b-8xh100": _H100 + ", row 7b / 2048 / 8 GPUs (mb 6, GA 1, FULL_SHARD, no AC, amp_bf16 DEFAULT)",
    "short-llmfoundry-mpt7b-128xh100": _H100L + ", row 7b / 2048 / 128 GPUs (mb 6, GA 1, FULL_SHARD, no AC, amp_bf16)",
    "short-llmfoundry-mpt3b-128xh100": _H100L + ", row 3b / 2048 / 128 GPUs (mb 8, GA 1, SHARD_GRAD_OP, no AC, amp_bf16)",
    "short-llmfoundry-mpt70b-64xh100": _H100 + ", row 70b / 2048 / 64 GPUs (mb 8, GA 4, FULL_SHARD, AC, amp_bf16)",
    "short-llmfoundry-mpt30b-8xh100-8k": _H100 + ", row 30b / 8192 / 8 GPUs (mb 1, GA 21, FULL_SHARD, AC, amp_bf16)",
    "short-llmfoundry-mpt1b-8xh100-16k": _H100 + ", row 1b / 16384 / 8 GPUs (mb 2, GA 4, FULL_SHARD, no AC, amp_bf16)",
    "short-llmfoundry-mpt13b-64xh100": _H100 + ", row 13b / 2048 / 64 GPUs (mb 2, GA 1, FULL_SHARD, no AC, amp_bf16)",
    "short-llmfoundry-mpt1b-128xa100-40g": _A40 + ", row 1b / 2048 / 128 GPUs (mb 10, GA 1, FULL_SHARD, no AC, bf16 PURE)",
    "short-llmfoundry-mpt7b-8xa100-80g": _A80 + ", row 7b / 2048 / 8 GPUs (mb 6, GA 2, FULL_SHARD, no AC, amp_bf16)",
    "short-llmfoundry-mpt13b-8xa100-80g-4k": _A80 + ", row 13b / 4096 / 8 GPUs (mb 10, GA 3, FULL_SHARD, AC, amp_bf16)",
    "short-llmfoundry-mpt30b-8xa100-80g": _A80 + ", row 30b / 2048 / 8 GPUs (mb 3, GA 21, FULL_SHARD, AC, amp_bf16)",
    "short-llmfoundry-mpt70b-128xa100-40g": _A40 + ", row 70b / 2048 / 128 GPUs (mb 4, GA 1, FULL_SHARD, AC, bf16 PURE)",
    "short-llmfoundry-mpt7b-64xa100-40g": _A40 + ", row 7b / 2048 / 64 GPUs (mb 18, GA 1, FULL_SHARD, AC, bf16 PURE)",
    "short-llmfoundry-mpt1b-8xa100-40g-8k": _A40 + ", row 1b / 8192 / 8 GPUs (mb 2, GA 8, FULL_SHARD, no AC, bf16 PURE)",
    "short-torchtitan-llama31-8b-8xh100": "pytorch/torchtitan@d4c86e3 docs/performance.md Table 1, row FSDP "
    "(Llama 3.1 8B, 8 H100 96GB HBM2e 500 W, local batch 2, global 16, selective AC; seq 8192 of "
    "its llama3_8b.toml)",
    "short-torchtitan-llama3-70b-64xa100": "pytorch/torchtitan@4d88a8a docs/performance.md 'Llama 3 "
    "performance numbers', row 70B / 1 / full / 331 WPS (64 A100 80GB, FSDP2, global 64; seq 8192 "
    "of train_configs/llama3_70b.toml at 4d88a8a)",
    "short-torchtitan-llama31-405b-128xh100": "pytorch/torchtitan@4d88a8a docs/performance.md 'Llama "
    "3.1 performance numbers', row 405B / 2 / full / 109 WPS / Optimizations None (128 H100 HBM2e, "
    "FSDP2 + TP; train_configs/llama3_405b.toml at 4d88a8a: seq 8192, TP 8)",
    "short-torchtitan-llama3-70b-256xh100": "pytorch/torchtitan@820504e benchmarks/asyncTP_llama3_h100_"
    "2025-06_torchtitan.md, 'Llama3 70b on 256 H100s', row None (bfloat16), Vanilla TP 597.3",
    "short-torchtitan-llama3-8b-64xh100": "pytorch/torchtitan@820504e benchmarks/asyncTP_llama3_h100_"
    "2025-06_torchtitan.md, 'Llama3 8b on 64 H100s', row None (bfloat16), Vanilla TP 4378",
}

MISSING = {
    "short-llmfoundry-mpt1b-8xh100-16k":
        "attention kernel. The llm-foundry harness ran MPT's Triton FlashAttention (v1 era; "
        "TRITON_KERNEL in bench/heldout_short.py), not a FlashAttention-2-class kernel. Its own "
        "1B H100 rows (no AC, 8 GPUs) cost 2.03-2.04 ns per token per unit of sequence length "
        "from 4K to 16K, i.e. ~170 TFLOP/s of causal attention forward + backward (7 h L FLOPs "
        "per token per key); the planner's own 8K and 16K predictions give 1.10 ns (~310 "
        "TFLOP/s). The intercepts (everything else) agree: 17.7 us/token published, 19.1 "
        "predicted. The same tables, 8 GPUs, published layout fixed: on H100 the ratio grows "
        "with the sequence length (1B 1.10 / 1.22 / 1.37x at 4K / 8K / 16K; 7B 1.10 / 1.23x "
        "at 4K / 8K). On A100, priced with FlashAttention v1 (the specs' attention_kernel), it "
        "stays flat (1B 0.85 / 0.86 / 0.84x; 7B 0.92 / 0.92 / 0.95x at 4K / 8K / 16K). So the "
        "trend is the kernel, not the planner's attention curve. There is no published H100 "
        "figure for that kernel (attention_kernel is refused off SM80), so this row keeps the "
        "planner's H100 curve",
    "short-llmfoundry-mpt30b-8xh100-8k":
        "not the kernel alone, and not explained. This row's own 4K -> 8K step (micro batch 1 "
        "at both) loses 23% of tok/s/GPU on H100, and 29% on A100 (814 -> 574). The planner "
        "loses 1% on H100 and 5% on A100 (30B at 8K: attention ~10% of the FLOPs); the A100 "
        "8K row is 1.30x even with FlashAttention v1 priced, while 2K and 4K are 0.92 / 0.96x. "
        "FULL_SHARD 30B on 8 GPUs holds ~60 GB of fp32 master weights, gradients and Adam "
        "state per GPU, so memory pressure is one candidate (no source)",
    "short-llmfoundry-mpt1b-128xa100-40g":
        "fixed layout only (free: 0.87x, with recompute). The row ran without AC at micro "
        "batch 10 (20,480 tokens) on 40 GB. The planner prices disttrain's block, which saves "
        "40 h bytes per token per layer in bf16 (planner.analytic.layer_saved_bytes_per_token: "
        "each RMSNorm keeps an fp32 copy of its input, its rsqrt, the normed tensor and its "
        "product with the weight, 8 h per norm). MPT's block saves about 32 h (low-precision LayerNorm: input and output, 4 h "
        "per norm). 24 layers x 20,480 tokens x 40 h = 40 GB does not fit, so with recompute "
        "forbidden the plan swaps activations to the host. This is the runtime's footprint, "
        "priced correctly, not a cost-model error; a fused norm that saves only its input "
        "would close it",
    "short-torchtitan-llama3-70b-256xh100":
        "free choice only: the planner picks Ulysses sp8, which torchtitan does not offer (its "
        "CP is ring attention). The published layout fixed (TP8 with blocking collectives) is "
        "1.17x, 0.97x with torchtitan's whole-block AC recompute ('as published'). torch.compile "
        "(not modelled) makes the published figure if anything faster",
    "short-torchtitan-llama3-8b-64xh100":
        "free choice only: Ulysses sp8, not offered by torchtitan. The published layout fixed "
        "is 1.10x; its per-op SAC with TP is not expressible (the planner offers op-level "
        "selective AC only at tp 1), so recompute is left to the planner",
    "short-torchtitan-llama31-405b-128xh100":
        "free choice only (dp16 tp4 sp2 ring, not published). The published FSDP16 TP8 fixed "
        "is 1.20x, 1.05x with the whole-block AC recompute ('as published')",
}
"""What we believe each row outside the band misses (bench/heldout.py prints it)."""
