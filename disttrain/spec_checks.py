"""The checks across spec sections (parallel degrees against the world size and the
model, batch sizes, learning-rate schedule, data and launcher), run once the sections are
valid and resolved; each failure is one `SpecError` line naming the YAML path.
"""

from __future__ import annotations

from disttrain.spec_sections import JobSpec, LaunchContext, SpecError
from planner.hardware import HardwareSpec
from planner.shapes import ModelShape


def tensor_parallel_error(shape: ModelShape, tp: int) -> str | None:
    """Why `shape` cannot be split over `tp` tensor-parallel ranks (None when it can): heads,
    kv heads, ffn and hidden features are each divided among the tp ranks; the vocabulary is
    padded to a multiple of tp (`disttrain.parallel.tensor.padded_vocab_size`). Qwen3's q/k
    norm weights (one head_dim weight every head uses) are replicated over tp, their
    gradients summed over it (`disttrain.parallel.grad_reduce.TpReplicatedGrads`)."""
    for name in ("num_heads", "num_kv_heads", "ffn_hidden_size", "hidden_size"):
        if getattr(shape, name) % tp:
            return f"model.{name} ({getattr(shape, name)}) must be divisible by tp, got {tp}"
    if tp > 1 and shape.qkv_bias:
        return (f"model.qkv_bias: tensor parallelism does not split q/k/v biases yet (Qwen2 / "
                f"Qwen2.5), got tp {tp}")
    return None


