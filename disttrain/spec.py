"""The job spec: one YAML file describes a training job; this module validates it.

Strict: unknown keys are errors, ranges are checked, and every error a user can cause is
reported as one line naming the YAML path, e.g.
    train.seq_len: must be a positive multiple of parallel.sp (8), got 1000
Decisions the planner can make (`parallel.*`, `memory.*`) accept `auto`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from planner.hardware import CLUSTER_PRESETS, GB, GiB, HardwareSpec
from planner.request import PlanRequest
from planner.shapes import MODEL_PRESETS, ModelShape

Auto = Literal["auto"]


class SpecError(ValueError):
    """A user error in a job spec: the message is one line starting with the YAML path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class TrainSection(_Section):
    seq_len: int = Field(gt=0)
    """Tokens per sequence."""
    micro_batch_size: int = Field(1, gt=0)
    """Sequences per forward/backward on one data-parallel rank."""
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


class Job:
    """A validated spec with everything derived from it resolved once."""

    def __init__(self, spec: JobSpec, base_dir: Path, launch: LaunchContext | None = None):
        self.spec = spec
        self.base_dir = base_dir
        self.launch = launch
        self.hf = _hf_source(spec, base_dir)
        """The model.hf directory read and checked (disttrain.model.hf_config.HfSource), or None."""
        self.shape = self.hf.shape if self.hf is not None else _model_shape(spec.model)
        self.hardware = _hardware(spec.cluster, base_dir)
        if launch is not None:
            self.hardware = _launched_hardware(spec.cluster, self.hardware, launch)
        _cross_checks(spec, self.shape, self.hardware, launch)
        self.data_path = _data_path(spec.data, base_dir)
        self.output_dir = Path(spec.output_dir.replace("${name}", spec.name))

    @property
    def dtype(self) -> str:
        return self.spec.model.dtype

    def plan_request(self) -> PlanRequest:
        par, mem, pl, tr = self.spec.parallel, self.spec.memory, self.spec.planner, self.spec.train
        fixed = lambda v: None if v == "auto" else v  # noqa: E731
        return PlanRequest(
            model=self.shape, hardware=self.hardware, dtype=self.dtype, seq_len=tr.seq_len,
            micro_batch_size=tr.micro_batch_size, global_batch_size=tr.global_batch_size,
            dp=fixed(par.dp), sp=fixed(par.sp), sp_kind=fixed(par.sp_kind), pp=fixed(par.pp),
            tp=fixed(par.tp), tp_overlap_chunks=fixed(par.tp_overlap_chunks),
            overlap_param_gather=fixed(par.overlap_param_gather),
            grad_reduce_dtype=getattr(tr, "grad_reduce_dtype", "fp32"),
            num_microbatches=fixed(par.num_microbatches), zero_stage=fixed(par.zero_stage),
            activation_offload=mem.activation_offload, recompute=mem.recompute,
            grad_clip=tr.grad_clip, solver=pl.solver, time_limit_s=pl.time_limit_s,
            attention_fraction=self.attention_fraction())

    def attention_fraction(self) -> float | None:
        """Packed documents: the measured share of full causal attention document masking
        leaves (tokenizes the data once, cached); None for other data (one document per
        sequence is assumed)."""
        if self.spec.data.kind != "documents":
            return None
        from disttrain.data.packing import build_document_batches  # data imports this module

        train, _ = build_document_batches(self, progress=False)
        return train.attention_fraction()


