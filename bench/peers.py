"""disttrain against DeepSpeed's long-sequence recipe (ALST) and the usual baselines, on the
same job and machine.

One small Llama (explicit shape below), the same seeded weights and synthetic batches, the
same global batch (2 sequences: one per rank, or both split over 2 ranks at sp2), 2 gloo ranks
with one thread each, fp32, the same AdamW settings (betas, eps, lr, no decay, clip 1.0),
one length-major sweep. Systems:

  alst-sp2   DeepSpeed ALST: ZeRO-3 + Ulysses sp2 + TiledMLP + TiledFusedLogitsLoss +
             checkpointing (bench/peers_alst.py has the wiring and its measured reasons)
  alst-dp2   the same without sequence parallelism
  disttrain  disttrain under the planner's own plan for a per-rank budget (`--budget-mib`) at
             each length: the fastest plan it predicts to fit (a CPU node is one memory pool)
  disttrain-hand      disttrain under a CPU-node plan set by hand (`cpu_node_plan`, extra row)
  plain      PyTorch DDP, every activation kept (extra row)
  ds-z3-ckpt DeepSpeed ZeRO-3, every decoder layer under deepspeed.checkpointing (extra row)

Every (system, length) runs in freshly spawned ranks (high-water marks do not leak between
runs; under the test suite's fork server a rank starts from the server's imports, so only
this script's own RSS numbers mean anything). Measured per run: peak RSS per rank (VmHWM), median step time after the first, the
loss and global gradient norm of every step (asserted equal across systems), and for
disttrain a per-category breakdown of its peak RSS (bench/peers_breakdown.py).

    .venv/bin/python bench/peers.py [--seq 2048 4096 8192 16384] [--steps 3] [--no-docs]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_sections import DOCS, fmt_mib, write_section  # noqa: E402
from peers_alst import alst_worker  # noqa: E402
from peers_baselines import deepspeed_worker, plain_worker  # noqa: E402
from peers_breakdown import disttrain_worker  # noqa: E402

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402

SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=352,
             vocab_size=8192, max_seq_len=262144)
"""The model of every run: a 4-layer Llama, 8K vocabulary (small enough for 2 CPU cores)."""
GLOBAL_BATCH, LR, SEED, GRAD_CLIP = 2, 1e-3, 0, 1.0
ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8
"""Every system's AdamW (disttrain through train.adam_betas / train.adam_eps)."""
COMMON = dict(shape=SHAPE, seed=SEED, lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS,
              global_batch=GLOBAL_BATCH, grad_clip=GRAD_CLIP)
BUDGET_MIB = 128.0
"""Per-rank memory budget the planner plans the `disttrain` row for (on a CPU node the
'device' is the rank's share of host memory; the interpreter and allocator caches are not in
it)."""
LOSS_RTOL = 1e-5
"""Losses of every step must agree across systems to this relative tolerance."""
ALST = ("alst-sp2", "alst-dp2")
EXTRAS = ("plain", "ds-z3-ckpt", "disttrain-hand")
"""Rows that are no target (run up to --extras-max-seq)."""
SYSTEMS = ("disttrain", *ALST, *EXTRAS)
FAIRNESS = "alst-sp2-malloc"
"""ALST sp2 with glibc's mmap/trim thresholds at 1 MiB through the environment, as disttrain's
runtime sets them in-process (not in the default sweep: run with --systems)."""
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
CPU_NODE_TILES = dict(loss_chunk_tokens=256, mlp_chunk_tokens=0, rebuild_tile_tokens=1024)
"""The hand-set CPU-node plan's tiles: head+loss 256 tokens, rebuild 1024 (the MLP then needs
no tiling of its own: the rebuild tile bounds it)."""


