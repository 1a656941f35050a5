"""Where the predicted step time of a published-run plan goes (issue 14's throughput band):
for each spec of bench/published_specs/, free and with the published layout fixed, the
step's parts (compute, recompute, exposed communication, bubble, optimizer) and the compute
split by kernel kind from the device efficiency curves (GEMM, attention, element-wise), per
GPU per step, and what torchtitan's selective op checkpointing would add (a price, not a plan:
the runtime cannot run that policy).

    .venv/bin/python bench/cost_breakdown.py [--only NAME ...]
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
from planner.costmodel import (MEMORY_EFFICIENCY, Candidate, attention_efficiency,  # noqa: E402
                               device_family, elementwise_bytes_per_token, gemm_seconds,
                               layer_gemms, local_tokens)
from planner.shapes import DTYPE_BYTES  # noqa: E402


def kernel_split(request, plan) -> dict[str, float]:
    """Seconds per step of one rank's decoder-layer kernels by kind (no recompute)."""
    par, shape, hw = plan.parallel, request.model, request.hardware
    family = device_family(hw.device_name)
    if family is None:
        return {}
    cand = Candidate(dp=par.dp, sp=par.sp, sp_kind=par.sp_kind, pp=par.pp, tp=par.tp,
                     num_microbatches=par.num_microbatches, zero_stage=par.zero_stage)
    tokens = local_tokens(request.seq_len, request.micro_batch_size, par.sp)
    peak, b = hw.flops(request.dtype), DTYPE_BYTES[request.dtype]
    gemms = layer_gemms(shape, tokens, par.tp)
    gemm = 3 * sum(gemm_seconds(family, peak, m, n, k, b) for m, n, k in gemms)
    flops = layer_flops_per_token(shape, request.seq_len).attention * tokens / par.tp
    key_len = request.seq_len if par.sp_kind == "ulysses" else request.seq_len / par.sp
    attn = (flops / (peak * attention_efficiency(family, key_len, shape.head_dim, False))
            + 2.5 * flops / (peak * attention_efficiency(family, key_len, shape.head_dim, True)))
    fwd, bwd = elementwise_bytes_per_token(shape, request.dtype, par.tp)
    ew = (fwd + bwd) * tokens / (family.hbm_bw * MEMORY_EFFICIENCY)
    layers = -(-shape.num_layers // par.pp) * par.num_microbatches
    gemm_eff = sum(2 * m * n * k for m, n, k in gemms) / (peak * gemm / 3)
    # torchtitan's selective op checkpointing reruns every element-wise op and every second
    # matmul of a layer (k, o, up) in the backward: what it would add (disttrain cannot run it)
    sac = (sum(gemm_seconds(family, peak, m, n, k, b) for m, n, k in gemms[1:7:2])
           + fwd * tokens / (family.hbm_bw * MEMORY_EFFICIENCY))
    return dict(gemm=gemm * layers, attention=attn * layers, elementwise=ew * layers,
                gemm_eff=gemm_eff, tokens=tokens, op_sac=sac * layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[])
    args = parser.parse_args(argv)
    cols = ("compute", "recompute", "exposed_communication", "exposed_transfer", "bubble", "optimizer")
    print("| spec | kind | layout | step s | " + " | ".join(cols)
          + " | gemm | attention | elementwise | gemm eff | op-SAC would add | pred/pub |")
    print("|---" * (len(cols) + 10) + "|")
    for path in sorted(published.SPECS.glob("*.yaml")):
        if args.only and path.stem not in args.only:
            continue
        pub = published.PUBLISHED[path.stem]
        request = published.free_request(load_job(path))
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
            print(f"| {path.stem} | {kind} | {row['layout']} | {plan.prediction.step_time_s:.3f} | "
                  + " | ".join(f"{tb.get(c, 0):.3f}" for c in cols)
                  + f" | {split.get('gemm', 0):.3f} | {split.get('attention', 0):.3f} | "
                  f"{split.get('elementwise', 0):.3f} | {split.get('gemm_eff', 0):.2f} | "
                  f"{split.get('op_sac', 0):.3f} | {ratio} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
