"""Communication bytes and model-state bytes per rank: cost model vs runtime, side by side.

For each parallel layout on 2 gloo ranks (tiny model, fp32), one training step runs through
the real runtime (`disttrain.engine`); the bytes each collective kind sent and the model-state
bytes the runtime holds are compared with what the planner's cost model predicts for the same
layout. Prints a table; `tests/test_comm_volume.py` asserts the errors stay under 1%.

Tensor-parallel rows (tp2; the tiny model with a vocabulary of 260, divisible by tp): model
states against `model_state_bytes` of the per-rank parameters (every parameter is split over
tp), and the bytes the tp collectives sent against the planner's `tp_step_bytes`
(`planner/tp_collectives.py`). The `overlap4` row pipelines the tp collectives
over 4 token blocks (`parallel.tp_overlap_chunks`): the same bytes in 4x the calls.
Rows "calls: <kind>": the blocking collective calls of the step, counted by wrapping
`torch.distributed`, against `planner.collectives.step_collective_calls` (the calls the cost
model prices a latency for; not for pipelines or tp pipelined over token blocks).

    .venv/bin/python bench/comm_volume.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disttrain.parallel.spawn import spawn_ranks  # noqa: E402
from disttrain.spec import job_from_dict  # noqa: E402
from planner.collectives import step_collective_calls  # noqa: E402
from planner.costmodel import (Candidate, model_state_bytes, ring_p2p_backward_bytes,  # noqa: E402
                               ring_p2p_bytes, ulysses_alltoall_bytes, zero_step_bytes)
from planner.plan import ParallelPlan, Plan  # noqa: E402
from planner.tp_collectives import tp_replicated_grad_bytes, tp_step_bytes  # noqa: E402

SEQ, MICRO, GLOBAL = 64, 1, 4
LAYOUTS = {  # name: (dp, sp, sp_kind, pp, zero_stage[, tp[, tp_overlap_chunks[, gather overlap]]])
    "dp2 zero0": (2, 1, "ulysses", 1, 0),
    "dp2 zero1": (2, 1, "ulysses", 1, 1),
    "dp2 zero1 gather overlap": (2, 1, "ulysses", 1, 1, 1, 1, True),
    "dp2 zero2": (2, 1, "ulysses", 1, 2),
    "dp2 zero3": (2, 1, "ulysses", 1, 3),
    "sp2 ulysses zero3": (1, 2, "ulysses", 1, 3),
    "sp2 ring zero2": (1, 2, "ring", 1, 2),
    "pp2 zero0": (1, 1, "ulysses", 2, 0),
    "tp2 zero3": (1, 1, "ulysses", 1, 3, 2),
    "tp2 zero3 overlap4": (1, 1, "ulysses", 1, 3, 2, 4),
}
TP_VOCAB = 260
"""Vocabulary of the tensor-parallel rows (tiny's 259 does not split over tp2)."""


def planner_tp_bytes(shape, dtype: str, tokens: int, tp: int, num_microbatches: int
                     ) -> float | None:
    """Bytes one rank sends in a step for tensor parallelism, by the planner's cost model."""
    return num_microbatches * tp_step_bytes(shape, dtype, tokens, tp)


def job_spec(tp: int = 1) -> dict:
    model = {"preset": "tiny", **({"vocab_size": TP_VOCAB} if tp > 1 else {})}
    return {"name": "comm", "model": model,
            "train": {"seq_len": SEQ, "micro_batch_size": MICRO, "global_batch_size": GLOBAL,
                      "steps": 1},
            "data": {"kind": "synthetic"},
            "cluster": {"preset": "cpu-local", "devices_per_node": 2},
            "launch": {"launcher": "torchrun"}, "output_dir": "/tmp/disttrain-comm-bench"}


def plan_for(job, dp, sp, sp_kind, pp, zero, tp=1, tp_chunks=1, gather_overlap=False) -> Plan:
    micro = GLOBAL // (MICRO * dp)
    return Plan(model=job.shape.to_dict(), seq_len=SEQ, micro_batch_size=MICRO,
                global_batch_size=GLOBAL,
                parallel=ParallelPlan(dp=dp, sp=sp, sp_kind=sp_kind, pp=pp, zero_stage=zero, tp=tp,
                                      num_microbatches=micro, tp_overlap_chunks=tp_chunks,
                                      overlap_param_gather=gather_overlap,
                                      schedule="1f1b" if pp > 1 else "none"))


def predicted(job, dp, sp, sp_kind, pp, zero, tp=1, tp_chunks=1, gather_overlap=False
              ) -> tuple[dict[str, float | None], dict[str, float]]:
    """(bytes sent per collective kind, model-state bytes) the cost model expects per rank;
    pipelining the tp collectives over `tp_chunks` token blocks, or overlapping the stage 1-2
    parameter all-gather with the next forward, sends the same bytes."""
    del tp_chunks, gather_overlap
    shape, micro = job.shape, GLOBAL // (MICRO * dp)
    tokens = MICRO * SEQ // sp
    comm: dict[str, float | None] = {}
    if tp > 1:   # + Qwen3's q/k norm gradients summed over tp once a step (0 without them)
        comm["tp"] = planner_tp_bytes(shape, "fp32", tokens, tp, micro) + tp_replicated_grad_bytes(
            shape, tp, shape.num_layers, zero_stage=zero, shard_group=dp * sp)
    if sp > 1 and sp_kind == "ulysses":
        comm["sp_all_to_all"] = micro * shape.num_layers * 3 * ulysses_alltoall_bytes(
            shape, "fp32", tokens, sp)
    if sp > 1 and sp_kind == "ring":
        comm["sp_p2p"] = micro * shape.num_layers * (
            ring_p2p_bytes(shape, "fp32", tokens, sp)
            + ring_p2p_backward_bytes(shape, "fp32", tokens, sp))
    if pp > 1:  # stage 0 sends activations, stage 1 their gradients: the same bytes
        comm["pp_sent"] = micro * tokens * shape.hidden_size * 4
    group = dp * sp
    params = (shape.num_params() - shape.num_layers * shape.tp_replicated_layer_params) // tp \
        + shape.num_layers * shape.tp_replicated_layer_params if pp == 1 else None  # per tp rank
    if group > 1 and params is not None:
        resident = shape.embedding_params()  # embedding + final norm + head
        per_mb, per_step = zero_step_bytes(params, "fp32", zero, group, micro,
                                           backward_resident_params=resident)
        comm["zero"] = micro * per_mb + per_step
    states = model_state_bytes(params, "fp32", zero, group) if params is not None else {}
    return comm, states


CALL_KINDS = {"all_to_all_single": "all_to_all", "reduce_scatter_single": "reduce_scatter",
              "all_gather_single": "all_gather", "all_gather": "all_gather",
              "all_reduce": "all_reduce", "broadcast": "broadcast", "batch_isend_irecv": "p2p"}
"""torch.distributed functions the runtime calls, by the collective kind they are counted as."""


def predicted_calls(job, dp, sp, sp_kind, pp, zero, tp=1, tp_chunks=1, gather_overlap=False
                    ) -> dict[str, int] | None:
    """Blocking collective calls per step by kind the cost model prices
    (`step_collective_calls`); None where it does not count them (pipelines, tp pipelined
    over token blocks)."""
    del gather_overlap
    if pp > 1 or tp_chunks > 1:
        return None
    micro = GLOBAL // (MICRO * dp)
    cand = Candidate(dp=dp, sp=sp, sp_kind=sp_kind, pp=pp, tp=tp, zero_stage=zero,
                     num_microbatches=micro)
    return step_collective_calls(job.shape, cand, stage_layers=job.shape.num_layers,
                                 num_microbatches=micro)


def _counted(dist, counts: dict) -> dict:
    """Wrap `dist`'s collectives so that each call adds 1 to counts[kind]; the originals."""
    originals = {name: getattr(dist, name) for name in CALL_KINDS}
    for name, fn in originals.items():
        def counted(*args, __fn=fn, __kind=CALL_KINDS[name], **kwargs):
            counts[__kind] = counts.get(__kind, 0) + 1
            return __fn(*args, **kwargs)
        setattr(dist, name, counted)
    return originals


def _worker(rank, world, spec, layouts):
    import torch.distributed as dist

    from disttrain.data import build_batches
    from disttrain.engine import build_runtime

    job = job_from_dict(spec)
    batches = build_batches("synthetic", None, vocab_size=job.shape.vocab_size, seq_len=SEQ,
                            micro_batch_size=MICRO, seed=0)
    out = {}
    for name, layout in layouts.items():
        runtime = build_runtime(job, plan_for(job, *layout), rank=rank)
        runtime.communication_bytes()  # discard what construction sent
        calls: dict[str, int] = {}
        originals = _counted(dist, calls)
        try:
            runtime.forward_backward(0, batches)
            runtime.states.clip_grad_norm(1.0)
            runtime.states.step(1e-3)
        finally:
            for fn_name, fn in originals.items():
                setattr(dist, fn_name, fn)
        comm = runtime.communication_bytes()
        measured = {}
        for key, value in comm.items():
            if key.startswith("zero_"):
                measured["zero"] = measured.get("zero", 0) + value
            elif key in ("pp_activations", "pp_gradients"):
                measured["pp_sent"] = measured.get("pp_sent", 0) + value
            elif key.startswith("sp_"):
                measured[key] = value
            elif key.startswith("tp_"):
                measured["tp"] = measured.get("tp", 0) + value
        states = {c: sum(p[c] for p in runtime.states.bytes_by_place().values())
                  for c in ("parameters", "gradients", "optimizer")}
        out[name] = (measured, states, calls)
        dist.barrier()
    return out


def measure(layouts: dict = LAYOUTS) -> list[dict]:
    results, jobs = {}, {}
    for tp in sorted({(layout + (1,))[5] for layout in layouts.values()}):
        spec = job_spec(tp)
        group = {n: l for n, l in layouts.items() if (l + (1,))[5] == tp}
        results.update(spawn_ranks(_worker, 2, spec, group)[0])
        jobs.update(dict.fromkeys(group, job_from_dict(spec)))
    rows = []
    for name, layout in layouts.items():
        comm_pred, state_pred = predicted(jobs[name], *layout)
        measured_comm, measured_states, measured_calls = results[name]
        calls_pred = predicted_calls(jobs[name], *layout)
        for kind in sorted(set(calls_pred or {}) | set(measured_calls) if calls_pred else ()):
            if kind == "p2p":   # ring attention's exchanges: bytes above, not counted calls
                continue
            rows.append({"layout": name, "quantity": f"calls: {kind}",
                         "predicted": calls_pred.get(kind, 0), "measured": measured_calls.get(kind, 0)})
        for kind, value in sorted(comm_pred.items()):
            rows.append({"layout": name, "quantity": f"sent: {kind}", "predicted": value,
                         "measured": measured_comm.get(kind, 0)})
        for kind, value in state_pred.items():
            rows.append({"layout": name, "quantity": f"state: {kind}", "predicted": value,
                         "measured": measured_states[kind]})
    for row in rows:
        row["error"] = (row["measured"] - row["predicted"]) / row["predicted"] \
            if row["predicted"] else float(row["measured"] != 0)
    return rows


def main() -> None:
    rows = measure()
    print(f"{'layout':<20} {'quantity':<22} {'predicted':>12} {'measured':>12} {'error':>8}")
    for r in rows:
        print(f"{r['layout']:<20} {r['quantity']:<22} {r['predicted']:>12,.0f} "
              f"{r['measured']:>12,.0f} {r['error']:>+8.2%}")
    print(f"worst |error|: {max(abs(r['error']) for r in rows):.3%} over {len(rows)} rows")


if __name__ == "__main__":
    main()
