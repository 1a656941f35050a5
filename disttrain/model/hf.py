"""The Hugging Face adapter: HF safetensors <-> disttrain's Llama, and the model dir's tokenizer.

The model file (`llama.py`) stays the model; this module only moves tensors between an HF
directory and an unmodified `build_model(shape)` model, by name (`hf_config.hf_names`), and
loads the tokenizer from local files. Config parsing and checks are in `hf_config` (no torch).

    model: {hf: DIR}  ->  spec: read_hf_source (shape from config.json, headers checked)
                      ->  engine: build_model(shape) -> load_hf_weights(model, DIR) -> parallelism
    disttrain export  ->  hf_state_dict(full checkpoint state) -> model.safetensors + config.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from disttrain.model.hf_config import (FIELD, HfConfigError, HfSource, config_from_shape,
                                       hf_names, read_hf_source, safetensors_files)
from disttrain.spec import SpecError
from planner.shapes import ModelShape

__all__ = ["HfConfigError", "HfSource", "TOKENIZER_FILES", "config_from_shape",
           "hf_state_dict", "load_hf_weights", "read_hf_source"]


def load_hf_weights(model: nn.Module, path: Path) -> None:
    """Copy the weights of HF directory `path` into `model` (a `build_model(shape)` model of
    the shape read from the same directory) in place, converted to the model's dtype."""
    from safetensors import safe_open

    names = hf_names(model.shape)
    params = dict(model.named_parameters())
    assert set(params) == set(names), sorted(set(params) ^ set(names))
    try:
        files = safetensors_files(path)
    except HfConfigError as exc:  # checked at spec time; the directory changed since
        raise SpecError(str(exc)) from None
    by_file: dict[Path, list[str]] = {}
    for ours in names:
        by_file.setdefault(files[names[ours]], []).append(ours)
    with torch.no_grad():
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for ours in group:
                    tensor = f.get_tensor(names[ours])
                    if tensor.shape != params[ours].shape:  # checked at spec time; a file changed
                        raise SpecError(f"{FIELD}: {names[ours]} has shape {list(tensor.shape)}, "
                                        f"expected {list(params[ours].shape)}")
                    params[ours].copy_(tensor.to(params[ours].dtype))


def hf_state_dict(state: dict[str, torch.Tensor], shape: ModelShape,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF-named tensors of a full disttrain state ({parameter name: tensor}, as
    `checkpoint.load_full_model_state` returns), contiguous, in `dtype`."""
    names = hf_names(shape)
    if set(state) != set(names):
        missing = sorted(set(names) - set(state)) or sorted(set(state) - set(names))
        raise ValueError(f"state does not match the model shape (first difference: "
                         f"{missing[0]})")
    return {names[k]: v.detach().to(dtype).contiguous() for k, v in state.items()}


# --- tokenizer ----------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
"""Files that make up an HF tokenizer (those present are copied on export; the tokenizer
itself loads with `disttrain.data.documents.load_tokenizer`)."""


