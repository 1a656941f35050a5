"""DeepSpeed config (JSON) from a plan: ZeRO stage and offload, activation checkpointing,
batch sizes, Ulysses sequence parallelism.

What DeepSpeed can express, and so what the alternatives range over:
- activations: a layer is either kept whole or checkpointed (`deepspeed.checkpointing.
  checkpoint` around it in the model code), which recomputes its whole forward - attention
  core included - from its input; `cpu_checkpointing` moves every checkpointed input to host
  memory. No token fractions, no NVMe tier, no kept attention output.
- model states: ZeRO-3 `offload_param` / `offload_optimizer` move all parameters and optimizer
  states (not a subset of layer chunks) to `cpu` or `nvme`.
- sequence parallelism: Ulysses only (`sequence_parallel_size` + `data_parallel_size`); no ring.
- pipeline: `PipelineModule` in code; its engine accepts ZeRO stage 0 or 1 only.
- tensor parallelism: AutoTP (`tensor_parallel.autotp_size`) shards the linear layers of an HF
  model; the activations between blocks stay whole on every tp rank (no Megatron-style
  sequence parallelism), so that part of the plan's memory is not what DeepSpeed would use.
DeepSpeed's config loader accepts unknown top-level keys (each section is strict), so the
"cannot express" list and the predicted costs travel in a `"_disttrain"` key of the same file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from planner.costmodel import CostParams
from planner.export import (Alternative, ExportResult, choose_nearest, costs_record, evaluate_plan,
                            layer_ranges, whole_layer_recompute)
from planner.mip import StageProblem
from planner.plan import OUTER_NAMES, LayerActivationPlan, Plan
from planner.shapes import DTYPE_BYTES, ModelShape

FILENAME = "deepspeed.json"
ADAM_STATES = 4
"""Buffers DeepSpeed's NVMe optimizer swapper needs for Adam: parameter, gradient, m, v."""


def _cpu_ranks(plan: Plan) -> bool:
    return str(plan.prediction.hardware.get("device_name", "")).lower() == "cpu"


def _checkpointed(plan: Plan) -> list[int]:
    return [i for i, act in enumerate(plan.activations) if not act.keep_all]


def _nvme_states(problem: StageProblem) -> StageProblem:
    """Offloaded chunks live on NVMe: no host bytes, streamed at the slower of link and disk."""
    slowdown = problem.host_link_bw / min(problem.host_link_bw, problem.nvme_read_bw)
    return dataclasses.replace(problem, chunk_host_bytes=0.0,
                               chunk_link_bytes=problem.chunk_link_bytes * slowdown)


def unexpressed(plan: Plan) -> list[str]:
    """Plan decisions DeepSpeed cannot express, one sentence each."""
    acts, par, states = plan.activations, plan.parallel, plan.model_states
    out = []
    selective = [i for i, a in enumerate(acts) if a.selective]
    if selective:
        out.append(f"op-level selective checkpointing (torchtitan's policy: keep every other matmul's "
                   f"output) on layers {layer_ranges(selective)}: DeepSpeed checkpoints whole layers")
    partial = [i for i, a in enumerate(acts) if not a.keep_all and 0 < a.swap_fraction < 1]
    if partial:
        fractions = [acts[i].swap_fraction for i in partial]
        out.append(f"token-wise swap of a fraction of token-local activations (layers {layer_ranges(partial)}, "
                   f"{min(fractions):.0%}-{max(fractions):.0%} of tokens): DeepSpeed checkpoints whole layers")
    swapped = [i for i, a in enumerate(acts) if not a.keep_all and a.swap_fraction > 0]
    if swapped:
        out.append(f"swapping token-local activations to host/NVMe (layers {layer_ranges(swapped)}): "
                   f"cpu_checkpointing moves only a checkpointed layer's input")
    nvme = [i for i, a in enumerate(acts) if not a.keep_all and a.tier == "nvme"
            and (a.swap_fraction > 0 or a.swap_input or a.swap_attention_output)]
    if nvme:
        out.append(f"NVMe tier for activations (layers {layer_ranges(nvme)}): DeepSpeed activation "
                   f"checkpointing offloads to CPU memory only")
    kept_attn = [i for i, a in enumerate(acts) if not a.keep_all]
    if kept_attn:
        out.append(f"never recomputing the attention core (layers {layer_ranges(kept_attn)} keep or swap "
                   f"the attention output + log-sum-exp): a checkpointed layer recomputes its whole forward")
    inputs = {a.swap_input for a in acts if not a.keep_all}
    if len(inputs) > 1:
        out.append("swapping the layer input on some layers only: cpu_checkpointing is one switch for all")
    if par.tp > 1:
        out.append(f"activations between blocks sharded over tp={par.tp} ranks: DeepSpeed AutoTP "
                   f"(tensor_parallel.autotp_size) keeps norms, residuals and layer inputs whole on "
                   f"every tp rank, {par.tp}x the plan's bytes for those")
    if par.sp > 1 and par.sp_kind == "ring":
        out.append(f"ring attention (sp={par.sp}): DeepSpeed sequence parallelism is Ulysses all-to-all")
    if par.pp > 1:
        out.append(f"pipeline stage boundaries {list(par.stages)}: set in code by PipelineModule"
                   f"(num_stages={par.pp}, partition_method=...), not by the config")
        if par.zero_stage >= 2:
            out.append(f"ZeRO-{par.zero_stage} with pipeline parallelism: DeepSpeed's pipeline engine "
                       f"allows ZeRO-0/1 only")
    if (states.cpu_chunks or states.cpu_outer) and (len(states.cpu_chunks) < states.num_chunks
                                                     or len(states.cpu_outer) < len(OUTER_NAMES)):
        outer = f", outer states on the CPU: {'+'.join(states.cpu_outer) or 'none'}"
        out.append(f"per-chunk placement ({len(states.cpu_chunks)} of {states.num_chunks} layer chunks in host "
                   f"memory{outer}): offload_param moves all parameters or none")
    tiles = [f"{name} {tokens} tokens" for name, tokens in (("loss", plan.tiling.loss_chunk_tokens),
                                                             ("MLP", plan.tiling.mlp_chunk_tokens)) if tokens]
    if tiles:
        out.append(f"token tiling ({', '.join(tiles)}): not a config setting; the model code must tile")
    if plan.memory_layout:
        out.append("the planned activation arena layout: DeepSpeed uses the framework allocator")
    return out