def job_spec(seq_len: int, budget_mib: float, steps: int) -> dict:
    """The disttrain job: 2 CPU ranks whose 'device' memory is the per-rank budget."""
    return {"name": f"peers-{seq_len}", "model": {"dtype": "fp32", **SHAPE},
            "train": {"seq_len": seq_len, "micro_batch_size": 1,
                      "global_batch_size": GLOBAL_BATCH, "steps": steps, "lr": LR,
                      "min_lr": LR, "seed": SEED, "grad_clip": GRAD_CLIP, "weight_decay": 0.0,
                      "adam_betas": list(ADAM_BETAS), "adam_eps": ADAM_EPS},
            "data": {"kind": "synthetic"},
            "cluster": {"preset": "cpu-local", "devices_per_node": 2,
                        "device": {"name": "cpu", "memory_gib": budget_mib / 1024,
                                   "peak_tflops": {"fp32": 0.05, "bf16": 0.025}},
                        "host_memory_gib": 2 * budget_mib / 1024},
            "launch": {"launcher": "torchrun"}, "output_dir": "/tmp/disttrain-peers"}


def plan_for(seq_len: int, budget_mib: float, steps: int, profile):
    """disttrain's own plan for this length (planner free to choose everything)."""
    from planner.search import plan_job

    job = job_from_dict(job_spec(seq_len, budget_mib, steps))
    return job, plan_job(job.plan_request(), profile, with_layout=False)


def cpu_node_plan(plan):
    """A plan for a node whose 'device' is its host RAM, set by hand (the extra row
    `disttrain-hand`, for comparison with the planner's pick): Ulysses sp2 (each rank holds
    half of every sequence), optimizer states sharded (ZeRO-1), every layer keeps nothing in
    RAM but recomputes its token-local tensors a tile at a time, the layer input and attention
    output go to the NVMe tier (the 'cpu' tier is the same RAM), head+loss tiled."""
    from planner.plan import LayerActivationPlan, ParallelPlan, TilingPlan

    layers = tuple(LayerActivationPlan(swap_fraction=0.0, tier="nvme", swap_input=True,
                                       swap_attention_output=True)
                   for _ in range(SHAPE["num_layers"]))
    return dataclasses.replace(
        plan, parallel=ParallelPlan(dp=1, sp=2, zero_stage=1, num_microbatches=1),
        activations=layers, tiling=TilingPlan(**CPU_NODE_TILES),
        model_states=dataclasses.replace(plan.model_states, cpu_chunks=(),
                                         num_persistent_chunks=plan.model_states.num_chunks))


def describe_plan(plan) -> str:
    par = plan.parallel
    kept = sum(a.keep_all for a in plan.activations)
    rest = [a for a in plan.activations if not a.keep_all]
    tiers = [a.tier for a in rest if a.swap_fraction or a.swap_input or a.swap_attention_output]
    tier_text = ", ".join(f"{t} {tiers.count(t)}" for t in sorted(set(tiers)))
    swap = np.mean([a.swap_fraction for a in rest]) if rest else 0.0
    inputs = sum(a.swap_input for a in rest)
    cpu = len(plan.model_states.cpu_chunks)
    t = plan.tiling
    return (f"dp{par.dp} sp{par.sp} z{par.zero_stage}, keep {kept}/{len(plan.activations)}"
            + (f", swap {swap:.2f} ({tier_text or 'none'}), inputs out {inputs}" if rest else "")
            + (f", {cpu} chunks on cpu" if cpu else "")
            + f", tiles loss {t.loss_chunk_tokens} mlp {t.mlp_chunk_tokens} rebuild "
              f"{t.rebuild_tile_tokens}")


def layer_profile(max_seq: int):
    """A CPU profile of one decoder layer, taken with one thread like each rank runs with; a
    cached one is reused for 20 minutes only (a profile from another hour's load predicts
    another machine: one left from a busy moment made predictions about 4x too large)."""
    from disttrain.profiling import profile_job_layer

    lens = tuple(s for s in (256, 512, 1024) if s <= max_seq) or (max_seq,)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_job_layer(job_from_dict(job_spec(max_seq, 1024, 1)), lens,
                                 cache_dir=Path("/tmp/disttrain-peers-profile-1thread"),
                                 max_cache_age_s=1200)
    finally:
        torch.set_num_threads(threads)


