"""Dry-run report: a terminal summary, plan.json, report.md and a memory-timeline PNG.

The baselines (keep everything; recompute all token-local activations; swap everything to
the CPU) are evaluated for the chosen parallel layout with the same cost model as the plan,
so the report shows which of them would fit and how fast they would be.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table

from planner.candidates import KERNEL_NOTE, profiled_stages
from planner.costmodel import Candidate, CostParams
from planner.hardware import HardwareSpec
from planner.mip import evaluate_stage
from planner.outer import outer_flags
from planner.plan import LayerActivationPlan, Plan
from planner.request import PlanRequest
from planner.search import compose_step
from planner.shapes import ModelShape

GiB = 2**30
BASELINES = {
    "keep everything": LayerActivationPlan(keep_all=True),
    "full recompute (token-local)": LayerActivationPlan(swap_fraction=0.0),
    "full CPU swap": LayerActivationPlan(swap_fraction=1.0, tier="cpu", swap_input=True,
                                         swap_attention_output=True),
}


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:,.2f} GiB"


def _overlap(par) -> str:
    """' (collectives overlapped over K token blocks)' when tensor parallelism pipelines them."""
    chunks = getattr(par, "tp_overlap_chunks", 1)
    return f" (collectives overlapped over {chunks} token blocks)" if par.tp > 1 and chunks > 1 else ""


def kernel_note(plan: Plan) -> str:
    """The plan's note on the attention kernel generation its cluster names
    (`HardwareSpec.attention_kernel`, `planner.candidates.KERNEL_NOTE`), else ''."""
    return next((n for n in plan.notes if n.startswith(KERNEL_NOTE)), "")


def _request(plan: Plan) -> tuple[PlanRequest, Candidate]:
    par = plan.parallel
    request = PlanRequest(model=ModelShape(**plan.model),
                          hardware=HardwareSpec.from_dict(plan.prediction.hardware),
                          dtype=plan.dtype, seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                          global_batch_size=plan.global_batch_size, grad_clip=plan.grad_clip,
                          tp_overlap_chunks=par.tp_overlap_chunks,
                          overlap_param_gather=par.overlap_param_gather)
    cand = Candidate(dp=par.dp, tp=par.tp, sp=par.sp, sp_kind=par.sp_kind, pp=par.pp,
                     virtual=2 if par.schedule == "interleaved-1f1b" else 1,
                     num_microbatches=par.num_microbatches, zero_stage=par.zero_stage,
                     micro_batch_size=plan.micro_batch_size)
    return request, cand


def plan_stages(plan: Plan, params: CostParams) -> tuple[PlanRequest, Candidate, list]:
    """The stage set-ups `plan` was solved on: its request and layout, its profile's bytes and
    times (when taken on the target's device type) and its tiling."""
    from planner.profiler import LayerProfile  # torch: only when re-costing a plan

    request, cand = _request(plan)
    profile_dict = plan.prediction.profile
    profile = LayerProfile.from_dict(profile_dict) if "time_coeffs" in profile_dict else None
    setups, _ = profiled_stages(request, cand, params, profile, profile_dict.get("bytes_per_token"),
                                tiling=(plan.tiling.loss_chunk_tokens, plan.tiling.mlp_chunk_tokens,
                                        plan.tiling.rebuild_tile_tokens))
    return request, cand, setups


def evaluate_baselines(plan: Plan, params: CostParams | None = None) -> list[dict]:
    """Each baseline policy on the plan's layout: fits?, peak device bytes, step time."""
    if not plan.feasible:
        return []
    params = params or CostParams()
    _, cand, setups = plan_stages(plan, params)
    cpu_chunks = set(plan.model_states.cpu_chunks)
    rows = []
    for name, act in BASELINES.items():
        evaluations = []
        for setup in setups:
            first, last = setup.layer_range
            persistent = setup.problem.num_chunks - sum(1 for c in range(first, last) if c in cpu_chunks)
            acts = (act,) * len(setup.problem.layers)
            buffers = max(1, plan.model_states.num_prefetch_buffers)
            evaluations.append(evaluate_stage(setup.problem, acts, persistent, buffers, outer_on_cpu=outer_flags(
                setup.problem.outer_chunks, plan.model_states.cpu_outer)))
        step = compose_step(cand, tuple(setups), evaluations)
        violations = sorted({v for ev in evaluations for v in ev.violations})
        rows.append(dict(name=name, fits=not violations, violations=violations,
                         device_bytes=max(ev.device_bytes for ev in evaluations),
                         step_time_s=step.total))
    return rows


def render_summary(plan: Plan) -> Group:
    """Rich renderable: memory by category vs capacity, time breakdown, plan, rejections."""
    pred, par = plan.prediction, plan.parallel
    capacity = pred.hardware.get("device_memory_bytes", 0)
    parts = []
    title = Table.grid(padding=(0, 1))
    title.add_row("[bold]feasible[/]", "[green]yes[/]" if plan.feasible else "[red]no[/]")
    if plan.feasible:
        title.add_row("[bold]layout[/]", f"dp={par.dp} tp={par.tp}{_overlap(par)} sp={par.sp} ({par.sp_kind}) pp={par.pp} "
                      f"microbatches={par.num_microbatches} x {plan.micro_batch_size} seq ZeRO-{par.zero_stage} "
                      f"schedule={par.schedule}")
        title.add_row("[bold]step[/]", f"{pred.step_time_s:.3f} s, {pred.tokens_per_s:,.0f} tokens/s, "
                      f"MFU {pred.mfu:.1%} causal (6N+6LhS) / {pred.mfu_noncausal:.1%} non-causal (6N+12LhS)")
    if plan.feasible:
        title.add_row("[bold]model states[/]", model_states_text(plan))
    if kernel_note(plan):
        title.add_row("[bold]attention[/]", kernel_note(plan).removeprefix("attention "))
    title.add_row("[bold]solver[/]", f"{plan.solver.backend}: {plan.solver.status}, gap "
                  f"{plan.solver.gap:.2%}, {plan.solver.solve_time_s:.2f} s")
    shortfall = smallest_shortfall(plan)
    if shortfall:
        title.add_row("[bold red]closest miss[/]", shortfall)
    parts.append(title)
    if plan.feasible:
        memory = Table(title=f"per-rank device memory (capacity {_gib(capacity)})")
        memory.add_column("category")
        memory.add_column("bytes", justify="right")
        memory.add_column("share", justify="right")
        for name, value in pred.bytes_by_category.items():
            memory.add_row(name, _gib(value), f"{value / capacity:.1%}" if capacity else "")
        memory.add_row("[bold]peak[/]", f"[bold]{_gib(pred.per_rank_peak_bytes)}[/]",
                       f"{pred.per_rank_peak_bytes / capacity:.1%}" if capacity else "")
        parts.append(memory)
        times = Table(title="step time")
        times.add_column("part")
        times.add_column("seconds", justify="right")
        for name, value in pred.time_breakdown.items():
            times.add_row(name, f"{value:.4f}")
        parts.append(times)
        parts.append(_policy_table(plan))
        base = Table(title="baselines on the same layout")
        for column in ("policy", "fits", "peak device", "step s"):
            base.add_column(column)
        for row in evaluate_baselines(plan):
            base.add_row(row["name"], "yes" if row["fits"] else "[red]no[/]",
                         _gib(row["device_bytes"]), f"{row['step_time_s']:.3f}")
        parts.append(base)
    rejected = Table(title=f"rejected layouts (top 8 of {len(plan.rejected)})")
    rejected.add_column("candidate")
    rejected.add_column("reason")
    for entry in plan.rejected[:8]:
        rejected.add_row(_candidate_text(entry["candidate"]), entry["reason"])
    parts.append(rejected)
    return Group(*parts)


def model_states_text(plan: Plan) -> str:
    """Where the model states live: the layer chunks on the CPU, and the outer states
    (embedding, final norm + head) kept on the device or held as CPU chunks."""
    ms = plan.model_states
    if not ms.num_chunks and not ms.cpu_outer:
        return f"ZeRO-{plan.parallel.zero_stage}, all on the device"
    outer = ("embedding" if plan.model.get("tie_embeddings") else "embedding, final norm + head")
    on_cpu = " + ".join(ms.cpu_outer)
    return (f"{len(ms.cpu_chunks)} of {ms.num_chunks} layer chunks on the CPU; "
            + (f"{on_cpu} states as CPU chunks (CPU optimizer)" if on_cpu else f"{outer} on the device"))


def smallest_shortfall(plan: Plan) -> str | None:
    """For an infeasible plan: the rejected layout that missed by the fewest bytes, and why."""
    if plan.feasible:
        return None
    misses = [r for r in plan.rejected if r.get("shortfall_bytes") is not None]
    if not misses:
        return plan.rejected[0]["reason"] if plan.rejected else "no candidate layout"
    best = min(misses, key=lambda r: r["shortfall_bytes"])
    return (f"{_candidate_text(best['candidate'])}: short by {_gib(best['shortfall_bytes'])}: "
            f"{best['reason']}")


def _candidate_text(cand: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cand.items())


def _policy_rows(plan: Plan) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for act in plan.activations:
        if act.keep_all:
            key = "keep everything"
        elif act.selective:
            key = "selective op checkpointing (keep every other matmul + attn-out, recompute rest)"
        else:
            kept = [n for n, s in (("input", act.swap_input), ("attn-out", act.swap_attention_output)) if not s]
            key = (f"swap {act.swap_fraction:.0%} token-local to {act.tier}, recompute rest; keep "
                   f"{'+'.join(kept) or 'nothing'}")
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def _policy_table(plan: Plan) -> Table:
    table = Table(title="activation policy (layers per choice)")
    table.add_column("policy")
    table.add_column("layers", justify="right")
    for key, count in _policy_rows(plan):
        table.add_row(key, str(count))
    return table


def memory_timeline(plan: Plan) -> tuple[list[str], dict[str, list[float]]]:
    """Device bytes of the first stage over one microbatch's forward and backward, by kind."""
    cats = plan.prediction.bytes_by_category
    first, last = plan.parallel.stages[0] if plan.parallel.stages else (0, len(plan.activations))
    resident = plan.prediction.activation_bytes_per_layer[first:last]
    base = sum(v for k, v in cats.items() if k not in ("activations", "working_set"))
    inflight_other = max(0.0, cats.get("activations", 0) - sum(resident))
    labels, series = [], {"states+buffers": [], "activations": [], "working set": []}
    kept = 0.0
    for index, size in enumerate(resident):
        kept += size
        labels.append(f"F{first + index}")
        series["states+buffers"].append(base)
        series["activations"].append(inflight_other + kept)
        series["working set"].append(0.0)
    for index in reversed(range(len(resident))):
        labels.append(f"B{first + index}")
        series["states+buffers"].append(base)
        series["activations"].append(inflight_other + kept)
        series["working set"].append(cats.get("working_set", 0))
        kept -= resident[index]
    return labels, series


def _plot(plan: Plan, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, series = memory_timeline(plan)
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(labels))
    ax.stackplot(xs, *[[v / GiB for v in vals] for vals in series.values()], labels=list(series))
    ax.axhline(plan.prediction.hardware.get("device_memory_bytes", 0) / GiB, color="red",
               linestyle="--", label="device capacity")
    step = max(1, len(labels) // 16)
    ax.set_xticks(list(xs)[::step], labels[::step])
    ax.set_xlabel("layer step (F forward, B backward), stage 0, last microbatch")
    ax.set_ylabel("GiB")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("predicted device memory per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_markdown(plan: Plan) -> str:
    pred, par = plan.prediction, plan.parallel
    lines = ["# disttrain plan", "", f"- feasible: **{'yes' if plan.feasible else 'no'}**",
             f"- model: {plan.model.get('num_layers')} layers, hidden {plan.model.get('hidden_size')}, "
             f"{plan.dtype}, sequence {plan.seq_len:,}, global batch {plan.global_batch_size}",
             f"- cluster: {pred.hardware.get('name')} ({pred.hardware.get('nodes')} x "
             f"{pred.hardware.get('devices_per_node')} {pred.hardware.get('device_name')})"
             + (f"; {kernel_note(plan).split(':')[0]}" if kernel_note(plan) else ""),
             f"- solver: {plan.solver.backend}, {plan.solver.status}, gap {plan.solver.gap:.3%}, "
             f"{plan.solver.solve_time_s:.2f} s", ""]
    if not plan.feasible:
        lines += [f"**No layout fits.** Closest miss: {smallest_shortfall(plan)}", ""]
    if plan.feasible:
        lines += [f"## Layout", "", f"dp={par.dp}, tp={par.tp}{_overlap(par)}, sp={par.sp} ({par.sp_kind}), pp={par.pp}, "
                  f"microbatches={par.num_microbatches} of {plan.micro_batch_size} sequences, ZeRO-{par.zero_stage}, stages {list(par.stages)}; "
                  f"loss chunk {plan.tiling.loss_chunk_tokens} tokens, MLP tile {plan.tiling.mlp_chunk_tokens} tokens, "
                  f"rebuild tile {plan.tiling.rebuild_tile_tokens} tokens, schedule {par.schedule}", "",
                  f"Model states: {model_states_text(plan)}.", "",
                  "## Memory per rank", "", "| category | GiB |", "|---|---:|"]
        lines += [f"| {k} | {v / GiB:.2f} |" for k, v in pred.bytes_by_category.items()]
        lines += [f"| **peak** | **{pred.per_rank_peak_bytes / GiB:.2f}** |", "",
                  f"Host per rank {pred.host_bytes / GiB:.1f} GiB, NVMe per rank {pred.nvme_bytes / GiB:.1f} GiB.", "",
                  "![memory timeline](memory_timeline.png)", "", "## Step time", "",
                  "| part | s |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in pred.time_breakdown.items()]
        lines += [f"| **step** | **{pred.step_time_s:.4f}** |", "",
                  f"{pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.1%} (causal: 6N + 6LhS model FLOPs per "
                  f"token), {pred.mfu_noncausal:.1%} non-causal (6N + 12LhS, Megatron's convention).", "",
                  "## Activation policy", "", "| policy | layers |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in _policy_rows(plan)]
        if plan.memory_layout:
            lines += ["", f"Memory layout: arena {plan.memory_layout['arena_bytes'] / GiB:.2f} GiB per "
                      f"microbatch, fragmentation ratio {plan.memory_layout['fragmentation_ratio']:.3f} "
                      f"(layer arena {plan.memory_layout['inner_fragmentation_ratio']:.3f})."]
        lines += ["", "## Baselines on the same layout", "", "| policy | fits | peak device GiB | step s |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r['name']} | {'yes' if r['fits'] else 'no: ' + '; '.join(r['violations'])} | "
                  f"{r['device_bytes'] / GiB:.2f} | {r['step_time_s']:.3f} |" for r in evaluate_baselines(plan)]
    if plan.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in plan.notes]
    lines += ["", f"## Rejected layouts ({len(plan.rejected)})", "", "| candidate | reason |", "|---|---|"]
    lines += [f"| {_candidate_text(r['candidate'])} | {r['reason']} |" for r in plan.rejected]
    return "\n".join(lines) + "\n"


def write_report(plan: Plan, out_dir: str | Path) -> list[Path]:
    """Write plan.json, report.md and (for a feasible plan) memory_timeline.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "plan.json", out / "report.md"]
    plan.save(paths[0])
    paths[1].write_text(report_markdown(plan))
    if plan.feasible and plan.activations:
        png = out / "memory_timeline.png"
        _plot(plan, png)
        paths.append(png)
    return paths