def _parallel(plan: Plan) -> tuple[Any, list[str]]:
    """The parallel layout DeepSpeed can run: Ulysses for any sp, ZeRO <= 1 under a pipeline."""
    par, shape = plan.parallel, ModelShape(**plan.model)
    notes = []
    changes: dict[str, Any] = {}
    if par.sp > 1 and par.sp_kind == "ring":
        if shape.num_heads % par.sp:
            raise ValueError(f"parallel.sp: ring sp={par.sp} has no DeepSpeed equivalent: Ulysses needs "
                             f"num_heads ({shape.num_heads}) divisible by sp")
        changes["sp_kind"] = "ulysses"
        notes.append("ring -> Ulysses")
    if par.pp > 1 and par.zero_stage >= 2:
        changes["zero_stage"] = 1
        notes.append(f"ZeRO-{par.zero_stage} -> ZeRO-1 under the pipeline")
    return dataclasses.replace(par, **changes), notes


def alternatives(plan: Plan) -> list[Alternative]:
    """Every DeepSpeed-expressible variant of `plan`: cpu_checkpointing on/off x offload tier."""
    parallel, layout_notes = _parallel(plan)
    checkpointed = _checkpointed(plan)
    adjust = whole_layer_recompute(set(checkpointed))
    hardware = plan.prediction.hardware
    tiers = ["none"]
    if parallel.zero_stage == 3 and plan.model_states.num_chunks:
        tiers.append("cpu")
        if hardware.get("nvme_capacity_bytes", 0) > 0 and hardware.get("nvme_path"):
            tiers.append("nvme")
    out = []
    # On CPU ranks activations already live in host memory, and DeepSpeed 0.19.8's blocking
    # cpu_checkpointing path empties an input that is already on the CPU before saving it.
    cpu_options = (False, True) if checkpointed and not _cpu_ranks(plan) else (False,)
    for cpu_checkpointing in cpu_options:
        acts = tuple(a if a.keep_all else LayerActivationPlan(swap_fraction=0.0, tier="cpu",
                                                              swap_input=cpu_checkpointing)
                     for a in plan.activations)
        for tier in tiers:
            cpu_chunks = tuple(range(plan.model_states.num_chunks)) if tier != "none" else ()
            # offload_param moves every parameter, the embedding and head included, or none
            states = dataclasses.replace(plan.model_states, cpu_chunks=cpu_chunks,
                                         cpu_outer=OUTER_NAMES if tier != "none" else (),
                                         num_persistent_chunks=plan.model_states.num_chunks - len(cpu_chunks),
                                         num_prefetch_buffers=max(1, plan.model_states.num_prefetch_buffers))
            name = ", ".join(layout_notes + [
                f"checkpoint {len(checkpointed)} of {len(acts)} layers" if checkpointed else "no checkpointing",
                "inputs on cpu" if cpu_checkpointing else "inputs on device",
                "no offload" if tier == "none" else f"params+optimizer offloaded to {tier}"])
            out.append(Alternative(
                name=name, plan=dataclasses.replace(plan, parallel=parallel, activations=acts,
                                                    model_states=states),
                settings=dict(cpu_checkpointing=cpu_checkpointing, offload=tier, checkpointed=checkpointed),
                layer_adjust=adjust, problem_adjust=_nvme_states if tier == "nvme" else None))
    return out


