"""bench/peers.py's derived numbers, targets and Markdown section."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from docs_sections import fmt_mib, md_table
from peers import (ADAM_BETAS, ADAM_EPS, ALST, CPU_NODE_TILES, FAIRNESS,
                   GLOBAL_BATCH, LOSS_RTOL, SHAPE, SYSTEMS, check_losses)
from peers_alst import TILE_TOKENS
from peers_breakdown import CATEGORIES

FIT_LENS = (2048, 4096, 8192, 16384)
"""Lengths of the slope fit (least squares of peak RSS over sequence length)."""


def fit(rows: list[dict], system: str) -> tuple[float, float]:
    """(slope B/token, intercept B) of `system`'s peak RSS over the FIT_LENS it ran."""
    ok = [r for r in rows if r["system"] == system and "error" not in r
          and r["seq_len"] in FIT_LENS]
    if len(ok) < 2:
        return float("nan"), float("nan")
    x = np.array([r["seq_len"] for r in ok], dtype=float)
    y = np.array([r["peak_rss"] for r in ok], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def fitted_len(rows: list[dict], system: str, rss_budget_mib: float) -> float:
    slope, intercept = fit(rows, system)
    return (rss_budget_mib * 2**20 - intercept) / slope if slope > 0 else float("nan")


def alst_best_fitted_len(rows: list[dict], rss_budget_mib: float) -> float:
    """The longer of ALST sp2's and dp2's fitted lengths at the RSS budget (0 if neither ran)."""
    lens = [fitted_len(rows, s, rss_budget_mib) for s in ALST]
    lens = [x for x in lens if np.isfinite(x)]
    return max(lens) if lens else 0.0


def targets(rows: list[dict], search: list[dict], rss_budget_mib: float
            ) -> list[tuple[str, bool | None, str]]:
    """(target, met?, evidence); None when the runs cannot decide it."""
    out: list[tuple[str, bool | None, str]] = []
    dt, sp2 = fit(rows, "disttrain"), fit(rows, "alst-sp2")
    out.append(("disttrain's peak-RSS slope <= 0.5 x ALST sp2's",
                dt[0] <= 0.5 * sp2[0] if np.isfinite(dt[0] + sp2[0]) else None,
                f"{dt[0]:,.0f} vs {sp2[0]:,.0f} B/token (ratio {dt[0] / sp2[0]:.2f})"))
    lens = sorted({r["seq_len"] for r in rows if r["system"] == "disttrain" and "error" not in r})
    ratios = {}
    for s in lens:
        ours = next(r["step_s"] for r in rows if r["system"] == "disttrain" and r["seq_len"] == s
                    and "error" not in r)
        theirs = [r["step_s"] for r in rows if r["system"] in ALST and r["seq_len"] == s
                  and "error" not in r]
        if theirs:
            ratios[s] = ours / min(theirs)
    out.append(("disttrain's step time <= ALST's best at every length",
                all(v <= 1.0 for v in ratios.values()) if ratios else None,
                ", ".join(f"{s}: {v:.2f}x" for s, v in ratios.items())))
    best = alst_best_fitted_len(rows, rss_budget_mib)
    under = [r["seq_len"] for r in search
             if "error" not in r and r["peak_rss"] <= rss_budget_mib * 2**20]
    longest = max(under, default=0)
    out.append((f"longest length disttrain trains under {rss_budget_mib:.0f} MiB RSS per rank "
                f">= 2 x ALST's best",
                (longest >= 2 * best) if search and best else None,
                f"disttrain {longest:,} measured (runs: " + ", ".join(
                    f"{r['seq_len']:,} -> {fmt_mib(r.get('peak_rss'))} MiB"
                    + (f" planned for {r['budget_mib']:.0f} MiB" if "budget_mib" in r else "")
                    for r in search)
                + f") vs ALST's best fitted {best:,.0f} (x2 = {2 * best:,.0f})"))
    worst = max((check_losses(rows, s) for s in {r["seq_len"] for r in rows}), default=0.0)
    out.append((f"losses equal at every step (relative {LOSS_RTOL:g}) across all systems",
                worst <= LOSS_RTOL, f"largest relative difference {worst:.1e}"))
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for system in SYSTEMS:
        ok = sorted((r["seq_len"], r["peak_rss"]) for r in rows
                    if r["system"] == system and "error" not in r)
        if ok:
            ax.plot([s for s, _ in ok], [b / 2**20 for _, b in ok], marker="o", label=system)
    ax.set(xlabel="sequence length (tokens)", ylabel="peak RSS per rank (MiB)")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def _breakdown_table(rows: list[dict]) -> str:
    have = [r for r in rows if r.get("breakdown")]
    return md_table(["system", "seq_len", *CATEGORIES, "peak RSS"],
                    [[r["system"], r["seq_len"], *(fmt_mib(r["breakdown"][c]) for c in CATEGORIES),
                      fmt_mib(r["peak_rss"])] for r in have])


def report(rows: list[dict], search: list[dict], args, seconds: float) -> str:
    """The Markdown section (also printed)."""
    rss = args.rss_budget_mib
    table = md_table(
        ["system", "seq_len", "losses (every step)", "peak RSS/rank MiB (r0, r1)",
         "median step s", "plan"],
        [[r["system"], r["seq_len"], r.get("error") or " ".join(f"{v:.6f}" for v in r["losses"]),
          "" if "error" in r else " / ".join(fmt_mib(b) for b in r["peak_rss_ranks"]),
          "" if "error" in r else f"{r['step_s']:.2f}", r.get("plan", "")] for r in rows])
    fits = md_table(["system", "slope B/token", "intercept MiB", f"fitted len at {rss:.0f} MiB"],
                    [[s, f"{fit(rows, s)[0]:,.0f}", fmt_mib(fit(rows, s)[1]),
                      f"{fitted_len(rows, s, rss):,.0f}"] for s in SYSTEMS
                     if any(r["system"] == s for r in rows)] + [
                        [FAIRNESS, f"{fit(rows, FAIRNESS)[0]:,.0f}", fmt_mib(fit(rows, FAIRNESS)[1]),
                         f"{fitted_len(rows, FAIRNESS, rss):,.0f}"]
                        for _ in range(any(r["system"] == FAIRNESS for r in rows))])
    verdict = "\n".join(f"- {'MET' if ok else 'NOT MET' if ok is not None else 'UNDECIDED'}: "
                        f"{name} — {why}" for name, ok, why in targets(rows, search, rss))
    norms = {}
    for r in rows:
        if "error" not in r:
            norms.setdefault(r["seq_len"], []).append(r["grad_norms"])
    norm_gap = max((max(abs(a - b) / b for v in group for a, b in zip(v, group[0]))
                    for group in norms.values()), default=0.0)
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items() if k != "max_seq_len")
    load = os.getloadavg()
    return (
        f"## Peers: DeepSpeed's long-sequence recipe (ALST), DDP, ZeRO-3 + checkpointing, "
        f"disttrain\n\n`bench/peers.py`: model {shape}; fp32; global batch {GLOBAL_BATCH} "
        f"(one sequence per rank at dp2, both split over the ranks at sp2); 2 gloo ranks x 1 "
        f"thread; AdamW lr 1e-3, betas {ADAM_BETAS}, eps {ADAM_EPS:g}, no decay, clip 1.0 in "
        f"every system; {args.steps} steps per run, median of steps 2..{args.steps}; fresh "
        f"processes per run; one length-major sweep ({seconds / 60:.0f} min; load average at "
        f"the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on 2 cores shared with other "
        f"jobs, so step times carry that noise). Peak RSS is VmHWM of the whole process.\n\n"
        f"Systems: **alst-sp2 / alst-dp2** — DeepSpeed 0.19.8's ALST as `ulysses_sp.py` "
        f"intends (bench/peers_alst.py): ZeRO-3, `UlyssesSPAttentionHF` over HF sdpa (sp2), "
        f"`TiledMLP` and `TiledFusedLogitsLoss` in {TILE_TOKENS}-token tiles, HF gradient "
        f"checkpointing, disttrain's weights in an HF `LlamaForCausalLM`. Wiring facts: the "
        f"fused loss computes lm_head's gradient in its forward, so the loss weight is applied "
        f"inside it and `engine.backward(..., scale_wrt_gas=False)`; ZeRO-3 averages gradients "
        f"over dp x sp, so each rank weights its tokens by world / global tokens (then every "
        f"step's gradient norm equals DDP's); body and loss run inside the engine's forward; "
        f"at sp1 the S x S mask transformers 4.57 builds is dropped as ALST drops it at sp>1; "
        f"checkpoint offload is a no-op on the CPU backend. **disttrain** — the planner's own "
        f"pick at each length for a {args.budget_mib:.0f} MiB per-rank memory budget: the "
        f"fastest plan it predicts to fit, with the CPU node modelled as one memory pool "
        f"(activations offload only to NVMe, whose reads pass through the page cache and count "
        f"against the budget; no cpu tier); the runtime returns freed blocks to the OS "
        f"(offload/host_memory.py) only under a memory-bound plan, and under a keep-all plan "
        f"with room keeps every freed block in its heap (the peers run with glibc's defaults). "
        f"**disttrain-hand** — a CPU-node plan set by hand for comparison: sp2 "
        f"Ulysses, ZeRO-1, every layer recomputes its token-local tensors in tiles (rebuild "
        f"{CPU_NODE_TILES['rebuild_tile_tokens']}, loss {CPU_NODE_TILES['loss_chunk_tokens']}), "
        f"layer inputs and attention outputs on the NVMe tier. "
        f"plain (DDP), ds-z3-ckpt (ZeRO-3 + per-layer checkpointing, full logits) and "
        f"disttrain-hand "
        f"are extra rows.\n\n{table}\n\n![peak memory](benchmarks_memory.png)\n\n"
        f"Fit of peak RSS over sequence length at {list(FIT_LENS)}:\n\n{fits}\n\n"
        f"disttrain's peak RSS by category (rank 0, bench/peers_breakdown.py):\n\n"
        f"{_breakdown_table(rows + search)}\n\nGradient norms of every step agree across "
        f"systems to {norm_gap:.1e} relative.\n\nTargets (one run):\n\n{verdict}\n")
