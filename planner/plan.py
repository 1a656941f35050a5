"""The plan: the one contract between planner and runtime.

A frozen, versioned document serialised to JSON. The runtime reads only what is here, so a
plan written on a laptop for a cluster that is not there runs unchanged where it is.
Loading checks `version` and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLAN_VERSION = 1
SP_KINDS = ("ulysses", "ring")
SCHEDULES = ("1f1b", "interleaved-1f1b", "none")
TIERS = ("cpu", "nvme")
TP_COLUMN_BACKWARDS = ("lean", "whole")
"""How tensor parallelism's column-parallel backward runs its GEMMs (`ParallelPlan`)."""
OUTER_NAMES = ("embedding", "head")
"""Outer model states a plan may hold as CPU chunks (planner.outer uses the same names)."""


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """Parallel degrees and schedule; dp * tp * sp * pp == world size."""

    dp: int = 1
    """Data-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree (innermost axis of the rank grid: a TP group stays in a node)."""
    sp: int = 1
    """Sequence-parallel degree."""
    sp_kind: str = "ulysses"
    """'ulysses' (all-to-all around attention) or 'ring' (K/V passed around a ring)."""
    pp: int = 1
    """Pipeline-parallel degree."""
    num_microbatches: int = 1
    """Microbatches per optimizer step per pipeline (gradient accumulation when pp == 1)."""
    schedule: str = "none"
    """Pipeline schedule: '1f1b', 'interleaved-1f1b' or 'none' (pp == 1)."""
    zero_stage: int = 0
    """ZeRO stage 0-3; states are sharded over the dp x sp group."""
    tp_overlap_chunks: int = 1
    """Token blocks over which every tensor-parallel all-gather -> GEMM and GEMM ->
    reduce-scatter pair is pipelined, each block's collective issued asynchronously so that
    it overlaps the other blocks' GEMMs (1: one blocking collective each)."""
    stages: tuple[tuple[int, int], ...] = ()
    """Half-open decoder-layer range [start, end) of each pipeline stage."""
    overlap_param_gather: bool = False
    """ZeRO 0-2: each chunk's post-update parameter all-gather runs beside the next step's
    forward, waited for before the chunk's first use (False: blocking in the step)."""
    tp_column_backward: str = "lean"
    """How the column-parallel linears' backward (q/k/v, the MLP's input projections) runs
    its GEMMs (disttrain/parallel/tp_linear.py): 'lean', tp GEMMs of H / tp features each
    (plans written before the choice existed), or 'whole', one GEMM per input / weight
    gradient over all H features on transposed layouts (same peak bytes, two small (T, H/tp)
    transposes more; faster where narrow GEMMs are slower, GPUs)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "sp", "pp", "num_microbatches", "tp_overlap_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.sp_kind not in SP_KINDS:
            raise ValueError(f"parallel.sp_kind: must be one of {SP_KINDS}, got {self.sp_kind!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallel.schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage: must be 0-3, got {self.zero_stage}")
        if self.tp_column_backward not in TP_COLUMN_BACKWARDS:
            raise ValueError(f"parallel.tp_column_backward: must be one of {TP_COLUMN_BACKWARDS}, "
                             f"got {self.tp_column_backward!r}")
        if not isinstance(self.overlap_param_gather, bool):
            raise ValueError(f"parallel.overlap_param_gather: must be true or false, got "
                             f"{self.overlap_param_gather!r}")
        per_rank = 2 if self.schedule == "interleaved-1f1b" else 1  # virtual stages per rank
        if self.stages and len(self.stages) != self.pp * per_rank:
            raise ValueError(f"parallel.stages: need {self.pp * per_rank} ranges for pp="
                             f"{self.pp} with schedule {self.schedule!r}, got {len(self.stages)}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.sp * self.pp


@dataclass(frozen=True, kw_only=True)
class LayerActivationPlan:
    """What one decoder layer keeps, swaps and recomputes."""

    keep_all: bool = False
    """Plain layer: autograd keeps every saved tensor (no swap, no recompute)."""
    swap_fraction: float = 0.0
    """Share of tokens whose token-local activations are swapped; the rest are recomputed."""
    tier: str = "cpu"
    """Where swapped bytes go: 'cpu' or 'nvme'."""
    swap_input: bool = False
    """Swap the layer input to `tier` instead of keeping it on the device."""
    swap_attention_output: bool = False
    """Swap the attention output (+ log-sum-exp) to `tier` instead of keeping it."""
    selective: bool = False
    """Op-level selective checkpointing (torchtitan's "selective op" AC, `planner.selective`):
    keep the input, every other matmul's output and the attention core's output; recompute
    the rest in the backward. Nothing is swapped (keep_all and the swap fields stay off)."""

    def __post_init__(self) -> None:
        if self.selective not in (True, False):
            raise ValueError(f"activations.selective: must be true or false, got {self.selective!r}")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ValueError(f"activations.swap_fraction: must be in [0, 1], got {self.swap_fraction}")
        if self.tier not in TIERS:
            raise ValueError(f"activations.tier: must be one of {TIERS}, got {self.tier!r}")
        if self.selective and (self.keep_all or self.swap_fraction > 0 or self.swap_input
                               or self.swap_attention_output):
            raise ValueError("activations.selective: a selective layer neither keeps everything "
                             "nor swaps (keep_all, swap_fraction, swap_input and "
                             "swap_attention_output must be off)")


@dataclass(frozen=True, kw_only=True)
class ModelStatePlan:
    """How parameters, gradients and optimizer states are chunked and placed.

    Chunks hold the decoder layers' states: their parameters packed whole, in execution order,
    into chunks of `chunk_size_bytes`, packing restarting at each pipeline stage, numbered
    from 0 over the whole model in that order. With one layer's bytes (what the planner
    writes) or 0, chunk i is decoder layer i. The embedding, final norm and output head are in
    none of these chunks: their states stay on the device (sharded over dp x sp at ZeRO-3)
    unless `cpu_outer` names them."""

    chunk_size_bytes: int = 0
    """Bytes of parameters per chunk, in the plan's dtype (0: one chunk per layer)."""
    num_chunks: int = 0
    """Number of chunks the decoder layers pack into (0: not stated, not checked)."""
    num_persistent_chunks: int = 0
    """Chunks whose states stay on the device (sharded, gathered when used): those not in
    `cpu_chunks`."""
    num_prefetch_buffers: int = 0
    """Device buffers for gathering / prefetching non-persistent chunks."""
    cpu_chunks: tuple[int, ...] = ()
    """Ids of chunks whose master copy (and optimizer state) lives in host memory."""
    optimizer_on: str = "device"
    """Where the optimizer step of non-CPU chunks runs: 'device' or 'cpu'."""
    cpu_outer: tuple[str, ...] = ()
    """Outer states held as CPU chunks (master, moments and gradient shard in host memory,
    optimizer step on the CPU), as the `cpu_chunks` are: 'embedding' (the first stage's input
    embedding; with tied embeddings also the head) and/or 'head' (the last stage's final norm
    + output head)."""

    def __post_init__(self) -> None:
        bad = [n for n in self.cpu_outer if n not in OUTER_NAMES]
        if bad:
            raise ValueError(f"model_states.cpu_outer: {bad[0]!r} is not one of {OUTER_NAMES}")


