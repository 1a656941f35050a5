"""The job spec's schema: one pydantic model per YAML section (fields, ranges, choices,
defaults, each field's docstring), the error type every spec problem is raised as, and the
launch context a launcher passes in. Loading a spec is `disttrain.spec`; turning sections
into planner objects `disttrain.spec_resolve`; the checks across sections `disttrain.spec_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

Auto = Literal["auto"]


class SpecError(ValueError):
    """A user error in a job spec: the message is one line starting with the YAML path."""


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes true/false (bool, StrictBool, `bool | None`, ...)."""
    return annotation is bool or any(_admits_bool(a) for a in get_args(annotation))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_other_types(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true/false as 1/0 for ints and literals (`zero_stage: no` would be
        ZeRO-0, `seq_len: yes` 1): a boolean is only accepted where the field is one."""
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_not_allowed", "not a boolean (YAML reads "
                                      "true/false/yes/no/on/off as booleans)")
        return value


class ModelSection(_Section):
    preset: str | None = None
    """Name of a published shape (see planner.shapes.MODEL_PRESETS); explicit fields override it."""
    hf: str | None = None
    """A Hugging Face model directory (config.json + *.safetensors; relative to the spec file):
    the shape comes from its config.json and training starts from its weights. Excludes
    preset and the shape fields."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Training dtype."""
    hidden_size: int | None = Field(None, gt=0)
    num_layers: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    ffn_hidden_size: int | None = Field(None, gt=0)
    vocab_size: int | None = Field(None, gt=0)
    max_seq_len: int | None = Field(None, gt=0)
    rope_theta: float | None = Field(None, gt=0)
    norm_eps: float | None = Field(None, gt=0)
    tie_embeddings: bool | None = None
    mlp: str | None = None
    """MLP block: 'swiglu' (Llama, default) or 'gelu' (GPT: 2 matrices, ffn usually 4 x hidden)."""
    positions: str | None = None
    """Position encoding: 'rope' (default) or 'learned' (GPT: a max_seq_len x hidden table)."""
    head_dim: int | None = Field(None, gt=0)
    """Width of one attention head (default hidden_size / num_heads; Qwen3, Mistral-Nemo)."""
    qk_norm: bool | None = None
    """Qwen3's per-head RMSNorm on q and k before RoPE (default false)."""


class TrainSection(_Section):
    seq_len: int = Field(gt=0)
    """Tokens per sequence."""
    micro_batch_size: Union[int, Auto] = 1
    """Sequences per forward/backward on one data-parallel rank; auto: the planner's choice
    among the divisors (up to 8) of the per-rank batch global_batch_size / dp. Training uses
    the plan's value (`Plan.micro_batch_size`), never this field."""
    global_batch_size: int = Field(1, gt=0)
    """Sequences per optimizer step (gradient accumulation is derived)."""
    steps: int = Field(gt=0)
    """Optimizer steps."""
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2), each in [0, 1)."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0)
    """Max global gradient norm (0: no clipping)."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype gradients are reduced in across ranks under `model.dtype: bf16` (they are
    accumulated in fp32 either way); fp32 runs reduce in fp32."""
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = Field(1, gt=0)
    log_to: list[Literal["jsonl", "tensorboard"]] = ["jsonl"]
    """Where step metrics go: metrics.jsonl always; 'tensorboard' adds event files under
    <output_dir>/tensorboard."""
    eval_every: int = Field(0, ge=0)
    """Steps between validation losses on the held-out split (data.valid_fraction); 0: never."""


class DataSection(_Section):
    kind: Literal["synthetic", "text", "tokens", "documents"] = "synthetic"
    """synthetic tokens, byte-level text files, a .npy/.bin memmap of token ids, or
    documents (jsonl / parquet / saved dataset) packed with their boundaries kept."""
    path: str | None = None
    """File or directory (text, documents) or token file; relative to the spec file. Text
    defaults to the bundled corpus."""
    text_field: str = Field("text", min_length=1)
    """documents: the record field holding the text."""
    ids_field: str | None = Field(None, min_length=1)
    """documents: a record field holding token ids instead (no tokenizer then)."""
    tokenizer: str | None = None
    """documents: a Hugging Face tokenizer directory; default model.hf's directory, else
    disttrain's byte tokenizer."""
    cache_dir: str | None = None
    """documents: where tokenized documents are cached (default ~/.cache/disttrain/documents)."""
    pad_to_multiple_of: int = Field(0, ge=0)
    """documents: pad every document to a multiple of this many tokens (0: no padding)."""
    valid_fraction: float = Field(0.0, ge=0, lt=1)
    """documents: share of documents held out for the validation loss (train.eval_every)."""


