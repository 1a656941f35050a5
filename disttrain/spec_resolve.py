"""Turning validated spec sections into the planner's objects: the model shape (a preset,
explicit fields or a Hugging Face directory), the cluster (a preset, `probe`, overrides, the
launch's world size), and paths relative to the spec file. Errors are `SpecError`s naming
the YAML path.
"""

from __future__ import annotations

from pathlib import Path

from disttrain.spec_sections import (NVME_DEFAULT_READ_GBPS, NVME_DEFAULT_WRITE_GBPS,
                                     ClusterSection, DataSection, JobSpec, LaunchContext,
                                     ModelSection, SpecError)
from planner.hardware import CLUSTER_PRESETS, GB, GiB, HardwareSpec
from planner.shapes import MODEL_PRESETS, ModelShape


_SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                 "vocab_size", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings", "mlp",
                 "positions", "head_dim", "qk_norm")


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
    if section.attention_kernel is not None:
        over["attention_kernel"] = section.attention_kernel
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
