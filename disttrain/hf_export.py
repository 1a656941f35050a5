"""`disttrain export RUN_DIR [--step N] --hf OUT`: a checkpoint as a Hugging Face model directory.

Reads the checkpoint's full-shaped DCP keys in this one process (`load_full_model_state`:
whatever dp / sp / pp / ZeRO layout wrote it, no process group) and writes

    OUT/model.safetensors   the weights under HF names (tied models: no lm_head.weight)
    OUT/config.json         the source config.json when the run came from `model.hf`, else a
                            LlamaConfig-equivalent one (Qwen2 when the shape has q/k/v biases)
    OUT/tokenizer files     copied from the `model.hf` directory, when there was one

that `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from disttrain.checkpoint import latest_checkpoint, load_full_model_state, read_checkpoint_meta
from disttrain.model.hf import TOKENIZER_FILES, config_from_shape, hf_state_dict
from disttrain.model.hf_config import shape_from_config
from disttrain.spec import SpecError
from planner.shapes import ModelShape

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
COPIED = (*TOKENIZER_FILES, "generation_config.json")
"""Files of the source HF directory that are copied beside the exported weights."""


@dataclass
class ExportResult:
    step_dir: Path
    """The checkpoint exported."""
    out: Path
    copied: list[str] = field(default_factory=list)
    """Files copied from the source HF directory."""
    note: str | None = None
    """Why nothing was copied from the source directory, if it is gone."""


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step` (default: the latest) under RUN_DIR/checkpoints."""
    if not run_dir.is_dir():
        raise SpecError(f"RUN_DIR: {run_dir} is not a directory")
    ckpt_dir = run_dir / "checkpoints"
    if step is None:
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            raise SpecError(f"RUN_DIR: no checkpoint under {ckpt_dir}")
        return found
    found = ckpt_dir / f"step_{step:07d}"
    if not found.is_dir():
        have = sorted(int(p.name[5:]) for p in ckpt_dir.glob("step_???????") if p.is_dir())
        raise SpecError(f"--step: no checkpoint of step {step} under {ckpt_dir}; available: "
                        f"{', '.join(map(str, have)) or 'none'}")
    return found


def export_hf(run_dir: Path, out: Path, *, step: int | None = None,
              dtype: str = "fp32") -> ExportResult:
    """Write checkpoint `step` (default: latest) of `run_dir` as an HF model directory `out`."""
    step_dir = find_checkpoint(Path(run_dir), step)
    try:
        meta = read_checkpoint_meta(step_dir)["meta"]
    except FileNotFoundError as exc:
        raise SpecError(f"RUN_DIR: {exc}") from None
    shape = ModelShape(**meta["model"])
    if shape.mlp != "swiglu" or shape.positions != "rope":
        raise SpecError(f"RUN_DIR: a GPT-block model (mlp {shape.mlp}, positions "
                        f"{shape.positions}) has no Hugging Face Llama/Qwen2 export")
    source = meta.get("hf")
    config = config_from_shape(shape, base=source["config"] if source else None)
    # The config written must describe exactly the weights written.
    assert shape_from_config(config, seq_len=1) == shape, "config.json does not match the shape"
    torch_dtype, dtype_name = DTYPES[dtype]
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = dtype_name  # transformers 4.56+ writes `dtype`, older `torch_dtype`
    state = hf_state_dict(load_full_model_state(step_dir), shape, torch_dtype)

    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--hf: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    stale = out / "model.safetensors.index.json"  # from an earlier export of a sharded model
    if stale.exists():
        stale.unlink()
    result = ExportResult(step_dir=step_dir, out=out)
    if source:
        src = Path(source["path"])
        if not src.is_dir():
            result.note = f"the source directory {src} is gone: no tokenizer files copied"
        for name in COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
                result.copied.append(name)
    return result
