"""Hugging Face `config.json` <-> disttrain's ModelShape, and the checks that keep them honest.

A supported config maps onto disttrain's Llama-family model exactly; any field whose value
would make the HF model compute something else (another RoPE scaling, an activation other
than SiLU, a sliding window that cuts into the training sequence, ...) is refused with an
HfConfigError naming `model.hf` and the config field — never a silently different model.

HfConfigError is a ValueError; the spec turns it into its SpecError (so this module does not
import the spec). Also reads the safetensors headers (8-byte length + JSON: no tensor bytes, no
torch) so a shape mismatch between config.json and the weights is caught when the spec loads.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from planner.shapes import ModelShape

FIELD = "model.hf"

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
"""Supported model_type -> architecture."""

_DEFAULTS = {  # the HF config classes' defaults (transformers 4.57) for optional fields
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28, "head_dim": 128},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "sliding_window": 4096},
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face model directory a job starts from."""

    path: Path
    """The directory (config.json, *.safetensors, tokenizer files)."""
    config: dict
    """config.json as read."""
    shape: ModelShape
    """disttrain's shape of the same model."""

    @property
    def family(self) -> str:
        return self.config["model_type"]


class HfConfigError(ValueError):
    """A model.hf directory that cannot be used: one line starting with the YAML path."""


def _err(message: str) -> HfConfigError:
    return HfConfigError(f"{FIELD}: {message}")