def load_job(path: str | Path, launch: LaunchContext | None = None) -> Job:
    """Read, validate and resolve a job spec (as started by `launch`, default: as the spec
    says); raises SpecError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return job_from_dict(raw, base_dir=path.resolve().parent, launch=launch)


def job_from_dict(raw: object, base_dir: Path = Path("."),
                  launch: LaunchContext | None = None) -> Job:
    if not isinstance(raw, dict):
        raise SpecError("spec: must be a mapping of sections (name, model, train, ...)")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_first_error(exc)) from None
    try:
        return Job(spec, base_dir, launch)
    except SpecError:
        raise
    except ValueError as exc:  # a shape or hardware rule from the planner's dataclasses
        raise SpecError(str(exc)) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("int", "literal["))
           and str(p) != "bool"]
    path = ".".join(loc) or "spec"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        what = "section" if len(loc) == 1 else "key"
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6) if loc else []
        hint = f"; did you mean {close[0]!r}?" if close else (
            f"; known: {', '.join(known)}" if known else "")
        return f"{path}: unknown {what}{hint}"
    if kind == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"]
    if "input" in err and kind not in ("model_type", "dict_type"):
        return f"{path}: {msg}, got {err['input']!r}"
    return f"{path}: {msg}"


def _known_keys(loc: list[str]) -> list[str]:
    """The field names of the spec section at `loc` (a path of field names from the top)."""
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return []
        candidates = (field.annotation, *get_args(field.annotation))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                     None)
    return list(model.model_fields) if model else []


_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                 "vocab_size", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings", "mlp",
                 "positions")


def _model_shape(section: ModelSection) -> ModelShape:
    overrides = {f: getattr(section, f) for f in _SHAPE_FIELDS if getattr(section, f) is not None}
    if section.preset is not None:
        if section.preset not in MODEL_PRESETS:
            raise SpecError(f"model.preset: unknown preset {section.preset!r}; "
                            f"known: {', '.join(MODEL_PRESETS)}")
        base = MODEL_PRESETS[section.preset].to_dict()
    else:
        required = _SHAPE_FIELDS[:6]
        missing = [f for f in required if f not in overrides]
        if missing:
            raise SpecError(f"model.{missing[0]}: required when model.preset is not given")
        base = {}
    try:
        return ModelShape(**{**base, **overrides})
    except ValueError as exc:
        raise SpecError(f"model.{exc}") from None


def _hf_source(spec: JobSpec, base_dir: Path):
    if spec.model.hf is None:
        return None
    given = [f for f in ("preset", *_SHAPE_FIELDS) if getattr(spec.model, f) is not None]
    if given:
        raise SpecError(f"model.{given[0]}: not allowed with model.hf (the shape comes from its "
                        f"config.json)")
    from disttrain.model.hf_config import HfConfigError, read_hf_source  # imports torch

    try:
        return read_hf_source(_resolve(spec.model.hf, base_dir), seq_len=spec.train.seq_len)
    except HfConfigError as exc:
        raise SpecError(str(exc)) from None


def _hardware(section: ClusterSection, base_dir: Path) -> HardwareSpec:
    if section.preset == "probe":
        from planner.hardware import probe  # measured on this machine

        nvme_path = _resolve(section.nvme.path, base_dir) if section.nvme else None
        base = probe(nvme_path=nvme_path).to_dict()
    elif section.preset is not None:
        if section.preset not in CLUSTER_PRESETS:
            raise SpecError(f"cluster.preset: unknown preset {section.preset!r}; known: probe, "
                            f"{', '.join(CLUSTER_PRESETS)}")
        base = CLUSTER_PRESETS[section.preset].to_dict()
    else:
        base = {"name": "custom"}
    over: dict = {}
    for f in ("nodes", "devices_per_node"):
        if getattr(section, f) is not None:
            over[f] = getattr(section, f)
    if section.device is not None:
        over.update(device_name=section.device.name,
                    device_memory_bytes=int(section.device.memory_gib * GiB),
                    peak_flops={k: v * 1e12 for k, v in section.device.peak_tflops.items()})
    if section.host_memory_gib is not None:
        over["host_memory_bytes"] = int(section.host_memory_gib * GiB)
    for f, key in (("host_link_gbps", "host_link_bw"), ("intra_node_gbps", "intra_node_bw"),
                   ("inter_node_gbps", "inter_node_bw")):
        if getattr(section, f) is not None:
            over[key] = getattr(section, f) * GB
    if section.nvme is not None:
        nvme = section.nvme
        read = nvme.read_gbps * GB if nvme.read_gbps else \
            base.get("nvme_read_bw") or NVME_DEFAULT_READ_GBPS * GB
        write = nvme.write_gbps * GB if nvme.write_gbps else \
            base.get("nvme_write_bw") or NVME_DEFAULT_WRITE_GBPS * GB
        over.update(nvme_path=str(_resolve(nvme.path, base_dir)),
                    nvme_capacity_bytes=int(nvme.capacity_gib * GiB),
                    nvme_read_bw=read, nvme_write_bw=write)
    merged = {**base, **over}
    if section.preset is not None and over:
        merged["name"] = f"{base['name']}+overrides"
    try:
        return HardwareSpec(**merged)
    except TypeError as exc:  # no preset and a required field not given
        field = str(exc).rsplit(" ", 1)[-1].strip("'")
        raise SpecError(f"cluster: explicit cluster needs more fields ({field}); "
                        f"or give cluster.preset") from None
    except ValueError as exc:
        raise SpecError(f"cluster.{exc}") from None


def _launched_hardware(section: ClusterSection, hw: HardwareSpec,
                       launch: LaunchContext) -> HardwareSpec:
    """The cluster with the launch's nodes and processes per node; an explicit spec value that
    differs is a conflict (a preset's device count is only a default)."""
    changes = {}
    for name, value in (("nodes", launch.nodes), ("devices_per_node", launch.devices_per_node)):
        if value is None or value == getattr(hw, name):
            continue
        explicit = getattr(section, name)
        if explicit is not None:
            raise SpecError(f"cluster.{name}: {explicit}, but {launch.launcher} started {value} "
                            f"({'nodes' if name == 'nodes' else 'processes per node'}); remove "
                            f"cluster.{name} (the launch decides) or launch {explicit}")
        changes[name] = value
    return hw.replace(**changes) if changes else hw


def tensor_parallel_error(shape: ModelShape, tp: int) -> str | None:
    """Why `shape` cannot be split over `tp` tensor-parallel ranks (None when it can): heads,
    kv heads, ffn and hidden features are each divided among the tp ranks; the vocabulary is
    padded to a multiple of tp (`disttrain.parallel.tensor.padded_vocab_size`)."""
    for name in ("num_heads", "num_kv_heads", "ffn_hidden_size", "hidden_size"):
        if getattr(shape, name) % tp:
            return f"model.{name} ({getattr(shape, name)}) must be divisible by tp, got {tp}"
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
    if par.pp != "auto" and par.pp > shape.num_layers:
        raise SpecError(f"parallel.pp: must be <= model.num_layers ({shape.num_layers}), "
                        f"got {par.pp}")
    dp = par.dp if par.dp != "auto" else 1
    if tr.global_batch_size % (tr.micro_batch_size * dp):
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


def _data_path(section: DataSection, base_dir: Path) -> Path | None:
    if section.path is None:
        return None
    path = _resolve(section.path, base_dir)
    if not path.exists():
        raise SpecError(f"data.path: {path} does not exist")
    return path


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)
