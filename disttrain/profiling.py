"""Glue between the runtime's model and the planner's profiler (`disttrain profile`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from disttrain.model.llama import DecoderLayer, RMSNorm, rope_tables
from disttrain.spec import Job
from disttrain.tiling import chunked_lm_loss
from offload.host_memory import keep_freed_host_memory
from planner.profiler import TORCH_DTYPES, LayerProfile, profile_layer
from planner.shapes import ModelShape

DEFAULT_SEQ_LENS = (128, 256, 512, 1024)
HEAD_PROFILE_MAX_BYTES = 1 << 30
"""The head is timed only when its fp32 logits, their gradient and softmax fit in this."""


def rank_conditions(job: Job) -> tuple[int | None, int]:
    """(torch threads per rank, ranks sharing this machine's cores) for a CPU job, as the
    launchers run them (`OMP_NUM_THREADS` = cores // ranks per node, at least 1; spawned
    test/bench ranks use 1 thread); (None, 1) when the job's device is not the CPU."""
    hw = job.hardware
    if hw.device_name.lower() != "cpu":
        return None, 1
    cores = os.cpu_count() or 1
    ranks = hw.devices_per_node
    return max(1, cores // ranks), max(1, min(ranks, cores))


class _Head(torch.nn.Module):
    """Final norm + output projection + mean cross entropy in fp32, as the runtime's
    untiled `lm_loss`; fixed random targets per shape. Cast to the training dtype with the
    layer (bf16: bf16 weights, no autocast, as the runtime computes). With `chunk_tokens` the
    runtime's tiled loss (`chunked_lm_loss`) instead: `planner.profile_loss` times its tiles."""

    tiles_loss = True
    """Takes `chunk_tokens` (`planner.profile_loss.measure_loss_tile_s`)."""

    def __init__(self, shape: ModelShape, seed: int):
        super().__init__()
        self.norm = RMSNorm(shape.hidden_size, shape.norm_eps)
        self.weight = torch.nn.Parameter(torch.randn(shape.vocab_size, shape.hidden_size) * 0.02)
        self.vocab, self.seed = shape.vocab_size, seed
        self._targets: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, x_BSH: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
        key = tuple(x_BSH.shape[:2])
        if key not in self._targets:
            gen = torch.Generator().manual_seed(self.seed)
            self._targets[key] = torch.randint(self.vocab, key, generator=gen)
        if chunk_tokens:
            return chunked_lm_loss(self.norm(x_BSH), self.weight, self._targets[key], chunk_tokens)
        logits = F.linear(self.norm(x_BSH), self.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), self._targets[key].flatten())


def optimizer_chunk_sizes(shape: ModelShape) -> list[int]:
    """Parameters of the runtime's model-state chunks in update order: the embedding, every
    decoder layer, the final norm + head (the norm alone when tied)."""
    head = shape.embedding_params() - shape.vocab_size * shape.hidden_size
    return [shape.vocab_size * shape.hidden_size] + [shape.layer_params()] * shape.num_layers + [head]


def profile_job_layer(job: Job, seq_lens: tuple[int, ...] | None = None,
                      cache_dir: Path | None = None, *, threads: int | None = None,
                      concurrent: int | None = None, with_head: bool = True,
                      with_optimizer: bool = True, with_collectives: bool = True,
                      max_cache_age_s: float | None = None,
                      rounds: int | None = None) -> LayerProfile:
    """Profile one decoder layer of the job's model on this machine's CPU/device.

    Timed the way the job's ranks run (`rank_conditions`: their torch threads, as many
    processes side by side as ranks share the cores) unless `threads` / `concurrent` say
    otherwise; with the head + loss and the clip + AdamW update over the job's chunk sizes.
    Times are taken with the host allocator a plan that keeps everything runs with
    (`keep_freed_host_memory`: freed blocks reused, none faulted afresh; this process and its
    forked twins keep that setting); a memory-bound plan's fresh pages (`return_freed_host_memory`) are priced apart from the
    profile's page-fault cost and allocation sizes (`planner.page_faults`). With ranks side by
    side (`with_collectives`), blocking gloo collectives between them are timed too, as a step
    meets them after compute (`LayerProfile.collective_fits`). `rounds`: interleaved rounds
    of the timings (None: the profiler's default, `planner.profiler.TWIN_ROUNDS` beside twins).
    """
    shape = job.shape
    lens = seq_lens or tuple(s for s in DEFAULT_SEQ_LENS if s <= job.spec.train.seq_len) or (
        job.spec.train.seq_len,)
    batch = profile_batch(job)
    rank_threads, rank_concurrent = rank_conditions(job)
    threads = threads or rank_threads
    concurrent = concurrent or rank_concurrent
    torch.manual_seed(job.spec.train.seed)
    with torch.device("meta"):
        layer = DecoderLayer(shape)
    layer = layer.to_empty(device="cpu")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def rope(positions: torch.Tensor, dtype: torch.dtype):
        return rope_tables(shape, positions, dtype)

    head = None
    if with_head and 3 * 4 * shape.vocab_size * batch * max(lens) <= HEAD_PROFILE_MAX_BYTES:
        head = _Head(shape, job.spec.train.seed).to(TORCH_DTYPES[job.dtype])
    keep_freed_host_memory()
    return profile_layer(layer, rope, shape.hidden_size, list(lens), job.dtype,
                         batch=batch, shape_dict=shape.to_dict(),
                         cache_dir=cache_dir, device="cpu", threads=threads,
                         concurrent=concurrent, head=head,
                         optimizer_numel=optimizer_chunk_sizes(shape) if with_optimizer else 0,
                         max_cache_age_s=max_cache_age_s, rounds=rounds,
                         collectives=with_collectives and concurrent > 1)


def profile_batch(job: Job) -> int:
    """Sequences per profiled microbatch: the spec's micro-batch size, 1 under auto (the
    profile's fits are per token and per token x sequence, so the planner prices any size
    from them)."""
    size = job.spec.train.micro_batch_size
    return 1 if size == "auto" else size


def describe(profile: LayerProfile, seq_len: int, micro_batch: int) -> str:
    tokens = seq_len * micro_batch
    saved = profile.saved_bytes(tokens)
    lines = [f"profile {profile.key} ({profile.dtype}, {profile.device}), fitted on seq_lens "
             f"{[m.seq_len for m in profile.measurements]}",
             "saved bytes per token: " + ", ".join(f"{k} {v:,.0f}"
                                                   for k, v in profile.bytes_per_token.items()),
             f"at seq_len {seq_len} x batch {micro_batch}: " + ", ".join(
                 f"{k} {v / 2**20:,.1f} MiB" for k, v in saved.items())]
    lines.append(f"measured with {profile.threads or '?'} torch thread(s) per process, "
                 f"{profile.concurrent} process(es) side by side"
                 + (f", load average {profile.load_average:.2f}" if profile.load_average >= 0 else ""))
    for name in profile.time_coeffs:
        lines.append(f"time {name}: {profile.time_s(name, tokens, seq_len) * 1e3:,.1f} ms")
    if profile.optimizer_s_per_param:
        lines.append(f"clip + AdamW: {profile.optimizer_s_per_param * 1e9:,.2f} ns per parameter "
                     f"({1 / profile.optimizer_s_per_param / 1e6:,.0f} M params/s)")
    return "\n".join(lines)


def save_profile(profile: LayerProfile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1))


def load_profile(path: Path) -> LayerProfile:
    return LayerProfile.from_dict(json.loads(path.read_text()))