def _offload_sections(plan: Plan, tier: str) -> dict[str, Any]:
    """offload_param / offload_optimizer with buffer sizes derived from the chunk placement."""
    if tier == "none":
        return {}
    shape, hardware, states = ModelShape(**plan.model), plan.prediction.hardware, plan.model_states
    pin = not _cpu_ranks(plan)            # no pinned memory without a GPU
    if tier == "cpu":
        return {"offload_param": {"device": "cpu", "pin_memory": pin},
                "offload_optimizer": {"device": "cpu", "pin_memory": pin}}
    b = DTYPE_BYTES[plan.dtype]
    chunk_numel = states.chunk_size_bytes // b or shape.layer_params()
    largest_param = max(shape.vocab_size * shape.hidden_size, shape.hidden_size * shape.ffn_hidden_size)
    host_per_rank = hardware["host_memory_bytes"] / hardware["devices_per_node"]
    host_free = max(0.0, host_per_rank - plan.prediction.host_bytes)
    path = hardware["nvme_path"]
    return {"offload_param": {"device": "nvme", "nvme_path": path, "pin_memory": pin,
                              "buffer_count": max(5, states.num_prefetch_buffers + 3),
                              "buffer_size": int(max(chunk_numel, largest_param)),
                              "max_in_cpu": int(min(host_free // b, shape.num_params()))},
            "offload_optimizer": {"device": "nvme", "nvme_path": path, "pin_memory": pin,
                                  "buffer_count": ADAM_STATES, "pipeline_read": True,
                                  "pipeline_write": True}}


def build_config(plan: Plan, alt: Alternative) -> dict[str, Any]:
    """The DeepSpeed config dict for the chosen alternative (without `_disttrain`)."""
    par, shape = alt.plan.parallel, ModelShape(**plan.model)
    states = plan.model_states
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage == 3:
        chunk_numel = states.chunk_size_bytes // DTYPE_BYTES[plan.dtype] or shape.layer_params()
        zero.update(stage3_prefetch_bucket_size=int(chunk_numel * max(1, states.num_prefetch_buffers)),
                    stage3_max_live_parameters=int(chunk_numel * (max(1, states.num_prefetch_buffers) + 1)))
    zero.update(_offload_sections(plan, alt.settings["offload"]))
    checkpointed = alt.settings["checkpointed"]
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": par.num_microbatches,
        "zero_optimization": zero,
        "activation_checkpointing": {"partition_activations": False,
                                     "cpu_checkpointing": alt.settings["cpu_checkpointing"],
                                     "contiguous_memory_optimization": False,
                                     "synchronize_checkpoint_boundary": False,
                                     **({"number_checkpoints": len(checkpointed)} if checkpointed else {})},
    }
    if plan.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if par.sp > 1:
        config["sequence_parallel_size"] = par.sp
        config["data_parallel_size"] = par.dp
    if par.pp > 1:
        config["pipeline"] = {"stages": par.pp, "partition": "uniform"}
    if par.tp > 1:
        config["tensor_parallel"] = {"autotp_size": par.tp}
    if alt.settings["offload"] != "none" and _cpu_ranks(plan):
        config["zero_force_ds_cpu_optimizer"] = False   # CPU ranks: a torch optimizer already runs on CPU
    return config


def _usage(alt: Alternative, cpu_ranks: bool) -> list[str]:
    checkpointed = alt.settings["checkpointed"]
    usage = ["engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=..., config='deepspeed.json')"]
    if checkpointed:
        usage.append(f"wrap decoder layers {layer_ranges(checkpointed)} with deepspeed.checkpointing.checkpoint(layer, ...) "
                     f"after deepspeed.checkpointing.configure(None, deepspeed_config=config)")
    if alt.settings["offload"] != "none":
        usage.append("torch optimizer accepted on CPU ranks (zero_force_ds_cpu_optimizer=false)" if cpu_ranks
                     else "optimizer offload: use deepspeed.ops.adam.DeepSpeedCPUAdam or an 'optimizer' section")
    if alt.plan.parallel.tp > 1:
        usage.append(f"AutoTP: pass an HF model (its config names the projections); DeepSpeed "
                     f"shards its linear layers over {alt.plan.parallel.tp} adjacent ranks")
    if alt.plan.parallel.sp > 1:
        usage.append("Ulysses: attention must go through deepspeed's sequence-parallel attention "
                     "(its all-to-all) and each rank must feed its 1/sp slice of the sequence")
    return usage


def export(plan: Plan, out_dir: Path, *, params: CostParams | None = None) -> ExportResult:
    """Write `deepspeed.json` for `plan` into `out_dir`; return what it could not express."""
    full = evaluate_plan(plan, params=params)
    alt, nearest, costed = choose_nearest(alternatives(plan), params)
    missing = unexpressed(plan)
    config = build_config(plan, alt)
    config["_disttrain"] = {
        "note": "DeepSpeed ignores unknown top-level keys; this one is the planner's commentary",
        "cannot_express": missing,
        "predicted": costs_record(full, alt.name, nearest, costed),
        "checkpoint_layers": alt.settings["checkpointed"],
        "usage": _usage(alt, _cpu_ranks(plan)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAME
    path.write_text(json.dumps(config, indent=2) + "\n")
    return ExportResult(stack="deepspeed", path=path, unexpressed=tuple(missing), full=full,
                        nearest=nearest, chosen=alt.name, alternatives=costed)
