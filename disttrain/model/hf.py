"""The Hugging Face adapter: HF safetensors <-> disttrain's Llama, and the model dir's tokenizer.

The model file (`llama.py`) stays the model; this module only moves tensors between an HF
directory and an unmodified `build_model(shape)` model, by name (`hf_config.hf_names`), and
loads the tokenizer from local files. Config parsing and checks are in `hf_config` (no torch).

    model: {hf: DIR}  ->  spec: read_hf_source (shape from config.json, headers checked)
                      ->  engine: build_model(shape) -> load_hf_weights(model, DIR) -> parallelism
    disttrain export  ->  hf_state_dict(full checkpoint state) -> model.safetensors + config.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from disttrain.model.hf_config import (FIELD, HfConfigError, HfSource, config_from_shape,
                                       hf_names, read_hf_source, safetensors_files)
from disttrain.spec import SpecError
from planner.shapes import ModelShape

__all__ = ["HfConfigError", "HfSource", "HfTokenizer", "TOKENIZER_FILES", "config_from_shape",
           "hf_state_dict", "load_hf_weights", "load_tokenizer", "read_hf_source"]


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
"""Files that make up an HF tokenizer (those present are copied on export)."""


class HfTokenizer:
    """A model directory's tokenizer, from local files only.

    `tokenizer.json` is read with the `tokenizers` library; a directory with only a slow
    tokenizer (tokenizer.model, vocab.json + merges.txt) goes through
    `transformers.AutoTokenizer(local_files_only=True)`. `fingerprint` hashes the tokenizer
    files, for cache keys of tokenized data."""

    def __init__(self, path: Path, *, field: str = FIELD):
        self.path = path
        present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not path.is_dir() or not any(n in present for n in
                                        ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise SpecError(f"{field}: no tokenizer files in {path} (expected tokenizer.json, "
                            f"or tokenizer.model / vocab.json + merges.txt)")
        digest = hashlib.sha256()
        for name in present:
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        self.fingerprint = digest.hexdigest()[:16]
        self._fast = self._slow = None
        if "tokenizer.json" in present:
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # the library raises its own Exception types
                raise SpecError(f"{field}: {path / 'tokenizer.json'} cannot be read "
                                f"({str(exc).splitlines()[0]})") from None
        else:
            from transformers import AutoTokenizer

            try:
                self._slow = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise SpecError(f"{field}: the tokenizer in {path} cannot be loaded "
                                f"({str(exc).splitlines()[0]})") from None
        self.eos_id = self._special_id("eos")
        self.bos_id = self._special_id("bos")

    @property
    def vocab_size(self) -> int:
        """Token ids in use (added tokens included)."""
        if self._fast is not None:
            return self._fast.get_vocab_size(with_added_tokens=True)
        return len(self._slow)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (BOS etc. as the tokenizer's post-processor adds them)."""
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True
                     ) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts,
                                                           add_special_tokens=add_special_tokens)]
        return self._slow(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def _token_id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        return self._slow.convert_tokens_to_ids(token)

    def _special_id(self, kind: str) -> int | None:
        """From tokenizer_config.json / special_tokens_map.json, else config.json's id."""
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            file = self.path / name
            if file.is_file():
                token = json.loads(file.read_text()).get(f"{kind}_token")
                if isinstance(token, dict):
                    token = token.get("content")
                if isinstance(token, str) and self._token_id(token) is not None:
                    return self._token_id(token)
        config = self.path / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get(f"{kind}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
        return None


def load_tokenizer(path: Path, *, field: str = FIELD) -> HfTokenizer:
    """The tokenizer of HF directory `path` (local files only); SpecError naming `field` when
    the directory holds no tokenizer files."""
    return HfTokenizer(Path(path), field=field)
