"""The candidate parallel layouts: every (dp, tp, sp, sp_kind, pp, schedule, micro-batch size,
microbatches, ZeRO stage) that divides the world size, respects head counts and the values
fixed in the request, with a reason (and numbers) for each one ruled out. Tensor parallelism
stays inside a node; interleaved 1F1B is offered where Megatron's schedule allows it
(microbatches a multiple of pp, layers a multiple of 2 pp)."""

from __future__ import annotations

import dataclasses

from planner.costtypes import Candidate
from planner.request import PlanRequest

MAX_AUTO_MICRO_BATCH = 8
"""Largest micro-batch size an auto request tries: past a few sequences per microbatch the
GEMMs are large already and only activation memory grows (and each size multiplies the
layouts the search prices)."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def micro_batch_sizes(request: PlanRequest, dp: int) -> list[int]:
    """Sequences per microbatch to try at data-parallel degree `dp`: the request's size, or
    with auto (None) every divisor <= MAX_AUTO_MICRO_BATCH of the per-rank batch
    global_batch_size / dp, so that it splits into whole microbatches (only the one size
    giving `num_microbatches` when that is fixed). Empty when dp does not divide the batch."""
    if request.micro_batch_size is not None:
        return [request.micro_batch_size]
    if request.global_batch_size % dp:
        return []
    per_rank = request.global_batch_size // dp
    if request.num_microbatches is not None:
        fits = per_rank % request.num_microbatches == 0
        return [per_rank // request.num_microbatches] if fits else []
    return [m for m in divisors(per_rank) if m <= MAX_AUTO_MICRO_BATCH]


def sized_request(request: PlanRequest, cand: Candidate) -> PlanRequest:
    """`request` with the candidate's micro-batch size (itself when they agree): what every
    per-layout cost (`planner.candidates`) reads the size from."""
    if request.micro_batch_size == cand.micro_batch_size:
        return request
    return dataclasses.replace(request, micro_batch_size=cand.micro_batch_size)


def _reason(cand: dict, reason: str, shortfall: float | None = None) -> dict:
    return {"candidate": cand, "reason": reason, "shortfall_bytes": shortfall}


TP_DIVIDED = ("num_heads", "num_kv_heads", "ffn_hidden_size", "hidden_size")
"""Sizes the runtime's tensor parallelism divides evenly among the tp ranks
(`disttrain.spec.tensor_parallel_error`; tests/test_tensor_parallel.py checks the two agree):
no uneven shards, no replicated KV heads. The vocabulary is padded to a multiple of tp, as
Megatron does, so any vocabulary splits."""


def tp_problem(shape, tp: int, devices_per_node: int) -> str:
    """Why tensor parallelism of degree `tp` cannot split this model ('' when it can): the
    TP group stays in a node, and every size in `TP_DIVIDED` must divide by tp, exactly
    what the runtime refuses otherwise."""
    if tp > devices_per_node:
        return f"tp={tp} > {devices_per_node} devices per node (a TP group stays in a node)"
    for name in TP_DIVIDED:
        if getattr(shape, name) % tp:
            return (f"tp={tp} does not divide {name} ({getattr(shape, name)}): the runtime "
                    f"splits it evenly over the tp ranks")
    if tp > 1 and getattr(shape, "qkv_bias", False):
        return (f"tp={tp}: the runtime's tensor parallelism does not split q/k/v biases yet "
                f"(Qwen2 / Qwen2.5)")
    return ""


def _tp_degrees(request: PlanRequest) -> list[int]:
    hw = request.hardware
    if request.tp is not None:
        return [request.tp]
    return [t for t in divisors(hw.devices_per_node) if hw.world_size % t == 0]


def enumerate_candidates(request: PlanRequest) -> tuple[list[Candidate], list[dict], dict[Candidate, list[str]]]:
    """(valid candidates, rejected with reasons, notes per candidate)."""
    shape, world = request.model, request.hardware.world_size
    candidates, rejected, notes = [], [], {}
    for name, value in (("dp", request.dp), ("tp", request.tp), ("sp", request.sp), ("pp", request.pp)):
        if value is not None and (value < 1 or world % value):
            rejected.append(_reason({name: value}, f"{name}={value} (fixed in the request) does "
                                    f"not divide the world size {world}"))
            return [], rejected, notes
    for tp in _tp_degrees(request):
        why = tp_problem(shape, tp, request.hardware.devices_per_node)
        if why:
            rejected.append(_reason({"tp": tp}, why))
            continue
        rest = world // tp
        for dp in divisors(rest):
            for sp in divisors(rest // dp):
                pp = rest // (dp * sp)
                if any(fixed is not None and fixed != value for fixed, value in
                       ((request.dp, dp), (request.sp, sp), (request.pp, pp))):
                    continue
                _add_layouts(request, tp, dp, sp, pp, candidates, rejected, notes)
    return candidates, rejected, notes


def _add_layouts(request: PlanRequest, tp: int, dp: int, sp: int, pp: int, candidates: list,
                 rejected: list, notes: dict) -> None:
    shape = request.model
    kinds = [request.sp_kind] if request.sp_kind else (["ulysses"] if sp == 1 else ["ulysses", "ring"])
    for kind in kinds:
        base = dict(dp=dp, tp=tp, sp=sp, sp_kind=kind, pp=pp)
        problem = _layout_problem(request, dp, sp, kind, pp, tp)
        if problem:
            rejected.append(_reason(base, problem))
            continue
        sizes = micro_batch_sizes(request, dp)
        if not sizes:
            rejected.append(_reason(dict(base, num_microbatches=request.num_microbatches),
                                    f"num_microbatches={request.num_microbatches} (fixed) does "
                                    f"not divide the per-rank batch {request.global_batch_size} "
                                    f"/ dp {dp} = {request.global_batch_size // dp}"))
            continue
        for size in sizes:
            microbatches = request.global_batch_size // (dp * size)
            if request.num_microbatches is not None and request.num_microbatches != microbatches:
                rejected.append(_reason(dict(base, num_microbatches=request.num_microbatches),
                                        f"num_microbatches={request.num_microbatches} (fixed) but global batch "
                                        f"{request.global_batch_size} / (dp {dp} x micro batch "
                                        f"{size}) = {microbatches}"))
                continue
            _add_schedules(request, base, size, microbatches, candidates, notes)


def _add_schedules(request: PlanRequest, base: dict, size: int, microbatches: int,
                   candidates: list, notes: dict) -> None:
    """Every ZeRO stage and pipeline schedule of one layout at one micro-batch size."""
    shape, dp, sp, pp, tp, kind = (request.model, base["dp"], base["sp"], base["pp"], base["tp"],
                                   base["sp_kind"])
    stages = ([request.zero_stage] if request.zero_stage is not None
              else ([0, 3] if dp * sp == 1 else [0, 1, 2, 3]))
    virtuals = [1]
    if (pp > 1 and request.schedule != "1f1b" and microbatches % pp == 0
            and shape.num_layers % (2 * pp) == 0):
        virtuals = [2] if request.schedule == "interleaved-1f1b" else [1, 2]
    for zero in stages:
        for virtual in virtuals:
            cand = Candidate(dp=dp, tp=tp, sp=sp, sp_kind=kind, pp=pp, virtual=virtual,
                             num_microbatches=microbatches, zero_stage=zero,
                             micro_batch_size=size)
            candidates.append(cand)
            heads = shape.num_kv_heads // tp if shape.num_kv_heads >= tp else 1
            cand_notes = []
            if kind == "ulysses" and sp > heads:
                cand_notes.append(f"Ulysses sp={sp} > KV heads per TP rank ({heads}): each rank "
                                  f"holds one replicated KV head ({sp // heads}x copies)")
            if cand_notes:
                notes[cand] = cand_notes


def _layout_problem(request: PlanRequest, dp: int, sp: int, kind: str, pp: int, tp: int = 1) -> str:
    shape = request.model
    if pp > shape.num_layers:
        return f"pp={pp} > {shape.num_layers} layers"
    if pp > 1 and shape.tie_embeddings:
        return (f"pp={pp} with tied embeddings: the runtime does not sum the tied gradient "
                f"across pipeline stages")
    if request.global_batch_size % (dp * (request.micro_batch_size or 1)):
        micro = (f" x micro batch {request.micro_batch_size}"
                 if request.micro_batch_size is not None else "")
        return f"global batch {request.global_batch_size} is not a multiple of dp {dp}{micro}"
    if request.seq_len % (sp * tp):
        return f"seq_len {request.seq_len} is not divisible by sp*tp={sp * tp}"
    if request.recompute == "selective" and tp > 1:
        # the stage solver would only find no selective layer to price and blame memory
        return (f"recompute 'selective' with tp={tp}: op-level checkpointing runs at tp 1 only "
                f"(tensor-parallel linears carry their collectives inside; use 'full' or 'auto')")
    if kind == "ulysses" and sp > 1:
        heads, kv = shape.num_heads // tp, max(1, shape.num_kv_heads // tp)
        per = "" if tp == 1 else f" / tp={tp}"
        if heads % sp:
            return f"Ulysses needs num_heads ({shape.num_heads}){per} divisible by sp={sp}"
        if kv % sp and sp % kv:
            return (f"Ulysses needs num_kv_heads ({shape.num_kv_heads}){per} and sp={sp} to divide "
                    f"one another")
    if kind == "ring" and sp > 1 and request.seq_len % (2 * sp):
        return f"ring attention needs seq_len {request.seq_len} divisible by 2*sp={2 * sp}"
    return ""
