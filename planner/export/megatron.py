"""Megatron-core arguments (YAML + command-line flags) from a plan.

Field names are megatron-core 0.16.1's (`ModelParallelConfig`, `TransformerConfig`,
`DistributedDataParallelConfig`, `OptimizerConfig`), read from the installed package. What
Megatron can express, and so what the alternatives range over:
- activations, one setting for every layer: selective recompute of modules
  (`recompute_modules`, never `core_attn` here: the plan never recomputes the attention core),
  full-layer recompute of the first N layers of each stage (`recompute_method: block`),
  fine-grained offloading of module inputs to CPU (`offload_modules`), or layer-level
  `cpu_offloading` of N layers (not with recompute, not with pipeline parallelism). There is no
  per-layer or per-token swap fraction (megatron-core 0.16.1 has no `activation_offload_fraction`)
  and no NVMe tier.
- model states: the distributed optimizer (ZeRO-1) or Megatron-FSDP sharding
  (`optim_grads` = ZeRO-2, `optim_grads_params` = ZeRO-3); only optimizer state moves to CPU
  (`optimizer_cpu_offload` + `optimizer_offload_fraction`), never parameters or gradients.
- sequence parallelism: context parallelism with `cp_comm_type` `a2a` (Ulysses) or `p2p` (ring).
- tensor parallelism: `tensor_model_parallel_size` with `sequence_parallel` (activations between
  blocks sharded over the tp ranks, as disttrain's runtime shards them: Megatron over tokens,
  disttrain over hidden features - the same bytes and collectives per block).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from planner.costmodel import CostParams, LayerCost, optimizer_bytes_per_param
from planner.export import (Alternative, ExportResult, LayerAdjust, ProblemAdjust, choose_nearest,
                            costs_record, evaluate_plan, layer_ranges, whole_layer_recompute)
from planner.mip import StageProblem
from planner.plan import LayerActivationPlan, Plan
from planner.shapes import DTYPE_BYTES, ModelShape

FILENAME = "megatron.yaml"
SELECTIVE_MODULES = ["layernorm", "mlp"]
"""Selective recompute of the token-local parts (the attention core is never recomputed)."""
KEEP = LayerActivationPlan(keep_all=True)
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""Dtype fields hold torch dtype names: pass `getattr(torch, name)` to Megatron."""


def _stage_counts(plan: Plan) -> list[int]:
    stages = plan.parallel.stages or ((0, len(plan.activations)),)
    return [end - start for start, end in stages]


def _extra_qkv_bytes(shape: ModelShape, dtype: str) -> LayerAdjust:
    """Megatron's selective recompute keeps q, k, v (saved by the attention core; offloaded with
    it when `core_attn` is in offload_modules), which the plan's token-local recompute rebuilds
    from the layer input: count them with the attention output, which is kept or swapped alike."""
    per_token = (shape.q_dim + 2 * shape.kv_dim) * DTYPE_BYTES[dtype]

    def adjust(index: int, lc: LayerCost) -> LayerCost:
        return dataclasses.replace(lc, attention_output_bytes=lc.attention_output_bytes + per_token * lc.tokens)
    return adjust


