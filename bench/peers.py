"""disttrain against the systems a user would otherwise pick, on the same job and machine.

One small Llama (explicit shape below), the same synthetic data, the same global batch (2
sequences, one per rank), 2 gloo ranks with one thread each, fp32, over a sweep of sequence
lengths. Systems:

  plain      PyTorch DDP, every activation kept
  deepspeed  DeepSpeed ZeRO-3, every decoder layer under deepspeed.checkpointing.checkpoint
  disttrain  disttrain under its own plan (planner free; per-rank device budget `--budget-mib`,
             planned with a CPU profile of one layer)

and, where plain fits the RSS budget, disttrain once more planned for `AMPLE_MIB` (room for
everything): its step time against plain's is the plan's overhead vs keep-everything.

Every (system, length) runs in freshly spawned ranks so high-water marks do not leak between
runs. Measured per run: peak RSS per rank (VmHWM), the runtime's own tracked bytes where it
has them (disttrain: model states + peak resident saved activations), median step time after
the first (warm-up) step, first-step loss (asserted equal across systems).

    .venv/bin/python bench/peers.py [--seq 2048 4096 8192 16384] [--steps 3] [--budget-mib 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_sections import DOCS, fmt_mib, md_table, write_section  # noqa: E402

from disttrain.metrics import peak_rss_bytes  # noqa: E402
from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402

SYSTEMS = ("plain", "deepspeed", "disttrain")
SHAPE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=352,
             vocab_size=8192, max_seq_len=65536)
"""The model of every run: a 4-layer Llama, 8K vocabulary (small enough for 2 CPU cores)."""
GLOBAL_BATCH, LR, SEED = 2, 1e-3, 0
BUDGET_MIB = 128.0
"""disttrain's per-rank device budget: what its plan may hold besides the swap stores (the
planner's peak includes the backward working set, so 16K tokens need ~100 MiB here)."""
AMPLE, AMPLE_MIB = "disttrain-ample", 4096.0
"""disttrain planned for a per-rank budget where keeping everything fits."""
LOSS_RTOL = 1e-4  # first-step losses of the three systems must agree to this relative tolerance


def job_spec(seq_len: int, budget_mib: float, steps: int) -> dict:
    """The disttrain job: 2 CPU ranks whose 'device' memory is the per-rank budget."""
    return {"name": f"peers-{seq_len}", "model": {"dtype": "fp32", **SHAPE},
            "train": {"seq_len": seq_len, "micro_batch_size": 1,
                      "global_batch_size": GLOBAL_BATCH, "steps": steps, "lr": LR,
                      "min_lr": LR, "seed": SEED, "grad_clip": 1.0, "weight_decay": 0.0},
            "data": {"kind": "synthetic"},
            "cluster": {"preset": "cpu-local", "devices_per_node": 2,
                        "device": {"name": "cpu", "memory_gib": budget_mib / 1024,
                                   "peak_tflops": {"fp32": 0.05, "bf16": 0.025}},
                        "host_memory_gib": 2 * budget_mib / 1024},
            "launch": {"launcher": "torchrun"}, "output_dir": "/tmp/disttrain-peers"}


def _batches(seq_len: int):
    from disttrain.data import build_batches

    return build_batches("synthetic", None, vocab_size=SHAPE["vocab_size"], seq_len=seq_len,
                         micro_batch_size=1, seed=SEED)


