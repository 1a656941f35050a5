"""Where the predicted step time of a published-run plan goes (issue 14's throughput band):
for each spec of bench/published_specs/, free and with the published layout fixed, the
step's parts (compute, recompute, exposed communication, bubble, optimizer) and the compute
split by kernel kind from the device efficiency curves (GEMM, attention, element-wise), per
GPU per step, and what op-level selective checkpointing (torchtitan's policy,
`planner.selective`) costs per step on that layout: the planner's own price of the policy
(`LayerCost.selective_recompute_s`). Rows whose published run used it plan it with the
published layout (bench/published.py fixes `recompute="selective"`), so their "recompute"
column is that price; "selective layers" says how many layers of the plan run it.
"full-AC price" is what a whole-layer recompute would cost per step on that layout (every
layer's forward rerun, attention core included: DeepSpeed's and torchtitan's "full"
activation checkpointing, a policy disttrain never runs), and "pred/pub full AC" the ratio
the plan would have if it paid that instead of its own recompute: the published systems'
policy, priced, for the rows that ran it. "as-published step" / "pred/pub as published" (rows
with `as_published` in bench/published.py): that full-AC price (`published.as_published_step`),
a check of the cost model's mechanisms, not the banded target. Attention is priced with the
spec's `cluster.attention_kernel` everywhere (DeepSpeed-Ulysses: FlashAttention v1).

    .venv/bin/python bench/cost_breakdown.py [--only NAME ...] [--micro-batch-size N]

`--micro-batch-size` replaces the specs' `train.micro_batch_size` (sequences per microbatch;
the global batch stays), for rows whose source does not publish it (Megatron-LM's README).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import published  # noqa: E402

from disttrain.spec import load_job  # noqa: E402
from planner.analytic import layer_flops_per_token  # noqa: E402
from planner.costmodel import (MEMORY_EFFICIENCY, Candidate, CostParams,  # noqa: E402
                               attention_efficiency, device_family, elementwise_bytes_per_token,
                               gemm_seconds, layer_cost, layer_gemms, local_tokens)
from planner.shapes import DTYPE_BYTES  # noqa: E402


def kernel_split(request, plan) -> dict[str, float]:
    """Seconds per step of one rank's decoder-layer kernels by kind (no recompute)."""
    par, shape, hw = plan.parallel, request.model, request.hardware
    family = device_family(hw.device_name)
    if family is None:
        return {}
    cand = Candidate(dp=par.dp, sp=par.sp, sp_kind=par.sp_kind, pp=par.pp, tp=par.tp,
                     num_microbatches=par.num_microbatches, zero_stage=par.zero_stage)
    tokens = local_tokens(request.seq_len, plan.micro_batch_size, par.sp)
    peak, b = hw.flops(request.dtype), DTYPE_BYTES[request.dtype]
    gemms = layer_gemms(shape, tokens, par.tp)
    gemm = 3 * sum(gemm_seconds(family, peak, m, n, k, b) for m, n, k in gemms)
    flops = layer_flops_per_token(shape, request.seq_len).attention * tokens / par.tp
    key_len = request.seq_len if par.sp_kind == "ulysses" else request.seq_len / par.sp
    kernel = hw.attention_kernel
    attn = (flops / (peak * attention_efficiency(family, key_len, shape.head_dim, False, kernel))
            + 2.5 * flops / (peak * attention_efficiency(family, key_len, shape.head_dim, True, kernel)))
    fwd, bwd = elementwise_bytes_per_token(shape, request.dtype, par.tp)
    ew = (fwd + bwd) * tokens / (family.hbm_bw * MEMORY_EFFICIENCY)
    layers = -(-shape.num_layers // par.pp) * par.num_microbatches
    gemm_eff = sum(2 * m * n * k for m, n, k in gemms) / (peak * gemm / 3)
    # op-level selective checkpointing reruns the element-wise forward and every second
    # matmul (k, o, up): the planner's price of the policy on this layout
    lc = layer_cost(shape, request.dtype, hw, cand, seq_len=request.seq_len,
                    micro_batch_size=plan.micro_batch_size, params=CostParams(),
                    tp_overlap_chunks=par.tp_overlap_chunks)
    return dict(gemm=gemm * layers, attention=attn * layers, elementwise=ew * layers,
                gemm_eff=gemm_eff, tokens=tokens, op_sac=lc.selective_recompute_s * layers,
                full_ac=lc.forward_s * layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[])
    parser.add_argument("--micro-batch-size", type=int, default=0,
                        help="sequences per microbatch instead of the spec's")
    args = parser.parse_args(argv)
    if args.micro_batch_size < 0:
        parser.error("--micro-batch-size: must be >= 1 (0 or absent: the spec's)")
    cols = ("compute", "recompute", "exposed_communication", "exposed_transfer", "bubble", "optimizer")
    print("| spec | kind | layout | step s | " + " | ".join(cols)
          + " | gemm | attention | elementwise | gemm eff | op-SAC price | selective layers"
          " | pred/pub | full-AC price | pred/pub full AC | as-published step | pred/pub as published |")
    print("|---" * (len(cols) + 15) + "|")
    for path in sorted(published.SPECS.glob("*.yaml")):
        if args.only and path.stem not in args.only:
            continue
        pub = published.PUBLISHED[path.stem]
        request = published.free_request(load_job(path))
        if args.micro_batch_size:
            request = dataclasses.replace(request, micro_batch_size=args.micro_batch_size)
        runs = [("free", request)]
        if pub["layout"] is not None:
            runs.append(("fixed", dataclasses.replace(request, **pub["layout"])))
        for kind, req in runs:
            row = published.plan_one(req)
            plan = row["plan"]
            if not plan.feasible:
                print(f"| {path.stem} | {kind} | infeasible |")
                continue
            tb = plan.prediction.time_breakdown
            split = kernel_split(req, plan)
            ratio = f"{row['tok'] / pub['tok_s']:.2f}" if pub["tok_s"] else ""
            step = plan.prediction.step_time_s
            full = step - tb.get("recompute", 0) + split.get("full_ac", 0)
            ratio_full = f"{row['tok'] / pub['tok_s'] * step / full:.2f}" if pub["tok_s"] and split else ""
            as_pub = (published.as_published_step(req, plan, **pub["as_published"])
                      if pub["as_published"] and split else None)
            ratio_as_pub = (f"{row['tok'] / pub['tok_s'] * step / as_pub:.2f}"
                            if as_pub and pub["tok_s"] else "")
            print(f"| {path.stem} | {kind} | {row['layout']} | {plan.prediction.step_time_s:.3f} | "
                  + " | ".join(f"{tb.get(c, 0):.3f}" for c in cols)
                  + f" | {split.get('gemm', 0):.3f} | {split.get('attention', 0):.3f} | "
                  f"{split.get('elementwise', 0):.3f} | {split.get('gemm_eff', 0):.2f} | "
                  f"{split.get('op_sac', 0):.3f} | "
                  f"{sum(a.selective for a in plan.activations)}/{len(plan.activations)} | {ratio} | "
                  f"{split.get('full_ac', 0):.3f} | {ratio_full} | "
                  f"{'' if as_pub is None else f'{as_pub:.3f}'} | {ratio_as_pub} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
