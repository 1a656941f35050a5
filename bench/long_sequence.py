"""Long-sequence CPU run: NVMe swap + token recompute vs keep everything, measured vs predicted.

One job (the `small` preset with `NUM_LAYERS` decoder layers, fp32, one sequence of
`SEQ_LEN` tokens per step) is planned for a per-rank budget of `MEMORY_GIB` and
`NVME_GIB` of NVMe space (`memory.activation_offload: nvme`): everything cannot stay, and
not every token fits on the NVMe tier either, so the planner swaps part of the token-local
activations to NVMe and recomputes the rest. The same job then runs twice, each in a fresh
subprocess so its RSS high-water mark is its own:

  swap+recompute  the planner's plan;
  keep-all        the same plan (layout, loss tiling) with every layer keep_all and no MLP
                  tiling: plain autograd, measured through the runtime's saved-tensor hook.

Both run with glibc's mmap threshold fixed at 1 MiB (`MALLOC_ENV`), so RSS follows live
tensor bytes. Measured per run: RSS just before the first step (model and optimizer built),
peak RSS (VmHWM), the runtime's `peak_resident_bytes` (saved bytes of the decoder
layers, from metrics.jsonl), step times and losses (which must agree).

Predicted per run: the planner's `bytes_by_category`. The swap plan's come from `plan_job`
(with this CPU's layer profile); the keep-all plan is re-costed by the planner's cost model
on the same request (`predicted_categories`). Comparable with the RSS growth above the
baseline are the categories allocated after that point (`COMPARABLE`): activations, working
set, buffers (the loss chunk), gradients and optimizer states (torch's AdamW creates its
states at the first step; gradients are set to None after every step). Not comparable:
parameters (inside the baseline) and the fixed `reserved` / `fragmentation` allowances.
Target: the measured reduction factor (keep-all growth / swap growth) within 10% of the
predicted one; when missed, the table says which term differs.

    .venv/bin/python bench/long_sequence.py [--seq-len 16384] [--num-layers 4] [--write-docs]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disttrain.profiling import profile_job_layer  # noqa: E402
from disttrain.spec import Job, job_from_dict  # noqa: E402
from planner.export import evaluate_plan  # noqa: E402
from planner.plan import LayerActivationPlan, Plan  # noqa: E402
from planner.costtypes import CostParams  # noqa: E402
from planner.search import plan_job  # noqa: E402

SEQ_LEN = 16384
NUM_LAYERS = 4
STEPS = 2
"""Steps per run: the peak is reached in the first; at 16K tokens a keep-all step takes minutes."""
MEMORY_GIB = 1.6
"""Per-rank budget planned for: keeping everything (no tiling) needs ~3.6 GiB at 16K tokens."""
NVME_GIB = 0.3
"""NVMe space planned for: less than the token-local bytes, so part is recomputed."""
TARGET = 0.10
COMPARABLE = ("activations", "working_set", "buffers", "gradients", "optimizer")
"""Predicted categories allocated after the pre-step RSS baseline (see the module docstring)."""
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""Both runs: glibc serves blocks >= 1 MiB (every activation tensor here) with mmap and returns
them on free, so RSS follows live bytes instead of what the heap kept from earlier steps
(with its default dynamic threshold, freed tensors below 32 MiB stay resident)."""
DOCS = ROOT / "docs" / "activation_runtime.md"
MiB = 2**20


