"""The job spec: one YAML file describes a training job; this module validates it.

Strict: unknown keys are errors, ranges are checked, and every error a user can cause is
reported as one line naming the YAML path, e.g.
    train.seq_len: must be a positive multiple of parallel.sp (8), got 1000
Decisions the planner can make (`parallel.*`, `memory.*`) accept `auto`.

This module loads a spec and formats validation errors; the sections are in
`spec_sections.py`, their resolution into planner objects in `spec_resolve.py` and the checks
across sections in `spec_checks.py` (their names are importable from here too).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import get_args

import yaml
from pydantic import BaseModel, ValidationError

from disttrain.spec_checks import _cross_checks, tensor_parallel_error  # noqa: F401
from disttrain.spec_resolve import (_data_path, _hardware, _hf_source,  # noqa: F401
                                    _launched_hardware, _model_shape, _resolve)
from disttrain.spec_sections import (NVME_DEFAULT_READ_GBPS, NVME_DEFAULT_WRITE_GBPS,  # noqa: F401
                                     Auto, ClusterSection, DataSection, DeviceSection, JobSpec,
                                     LaunchContext, LaunchSection, MemorySection, ModelSection,
                                     NvmeSection, ParallelSection, PlannerSection, SpecError,
                                     TrainSection)
from planner.hardware import GB, GiB  # noqa: F401  (re-exported: tests import GB from here)
from planner.request import PlanRequest


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
            micro_batch_size=fixed(tr.micro_batch_size), global_batch_size=tr.global_batch_size,
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
