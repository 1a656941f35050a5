"""The job spec: one YAML file describes a training job; this module validates it.

Strict: unknown keys are errors, ranges are checked, and every error a user can cause is
reported as one line naming the YAML path, e.g.
    train.seq_len: must be a positive multiple of parallel.sp (8), got 1000
Decisions the planner can make (`parallel.*`, `memory.*`) accept `auto`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    grad_clip: float = Field(1.0, ge=0)
    """Max global gradient norm (0: no clipping)."""
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


class NvmeSection(_Section):
    path: str
    capacity_gib: float = Field(ge=0)
    read_gbps: float = Field(gt=0)
    write_gbps: float = Field(gt=0)


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
    num_microbatches: Union[int, Auto] = "auto"
    zero_stage: Union[Literal[0, 1, 2, 3], Auto] = "auto"


class MemorySection(_Section):
    activation_offload: Literal["auto", "none", "cpu", "nvme"] = "auto"
    recompute: Literal["auto", "none", "full", "token"] = "auto"


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


class Job:
    """A validated spec with everything derived from it resolved once."""

    def __init__(self, spec: JobSpec, base_dir: Path):
        self.spec = spec
        self.base_dir = base_dir
        self.shape = _model_shape(spec.model)
        self.hardware = _hardware(spec.cluster, base_dir)
        _cross_checks(spec, self.shape, self.hardware)
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


def load_job(path: str | Path) -> Job:
    """Read, validate and resolve a job spec; raises SpecError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return job_from_dict(raw, base_dir=path.resolve().parent)


def job_from_dict(raw: object, base_dir: Path = Path(".")) -> Job:
    if not isinstance(raw, dict):
        raise SpecError("spec: must be a mapping of sections (name, model, train, ...)")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_first_error(exc)) from None
    try:
        return Job(spec, base_dir)
    except SpecError:
        raise
    except ValueError as exc:  # a shape or hardware rule from the planner's dataclasses
        raise SpecError(str(exc)) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("int", "literal["))]
    path = ".".join(loc) or "spec"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"]
    if "input" in err and kind not in ("model_type", "dict_type"):
        return f"{path}: {msg}, got {err['input']!r}"
    return f"{path}: {msg}"


_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                 "vocab_size", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings")


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
        over.update(nvme_path=str(_resolve(section.nvme.path, base_dir)),
                    nvme_capacity_bytes=int(section.nvme.capacity_gib * GiB),
                    nvme_read_bw=section.nvme.read_gbps * GB,
                    nvme_write_bw=section.nvme.write_gbps * GB)
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


def _cross_checks(spec: JobSpec, shape: ModelShape, hw: HardwareSpec) -> None:
    tr, par = spec.train, spec.parallel
    world = hw.world_size
    for name in ("dp", "sp", "pp", "num_microbatches"):
        value = getattr(par, name)
        if value != "auto" and value < 1:
            raise SpecError(f"parallel.{name}: must be >= 1 or auto, got {value}")
    fixed = {n: getattr(par, n) for n in ("dp", "sp", "pp") if getattr(par, n) != "auto"}
    product = 1
    for v in fixed.values():
        product *= v
    if len(fixed) == 3 and product != world:
        raise SpecError(f"parallel: dp*sp*pp = {product} must equal the cluster's world size "
                        f"({hw.nodes} nodes x {hw.devices_per_node} devices = {world})")
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
    if par.pp != "auto" and par.pp > shape.num_layers:
        raise SpecError(f"parallel.pp: must be <= model.num_layers ({shape.num_layers}), "
                        f"got {par.pp}")
    dp = par.dp if par.dp != "auto" else 1
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise SpecError(f"train.global_batch_size: must be a multiple of micro_batch_size x dp "
                        f"({tr.micro_batch_size} x {dp}), got {tr.global_batch_size}")
    if tr.seq_len > shape.max_seq_len:
        raise SpecError(f"train.seq_len: exceeds model.max_seq_len ({shape.max_seq_len}), got "
                        f"{tr.seq_len}; raise model.max_seq_len to train longer sequences")
    if tr.min_lr > tr.lr:
        raise SpecError(f"train.min_lr: must be <= train.lr ({tr.lr}), got {tr.min_lr}")
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
    if spec.launch.launcher == "local" and world != 1:
        raise SpecError(f"launch.launcher: 'local' runs one process but the cluster has {world} "
                        f"devices; use torchrun or ray, or set cluster.devices_per_node: 1")
    if spec.launch.ray_address is not None and spec.launch.launcher != "ray":
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