def _activation_options(plan: Plan) -> list[tuple[str, tuple, Any, dict[str, Any]]]:
    """(name, activations, layer_adjust, transformer settings) Megatron can express."""
    shape, acts = ModelShape(**plan.model), plan.activations
    n, stages = len(acts), plan.parallel.stages or ((0, len(acts)),)
    options: list[tuple[str, tuple, Any, dict[str, Any]]] = [("keep every activation", (KEEP,) * n, None, {})]
    selective = {"recompute_granularity": "selective", "recompute_modules": SELECTIVE_MODULES}
    options.append(("selective recompute of layernorm+mlp on every layer",
                    (LayerActivationPlan(),) * n, _extra_qkv_bytes(shape, plan.dtype), selective))
    for swap_input, swap_attn in ((True, False), (False, True), (True, True)):
        modules = (["attn_norm"] if swap_input else []) + (["core_attn", "attn_proj"] if swap_attn else [])
        options.append((f"selective recompute + fine-grained offload of {'+'.join(modules)} inputs to cpu",
                        (LayerActivationPlan(swap_input=swap_input, swap_attention_output=swap_attn),) * n,
                        _extra_qkv_bytes(shape, plan.dtype),
                        dict(selective, fine_grained_activation_offloading=True, offload_modules=modules)))
    planned = max(sum(1 for a in acts[s:e] if not a.keep_all) for s, e in stages)
    for count in sorted({planned, max(_stage_counts(plan))} - {0}):
        chosen = {s + i for s, e in stages for i in range(min(count, e - s))}
        full = tuple(LayerActivationPlan() if i in chosen else KEEP for i in range(n))
        options.append((f"full recompute of the first {count} layers per stage (block)", full,
                        whole_layer_recompute(chosen), {"recompute_granularity": "full", "recompute_method": "block",
                                               "recompute_num_layers": count}))
    swapped = sum(1 for a in acts if not a.keep_all and a.swap_fraction >= 0.5)
    if plan.parallel.pp == 1 and 0 < swapped:
        count = min(swapped, n - 1)
        if count:
            full_swap = LayerActivationPlan(swap_fraction=1.0, swap_input=True, swap_attention_output=True)
            options.append((f"cpu_offloading of {count} layers", tuple(full_swap if i < count else KEEP
                                                                        for i in range(n)), None,
                            {"cpu_offloading": True, "cpu_offloading_num_layers": count,
                             "cpu_offloading_activations": True, "cpu_offloading_weights": False}))
    return options


def _optimizer_offload(plan: Plan, fraction: float) -> ProblemAdjust:
    """Optimizer states (a `fraction` of them) on CPU; parameters and gradients stay."""
    b = DTYPE_BYTES[plan.dtype]
    opt = optimizer_bytes_per_param(plan.dtype)
    share = opt / (2 * b + opt)

    def adjust(problem: StageProblem) -> StageProblem:
        return dataclasses.replace(
            problem, chunk_device_bytes=problem.chunk_device_bytes * (1 - fraction * share),
            chunk_device_optimizer_s=(1 - fraction) * problem.chunk_device_optimizer_s
            + fraction * problem.chunk_cpu_optimizer_s)
    return adjust


def alternatives(plan: Plan) -> list[Alternative]:
    """Every Megatron-expressible variant: activation option x optimizer offload fraction."""
    states = plan.model_states
    fractions = [0.0]
    if states.num_chunks and states.cpu_chunks:
        fractions += sorted({round(len(states.cpu_chunks) / states.num_chunks, 3), 1.0})
    all_device = dataclasses.replace(states, cpu_chunks=(), cpu_outer=(), num_persistent_chunks=states.num_chunks)
    out = []
    for name, acts, layer_adjust, settings in _activation_options(plan):
        for fraction in fractions:
            label = name + (f", optimizer_offload_fraction {fraction:g}" if fraction else "")
            out.append(Alternative(
                name=label, plan=dataclasses.replace(plan, activations=acts, model_states=all_device),
                settings=dict(settings, optimizer_offload_fraction=fraction), layer_adjust=layer_adjust,
                problem_adjust=_optimizer_offload(plan, fraction) if fraction else None))
    return out


