"""Document-masked attention time vs the share of causal attention it leaves.

The local core runs one causal kernel call per document, so its time should follow
`attention_fraction` = sum(len_i^2) / S^2 (what `PlanRequest.attention_fraction` gives the
planner) until the per-call overhead of many short documents dominates. Prints forward +
backward seconds of one (1, 8 heads, S, 64) core at 1 thread, for S split into N equal
documents. Not part of `make bench` (run it alone):

    PYTHONPATH=. python bench/document_attention.py [S]
"""

from __future__ import annotations

import sys
import time

import torch

from disttrain.model.attention import LOCAL_CORE
from disttrain.model.documents import documents_scope


def fwd_bwd_seconds(seq_len: int, num_docs: int, repeats: int = 2) -> float:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, seq_len, 64, generator=gen).requires_grad_()
               for h in (8, 4, 4))
    ids = (torch.arange(seq_len) // (seq_len // num_docs))[None]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with documents_scope(ids if num_docs > 1 else None):
            out = LOCAL_CORE(q, k, v)
        out.sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main(seq_len: int) -> None:
    torch.set_num_threads(1)
    base = fwd_bwd_seconds(seq_len, 1)
    print(f"S={seq_len}, 1 thread, forward+backward of the local core (best of 2)")
    print(f"{'documents':>9} {'attention_fraction':>18} {'seconds':>8} {'time ratio':>10}")
    for num_docs in (1, 4, 16, 64, 256, 1024):
        seconds = base if num_docs == 1 else fwd_bwd_seconds(seq_len, num_docs)
        print(f"{num_docs:>9} {1 / num_docs:>18.4f} {seconds:>8.3f} {seconds / base:>10.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
