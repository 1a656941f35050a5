"""Where a step's collective seconds go on this CPU, against what the planner prices for them.

For fidelity rows (`bench/fidelity.py`'s grid), 2 gloo ranks run the row's plan for a few
steps with every `torch.distributed` collective wrapped in a timer: per rank and kind, calls
per step and seconds inside them. The ranks then time the same collectives alone (a barrier
before each call, the step's exact buffer sizes): what a call costs when both ranks arrive
together. The difference is waiting for the other rank (rank skew): a blocking collective
returns when the slower rank has arrived.

Printed per row: measured step; per kind the counted calls per step (and the planner's count),
seconds per step inside the calls (per rank), the isolated seconds of the same calls, and the
planner's price of them; the ratio measured / priced.

    PYTHONPATH=$PWD .venv/bin/python bench/collective_pieces.py [--rows "512 sp2 ulysses z2 keep" ...] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import LAYOUTS, POLICIES, SWEEP, _plan, config_spec, fresh_profile  # noqa: E402

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402

WRAPPED = ("all_to_all_single", "reduce_scatter_single", "all_gather_single", "all_reduce",
           "all_gather", "broadcast", "barrier", "batch_isend_irecv")


def _wrap(dist, log: list) -> dict:
    """Replace dist's collectives with timed ones appending (name, seconds, input bytes, args)."""
    originals = {}
    for name in WRAPPED:
        fn = getattr(dist, name)
        originals[name] = fn

        def timed(*args, __fn=fn, __name=name, **kwargs):
            t0 = time.perf_counter()
            out = __fn(*args, **kwargs)
            if kwargs.get("async_op") and out is not None:   # time to completion
                out.wait()
            t1 = time.perf_counter()
            size = sum(a.numel() * a.element_size() for a in args if hasattr(a, "numel"))
            log.append((__name, t1 - t0, size, args, kwargs, t0, t1))
            return out
        setattr(dist, name, timed)
    return originals


_ULYSSES_ORIGINALS: dict = {}


def _wrap_ulysses_core(undo: bool = False) -> dict:
    """Time the Ulysses core's forward / backward and the flash kernels inside them
    (seconds summed into the returned dict: 'core' and 'kernels')."""
    import disttrain.parallel.ulysses as uly

    if undo:
        for (owner, name), fn in _ULYSSES_ORIGINALS.items():
            setattr(owner, name, fn)
        _ULYSSES_ORIGINALS.clear()
        return {}
    acc: dict = {}
    targets = [(uly.UlyssesCore, "forward", "core"), (uly.UlyssesCore, "backward", "core"),
               (uly, "flash_attention_forward", "kernels"),
               (uly, "flash_attention_backward", "kernels")]
    for owner, name, key in targets:
        fn = getattr(owner, name)
        _ULYSSES_ORIGINALS[(owner, name)] = fn

        def timed(*args, __fn=fn, __key=key, **kwargs):
            t0 = time.perf_counter()
            out = __fn(*args, **kwargs)
            acc[__key] = acc.get(__key, 0.0) + time.perf_counter() - t0
            return out
        setattr(owner, name, timed)
    return acc


