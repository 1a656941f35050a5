"""CPU cost model against the runtime, part by part: the planner's pick for bench/peers.py's
job, the same job with its layout fixed to each other family, and the hand-set CPU plan
(`peers.cpu_node_plan`), predicted and measured side by side in one run.

Predicted parts: the planner's `StepTime` (compute, recompute, exposed transfer,
communication, optimizer, page faults). Measured per rank (median of steps 2..n): wall time of
the forward + backward and of the clip + update; inside the forward + backward the seconds
spent in gloo collectives (a blocking call also waits for the slower rank), in the activation
runtime's recomputes and copy waits; and the process's CPU time split into user and kernel
(`os.times`): the kernel share is where a memory-bound plan's page faults show, and CPU time
is what the cores did whatever else the shared machine ran. Rounds alternate the plans; the
load average is printed with every run.

    .venv/bin/python bench/cpu_fit.py [--seq 4096] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import BUDGET_MIB, cpu_node_plan, describe_plan, job_spec, layer_profile, plan_for  # noqa: E402

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402

COLLECTIVES = ("all_to_all_single", "all_gather_single", "reduce_scatter_single", "all_reduce")
PARTS = ("wall", "fwd_bwd", "update", "cpu_user", "cpu_kernel", "collectives", "recompute",
         "copy_wait")


def _timed_collectives(acc: dict) -> None:
    """Wrap torch.distributed's collectives: seconds in each call (and in `wait` of an async
    one) are added to `acc`."""
    import torch.distributed as dist

    def wrap(name):
        fn = getattr(dist, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            acc["collectives"] += time.perf_counter() - start
            if kwargs.get("async_op") and out is not None:
                work = out

                class Waited:
                    def wait(self, *a, **k):
                        t0 = time.perf_counter()
                        result = work.wait(*a, **k)
                        acc["collectives"] += time.perf_counter() - t0
                        return result

                    def __getattr__(self, attr):
                        return getattr(work, attr)
                return Waited()
            return out
        setattr(dist, name, timed)

    for name in COLLECTIVES:
        wrap(name)


def fit_worker(rank: int, world: int, spec: dict, plan) -> dict:
    """Per-step measured parts of this rank under `plan`."""
    from disttrain.data import build_batches
    from disttrain.engine import build_runtime
    from disttrain.parallel.zero import ZeroModelStates
    from disttrain.spec import job_from_dict

    acc = {"collectives": 0.0}
    _timed_collectives(acc)
    job = job_from_dict(spec)
    tr = job.spec.train
    runtime = build_runtime(job, plan, rank=rank)
    batches = build_batches("synthetic", None, vocab_size=job.shape.vocab_size,
                            seq_len=tr.seq_len, micro_batch_size=1, seed=tr.seed)
    rows = []
    try:
        for step in range(tr.steps):
            acc["collectives"] = 0.0
            if isinstance(runtime.states, ZeroModelStates):
                runtime.states.begin_step(tr.lr, num_microbatches=runtime.accum_steps,
                                          grad_clip=tr.grad_clip)
            c0, t0 = os.times(), time.perf_counter()
            runtime.forward_backward(step, batches)
            t1, c1, comm = time.perf_counter(), os.times(), acc["collectives"]
            runtime.states.clip_grad_norm(tr.grad_clip)
            runtime.states.step(tr.lr)
            t2 = time.perf_counter()
            stats = runtime.activation_stats()
            layers = stats["layers"] if stats else []
            rows.append(dict(wall=t2 - t0, fwd_bwd=t1 - t0, update=t2 - t1,
                             cpu_user=c1.user - c0.user, cpu_kernel=c1.system - c0.system,
                             collectives=comm, recompute=sum(x["recompute_s"] for x in layers),
                             copy_wait=sum(x["copy_wait_s"] for x in layers)))
    finally:
        runtime.close()
    rows = rows[1:] or rows
    return {k: statistics.median(r[k] for r in rows) for k in PARTS}


def plans_for(seq: int, steps: int, budget_mib: float, profile) -> dict:
    """The planner's pick, its best plan for each other (dp, sp) layout, the hand-set plan."""
    from planner.search import plan_job

    job, plan = plan_for(seq, budget_mib, steps, profile)
    out = {"planner": plan}
    request = job.plan_request()
    for name, fixed in (("dp2", dict(dp=2, sp=1)), ("sp2 ulysses", dict(dp=1, sp=2, sp_kind="ulysses"))):
        other = plan_job(dataclasses.replace(request, pp=1, tp=1, **fixed), profile, with_layout=False)
        if other.feasible and other.parallel != plan.parallel:
            out[f"best {name}"] = other
    hand = cpu_node_plan(plan)    # its microbatch count as the runtime runs it (one per sequence)
    out["hand"] = dataclasses.replace(hand, parallel=dataclasses.replace(
        hand.parallel, num_microbatches=plan.global_batch_size // hand.parallel.dp))
    return out


def predicted_parts(plan) -> dict:
    """The plan's step time and parts, re-costed (a hand-set plan has no prediction of its own)."""
    from planner.costmodel import CostParams
    from planner.mip import evaluate_stage
    from planner.outer import outer_flags
    from planner.report import plan_stages
    from planner.search import compose_step

    _, cand, setups = plan_stages(plan, CostParams())
    cpu = set(plan.model_states.cpu_chunks)
    evaluations = []
    for setup in setups:
        first, last = setup.layer_range
        persistent = setup.problem.num_chunks - sum(1 for c in range(first, last) if c in cpu)
        evaluations.append(evaluate_stage(
            setup.problem, tuple(plan.activations[first:last]), persistent,
            max(1, plan.model_states.num_prefetch_buffers),
            outer_on_cpu=outer_flags(setup.problem.outer_chunks, plan.model_states.cpu_outer)))
    step = compose_step(cand, tuple(setups), evaluations)
    return {"total": step.total, **step.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    args = parser.parse_args(argv)
    for name, value in (("--seq", args.seq), ("--steps", args.steps), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{name}: must be >= 1, got {value}")
    print(f"load {os.getloadavg()[0]:.2f}: profiling one layer (1 thread, 2 side by side)", flush=True)
    profile = layer_profile(args.seq)
    print(f"profile load {profile.load_average:.2f}, fresh page "
          f"{profile.page_fault_s_per_byte * 1e9:.3f} s/GB", flush=True)
    plans = plans_for(args.seq, args.steps, args.budget_mib, profile)
    spec = job_spec(args.seq, args.budget_mib, args.steps)
    for name, plan in plans.items():
        pred = predicted_parts(plan)
        print(f"{name}: {describe_plan(plan)}\n  predicted " + " ".join(
            f"{k} {v:.3f}" for k, v in pred.items()), flush=True)
    for round_ in range(args.rounds):
        for name, plan in plans.items():
            load = os.getloadavg()[0]
            ranks = spawn_ranks(fit_worker, 2, spec, plan)
            print(f"round {round_} {name} (load {load:.2f}): " + " | ".join(
                f"r{i} " + " ".join(f"{k} {r[k]:.3f}" for k in PARTS) for i, r in enumerate(ranks)),
                flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