def unexpressed(plan: Plan) -> list[str]:
    """Plan decisions Megatron-core cannot express, one sentence each."""
    acts, par, states = plan.activations, plan.parallel, plan.model_states
    out = []
    selective = [i for i, a in enumerate(acts) if a.selective]
    if selective:
        out.append(f"op-level selective checkpointing (torchtitan's policy: keep every other matmul's "
                   f"output) on layers {layer_ranges(selective)}: Megatron's selective recompute "
                   f"names whole modules (recompute_modules), not every second matmul")
    policies = {(a.keep_all, a.selective, round(a.swap_fraction, 3), a.tier, a.swap_input,
                 a.swap_attention_output) for a in acts}
    if len(policies) > 1:
        out.append(f"a different policy per layer ({len(policies)} distinct among {len(acts)} layers): Megatron "
                   f"applies one recompute/offload setting to every layer (block recompute: first N per stage)")
    swapped = [i for i, a in enumerate(acts) if not a.keep_all and a.swap_fraction > 0]
    if swapped:
        fractions = sorted({round(acts[i].swap_fraction, 2) for i in swapped})
        out.append(f"per-layer token swap fractions {fractions[0]:.0%}-{fractions[-1]:.0%} (layers "
                   f"{layer_ranges(swapped)}): megatron-core 0.16.1 has no activation_offload_fraction; "
                   f"fine-grained offloading moves whole module inputs, not the MLP's internals")
    nvme = [i for i, a in enumerate(acts) if not a.keep_all and a.tier == "nvme"
            and (a.swap_fraction > 0 or a.swap_input or a.swap_attention_output)]
    if nvme:
        out.append(f"NVMe tier for activations (layers {layer_ranges(nvme)}): Megatron offloads to CPU only")
    if states.cpu_chunks:
        out.append(f"parameters and gradients of {len(states.cpu_chunks)} of {states.num_chunks} layer chunks in host "
                   f"memory: Megatron offloads optimizer states only (optimizer_offload_fraction)")
    if states.cpu_outer:
        out.append(f"{'+'.join(states.cpu_outer)} states as CPU chunks: Megatron offloads optimizer "
                   f"states only (optimizer_offload_fraction)")
    if par.zero_stage == 2:
        out.append("ZeRO-2 is Megatron-FSDP 'optim_grads' here; the distributed optimizer alone is ZeRO-1")
    counts = _stage_counts(plan)
    if len(set(counts[1:-1])) > 1:
        out.append(f"uneven pipeline stages {counts}: Megatron sets only the first and last stage sizes")
    if plan.tiling.loss_chunk_tokens or plan.tiling.mlp_chunk_tokens:
        parts = [f"{k} {v} tokens" for k, v in (("loss", plan.tiling.loss_chunk_tokens),
                                                 ("MLP", plan.tiling.mlp_chunk_tokens)) if v]
        out.append(f"token tiling ({', '.join(parts)}): no megatron-core config field")
    if plan.memory_layout:
        out.append("the planned activation arena layout: Megatron uses the framework allocator")
    return out


def build_sections(plan: Plan, alt: Alternative) -> dict[str, dict[str, Any]]:
    """YAML sections: model_parallel / transformer / ddp / optimizer / training fields."""
    shape, par = ModelShape(**plan.model), plan.parallel
    settings = alt.settings
    model_parallel: dict[str, Any] = {
        "tensor_model_parallel_size": par.tp, "pipeline_model_parallel_size": par.pp,
        "context_parallel_size": par.sp, "sequence_parallel": par.tp > 1, "bf16": plan.dtype == "bf16",
        "params_dtype": TORCH_DTYPES[plan.dtype]}
    if par.pp > 1:
        model_parallel["pipeline_dtype"] = TORCH_DTYPES[plan.dtype]   # Megatron requires it with pp > 1
    if par.schedule == "interleaved-1f1b":
        model_parallel["virtual_pipeline_model_parallel_size"] = 2
    for key in ("cpu_offloading", "cpu_offloading_num_layers", "cpu_offloading_activations",
                "cpu_offloading_weights"):
        if key in settings:
            model_parallel[key] = settings[key]
    transformer: dict[str, Any] = {
        "num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads, "num_query_groups": shape.num_kv_heads,
        "ffn_hidden_size": shape.ffn_hidden_size, "kv_channels": shape.head_dim,
        "gated_linear_unit": shape.mlp == "swiglu", "normalization": "RMSNorm",
        "layernorm_epsilon": shape.norm_eps,
        "add_bias_linear": False, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    if shape.qk_norm:   # Qwen3's per-head q/k norms (Megatron-Core's TransformerConfig field)
        transformer["qk_layernorm"] = True
    if par.sp > 1:
        transformer["cp_comm_type"] = "a2a" if par.sp_kind == "ulysses" else "p2p"
    counts = _stage_counts(plan)
    if par.pp > 1 and len(set(counts)) > 1:
        transformer["num_layers_in_first_pipeline_stage"] = counts[0]
        transformer["num_layers_in_last_pipeline_stage"] = counts[-1]
    for key in ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
                "fine_grained_activation_offloading", "offload_modules"):
        if key in settings:
            transformer[key] = settings[key]
    ddp: dict[str, Any] = {"use_distributed_optimizer": par.zero_stage >= 1}
    if par.zero_stage >= 2:
        ddp.update(use_megatron_fsdp=True, data_parallel_sharding_strategy=(
            "optim_grads" if par.zero_stage == 2 else "optim_grads_params"))
    fraction = settings["optimizer_offload_fraction"]
    optimizer: dict[str, Any] = {"optimizer": "adam", "bf16": plan.dtype == "bf16",
                                 "use_distributed_optimizer": par.zero_stage >= 1}
    if fraction:
        optimizer.update(optimizer_cpu_offload=True, optimizer_offload_fraction=fraction)
    training = {"seq_length": plan.seq_len, "micro_batch_size": plan.micro_batch_size,
                "global_batch_size": plan.global_batch_size,
                "position_embedding_type": "rope" if shape.rope else "learned_absolute"}
    if not shape.rope:
        training["max_position_embeddings"] = shape.max_seq_len
    return dict(model_parallel=model_parallel, transformer=transformer, ddp=ddp, optimizer=optimizer,
                training=training)