def pieces_worker(rank: int, world: int, name: str, spec: dict, plan, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from disttrain.engine import build_runtime
    from offload import apply_activation_policy
    from peers import COMMON
    from peers_baselines import _batches

    job = job_from_dict(spec)
    runtime = build_runtime(job, plan, rank=rank)
    if runtime.activations is None and plan.parallel.pp == 1:
        runtime.activations = apply_activation_policy(runtime.model, plan.activations)
    batches = _batches(COMMON, plan.seq_len)
    log: list = []
    originals = _wrap(dist, log)
    core_s = _wrap_ulysses_core()
    steps = []
    try:
        for step in range(job.spec.train.steps):
            log.clear()
            t0 = time.perf_counter()
            runtime.forward_backward(step, batches)
            runtime.states.clip_grad_norm(1.0)
            runtime.states.step(1e-3)
            steps.append((time.perf_counter() - t0, list(log)))
            if step == 0:  # the first step is not measured
                core_s.clear()
            else:
                core_s["steps"] = core_s.get("steps", 0) + 1
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
        _wrap_ulysses_core(undo=True)
    steps = steps[1:] or steps
    per_kind = defaultdict(lambda: [0, 0.0])
    for _, calls in steps:
        for kind, t, *_ in calls:
            per_kind[kind][0] += 1
            per_kind[kind][1] += t
    n = len(steps)
    out = {"step_s": statistics.median(s for s, _ in steps),
           "kinds": {k: (c / n, t / n) for k, (c, t) in per_kind.items()},
           # (kind, entered, left) of every call of the measured steps: clocks compared across
           # ranks (perf_counter is CLOCK_MONOTONIC, one clock for the machine)
           "calls": [[(c[0], c[5], c[6]) for c in calls] for _, calls in steps],
           "ulysses": {k: v / core_s["steps"] for k, v in core_s.items() if k != "steps"}
           if core_s.get("steps") else {}}
    if not repeats:
        runtime.close()
        return out
    # the same calls alone: a barrier before each one, the median of `repeats`
    isolated = defaultdict(float)
    for kind, _t, _size, args, kwargs, *_ in steps[-1][1]:
        if kind in ("barrier", "batch_isend_irecv"):
            continue
        kwargs = {k: v for k, v in kwargs.items() if k != "async_op"}
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            getattr(dist, kind)(*fresh, **kwargs)
            times.append(time.perf_counter() - t0)
        isolated[kind] += statistics.median(times)
    out["isolated"] = dict(isolated)
    runtime.close()
    return out


def pair_calls(calls0: list, calls1: list) -> dict:
    """{kind: (calls, wait s, cost s) per step}: each call of the two ranks paired in order;
    wait = how long the earlier rank waited for the later one to enter, cost = from both
    present until the first leaves."""
    out = defaultdict(lambda: [0, 0.0, 0.0])
    for step0, step1 in zip(calls0, calls1):
        if [c[0] for c in step0] != [c[0] for c in step1]:
            raise RuntimeError("the ranks issued different collectives")
        for (kind, e0, x0), (_, e1, x1) in zip(step0, step1):
            out[kind][0] += 1
            out[kind][1] += abs(e0 - e1)
            out[kind][2] += max(0.0, min(x0, x1) - max(e0, e1))
    n = max(1, len(calls0))
    return {k: (c / n, w / n, t / n) for k, (c, w, t) in out.items()}


def planner_parts(job, plan, profile) -> dict:
    """Calls per step and seconds the planner prices per kind for this plan (rank 0)."""
    from planner.collectives import _seconds, ulysses_alltoall_bytes, zero_collectives
    from planner.costtypes import CostParams

    from planner.candidates import profiled_collectives

    req, par = profiled_collectives(job.plan_request(), profile), plan.parallel
    shape, hw, params = req.model, req.hardware, CostParams()
    micro = plan.global_batch_size // (plan.micro_batch_size * par.dp)
    tokens = plan.micro_batch_size * plan.seq_len // par.sp
    out = {}
    if par.sp > 1 and par.sp_kind == "ulysses":
        a2a = ulysses_alltoall_bytes(shape, req.dtype, tokens, par.sp)
        calls = 4 * shape.num_layers * micro
        out["all_to_all_single"] = (calls, micro * shape.num_layers * _seconds(
            hw, params, "all_to_all", 3 * a2a, par.sp, 1, 4))
    if par.tp > 1:   # priced inside the layers' times (blocking on a CPU node): shown apart
        from planner.tp_collectives import tp_comm_seconds, tp_head_seconds
        layer = sum(tp_comm_seconds(shape, req.dtype, hw, tokens, par.tp, params, d)
                    for d in ("forward", "backward"))
        tiles = -(-tokens // plan.tiling.loss_chunk_tokens) if plan.tiling.loss_chunk_tokens else 1
        out["tp (all kinds)"] = (0, micro * (shape.num_layers * layer + tp_head_seconds(
            shape, req.dtype, hw, tokens, par.tp, params, loss_tiles=tiles)))
    group = par.dp * par.sp
    units = shape.num_layers + 2
    names = {"all_to_all": "all_to_all_single", "reduce_scatter": "reduce_scatter_single",
             "all_gather": "all_gather_single", "all_reduce": "all_reduce"}
    for kind, mb_b, st_b, mb_c, st_c in zero_collectives(
            shape.num_params(), par.zero_stage, group, units,
            backward_resident_params=shape.embedding_params()):
        calls, secs = out.get(names[kind], (0, 0.0))
        out[names[kind]] = (calls + micro * mb_c + st_c, secs + micro * _seconds(
            hw, params, kind, mb_b, group, 1, mb_c) + _seconds(hw, params, kind, st_b, group, 1, st_c))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["512 sp2 ulysses z2 keep",
                                                      "1024 sp2 ulysses z2 keep",
                                                      "512 dp2 z3 keep"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5,
                        help="isolated calls per collective of the step (0: not timed alone)")
    args = parser.parse_args()
    seqs = [int(r.split()[0]) for r in args.rows]
    profile = fresh_profile(max(seqs))
    print("profile's collectives (latency ms, GB/s): " + ", ".join(
        f"{k} {1e3 * lat:.2f} {bw / 1e9:.2f}" for k, (lat, bw) in profile.collective_fits.items()))
    for row in args.rows:
        seq, rest = row.split(" ", 1)
        if rest.startswith("sweep "):   # a layout of the planner-choice sweep, ample budget
            spec = config_spec(int(seq), 1024, SWEEP[rest.removeprefix("sweep ")], {}, args.steps)
        else:
            lname, pname = next((ln, pn) for ln in LAYOUTS for pn in POLICIES
                                if rest == f"{ln} {pn}")
            budget, memory = POLICIES[pname]
            spec = config_spec(int(seq), budget, LAYOUTS[lname], memory, args.steps)
        job, plan = _plan(spec, profile)
        ranks = spawn_ranks(pieces_worker, 2, row, spec, plan, args.repeats)
        priced = planner_parts(job, plan, profile)
        parts = plan.prediction.time_breakdown
        print(f"\n== {row}: measured step {statistics.mean(r['step_s'] for r in ranks):.3f} s "
              f"(ranks {', '.join(format(r['step_s'], '.3f') for r in ranks)}); predicted "
              f"{plan.prediction.step_time_s:.3f} s = " + ", ".join(
                  f"{k} {v:.3f}" for k, v in parts.items() if v))
        from planner.collectives import step_collective_calls
        from planner.costtypes import Candidate
        par = plan.parallel
        cand = Candidate(dp=par.dp, tp=par.tp, sp=par.sp, sp_kind=par.sp_kind, pp=par.pp,
                         zero_stage=par.zero_stage, num_microbatches=par.num_microbatches)
        tiles = (-(-plan.micro_batch_size * plan.seq_len // par.sp // plan.tiling.loss_chunk_tokens)
                 if plan.tiling.loss_chunk_tokens else 1)
        rebuilt = sum(1 for a in plan.activations if not a.keep_all) if par.tp > 1 else 0
        counted = step_collective_calls(job.shape, cand, stage_layers=job.shape.num_layers,
                                        num_microbatches=par.num_microbatches, loss_tiles=tiles,
                                        rebuilt_layers=rebuilt)
        names = {"all_to_all_single": "all_to_all", "reduce_scatter_single": "reduce_scatter",
                 "all_gather_single": "all_gather", "all_reduce": "all_reduce"}
        priced = {k: (counted.get(names.get(k, k), 0), v[1]) for k, v in priced.items()}
        for k in names:
            if k not in priced and names[k] in counted:
                priced[k] = (counted[names[k]], 0.0)
        kinds = sorted({k for r in ranks for k in r["kinds"]} | set(priced))
        print(f"{'kind':24s} {'calls/step':>10s} {'planner':>8s} {'in step s (r0, r1)':>20s} "
              f"{'alone s':>8s} {'priced s':>8s} {'step/priced':>11s}")
        for kind in kinds:
            calls = ranks[0]["kinds"].get(kind, (0, 0.0))[0]
            secs = [r["kinds"].get(kind, (0, 0.0))[1] for r in ranks]
            alone = statistics.mean(r.get("isolated", {}).get(kind, 0.0) for r in ranks)
            p_calls, p_secs = priced.get(kind, (0, 0.0))
            ratio = statistics.mean(secs) / p_secs if p_secs else float("nan")
            print(f"{kind:24s} {calls:10.1f} {p_calls:8.0f} {secs[0]:9.4f} {secs[1]:9.4f} "
                  f"{alone:8.4f} {p_secs:8.4f} {ratio:11.2f}")
        skew = pair_calls(ranks[0]["calls"], ranks[1]["calls"])
        for kind, (calls, waits, cost) in sorted(skew.items()):
            print(f"  {kind:22s} per step: wait for the later rank {waits:.4f} s (summed over "
                  f"both ranks; {1e3 * waits / max(calls, 1):.2f} ms per call), both present "
                  f"{cost:.4f} s ({1e3 * cost / max(calls, 1):.2f} ms per call)")
        for r, rank in enumerate(ranks):
            u = rank.get("ulysses") or {}
            if u:
                a2a = rank["kinds"].get("all_to_all_single", (0, 0.0))[1]
                print(f"  rank {r}: Ulysses core {u.get('core', 0):.4f} s per step = flash kernels "
                      f"{u.get('kernels', 0):.4f} + all-to-alls {a2a:.4f} + layout copies "
                      f"{u.get('core', 0) - u.get('kernels', 0) - a2a:.4f}")
        outside = [r["step_s"] - sum(t for _, t in r["kinds"].values()) for r in ranks]
        print(f"outside collectives s (r0, r1): {outside[0]:.3f} {outside[1]:.3f}; planner "
              f"compute + optimizer + faults {parts['compute'] + parts['optimizer'] + parts.get('page_faults', 0):.3f}")


if __name__ == "__main__":
    main()