def run_one(system: str, seq_len: int, steps: int, budget_mib: float, profile) -> dict:
    """One system at one length in fresh ranks; per-rank results folded into one row."""
    plan_text = ""
    if system == "plain":
        ranks = spawn_ranks(plain_worker, 2, seq_len, steps, COMMON)
    elif system == "ds-z3-ckpt":
        ranks = spawn_ranks(deepspeed_worker, 2, seq_len, steps, COMMON)
    elif system in ALST:
        ranks = spawn_ranks(alst_worker, 2, int(system[-1]), seq_len, steps, COMMON)
    elif system == FAIRNESS:  # the spawned ranks read the variables when glibc starts
        saved = {k: os.environ.get(k) for k in MALLOC_ENV}
        os.environ.update(MALLOC_ENV)
        try:
            ranks = spawn_ranks(alst_worker, 2, 2, seq_len, steps, COMMON, fresh=True)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    else:
        job, plan = plan_for(seq_len, budget_mib, steps, profile)
        if system == "disttrain-hand":
            plan = cpu_node_plan(plan)
        elif not plan.feasible:
            reason = plan.rejected[0]["reason"] if plan.rejected else "no candidate"
            return {"system": system, "seq_len": seq_len, "error": f"planner: infeasible ({reason})"}
        plan_text = describe_plan(plan)
        ranks = spawn_ranks(disttrain_worker, 2, job_spec(seq_len, budget_mib, steps), plan)
    times = ranks[0]["step_times"]
    return {"system": system, "seq_len": seq_len, "losses": ranks[0]["losses"],
            "grad_norms": ranks[0]["grad_norms"], "first_loss": ranks[0]["losses"][0],
            "peak_rss": max(r["peak_rss"] for r in ranks),
            "peak_rss_ranks": [r["peak_rss"] for r in ranks],
            "breakdown": ranks[0].get("breakdown"),
            "step_s": statistics.median(times[1:] or times), "plan": plan_text}


def check_losses(rows: list[dict], seq_len: int) -> float:
    """Largest relative loss difference of any step between systems at `seq_len`; raises when
    above LOSS_RTOL."""
    ok = [r for r in rows if r["seq_len"] == seq_len and "error" not in r]
    worst = 0.0
    for step in range(min(len(r["losses"]) for r in ok) if ok else 0):
        values = [r["losses"][step] for r in ok]
        worst = max(worst, (max(values) - min(values)) / abs(values[0]))
    assert worst <= LOSS_RTOL, f"losses disagree at seq {seq_len}: " + "; ".join(
        f"{r['system']} {r['losses']}" for r in ok)
    return worst