@dataclass(frozen=True, kw_only=True)
class TilingPlan:
    """Token tiling of the output head/loss and of token-local blocks."""

    loss_chunk_tokens: int = 0
    """Tokens per chunk of the output head + loss (0: whole sequence at once)."""
    mlp_chunk_tokens: int = 0
    """Tokens per chunk of the MLP in forward and backward (0: untiled)."""
    rebuild_tile_tokens: int = 0
    """Tokens per tile in which a non-kept layer's backward rebuilds (recomputes or swaps in)
    its token-local tensors and runs their backward (0: the whole local sequence at once)."""


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the cost model expects the runtime to measure, per rank."""

    per_rank_peak_bytes: int = 0
    """Predicted peak device bytes of the busiest rank."""
    bytes_by_category: dict[str, int] = field(default_factory=dict)
    """parameters, gradients, optimizer, activations, buffers, fragmentation."""
    host_bytes: int = 0
    """Host memory used per rank for offloaded states and swapped activations."""
    nvme_bytes: int = 0
    """NVMe bytes used per rank."""
    activation_bytes_per_layer: tuple[int, ...] = ()
    """Saved bytes resident on the device per layer under the plan (one microbatch)."""
    step_time_s: float = 0.0
    """Predicted optimizer-step time."""
    time_breakdown: dict[str, float] = field(default_factory=dict)
    """compute, recompute, exposed_transfer, exposed_communication, bubble (seconds)."""
    tokens_per_s: float = 0.0
    """Tokens trained per second, whole job."""
    mfu: float = 0.0
    """Model FLOPs utilisation (model FLOPs / (time * peak * world)), causal convention: model
    FLOPs per token 6N + 6LhS (N = layer parameters + output head; h the attention width,
    heads x head_dim, which is the hidden size unless the shape sets head_dim; attention counts
    the causal half of the score matrix)."""
    mfu_noncausal: float = 0.0
    """The same with Megatron's / torchtitan's non-causal convention (6N + 12LhS per token)."""
    hardware: dict[str, Any] = field(default_factory=dict)
    """The HardwareSpec (as a dict) the prediction was computed for."""
    profile: dict[str, Any] = field(default_factory=dict)
    """The layer profile (as a dict) the prediction was computed from."""


@dataclass(frozen=True, kw_only=True)
class SolverInfo:
    backend: str = "none"
    """'highs', 'cbc', 'greedy' or 'none' (fixed by the user)."""
    status: str = "not-run"
    """Solver status as read from the solver (never assumed optimal)."""
    objective: float = 0.0
    """Objective value (predicted step time, seconds)."""
    solve_time_s: float = 0.0
    """Wall time of the whole search."""
    gap: float = 0.0
    """Relative MIP gap at the end of the solve."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    version: int = PLAN_VERSION
    feasible: bool = True
    """False when no layout fits: `rejected` says why."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelShape as a dict."""
    dtype: str = "fp32"
    seq_len: int = 0
    micro_batch_size: int = 1
    global_batch_size: int = 1
    grad_clip: float = 0.0
    """The job's gradient clipping (0: none): with clipping the CPU optimizer is not overlapped."""
    parallel: ParallelPlan = field(default_factory=ParallelPlan)
    model_states: ModelStatePlan = field(default_factory=ModelStatePlan)
    activations: tuple[LayerActivationPlan, ...] = ()
    """One entry per decoder layer."""
    tiling: TilingPlan = field(default_factory=TilingPlan)
    memory_layout: dict[str, Any] | None = None
    """Arena offsets per buffer and fragmentation ratio, when planned."""
    prediction: Prediction = field(default_factory=Prediction)
    solver: SolverInfo = field(default_factory=SolverInfo)
    rejected: tuple[dict[str, Any], ...] = ()
    """Each {'candidate': {...}, 'reason': str} for layouts that failed."""
    notes: tuple[str, ...] = ()
    """Planner remarks the runtime should know (e.g. KV heads replicated across sp ranks)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        data = dict(data)
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"version: plan version {version} is not supported "
                             f"(this build reads {PLAN_VERSION})")
        _check_keys(cls, data, "plan")
        par = dict(data.get("parallel", {}))
        _check_keys(ParallelPlan, par, "parallel")
        par["stages"] = tuple(tuple(s) for s in par.get("stages", ()))
        data["parallel"] = ParallelPlan(**par)
        data["model_states"] = _build(ModelStatePlan, data.get("model_states", {}), "model_states")
        data["activations"] = tuple(_build(LayerActivationPlan, a, f"activations[{i}]")
                                    for i, a in enumerate(data.get("activations", ())))
        data["tiling"] = _build(TilingPlan, data.get("tiling", {}), "tiling")
        pred = dict(data.get("prediction", {}))
        pred["activation_bytes_per_layer"] = tuple(pred.get("activation_bytes_per_layer", ()))
        data["prediction"] = _build(Prediction, pred, "prediction")
        data["solver"] = _build(SolverInfo, data.get("solver", {}), "solver")
        data["rejected"] = tuple(data.get("rejected", ()))
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_keys(kind, data: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key in plan")


def _build(kind, data, where: str):
    if isinstance(data, kind):
        return data
    data = dict(data)
    _check_keys(kind, data, where)
    if kind is ModelStatePlan:
        for key in ("cpu_chunks", "cpu_outer"):
            if key in data:
                data[key] = tuple(data[key])
    return kind(**data)
