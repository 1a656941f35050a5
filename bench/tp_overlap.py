"""Does tensor parallelism's collective/GEMM overlap (`parallel.tp_overlap_chunks`) pay on
this machine? Two gloo ranks run a tensor-parallel MLP (column-parallel gate/up, row-parallel
down, the runtime's `disttrain.parallel.tensor` modules) forward + backward with K = 1, 2, 4
token blocks, and, for scale, this rank's GEMMs alone (no collectives) and the collectives
alone. Median of `REPS` (interleaved) after a warm-up, the slowest rank.

If the async collectives (gloo's worker thread) ran beside the GEMMs, K > 1 would be faster
than K = 1 by up to the collectives' time; the planner prices overlap on CPU nodes only
where this shows it (`planner.collectives.overlaps_compute`). The bytes each K sends are
the same (printed from the communication counter).

    .venv/bin/python bench/tp_overlap.py [--tokens 2048] [--hidden 1024] [--ffn 2816]

Timings on a shared 2-core machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.parallel.tensor import (ColumnParallelLinear, RowParallelLinear,  # noqa: E402
                                       TensorParallel, _Siblings)

REPS = 7
CHUNKS = (1, 2, 4)


def _medians(fns: dict) -> dict[str, float]:
    """Median seconds of each callable, the callables interleaved within every repetition
    (so that drifting load on a shared machine hits all of them alike); one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(REPS):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _worker(rank, world, tokens, hidden, ffn):
    torch.manual_seed(rank)
    h, f = hidden // world, ffn // world
    x = torch.randn(tokens, h, requires_grad=True)
    gate_w, up_w, down_w = torch.randn(f, hidden), torch.randn(f, hidden), torch.randn(hidden, f)
    fns, counters = {}, {}
    for chunks in CHUNKS:
        tp = TensorParallel(dist.group.WORLD, chunks)
        sib = _Siblings()
        gate, up = ColumnParallelLinear(tp, gate_w, sib), ColumnParallelLinear(tp, up_w, sib)
        down = RowParallelLinear(tp, down_w)

        def step(gate=gate, up=up, down=down):
            y = down(F.silu(gate(x)) * up(x))
            y.sum().backward()
        fns[f"K={chunks}"], counters[chunks] = step, tp
    full_x = torch.randn(tokens, hidden, requires_grad=True)
    gate_l, up_l, down_l = (torch.nn.Parameter(w) for w in (gate_w, up_w, down_w))

    def gemms_only():  # this rank's GEMMs without the collectives (partial output kept)
        y = F.linear(F.silu(F.linear(full_x, gate_l)) * F.linear(full_x, up_l), down_l)
        y.sum().backward()
    fns["GEMMs only"] = gemms_only
    tp = TensorParallel(dist.group.WORLD, 1)
    partial = torch.randn(tokens, hidden)

    def comm_only():  # the MLP's: forward 1 gather + 1 reduce-scatter, backward 2 + 1
        for _ in range(3):
            tp.gather_hidden(x.detach())
        for _ in range(2):
            tp.reduce_scatter_hidden(partial)
    fns["collectives only"] = comm_only
    out = _medians(fns)
    for chunks, counter in counters.items():
        out[f"bytes K={chunks}"] = sum(counter.reset_comm_bytes().values()) // (REPS + 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    args = ap.parse_args()
    results = spawn_ranks(_worker, 2, args.tokens, args.hidden, args.ffn)
    print(f"tp2 gloo MLP, {args.tokens} tokens, hidden {args.hidden}, ffn {args.ffn}, fp32; "
          f"median of {REPS}, slowest rank")
    for key in results[0]:
        if key.startswith("bytes"):
            print(f"  {key:<18} {results[0][key]:>12,} B sent per step (rank 0)")
        else:
            print(f"  {key:<18} {max(r[key] for r in results) * 1e3:>9.1f} ms")


if __name__ == "__main__":
    main()