def _cross_checks(spec: JobSpec, shape: ModelShape, hw: HardwareSpec,
                  launch: LaunchContext | None = None) -> None:
    tr, par = spec.train, spec.parallel
    world = hw.world_size
    for name in ("dp", "sp", "pp", "tp", "num_microbatches", "tp_overlap_chunks"):
        value = getattr(par, name)
        if value != "auto" and value < 1:
            raise SpecError(f"parallel.{name}: must be >= 1 or auto, got {value}")
    fixed = {n: getattr(par, n) for n in ("dp", "sp", "pp", "tp") if getattr(par, n) != "auto"}
    product = 1
    for v in fixed.values():
        product *= v
    if all(n in fixed for n in ("dp", "sp", "pp")) and product != world:
        label = "dp*sp*pp*tp" if "tp" in fixed else "dp*sp*pp"
        raise SpecError(f"parallel: {label} = {product} must equal the cluster's world size "
                        f"({hw.nodes} nodes x {hw.devices_per_node} devices = {world})")
    tp = 1 if par.tp == "auto" else par.tp
    if tensor_parallel_error(shape, tp):
        raise SpecError(f"parallel.tp: {tensor_parallel_error(shape, tp)}")
    if world % product:
        raise SpecError(f"parallel: fixed degrees {fixed} multiply to {product}, which does not "
                        f"divide the world size {world}")
    if par.sp != "auto":
        if tr.seq_len % par.sp:
            raise SpecError(f"train.seq_len: must be a positive multiple of parallel.sp "
                            f"({par.sp}), got {tr.seq_len}")
        if par.sp_kind == "ulysses" and shape.num_heads % par.sp:
            raise SpecError(f"parallel.sp: Ulysses needs num_heads ({shape.num_heads}) divisible "
                            f"by sp, got {par.sp}; use sp_kind: ring or another sp")
        if par.sp_kind == "ulysses" and (shape.num_heads // tp) % par.sp:
            raise SpecError(f"parallel.sp: Ulysses needs the heads left after tensor parallelism "
                            f"(num_heads / tp = {shape.num_heads // tp}) divisible by sp, got "
                            f"{par.sp}; use sp_kind: ring or a smaller tp or sp")
    if spec.memory.recompute == "selective" and tp > 1:
        raise SpecError(f"memory.recompute: 'selective' (op-level checkpointing) does not run "
                        f"under tensor parallelism, got parallel.tp {tp}; use recompute: auto "
                        f"or parallel.tp: 1")
    if par.pp != "auto" and par.pp > shape.num_layers:
        raise SpecError(f"parallel.pp: must be <= model.num_layers ({shape.num_layers}), "
                        f"got {par.pp}")
    dp = par.dp if par.dp != "auto" else 1
    if tr.micro_batch_size != "auto" and tr.micro_batch_size < 1:
        raise SpecError(f"train.micro_batch_size: must be >= 1 or auto, got {tr.micro_batch_size}")
    if tr.micro_batch_size == "auto" and tr.global_batch_size % dp:
        raise SpecError(f"train.global_batch_size: must be a multiple of parallel.dp ({dp}), "
                        f"got {tr.global_batch_size}")
    if tr.micro_batch_size != "auto" and tr.global_batch_size % (tr.micro_batch_size * dp):
        raise SpecError(f"train.global_batch_size: must be a multiple of micro_batch_size x dp "
                        f"({tr.micro_batch_size} x {dp}), got {tr.global_batch_size}")
    if tr.seq_len > shape.max_seq_len and spec.model.hf is None:  # model.hf: checked there
        raise SpecError(f"train.seq_len: exceeds model.max_seq_len ({shape.max_seq_len}), got "
                        f"{tr.seq_len}; raise model.max_seq_len to train longer sequences")
    if tr.min_lr > tr.lr:
        raise SpecError(f"train.min_lr: must be <= train.lr ({tr.lr}), got {tr.min_lr}")
    if not all(0.0 <= b < 1.0 for b in tr.adam_betas):
        raise SpecError(f"train.adam_betas: each must be in [0, 1), got {list(tr.adam_betas)}")
    if tr.warmup_steps > tr.steps:
        raise SpecError(f"train.warmup_steps: must be <= train.steps ({tr.steps}), "
                        f"got {tr.warmup_steps}")
    if spec.data.kind == "text" and shape.vocab_size < 259:
        raise SpecError(f"model.vocab_size: byte-level text needs at least 259 token ids, "
                        f"got {shape.vocab_size}")
    if spec.data.kind in ("tokens", "documents") and spec.data.path is None:
        raise SpecError(f"data.path: required for data.kind '{spec.data.kind}'")
    _document_checks(spec, shape)
    if spec.memory.activation_offload == "nvme" and not hw.has_nvme:
        raise SpecError("memory.activation_offload: 'nvme' needs cluster.nvme (this cluster has "
                        "no NVMe tier)")
    launcher = launch.launcher if launch is not None else spec.launch.launcher
    if launcher == "local" and world != 1:
        raise SpecError(f"launch.launcher: 'local' runs one process but the cluster has {world} "
                        f"devices; use torchrun or ray, or set cluster.devices_per_node: 1")
    if (launch is None and spec.launch.ray_address is not None
            and spec.launch.launcher != "ray"):
        raise SpecError("launch.ray_address: only used with launch.launcher: ray")


def _document_checks(spec: JobSpec, shape: ModelShape) -> None:
    data, tr = spec.data, spec.train
    if data.kind != "documents":
        for name in ("ids_field", "tokenizer", "cache_dir"):
            if getattr(data, name) is not None:
                raise SpecError(f"data.{name}: only used with data.kind: documents")
        if data.pad_to_multiple_of or data.valid_fraction:
            name = "pad_to_multiple_of" if data.pad_to_multiple_of else "valid_fraction"
            raise SpecError(f"data.{name}: only used with data.kind: documents")
    if data.ids_field is not None and data.tokenizer is not None:
        raise SpecError("data.tokenizer: not used with data.ids_field (ids are tokenized "
                        "already); set one of them")
    if tr.eval_every and not data.valid_fraction:
        raise SpecError("train.eval_every: needs a held-out split (data.valid_fraction > 0)")
    if (data.kind == "documents" and data.tokenizer is None and data.ids_field is None
            and getattr(spec.model, "hf", None) is None and shape.vocab_size < 259):
        raise SpecError(f"model.vocab_size: documents with the byte tokenizer need at least "
                        f"259 token ids, got {shape.vocab_size}")
