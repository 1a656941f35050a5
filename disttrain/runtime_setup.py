"""What `build_runtime` (disttrain/engine.py) derives from a plan for one rank: which of
this rank's model-state chunks live on the host (the plan numbers the decoder-layer chunks
over the whole model), and the activation policy with the swap stores it needs (their byte
budgets per tier). Errors a plan or the machine can cause are `SpecError`s.
"""

from __future__ import annotations

import os

from torch import nn

from disttrain.device import Device
from disttrain.parallel.chunks import num_layer_chunks, outer_chunk_name, pack_chunks, plan_chunk_ids
from disttrain.parallel.pipeline import PipelineConfig, split_stages
from disttrain.spec import Job, SpecError
from offload import (ActivationRuntime, ActivationRuntimeConfig, CopyEngineConfig,
                     StoreBudgetError, apply_activation_policy, create_engine, open_stores)
from planner.analytic import layer_saved_bytes_per_token
from planner.plan import Plan
from planner.shapes import DTYPE_BYTES


def _chunk_numel(plan: Plan) -> int:
    """Parameters per chunk: the plan counts a chunk's bytes in the training dtype (one
    layer's bytes)."""
    return plan.model_states.chunk_size_bytes // DTYPE_BYTES[plan.dtype]


def _first_chunk_ids(model: nn.Module, plan: Plan) -> dict[int, int]:
    """{first decoder layer of each pipeline (virtual) stage: plan id of its first chunk}.

    The plan numbers the decoder-layer chunks in execution order over the whole model,
    packing restarting at each stage (`planner.plan.ModelStatePlan`); the embedding, final
    norm and head are in none of them."""
    par, ms = plan.parallel, plan.model_states
    chunk_numel = _chunk_numel(plan)
    num_layers = len(model.layers)
    if par.pp > 1:
        config = PipelineConfig.from_plan(par)
        stages = config.stages or split_stages(num_layers, par.pp * config.virtual_stages)
    else:
        stages = ((0, num_layers),)
    first, total = {}, 0
    for start, end in stages:
        first[start] = total
        total += num_layer_chunks(list(model.layers)[start:end], chunk_numel)
    if ms.num_chunks and ms.num_chunks != total:
        raise SpecError(f"plan.model_states.num_chunks: {ms.num_chunks}, but the decoder layers "
                        f"pack into {total} chunks of {ms.chunk_size_bytes} bytes")
    bad = [c for c in ms.cpu_chunks if not 0 <= c < total]
    if bad:
        raise SpecError(f"plan.model_states.cpu_chunks: chunk {bad[0]} does not exist (the "
                        f"decoder layers pack into {total} chunks)")
    return first


def _local_cpu_chunks(model: nn.Module, plan: Plan, first_ids: dict[int, int]) -> tuple[int, ...]:
    """Indices into this rank's packing of the plan's CPU chunks held by this rank: the
    decoder-layer chunks the plan lists, and the outer chunks of `cpu_outer` (planner.plan)."""
    chunks = pack_chunks(model, chunk_numel=_chunk_numel(plan), group_size=1)
    ids = plan_chunk_ids(chunks, first_ids)
    cpu = set(plan.model_states.cpu_chunks)
    local = {index for index, plan_id in ids.items() if plan_id in cpu}
    outer = set(plan.model_states.cpu_outer)
    local.update(c.index for c in chunks if not c.layers and outer_chunk_name(model, c) in outer)
    return tuple(sorted(local))


def store_budgets(job: Job, plan: Plan) -> dict[str, int]:
    """Bytes each swap tier must hold on this rank: per layer, the swapped tokens' token-local
    bytes plus a swapped input / attention output, for every microbatch in flight (pp stages
    hold up to pp of them), with 25% + 64 MiB of headroom for alignment and copies in flight."""
    par = plan.parallel
    per_token = layer_saved_bytes_per_token(job.shape, plan.dtype, par.sp)
    tokens = plan.micro_batch_size * plan.seq_len // par.sp
    inflight = min(par.pp, par.num_microbatches) if par.pp > 1 else 1
    need = {"cpu": 0.0, "nvme": 0.0}
    for layer in plan.activations:
        if layer.keep_all or layer.selective:
            continue
        need[layer.tier] += tokens * (layer.swap_fraction * per_token.token_local
                                      + layer.swap_input * per_token.layer_input
                                      + layer.swap_attention_output * per_token.attention_output)
    return {tier: int(1.25 * inflight * b) + 64 * 2**20 for tier, b in need.items()}


def _apply_activations(job: Job, plan: Plan, model: nn.Module, rank: int
                       ) -> tuple[ActivationRuntime, str]:
    """Wrap each decoder layer with the plan's keep / swap / token-wise recompute policy."""
    engine = create_engine(CopyEngineConfig(backend="auto"))
    budgets = store_budgets(job, plan)
    nvme_path = job.hardware.nvme_path or None
    try:
        stores = open_stores(plan.activations, engine=engine, cpu_budget_bytes=budgets["cpu"],
                             nvme_path=nvme_path, nvme_budget_bytes=budgets["nvme"],
                             # the pid: concurrent runs of one job name on a host must
                             # not share (and sweep) each other's swap directories
                             run_id=f"{job.spec.name}-{os.getpid()}", rank=rank,
                             device=Device.from_torch(next(model.parameters()).device))
    except (ValueError, OSError, StoreBudgetError) as exc:  # no NVMe path, too little space
        raise SpecError(str(exc).splitlines()[0]) from None
    config = ActivationRuntimeConfig(rebuild_tile_tokens=plan.tiling.rebuild_tile_tokens)
    return (apply_activation_policy(model, plan.activations, stores=stores, config=config),
            engine.describe())