def measure(seq_lens: list[int], steps: int = 3, budget_mib: float = BUDGET_MIB,
            systems: tuple[str, ...] = SYSTEMS, log=print, *,
            after_alst=None, on_length=None, extras_max_seq: int = 1 << 30) -> list[dict]:
    """Run every system at every length (length-major); assert every step's loss agrees.
    `after_alst(rows)` is called once, after ALST's runs at the longest length (the extra rows
    of that length then run while it works); `on_length(rows)` after each length. The extra
    rows (EXTRAS) run up to `extras_max_seq`."""
    profile = layer_profile(max(seq_lens))
    rows = []
    for seq_len in seq_lens:
        for system in systems:
            if after_alst is not None and seq_len == max(seq_lens) and system not in (
                    "disttrain", *ALST):
                after_alst(rows)
                after_alst = None
            if system in EXTRAS and seq_len > extras_max_seq:
                continue
            t0 = time.perf_counter()
            row = run_one(system, seq_len, steps, budget_mib, profile)
            rows.append(row)
            log(f"  {system:<17} seq {seq_len:>6}: " + (row.get("error") or (
                f"losses {' '.join(f'{v:.6f}' for v in row['losses'])} peak RSS "
                f"{fmt_mib(row['peak_rss'])} MiB step {row['step_s']:.2f} s {row['plan']}"))
                + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        check_losses(rows, seq_len)
        if on_length is not None:
            on_length(rows)
    return rows


def longest_under(rss_budget_mib: float, target_len: int, steps: int, budget_mib: float,
                  runs: int, log=print) -> list[dict]:
    """disttrain at `target_len` (the length that decides the target), then bisecting upward
    for `runs - 1` more runs while it stays under the RSS budget (doubling until it fails)."""
    profile = layer_profile(target_len)
    rows, lo, hi, seq = [], 0, None, target_len
    for _ in range(runs):
        t0 = time.perf_counter()
        # the planner's budget is the rank's working memory, not its RSS (the interpreter and
        # allocator caches are outside it): where it plans nothing at --budget-mib, it is
        # doubled while it stays below half the RSS budget
        row, plan_mib = run_one("disttrain", seq, steps, budget_mib, profile), budget_mib
        while str(row.get("error", "")).startswith("planner: infeasible") and (
                2 * plan_mib <= rss_budget_mib / 2):
            plan_mib *= 2
            row = run_one("disttrain", seq, steps, plan_mib, profile)
        row["budget_mib"] = plan_mib
        rows.append(row)
        under = "error" not in row and row["peak_rss"] <= rss_budget_mib * 2**20
        log(f"  disttrain (1 GiB search) seq {seq:>7}: peak RSS {fmt_mib(row.get('peak_rss'))} "
            f"MiB {'under' if under else 'over'}, planned for {plan_mib:.0f} MiB "
            f"{row.get('plan', row.get('error', ''))} ({time.perf_counter() - t0:.0f} s)", flush=True)
        lo, hi = (seq, hi) if under else (lo, seq)
        nxt = 2 * seq if hi is None else (lo + hi) // 2
        seq = max(2048, nxt // 2048 * 2048)
        if hi is not None and hi - lo <= 2048:
            break
    return rows


def main(argv: list[str] | None = None) -> int:
    from peers_report import alst_best_fitted_len, plot, report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-mib", type=float, default=BUDGET_MIB,
                        help="per-rank memory budget the planner plans the disttrain row for")
    parser.add_argument("--rss-budget-mib", type=float, default=1024.0,
                        help="per-rank RSS budget for 'longest sequence that fits'")
    parser.add_argument("--search-runs", type=int, default=1,
                        help="disttrain runs for the longest length under the RSS budget (the "
                             "first at 2x ALST's fitted best: it decides the target)")
    parser.add_argument("--search-steps", type=int, default=1)
    parser.add_argument("--extras-max-seq", type=int, default=8192,
                        help="longest length of the extra rows (" + ", ".join(EXTRAS) + ")")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS),
                        choices=(*SYSTEMS, FAIRNESS))
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    search: list[dict] = []
    threads: list[threading.Thread] = []

    def start_search(rows: list[dict]) -> None:
        """Search disttrain's longest length in the background once ALST's fit is known:
        only the extra rows of the longest length run beside it (their times are no target)."""
        target = alst_best_fitted_len(rows, args.rss_budget_mib)
        if args.search_runs and target:
            seq = int(np.ceil(2 * target / 2048)) * 2048
            threads.append(threading.Thread(target=lambda: search.extend(longest_under(
                args.rss_budget_mib, seq, args.search_steps, args.budget_mib,
                args.search_runs))))
            threads[-1].start()

    def partial(rows: list[dict]) -> None:  # a long sweep leaves its rows in the docs as it goes
        if not args.no_docs:
            write_section("peers", report(rows, [], args, time.perf_counter() - t0)
                          + "\n_Partial: the sweep was still running when this was written._\n")

    rows = measure(args.seq, args.steps, args.budget_mib, tuple(args.systems),
                   after_alst=start_search,
                   on_length=partial, extras_max_seq=args.extras_max_seq)
    if not threads:
        start_search(rows)
    for thread in threads:
        thread.join()
    text = report(rows, search, args, time.perf_counter() - t0)
    print(text)
    if not args.no_docs:
        plot(rows, DOCS / "benchmarks_memory.png")
        print(f"wrote {write_section('peers', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
