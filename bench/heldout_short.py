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
_WHOLE_LAYER = dict(recompute_attention=True, kernel=None)
"""Whole-block activation checkpointing: the published run recomputed the attention core too."""


def _mpt(tok_s: int, gpus: int, *, zero_stage: int = 3, ac: bool, note: str = _FSDP_NOTE):
    strategy = "FULL_SHARD" if zero_stage == 3 else "SHARD_GRAD_OP"
    layout = dict(tp=1, pp=1, dp=gpus, sp=1, zero_stage=zero_stage,
                  recompute="full" if ac else "none")
    return _row(tok_s, layout, f"FSDP{gpus} {strategy}" + (", full AC" if ac else ""),
                note=note, as_published=_WHOLE_LAYER if ac else None)


_LLMF = ("mosaicml/llm-foundry@8c8dd48 scripts/train/benchmarking/README.md (tables of 5e85bd6, "
         "2024-01-06), table ")
_H100 = _LLMF + "'H100 80GB BF16'"
_H100L = _LLMF + "'H100 80GB BF16 (Large Scale, >= 128 GPUs)'"
_A80 = _LLMF + "'A100 80GB with 1600 Gbps node-node interconnect (RoCE)'"
_A40 = _LLMF + "'A100 40GB with 1600 Gbps node-node interconnect (RoCE)'"

ROWS = {
    "short-llmfoundry-mpt7b-8xh100": _mpt(10643, 8, ac=False),
    "short-llmfoundry-mpt7b-128xh100": _mpt(10475, 128, ac=False),
    "short-llmfoundry-mpt3b-128xh100": _mpt(23422, 128, zero_stage=2, ac=False),
    "short-llmfoundry-mpt70b-64xh100": _mpt(1039, 64, ac=True),
    "short-llmfoundry-mpt30b-8xh100-8k": _mpt(1384, 8, ac=True),
    "short-llmfoundry-mpt1b-8xh100-16k": _mpt(19649, 8, ac=False),
    "short-llmfoundry-mpt7b-8xa100-80g": _mpt(4641, 8, ac=False),
    "short-llmfoundry-mpt13b-8xa100-80g-4k": _mpt(2060, 8, ac=True),
    "short-llmfoundry-mpt30b-8xa100-80g": _mpt(916, 8, ac=True),
    "short-llmfoundry-mpt70b-128xa100-40g": _mpt(376, 128, ac=True),
    "short-llmfoundry-mpt7b-64xa100-40g": _mpt(3665, 64, ac=True),
    "short-llmfoundry-mpt1b-8xa100-40g-8k": _mpt(13474, 8, ac=False),
    "short-torchtitan-llama31-8b-8xh100": _row(
        5762, dict(tp=1, pp=1, dp=8, sp=1, zero_stage=3, recompute="selective"),
        "FSDP8 (eager), selective op AC", note="torchtitan TPS/GPU"),
    "short-torchtitan-llama3-70b-64xa100": _row(
        331, dict(tp=1, pp=1, dp=64, sp=1, zero_stage=3, recompute="full"), "FSDP64, full AC",
        note="torchtitan WPS (per GPU)", as_published=_WHOLE_LAYER),
    "short-torchtitan-llama31-405b-128xh100": _row(
        109, dict(tp=8, pp=1, dp=16, sp=1, zero_stage=3, recompute="full"),
        "FSDP16 TP8, full AC", note="torchtitan WPS; its toml sets compile = true",
        as_published=_WHOLE_LAYER),
    "short-torchtitan-llama3-70b-256xh100": _row(
        597, dict(tp=8, pp=1, dp=32, sp=1, zero_stage=3, recompute="full"),
        "FSDP32 TP8 (vanilla TP), full AC, torch.compile",
        note="597.3 tokens/sec; torch.compile", as_published=_WHOLE_LAYER),
    "short-torchtitan-llama3-8b-64xh100": _row(
        4378, dict(tp=8, pp=1, dp=8, sp=1, zero_stage=3, recompute="selective"),
        "FSDP8 TP8 (vanilla TP), per-op SAC, torch.compile", note="torch.compile"),
}

SOURCES = {
    "short-llmfoundry-mpt7b-8xh100": _H100 + ", row 7b / 2048 / 8 GPUs (mb 6, GA 1, FULL_SHARD, no AC, amp_bf16 DEFAULT)",
    "short-llmfoundry-mpt7b-128xh100": _H100L + ", row 7b / 2048 / 128 GPUs (mb 6, GA 1, FULL_SHARD, no AC, amp_bf16)",
    "short-llmfoundry-mpt3b-128xh100": _H100L + ", row 3b / 2048 / 128 GPUs (mb 8, GA 1, SHARD_GRAD_OP, no AC, amp_bf16)",
    "short-llmfoundry-mpt70b-64xh100": _H100 + ", row 70b / 2048 / 64 GPUs (mb 8, GA 4, FULL_SHARD, AC, amp_bf16)",
    "short-llmfoundry-mpt30b-8xh100-8k": _H100 + ", row 30b / 8192 / 8 GPUs (mb 1, GA 21, FULL_SHARD, AC, amp_bf16)",
    "short-llmfoundry-mpt1b-8xh100-16k": _H100 + ", row 1b / 16384 / 8 GPUs (mb 2, GA 4, FULL_SHARD, no AC, amp_bf16)",
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