def job_spec(*, seq_len: int = SEQ_LEN, num_layers: int = NUM_LAYERS, steps: int = STEPS,
             memory_gib: float = MEMORY_GIB, nvme_gib: float = NVME_GIB, nvme_dir: Path,
             output_dir: Path, preset: str = "small", name: str = "long-seq",
             nvme_gbps: tuple[float, float] = (0.6, 0.8)) -> dict:
    """The job: one sequence per step, fp32, NVMe-only swap; `nvme_gbps` = (read, write)."""
    return {"name": name, "model": {"preset": preset, "num_layers": num_layers,
                                    "max_seq_len": max(seq_len, 1024)},
            "train": {"seq_len": seq_len, "micro_batch_size": 1, "global_batch_size": 1,
                      "steps": steps, "lr": 1e-3, "min_lr": 1e-4, "seed": 0},
            "data": {"kind": "synthetic"},
            "cluster": {"preset": "cpu-local",
                        "device": {"name": "cpu", "memory_gib": memory_gib,
                                   "peak_tflops": {"fp32": 0.05}},
                        "nvme": {"path": str(nvme_dir), "capacity_gib": nvme_gib,
                                 "read_gbps": nvme_gbps[0], "write_gbps": nvme_gbps[1]}},
            "memory": {"activation_offload": "nvme"}, "parallel": {"zero_stage": 0},
            "output_dir": str(output_dir)}


def keep_all_plan(plan: Plan, *, mlp_tiling: bool = False) -> Plan:
    """`plan` with every layer keep_all; same layout, loss tiling and profile. Without
    `mlp_tiling` the layers are plain (autograd keeps every MLP intermediate)."""
    tiling = plan.tiling if mlp_tiling else dataclasses.replace(plan.tiling, mlp_chunk_tokens=0)
    return dataclasses.replace(
        plan, activations=tuple(LayerActivationPlan(keep_all=True) for _ in plan.activations),
        tiling=tiling)


def predicted_categories(plan: Plan) -> tuple[dict[str, int], dict[str, int]]:
    """(swap plan, keep-all plan) bytes by category from the planner's cost model.

    The swap plan's are its prediction. The keep-all plan (`keep_all_plan`, no MLP tiling) is
    re-costed on the same request (`evaluate_plan`): its resident activations and its working
    set differ, everything else is the same."""
    swap = dict(plan.prediction.bytes_by_category)
    cost_swap, cost_keep = (evaluate_plan(plan, params=TWO_POOLS),
                            evaluate_plan(keep_all_plan(plan), params=TWO_POOLS))
    allowances = swap["reserved"] + swap["fragmentation"]
    drift = abs(cost_swap.device_bytes - (plan.prediction.per_rank_peak_bytes - allowances))
    assert drift <= 1e-6 * plan.prediction.per_rank_peak_bytes + 16, (
        f"re-costed plan differs from its prediction by {drift:.0f} bytes")
    assert round(cost_swap.working_bytes) == swap["working_set"], (cost_swap, swap)
    keep = dict(swap, activations=int(round(cost_keep.activation_bytes)),
                working_set=int(round(cost_keep.working_bytes)))
    return swap, keep


def comparable(categories: dict[str, int]) -> int:
    return sum(categories[k] for k in COMPARABLE)


# -- one run in a fresh process ---------------------------------------------------------------

def current_rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS")


def _child(workdir: Path) -> None:
    """Run the job of workdir/spec.json under workdir/plan.json; write workdir/result.json."""
    from disttrain.metrics import peak_rss_bytes, read_metrics
    from disttrain.trainer import Trainer
    from offload import apply_activation_policy

    job = job_from_dict(json.loads((workdir / "spec.json").read_text()))
    plan = Plan.load(workdir / "plan.json")
    trainer = Trainer(job, plan)
    if trainer.runtime.activations is None:  # keep-all: measure saved bytes through the hook
        trainer.runtime.activations = apply_activation_policy(trainer.runtime.model,
                                                              plan.activations)
    baseline = current_rss_bytes()
    baseline_peak = peak_rss_bytes()
    result = trainer.run()
    records = read_metrics(job.output_dir / "metrics.jsonl")
    (workdir / "result.json").write_text(json.dumps({
        "baseline_rss": baseline, "baseline_peak_rss": baseline_peak,
        "peak_rss": peak_rss_bytes(),
        "losses": result.losses,
        "step_times": [r["step_time_s"] for r in records],
        "peak_resident": max(r["activations"]["peak_resident_bytes"] for r in records),
        "swapped_nvme": [sum(layer["bytes_swapped_nvme"] for layer in r["activations"]["layers"])
                         for r in records],
        "copy_wait_s": [sum(layer["copy_wait_s"] for layer in r["activations"]["layers"])
                        for r in records],
        "tokens_recomputed": [sum(layer["tokens_recomputed"] for layer in r["activations"]["layers"])
                              for r in records],
        "model_states": records[-1]["model_state_bytes"]["device"]}))