def _global_mean(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _result(losses: list[float], times: list[float], tracked: int | None) -> dict:
    return {"losses": losses, "step_times": times, "peak_rss": peak_rss_bytes(),
            "tracked_bytes": tracked}


def plain_worker(rank: int, world: int, seq_len: int, steps: int) -> dict:
    """PyTorch DDP, keep everything; rank r takes global sequence r of each step."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from disttrain.model import build_model
    from planner.shapes import ModelShape

    model = DistributedDataParallel(build_model(ModelShape(**SHAPE), seed=SEED))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    batches, losses, times = _batches(seq_len), [], []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens, targets = batches.get(step, rank)
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.item()))
    return _result(losses, times, None)


class _Checkpointed(torch.nn.Module):
    """A decoder layer whose activations DeepSpeed drops and recomputes in backward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        import deepspeed

        return deepspeed.checkpointing.checkpoint(self.layer, x, cos, sin)


def deepspeed_config() -> dict:
    """ZeRO-3 without offload, fp32, torch AdamW (no JIT-built CPU Adam), clipping at 1.0."""
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
            "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                         "contiguous_memory_optimization": False},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def deepspeed_worker(rank: int, world: int, seq_len: int, steps: int) -> dict:
    """DeepSpeed ZeRO-3 + per-layer activation checkpointing on gloo (no shm op build)."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops
    import torch.nn.functional as F

    from disttrain.model import build_model
    from planner.shapes import ModelShape

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = deepspeed_config()
    model = build_model(ModelShape(**SHAPE), seed=SEED)
    for index in range(len(model.layers)):
        model.layers[index] = _Checkpointed(model.layers[index])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    deepspeed.checkpointing.configure(None, deepspeed_config=config)
    batches, losses, times = _batches(seq_len), [], []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens, targets = batches.get(step, rank)
        loss = F.cross_entropy(engine(tokens).float().flatten(0, 1), targets.flatten())
        engine.backward(loss), engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.item()))
    return _result(losses, times, None)


def disttrain_worker(rank: int, world: int, spec: dict, plan) -> dict:
    """disttrain's runtime under `plan`; tracked bytes = model states + peak saved activations."""
    from disttrain.engine import build_runtime

    job = job_from_dict(spec)
    runtime = build_runtime(job, plan, rank=rank)
    batches, losses, times, tracked = _batches(job.spec.train.seq_len), [], [], 0
    try:
        for step in range(job.spec.train.steps):
            t0 = time.perf_counter()
            loss = runtime.forward_backward(step, batches)
            runtime.states.clip_grad_norm(1.0), runtime.states.step(LR)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            stats = runtime.activation_stats()
            states = sum(sum(v.values()) for v in runtime.states.bytes_by_place().values())
            resident = stats["peak_resident_bytes"] if stats is not None else 0
            tracked = max(tracked, states + resident)
    finally:
        runtime.close()
    return _result(losses, times, tracked)


def plan_for(seq_len: int, budget_mib: float, steps: int, profile):
    """disttrain's own plan for this length (planner free to choose everything)."""
    from planner.search import plan_job

    job = job_from_dict(job_spec(seq_len, budget_mib, steps))
    return job, plan_job(job.plan_request(), profile, with_layout=False)


def describe_plan(plan) -> str:
    par = plan.parallel
    kept = sum(a.keep_all for a in plan.activations)
    swap = [a.swap_fraction for a in plan.activations if not a.keep_all]
    tiers = [a.tier for a in plan.activations if not a.keep_all]
    tier_text = ", ".join(f"{t} {tiers.count(t)}" for t in sorted(set(tiers)))
    cpu = len(plan.model_states.cpu_chunks)
    return (f"dp{par.dp} sp{par.sp} pp{par.pp} z{par.zero_stage}, keep {kept}/"
            f"{len(plan.activations)} layers" + (f", swap {np.mean(swap):.2f} ({tier_text})" if swap else "")
            + (f", {cpu} chunks on cpu" if cpu else "")
            + f", tiles loss {plan.tiling.loss_chunk_tokens} mlp {plan.tiling.mlp_chunk_tokens}")


def layer_profile(max_seq: int):
    """A CPU profile of one decoder layer, taken with one thread like each rank runs with."""
    from disttrain.profiling import profile_job_layer

    lens = tuple(s for s in (256, 512, 1024) if s <= max_seq) or (max_seq,)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_job_layer(job_from_dict(job_spec(max_seq, 1024, 1)), lens,
                                 cache_dir=Path("/tmp/disttrain-peers-profile-1thread"))
    finally:
        torch.set_num_threads(threads)


def run_one(system: str, seq_len: int, steps: int, budget_mib: float, profile) -> dict:
    """One system at one length in fresh ranks; per-rank results folded into one row."""
    plan_text = ""
    if system == "plain":
        ranks = spawn_ranks(plain_worker, 2, seq_len, steps)
    elif system == "deepspeed":
        ranks = spawn_ranks(deepspeed_worker, 2, seq_len, steps)
    else:
        job, plan = plan_for(seq_len, budget_mib, steps, profile)
        if not plan.feasible:
            reason = plan.rejected[0]["reason"] if plan.rejected else "no candidate"
            return {"system": system, "seq_len": seq_len, "error": f"planner: infeasible ({reason})"}
        plan_text = describe_plan(plan)
        ranks = spawn_ranks(disttrain_worker, 2, job_spec(seq_len, budget_mib, steps), plan)
    times = ranks[0]["step_times"]
    tracked = [r["tracked_bytes"] for r in ranks if r["tracked_bytes"] is not None]
    return {"system": system, "seq_len": seq_len, "first_loss": ranks[0]["losses"][0],
            "peak_rss": max(r["peak_rss"] for r in ranks),
            "peak_rss_ranks": [r["peak_rss"] for r in ranks],
            "tracked_bytes": max(tracked) if tracked else None,
            "step_s": statistics.median(times[1:] or times), "plan": plan_text}


def measure(seq_lens: list[int], steps: int = 3, budget_mib: float = BUDGET_MIB,
            systems: tuple[str, ...] = SYSTEMS, log=print, *, ample_mib: float = AMPLE_MIB,
            rss_budget_mib: float = 1024.0) -> list[dict]:
    """Run every system at every length; assert first-step losses agree per length. Where plain
    fits `rss_budget_mib`, disttrain also runs planned for `ample_mib` (everything fits):
    the 'disttrain-ample' row, for the plan's overhead vs keep-everything."""
    profile = layer_profile(max(seq_lens))
    rows = []
    for seq_len in seq_lens:
        for system in systems + (AMPLE,):
            plain = next((r for r in rows if r["system"] == "plain" and r["seq_len"] == seq_len
                          and "error" not in r), None)
            if system == AMPLE and (plain is None or plain["peak_rss"] > rss_budget_mib * 2**20):
                continue
            t0 = time.perf_counter()
            if system == AMPLE:
                row = dict(run_one("disttrain", seq_len, steps, ample_mib, profile), system=AMPLE)
            else:
                row = run_one(system, seq_len, steps, budget_mib, profile)
            rows.append(row)
            log(f"  {system:<10} seq {seq_len:>6}: " + (row.get("error") or (
                f"loss {row['first_loss']:.6f} peak RSS {fmt_mib(row['peak_rss'])} MiB "
                f"step {row['step_s']:.2f} s {row['plan']}")) + f" ({time.perf_counter() - t0:.0f} s)")
        losses = [r["first_loss"] for r in rows if r["seq_len"] == seq_len and "error" not in r]
        assert max(losses) - min(losses) <= LOSS_RTOL * abs(losses[0]), (
            f"first-step losses disagree at seq {seq_len}: {losses}")
    return rows


def derived(rows: list[dict], rss_budget_mib: float) -> dict:
    """Per system: slope (bytes/token, least squares of peak RSS over tokens per rank, fitted
    over the lengths every system ran so slopes compare), the longest swept length within the
    RSS budget, and the fitted length at the budget."""
    out = {}
    ran = [{r["seq_len"] for r in rows if r["system"] == s and "error" not in r}
           for s in {r["system"] for r in rows} if s in SYSTEMS]
    common = set.intersection(*ran) if ran else set()
    for system in [s for s in SYSTEMS if any(r["system"] == s for r in rows)]:
        ok = [r for r in rows if r["system"] == system and "error" not in r]
        fit = [r for r in ok if r["seq_len"] in common]
        x = np.array([r["seq_len"] for r in fit], dtype=float)
        y = np.array([r["peak_rss"] for r in fit], dtype=float)
        slope, intercept = np.polyfit(x, y, 1) if len(fit) >= 2 else (float("nan"), float("nan"))
        fits = [r["seq_len"] for r in ok if r["peak_rss"] <= rss_budget_mib * 2**20]
        fitted = (rss_budget_mib * 2**20 - intercept) / slope if slope > 0 else float("inf")
        out[system] = {"slope": slope, "intercept": intercept,
                       "longest_measured": max(fits) if fits else 0, "longest_fitted": fitted,
                       "step_s": {r["seq_len"]: r["step_s"] for r in ok},
                       "peak": {r["seq_len"]: r["peak_rss"] for r in ok},
                       "fit_lens": sorted(common)}
    return out


def targets(d: dict, rss_budget_mib: float, ample: dict[int, float] | None = None
            ) -> list[tuple[str, bool | None, str]]:
    """(target, met?, measured evidence); None when the sweep cannot decide it. `ample`:
    seq_len -> step time of disttrain planned with room for everything."""
    out: list[tuple[str, bool | None, str]] = []
    if not {"disttrain", "deepspeed", "plain"} <= set(d):
        return out
    dt, ds, pl = d["disttrain"], d["deepspeed"], d["plain"]
    out.append(("disttrain bytes/token <= 1/2 of DeepSpeed ZeRO-3+ckpt",
                dt["slope"] <= 0.5 * ds["slope"],
                f"{dt['slope']:,.0f} vs {ds['slope']:,.0f} B/token "
                f"(ratio {dt['slope'] / ds['slope']:.2f})"))
    out.append(("disttrain bytes/token <= 1/4 of plain", dt["slope"] <= 0.25 * pl["slope"],
                f"{dt['slope']:,.0f} vs {pl['slope']:,.0f} B/token "
                f"(ratio {dt['slope'] / pl['slope']:.2f})"))
    both = sorted(set(dt["step_s"]) & set(ds["step_s"]))
    ratios = {s: dt["step_s"][s] / ds["step_s"][s] for s in both}
    out.append(("disttrain step time <= DeepSpeed's where both run",
                all(r <= 1.0 for r in ratios.values()) if ratios else None,
                ", ".join(f"{s}: {r:.2f}x" for s, r in ratios.items())))
    over = {s: t / pl["step_s"][s] - 1 for s, t in sorted((ample or {}).items())
            if s in pl["step_s"]}
    out.append((f"plan overhead vs keep-everything <= 10% where everything fits (disttrain "
                f"planned for {AMPLE_MIB:.0f} MiB vs plain, at the lengths where plain's RSS "
                f"<= {rss_budget_mib:.0f} MiB)",
                all(v <= 0.10 for v in over.values()) if over else None,
                ", ".join(f"{s}: {v:+.0%}" for s, v in over.items()) or "plain fits at no length"))
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
    ax.set(xlabel="sequence length (tokens per rank)", ylabel="peak RSS per rank (MiB)")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def report(rows: list[dict], budget_mib: float, rss_budget_mib: float, steps: int) -> str:
    """The Markdown section (also printed)."""
    d = derived(rows, rss_budget_mib)
    table = md_table(
        ["system", "seq_len", "first loss", "peak RSS/rank MiB (r0, r1)", "tracked MiB",
         "median step s", "plan"],
        [[r["system"], r["seq_len"], r.get("error") or f"{r['first_loss']:.6f}",
          "" if "error" in r else " / ".join(fmt_mib(b) for b in r["peak_rss_ranks"]),
          "" if "error" in r else fmt_mib(r["tracked_bytes"]),
          "" if "error" in r else f"{r['step_s']:.2f}", r.get("plan", "")] for r in rows])
    fig = md_table(["system", "slope B/token (fit)", "intercept MiB",
                    f"longest swept len <= {rss_budget_mib:.0f} MiB",
                    f"fitted len at {rss_budget_mib:.0f} MiB"],
                   [[s, f"{v['slope']:,.0f}", fmt_mib(v["intercept"]), v["longest_measured"],
                     f"{v['longest_fitted']:,.0f}"] for s, v in d.items()])
    ratio_rows = []
    for s in sorted({r["seq_len"] for r in rows}):
        times = {k: v["step_s"].get(s) for k, v in d.items()}
        if times.get("disttrain") and times.get("deepspeed") and times.get("plain"):
            ratio_rows.append([s, f"{times['disttrain'] / times['deepspeed']:.2f}",
                               f"{times['disttrain'] / times['plain']:.2f}",
                               f"{times['deepspeed'] / times['plain']:.2f}"])
    ratios = md_table(["seq_len", "disttrain/deepspeed", "disttrain/plain", "deepspeed/plain"],
                      ratio_rows)
    fit_lens = next(iter(d.values()))["fit_lens"] if d else []
    verdict = "\n".join(f"- {'MET' if ok else 'NOT MET' if ok is not None else 'UNDECIDED'}: "
                        f"{name} — {why}" for name, ok, why in targets(d, rss_budget_mib, {
                            r["seq_len"]: r["step_s"] for r in rows
                            if r["system"] == AMPLE and "error" not in r}))
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items() if k != "max_seq_len")
    return (f"## Peers: plain PyTorch DDP, DeepSpeed ZeRO-3 + checkpointing, disttrain\n\n"
            f"`bench/peers.py`: model {shape}; fp32; global batch {GLOBAL_BATCH} "
            f"(one sequence per rank); 2 gloo ranks x 1 thread; {steps} steps per run, median "
            f"of steps 2..{steps}; fresh processes per run; disttrain planned with a per-rank "
            f"device budget of {budget_mib:.0f} MiB and a CPU layer profile. Peak RSS is the "
            f"whole process (torch, DeepSpeed and the interpreter included). On a CPU-only machine "
            f"the 'cpu' swap tier is the same RAM, so swapped activations still count in RSS; "
            f"the tracked column is what disttrain holds outside its stores (model states + "
            f"peak resident saved activations), i.e. what a GPU's memory would hold.\n\n{table}\n\n"
            f"![peak memory](benchmarks_memory.png)\n\nDerived (fit of peak RSS over sequence "
            f"length at the lengths every system ran, {fit_lens}; RSS budget for 'fits' = "
            f"{rss_budget_mib:.0f} MiB per rank):\n\n{fig}\n\n"
            f"Step-time ratios:\n\n{ratios}\n\nTargets:\n\n{verdict}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-mib", type=float, default=BUDGET_MIB,
                        help="per-rank device memory the planner plans disttrain for")
    parser.add_argument("--rss-budget-mib", type=float, default=1024.0,
                        help="per-rank RSS budget for 'longest sequence that fits'")
    parser.add_argument("--no-docs", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows = measure(args.seq, args.steps, args.budget_mib, rss_budget_mib=args.rss_budget_mib)
    text = report(rows, args.budget_mib, args.rss_budget_mib, args.steps)
    print(text)
    if not args.no_docs:
        plot(rows, DOCS / "benchmarks_memory.png")
        print(f"wrote {write_section('peers', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
