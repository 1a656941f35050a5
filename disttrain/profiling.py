"""Glue between the runtime's model and the planner's profiler (`disttrain profile`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from disttrain.model.llama import DecoderLayer, rope_cos_sin
from disttrain.spec import Job
from planner.profiler import LayerProfile, profile_layer

DEFAULT_SEQ_LENS = (128, 256, 512, 1024)


def profile_job_layer(job: Job, seq_lens: tuple[int, ...] | None = None,
                      cache_dir: Path | None = None) -> LayerProfile:
    """Profile one decoder layer of the job's model on this machine's CPU/device."""
    shape = job.shape
    lens = seq_lens or tuple(s for s in DEFAULT_SEQ_LENS if s <= job.spec.train.seq_len) or (
        job.spec.train.seq_len,)
    torch.manual_seed(job.spec.train.seed)
    with torch.device("meta"):
        layer = DecoderLayer(shape)
    layer = layer.to_empty(device="cpu")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def rope(positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, shape.head_dim, shape.rope_theta, dtype)

    return profile_layer(layer, rope, shape.hidden_size, list(lens), job.dtype,
                         batch=job.spec.train.micro_batch_size, shape_dict=shape.to_dict(),
                         cache_dir=cache_dir, device="cpu")


def describe(profile: LayerProfile, seq_len: int, micro_batch: int) -> str:
    tokens = seq_len * micro_batch
    saved = profile.saved_bytes(tokens)
    lines = [f"profile {profile.key} ({profile.dtype}, {profile.device}), fitted on seq_lens "
             f"{[m.seq_len for m in profile.measurements]}",
             "saved bytes per token: " + ", ".join(f"{k} {v:,.0f}"
                                                   for k, v in profile.bytes_per_token.items()),
             f"at seq_len {seq_len} x batch {micro_batch}: " + ", ".join(
                 f"{k} {v / 2**20:,.1f} MiB" for k, v in saved.items())]
    for name in profile.time_coeffs:
        lines.append(f"time {name}: {profile.time_s(name, tokens, seq_len) * 1e3:,.1f} ms")
    return "\n".join(lines)


def save_profile(profile: LayerProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1))


def load_profile(path: Path) -> LayerProfile:
    return LayerProfile.from_dict(json.loads(path.read_text()))