def run_fresh(spec: dict, plan: Plan, workdir: Path, timeout_s: float = 1800) -> dict:
    """Train `spec` under `plan` in a new Python process; its measurements as a dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    plan.save(workdir / "plan.json")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **MALLOC_ENV)
    proc = subprocess.run([sys.executable, __file__, "--child", str(workdir)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"run in {workdir} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads((workdir / "result.json").read_text())


# -- the benchmark ----------------------------------------------------------------------------

TWO_POOLS = CostParams(single_pool_on_cpu=False)
"""This bench exercises the activation runtime's tiers as on a GPU node (device, host, NVMe):
the CPU stands in for a device with a host beside it, so it is planned as two pools (the
planner's default for a CPU node is one pool, NVMe only)."""


def plan_for(job: Job, profile_cache: Path | None = None) -> Plan:
    """The planner's plan for `job` with this CPU's measured layer profile, two pools."""
    profile = profile_job_layer(job, cache_dir=profile_cache)
    plan = plan_job(job.plan_request(), profile=profile, params=TWO_POOLS)
    if not plan.feasible:
        raise RuntimeError(f"the planner found no feasible plan: {plan.rejected[:1]}")
    return plan


def measure(*, seq_len: int = SEQ_LEN, num_layers: int = NUM_LAYERS, steps: int = STEPS,
            memory_gib: float = MEMORY_GIB, nvme_gib: float = NVME_GIB, preset: str = "small",
            workdir: Path | None = None) -> dict:
    """Plan, run both policies in fresh processes, and compare measured with predicted."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="disttrain-long-seq-")) if own else workdir
    try:
        spec_of = lambda name: job_spec(  # noqa: E731
            seq_len=seq_len, num_layers=num_layers, steps=steps, memory_gib=memory_gib,
            nvme_gib=nvme_gib, preset=preset, nvme_dir=workdir / "nvme",
            output_dir=workdir / name / "out", name=f"long-seq-{name}")
        job = job_from_dict(spec_of("swap"))
        plan = plan_for(job, workdir / "profile")
        pred_swap, pred_keep = predicted_categories(plan)
        predicted_nvme = plan.prediction.nvme_bytes
        runs = {"keep-all": run_fresh(spec_of("keep"), keep_all_plan(plan), workdir / "keep"),
                "swap+recompute": run_fresh(spec_of("swap"), plan, workdir / "swap")}
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    predicted = {"keep-all": pred_keep, "swap+recompute": pred_swap}
    rows = {}
    for name, run in runs.items():
        pred = predicted[name]
        states = run["model_states"]
        rows[name] = {
            "baseline_rss": run["baseline_rss"], "peak_rss": run["peak_rss"],
            "delta_rss": run["peak_rss"] - run["baseline_rss"],
            "peak_resident": run["peak_resident"],
            "predicted": comparable(pred), "predicted_categories": pred,
            "measured_states": states["gradients"] + states["optimizer"],
            "step_times": run["step_times"], "losses": run["losses"],
            "swapped_nvme": run["swapped_nvme"], "tokens_recomputed": run["tokens_recomputed"],
            "copy_wait_s": run["copy_wait_s"]}
    keep, swap = rows["keep-all"], rows["swap+recompute"]
    measured_factor = keep["delta_rss"] / swap["delta_rss"]
    predicted_factor = keep["predicted"] / swap["predicted"]
    losses_agree = all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(swap["losses"], keep["losses"]))
    return {"config": {"preset": preset, "num_layers": num_layers, "seq_len": seq_len,
                       "steps": steps, "memory_gib": memory_gib, "nvme_gib": nvme_gib,
                       "policy": policy_text(plan), "tiling": dataclasses.asdict(plan.tiling)},
            "rows": rows, "predicted_nvme": predicted_nvme, "measured_factor": measured_factor, "predicted_factor": predicted_factor,
            "factor_error": measured_factor / predicted_factor - 1,
            "losses_agree": losses_agree, "reasons": reasons(rows)}


def policy_text(plan: Plan) -> str:
    """One phrase per layer, e.g. 'L0 swap 67% to nvme + recompute 33%, keep input+attn'."""
    parts = []
    for index, act in enumerate(plan.activations):
        if act.keep_all:
            parts.append(f"L{index} keep all")
            continue
        kept = "+".join(n for n, swapped in (("input", act.swap_input),
                                             ("attn-out", act.swap_attention_output))
                        if not swapped) or "nothing"
        work = []
        if act.swap_fraction > 0:
            work.append(f"swap {act.swap_fraction:.0%} to {act.tier}")
        if act.swap_fraction < 1:
            work.append(f"recompute {1 - act.swap_fraction:.0%}")
        parts.append(f"L{index} {' + '.join(work)}, keep {kept}")
    return "; ".join(parts)


def reasons(rows: dict) -> list[str]:
    """Per run, which term of (measured RSS growth) vs (predicted comparable bytes) differs:
    decoder-layer saved bytes (the runtime's peak_resident vs `activations`), gradients +
    optimizer (measured exactly vs predicted), and the rest of the growth (working set, loss
    chunk, embedding/head activations, allocator) vs working_set + buffers."""
    out = []
    for name, row in rows.items():
        pred = row["predicted_categories"]
        states_pred = pred["gradients"] + pred["optimizer"]
        rest_measured = row["delta_rss"] - row["peak_resident"] - row["measured_states"]
        rest_pred = pred["working_set"] + pred["buffers"]
        out.append(
            f"{name}: saved activations {row['peak_resident'] / MiB:,.0f} MiB measured vs "
            f"{pred['activations'] / MiB:,.0f} predicted; grads+optimizer "
            f"{row['measured_states'] / MiB:,.0f} vs {states_pred / MiB:,.0f}; rest of the RSS "
            f"growth {rest_measured / MiB:,.0f} MiB vs working_set+buffers {rest_pred / MiB:,.0f}")
    return out


def table(result: dict) -> str:
    rows = result["rows"]
    head = (f"{'policy':<16} {'base RSS':>9} {'peak RSS':>9} {'growth':>9} {'predicted':>10} "
            f"{'resident':>9} {'pred act':>9} {'step s (each)':>22} {'NVMe MiB/step':>13} "
            f"{'losses':>26}")
    lines = [head]
    for name, r in rows.items():
        steps = " ".join(f"{t:.1f}" for t in r["step_times"])
        losses = " ".join(f"{x:.5f}" for x in r["losses"])
        lines.append(
            f"{name:<16} {r['baseline_rss'] / MiB:>9,.0f} {r['peak_rss'] / MiB:>9,.0f} "
            f"{r['delta_rss'] / MiB:>9,.0f} {r['predicted'] / MiB:>10,.0f} "
            f"{r['peak_resident'] / MiB:>9,.0f} {r['predicted_categories']['activations'] / MiB:>9,.0f} "
            f"{steps:>22} {max(r['swapped_nvme']) / MiB:>13,.0f} {losses:>26}")
    ok = abs(result["factor_error"]) <= TARGET
    lines.append(f"reduction factor (keep-all growth / swap growth): measured "
                 f"{result['measured_factor']:.3f}, predicted {result['predicted_factor']:.3f}, "
                 f"error {result['factor_error']:+.1%} -> target ±{TARGET:.0%} "
                 f"{'MET' if ok else 'MISSED'}")
    lines.append(f"losses agree (1e-5 relative): {'yes' if result['losses_agree'] else 'NO'}")
    swap = rows["swap+recompute"]
    lines.append(f"NVMe bytes per step: measured {max(swap['swapped_nvme']) / MiB:,.0f} MiB, "
                 f"planner {result['predicted_nvme'] / MiB:,.0f} MiB")
    if not ok:
        lines.append("where measured and predicted differ:")
        lines += [f"  {line}" for line in result["reasons"]]
    return "\n".join(lines)


# -- docs/activation_runtime.md -----------------------------------------------------------------

DOCS_INTRO = """# Activation runtime

`offload.apply_activation_policy` wraps each decoder layer with the plan's policy, leaving the
model file untouched. A `keep_all` layer runs plain autograd (only measured, through a
saved-tensor hook). Any other layer keeps or swaps its input and its attention output (+
log-sum-exp), copies the token-local activations (norms, QKV, MLP intermediates) of a
`swap_fraction` share of the tokens to the CPU arena or to NVMe files through the async copy
engine (`csrc/copy_engine.cpp`, Python threads as the fallback), and drops the rest. In
backward the swapped part is prefetched (started during the previous layer's backward), the
dropped tokens are recomputed from the layer input, and the layer's backward runs; the
attention core is never recomputed, its backward uses the saved output and log-sum-exp. At most
two layers' copies are in flight. Per step the runtime records, per layer, bytes kept and
swapped per tier, tokens recomputed, the peak of resident saved bytes and the time spent
waiting on copies (`metrics.jsonl`, key `activations`).

Every number below is printed by the command shown above it (`--write-docs` rewrites its
section). Machine: shared 2-core CPU, no GPU, 24 GiB; timings are noisy.

How the long-sequence table compares memory: each policy runs in a fresh process; its growth
is peak RSS (VmHWM) minus the RSS just before the first step, with glibc's mmap
threshold fixed at 1 MiB in both runs so freed tensors leave RSS. The planner's categories
allocated after that point are its prediction of the growth: activations + working set +
buffers (loss chunk) + gradients + optimizer states (torch's AdamW creates its states at the
first step). Parameters are inside the baseline; `reserved` and `fragmentation` are fixed
allowances, not allocations. Keep-all is the same plan with every layer keep_all and no MLP
tiling, re-costed by the planner's cost model.
"""
SECTION_TITLES = {"long_sequence": "Long sequence: NVMe swap + token recompute vs keep everything",
                  "overlap": "Overlap: swap-to-NVMe step time vs keep everything"}


def write_docs_section(name: str, text: str, command: str, path: Path = DOCS) -> Path:
    """Replace section `name` of `path` (between marker comments) with `text` and the command
    that printed it; the other section is left as it is."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    current = path.read_text() if path.exists() else DOCS_INTRO + "".join(
        f"\n## {title}\n\n<!-- bench:{key}:begin -->\n_not run yet_\n<!-- bench:{key}:end -->\n"
        for key, title in SECTION_TITLES.items())
    if begin not in current:
        current += f"\n## {SECTION_TITLES[name]}\n\n{begin}\n{end}\n"
    head, rest = current.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = f"```\n$ .venv/bin/{command}\n{text.rstrip()}\n```"
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--num-layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--memory-gib", type=float, default=MEMORY_GIB)
    parser.add_argument("--nvme-gib", type=float, default=NVME_GIB)
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the table into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return 0
    result = measure(seq_len=args.seq_len, num_layers=args.num_layers, steps=args.steps,
                     memory_gib=args.memory_gib, nvme_gib=args.nvme_gib)
    cfg = result["config"]
    text = "\n".join([
        f"{cfg['preset']} preset, {cfg['num_layers']} layers, seq_len {cfg['seq_len']}, fp32, "
        f"{cfg['steps']} steps, each policy in a fresh process; planned for {cfg['memory_gib']} "
        f"GiB per rank and {cfg['nvme_gib']} GiB of NVMe (swap to NVMe only):",
        f"  {cfg['policy']}; tiling {cfg['tiling']}",
        "MiB. growth = peak RSS (VmHWM) - RSS before step 1 (model + optimizer built);",
        f"predicted = planner's {' + '.join(COMPARABLE)};",
        "resident = runtime's peak_resident_bytes, pred act = planner's activations",
        table(result)])
    print(text)
    if args.write_docs:
        command = "python bench/long_sequence.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("write_docs", "child") and v != globals()[k.upper()])
        write_docs_section("long_sequence", text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