class DeviceSection(_Section):
    name: str = "custom"
    memory_gib: float = Field(gt=0)
    peak_tflops: dict[Literal["fp32", "bf16"], float]


NVME_DEFAULT_READ_GBPS = 2.0
NVME_DEFAULT_WRITE_GBPS = 1.0
"""Stated defaults for an NVMe tier given without bandwidths and no preset NVMe numbers to
inherit: a conservative PCIe Gen3 x4 SSD (datasheets give ~3 GB/s reads, ~1.5-3 GB/s writes)."""


class NvmeSection(_Section):
    path: str
    capacity_gib: float = Field(ge=0)
    read_gbps: float | None = Field(None, gt=0)
    """GB/s; default: the preset's NVMe read bandwidth, else NVME_DEFAULT_READ_GBPS."""
    write_gbps: float | None = Field(None, gt=0)
    """GB/s; default: the preset's NVMe write bandwidth, else NVME_DEFAULT_WRITE_GBPS."""


class ClusterSection(_Section):
    preset: str | None = "cpu-local"
    """A cluster preset, or 'probe' to measure this machine; explicit fields override it."""
    nodes: int | None = Field(None, gt=0)
    devices_per_node: int | None = Field(None, gt=0)
    device: DeviceSection | None = None
    host_memory_gib: float | None = Field(None, gt=0)
    host_link_gbps: float | None = Field(None, gt=0)
    """Host<->device bandwidth, GB/s (10^9 bytes/s)."""
    nvme: NvmeSection | None = None
    intra_node_gbps: float | None = Field(None, gt=0)
    inter_node_gbps: float | None = Field(None, gt=0)
    attention_kernel: str | None = None
    """The attention kernel generation the job's software stack runs ('flash-attn-2',
    'flash-attn-1'; `planner.efficiency.ATTENTION_KERNEL_TFLOPS`), for pricing a stack other
    than disttrain's; default: the device family's own curve. Pricing only (docs/spec.md)."""


class ParallelSection(_Section):
    dp: Union[int, Auto] = "auto"
    sp: Union[int, Auto] = "auto"
    sp_kind: Literal["ulysses", "ring", "auto"] = "auto"
    pp: Union[int, Auto] = "auto"
    tp: Union[int, Auto] = "auto"
    """Tensor-parallel degree (innermost, inside a node); auto: the planner's choice."""
    num_microbatches: Union[int, Auto] = "auto"
    zero_stage: Union[Literal[0, 1, 2, 3], Auto] = "auto"
    tp_overlap_chunks: Union[int, Auto] = "auto"
    """Token blocks over which tensor parallelism overlaps its collectives with its GEMMs (1:
    blocking); auto: the planner's choice."""
    overlap_param_gather: Union[StrictBool, Auto] = "auto"
    """ZeRO 0-2: run the post-update parameter all-gather beside the next step's forward
    (Megatron's overlap_param_gather); auto: on where it is measured to help (GPUs; on CPU
    nodes see `planner.collectives.param_gather_overlap`)."""


class MemorySection(_Section):
    activation_offload: Literal["auto", "none", "cpu", "nvme"] = "auto"
    recompute: Literal["auto", "none", "full", "token", "selective"] = "auto"


class PlannerSection(_Section):
    solver: Literal["auto", "highs", "cbc"] = "auto"
    time_limit_s: float = Field(10.0, gt=0)


class LaunchSection(_Section):
    launcher: Literal["local", "torchrun", "ray"] = "local"
    ray_address: str | None = None


class JobSpec(_Section):
    name: str = Field(min_length=1)
    model: ModelSection
    train: TrainSection
    data: DataSection = DataSection()
    cluster: ClusterSection = ClusterSection()
    parallel: ParallelSection = ParallelSection()
    memory: MemorySection = MemorySection()
    planner: PlannerSection = PlannerSection()
    launch: LaunchSection = LaunchSection()
    output_dir: str = "runs/${name}"
    """Where metrics, checkpoints and plans go; relative to the current directory."""


@dataclass(frozen=True)
class LaunchContext:
    """What started this process when a launcher did (torchrun, Ray): the launch, not the
    spec, decides the launcher and the world size; the spec's cluster is refused only where it
    truly conflicts (an explicit `cluster.nodes` / `cluster.devices_per_node` that differs)."""

    launcher: Literal["local", "torchrun", "ray"]
    nodes: int | None = None
    """Nodes of the launch (None: the spec's)."""
    devices_per_node: int | None = None
    """Processes per node of the launch (None: the spec's)."""