def command_line(sections: dict[str, dict[str, Any]]) -> list[str]:
    """The same settings as Megatron-LM style flags (`--field-name value`, booleans as switches)."""
    renames = {"num_query_groups": "--group-query-attention --num-query-groups",
               "layernorm_epsilon": "--norm-epsilon", "num_attention_heads": "--num-attention-heads"}
    skip = {"gated_linear_unit", "add_bias_linear", "params_dtype", "pipeline_dtype"}
    swiglu = sections.get("transformer", {}).get("gated_linear_unit", True)
    flags = ["--swiglu"] * swiglu + ["--disable-bias-linear", "--untie-embeddings-and-output-weights"]
    seen: set[str] = set()
    for section, fields in sections.items():
        for key, value in fields.items():
            if key in skip or key in seen or (key == "num_query_groups"
                                              and value == fields.get("num_attention_heads")):
                continue
            seen.add(key)
            flag = renames.get(key, "--" + key.replace("_", "-"))
            if isinstance(value, bool):
                if value:
                    flags.append(flag)
            elif isinstance(value, list):
                flags.append(f"{flag} {' '.join(map(str, value))}")
            else:
                flags.append(f"{flag} {value}")
    return flags


def _header(plan: Plan, missing: list[str], record: dict[str, Any]) -> str:
    lines = ["Megatron-core 0.16.1 arguments for a disttrain plan (written by `disttrain plan --emit megatron`).",
             "Build: ModelParallelConfig/TransformerConfig(**model_parallel, **transformer,",
             "       activation_func=torch.nn.functional.silu), DistributedDataParallelConfig(**ddp),",
             "       OptimizerConfig(**optimizer, lr=...); *_dtype values are torch dtype names",
             "       (getattr(torch, name)); `command_line` holds the same as Megatron-LM flags.", "",
             f"Cannot be expressed ({len(missing)}):"]
    lines += [f"  - {item}" for item in missing] or ["  (nothing)"]
    full, near = record["full_plan"], record["nearest_expressible"]
    lines += ["", "Predicted by the planner's cost model (per rank, busiest stage):"]
    for label, cost in (("full plan", full), ("nearest expressible", near)):
        verdict = "fits" if cost["fits"] else "does NOT fit: " + "; ".join(cost["violations"])
        lines.append(f"  {label}: step {cost['step_time_s']:.4g} s, device {cost['device_gib']:.2f} GiB, "
                     f"host {cost['host_gib']:.2f} GiB, nvme {cost['nvme_gib']:.2f} GiB, {verdict}")
    lines.append(f"  nearest = {near['name']}")
    return "\n".join("# " + line if line else "#" for line in lines) + "\n"


def export(plan: Plan, out_dir: Path, *, params: CostParams | None = None) -> ExportResult:
    """Write `megatron.yaml` for `plan` into `out_dir`; return what it could not express."""
    full = evaluate_plan(plan, params=params)
    alt, nearest, costed = choose_nearest(alternatives(plan), params)
    missing = unexpressed(plan)
    record = costs_record(full, alt.name, nearest, costed)
    sections = build_sections(plan, alt)
    document = dict(sections, command_line=command_line(sections),
                    _disttrain={"cannot_express": missing, "predicted": record})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAME
    path.write_text(_header(plan, missing, record) + yaml.safe_dump(document, sort_keys=False, width=100))
    return ExportResult(stack="megatron", path=path, unexpressed=tuple(missing), full=full,
                        nearest=nearest, chosen=alt.name, alternatives=costed)