def read_hf_source(path: Path, *, seq_len: int) -> HfSource:
    """Read and check `path`/config.json and the safetensors headers for training sequences of
    `seq_len` tokens; raises HfConfigError naming the field that is not supported."""
    if not path.is_dir():
        raise _err(f"{path} is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise _err(f"{path} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _err(f"{config_path} is not valid JSON ({exc})") from None
    shape = shape_from_config(config, seq_len=seq_len)
    check_weight_shapes(path, shape)
    return HfSource(path=path, config=config, shape=shape)


def shape_from_config(config: dict, *, seq_len: int) -> ModelShape:
    """The ModelShape of a supported HF config (HfConfigError otherwise)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        raise _err(f"config.json model_type {family!r} is not supported; supported: {supported}")
    archs = config.get("architectures") or [FAMILIES[family]]
    if archs != [FAMILIES[family]]:
        raise _err(f"config.json architectures {archs} is not supported for model_type "
                   f"{family!r}; supported: [{FAMILIES[family]!r}]")
    missing = [f for f in _REQUIRED if config.get(f) is None]
    if missing:
        raise _err(f"config.json has no {missing[0]}")
    cfg = {**_DEFAULTS[family], **{k: v for k, v in config.items() if v is not None}}
    if "sliding_window" in config and config["sliding_window"] is None:  # null: no window
        cfg["sliding_window"] = None
    _check_unsupported(family, cfg, seq_len)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")   # null or absent: hidden_size / num_attention_heads
    fields = dict(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_seq_len=cfg["max_position_embeddings"], rope_theta=float(cfg["rope_theta"]),
        norm_eps=float(cfg["rms_norm_eps"]), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        head_dim=None if head_dim is None else _positive_int(cfg, "head_dim"),
        **_rope_scaling_fields(cfg.get("rope_scaling")))
    try:
        shape = ModelShape(**fields)
    except (TypeError, ValueError) as exc:
        raise _err(f"config.json describes no valid model: {exc}") from None
    _check_seq_len(shape, seq_len)
    return shape


def _check_unsupported(family: str, cfg: dict, seq_len: int) -> None:
    def refuse(key: str, supported: str) -> HfConfigError:
        return _err(f"config.json {key} = {cfg[key]!r} is not supported; supported: {supported}")

    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise refuse("hidden_act", "'silu'")
    for key in ("attention_bias", "mlp_bias"):  # Llama's attention_bias also biases o_proj
        if cfg.get(key):
            raise refuse(key, "false (Qwen2's q/k/v biases are supported through qwen2)")
    if cfg.get("attention_dropout", 0.0):
        raise refuse("attention_dropout", "0.0")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", "1.0")
    if cfg.get("pretraining_tp", 1) != 1:
        raise refuse("pretraining_tp", "1")
    if "quantization_config" in cfg:
        raise _err("config.json quantization_config: quantized checkpoints are not supported; "
                   "supported: unquantized fp32/bf16/fp16 weights")
    window = _sliding_window(family, cfg)
    if window is not None and window < seq_len:
        raise _err(f"config.json sliding_window = {window} is shorter than train.seq_len "
                   f"({seq_len}); disttrain's attention is full causal, so a window is "
                   f"supported only when it covers the whole sequence (train.seq_len <= "
                   f"{window})")


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(f"config.json {key} = {value!r} is not supported; supported: a positive "
                   f"integer")
    return value


def _sliding_window(family: str, cfg: dict) -> int | None:
    """The attention window the HF model applies to some layer, or None."""
    if family == "mistral":
        return cfg.get("sliding_window")
    if (family in ("qwen2", "qwen3") and cfg.get("use_sliding_window")
            and cfg.get("sliding_window")):
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg["max_window_layers"] else "full_attention"
            for i in range(cfg["num_hidden_layers"])]
        return cfg["sliding_window"] if "sliding_attention" in types else None
    return None


def _rope_scaling_fields(scaling: dict | None) -> dict:
    if not scaling:
        return {}
    if not isinstance(scaling, dict):
        raise _err(f"config.json rope_scaling = {scaling!r} is not supported; supported: null, "
                   f"or rope_type 'default' / 'llama3'")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return {}
    if kind != "llama3":
        raise _err(f"config.json rope_scaling.rope_type = {kind!r} is not supported; "
                   f"supported: null, 'default', 'llama3'")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [k for k in keys if scaling.get(k) is None]
    if absent:
        raise _err(f"config.json rope_scaling.{absent[0]}: required for rope_type 'llama3'")
    return dict(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
                rope_low_freq_factor=float(scaling["low_freq_factor"]),
                rope_high_freq_factor=float(scaling["high_freq_factor"]),
                rope_original_max_seq_len=int(scaling["original_max_position_embeddings"]))


def _check_seq_len(shape: ModelShape, seq_len: int) -> None:
    """Longer than max_position_embeddings: an error without RoPE scaling (the model never saw
    such positions), a warning with it (the scaling's reach is the user's call)."""
    if seq_len <= shape.max_seq_len:
        return
    if shape.rope_scaling == "none":
        raise HfConfigError(f"train.seq_len: {seq_len} exceeds max_position_embeddings "
                        f"({shape.max_seq_len}) of the {FIELD} config.json and the model has "
                        f"no RoPE scaling; train at most {shape.max_seq_len} tokens")
    print(f"warning: train.seq_len {seq_len} exceeds max_position_embeddings "
          f"({shape.max_seq_len}) of the {FIELD} config.json (RoPE scaling "
          f"{shape.rope_scaling} x{shape.rope_scaling_factor:g})", file=sys.stderr)


def config_from_shape(shape: ModelShape, base: dict | None = None) -> dict:
    """An HF config.json for `shape`: `base` (the source config) when the run came from one,
    else a Llama config (Qwen2 when the shape has q/k/v biases, Qwen3 with q/k norms; a
    ValueError for both, which no supported family has)."""
    if base is not None:
        return dict(base)
    if shape.qkv_bias and shape.qk_norm:
        raise ValueError("model: q/k/v biases with q/k norms have no Hugging Face family "
                         "(Qwen2 has the biases, Qwen3 the norms)")
    family = "qwen3" if shape.qk_norm else "qwen2" if shape.qkv_bias else "llama"
    config = {
        "architectures": [FAMILIES[family]], "model_type": family,
        "hidden_size": shape.hidden_size, "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads, "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_seq_len, "rope_theta": shape.rope_theta,
        "rms_norm_eps": shape.norm_eps, "tie_word_embeddings": shape.tie_embeddings,
        "hidden_act": "silu", "attention_dropout": 0.0, "rope_scaling": None,
        "head_dim": shape.head_dim}
    if family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    if family == "qwen3":
        config.update(attention_bias=False)
    if shape.rope_scaling == "llama3":
        config["rope_scaling"] = {
            "rope_type": "llama3", "factor": shape.rope_scaling_factor,
            "low_freq_factor": shape.rope_low_freq_factor,
            "high_freq_factor": shape.rope_high_freq_factor,
            "original_max_position_embeddings": shape.rope_original_max_seq_len}
    return config


# --- tensor names ---------------------------------------------------------------------------

def hf_names(shape: ModelShape) -> dict[str, str]:
    """{disttrain parameter name: HF tensor name} for every parameter of `build_model(shape)`.
    HF Llama-family checkpoints already hold q/k in the rotate-half layout disttrain's RoPE
    uses, so no tensor is permuted; a tied model has no lm_head.weight; Qwen3's q/k norms
    are self_attn.{q,k}_norm.weight."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not shape.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    for i in range(shape.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ("q", "k", "v", "o"):
            names[f"{ours}attn.{proj}_proj.weight"] = f"{theirs}self_attn.{proj}_proj.weight"
            if shape.qkv_bias and proj != "o":
                names[f"{ours}attn.{proj}_proj.bias"] = f"{theirs}self_attn.{proj}_proj.bias"
        if shape.qk_norm:
            for proj in ("q", "k"):
                names[f"{ours}attn.{proj}_norm.weight"] = f"{theirs}self_attn.{proj}_norm.weight"
        for proj in ("gate", "up", "down"):
            names[f"{ours}mlp.{proj}_proj.weight"] = f"{theirs}mlp.{proj}_proj.weight"
    return names


def expected_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: its shape} for `shape`."""
    h, f, v, q, kv = (shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size,
                      shape.q_dim, shape.kv_dim)
    by_suffix = {"embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
                 "layernorm.weight": (h,), "q_proj.weight": (q, h), "k_proj.weight": (kv, h),
                 "v_proj.weight": (kv, h), "o_proj.weight": (h, q), "q_proj.bias": (q,),
                 "k_proj.bias": (kv,), "v_proj.bias": (kv,), "q_norm.weight": (shape.head_dim,),
                 "k_norm.weight": (shape.head_dim,), "gate_proj.weight": (f, h),
                 "up_proj.weight": (f, h), "down_proj.weight": (h, f)}
    out = {}
    for name in hf_names(shape).values():
        suffix = max((s for s in by_suffix if name.endswith(s)), key=len)  # q_norm, not norm
        out[name] = by_suffix[suffix]
    return out


# --- safetensors files --------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> dict[str, Path]:
    """{tensor name: file holding it} from the sharded index, else from *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise _err(f"{index} is not a safetensors index ({exc})") from None
        files = {name: path / file for name, file in weight_map.items()}
        gone = sorted({str(f) for f in files.values() if not f.is_file()})
        if gone:
            raise _err(f"{INDEX} names {gone[0]}, which does not exist")
        return files
    found = sorted(path.glob("*.safetensors"))
    if not found:
        extra = (" (pytorch_model.bin is not read: re-save with safe_serialization=True)"
                 if (path / "pytorch_model.bin").exists() else "")
        raise _err(f"{path} has no *.safetensors weights{extra}")
    return {name: file for file in found for name in read_header(file)}


def read_header(file: Path) -> dict[str, dict]:
    """{tensor name: {'dtype', 'shape', 'data_offsets'}} of one safetensors file."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise _err(f"{file} is not a safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def check_weight_shapes(path: Path, shape: ModelShape) -> None:
    """Every tensor the model needs is present with the shape config.json implies."""
    files = safetensors_files(path)
    expected = expected_shapes(shape)
    ignored = {"lm_head.weight"} if shape.tie_embeddings else set()  # HF ties it too
    extra = sorted(n for n in files if n not in expected and n not in ignored
                   and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise _err(f"weights hold {extra[0]}, which config.json does not describe")
    headers: dict[Path, dict] = {}
    for name, want in expected.items():
        if name not in files:
            raise _err(f"weights lack {name}, which config.json implies")
        file = files[name]
        header = headers.setdefault(file, read_header(file))
        got = tuple(header.get(name, {}).get("shape", ()))
        if got != want:
            raise _err(f"{name} in {file.name} has shape {list(got)} but config.json implies "
                       f"{list(want)}")
