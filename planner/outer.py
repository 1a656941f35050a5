"""The embedding, final norm and output head as model-state chunks ("outer" chunks).

At ZeRO-3 a stage's outer states (the first stage's input embedding, the last stage's final
norm + output head; a tied embedding is one chunk, packed with the embedding) are a chunk like
a decoder layer's: kept on the device (fp32 master and moments, fp32 gradient shard, the
compute-dtype shard), or held as a CPU chunk, its optimizer step on the CPU. They are costed as
the layer CPU chunks are (`planner.candidates.build_stages`): host bytes = the chunk's states,
host-link bytes per microbatch = its shard fetched for the forward and the backward and its
gradient shard sent back (3 x b bytes per parameter of the shard), CPU AdamW time overlapped
with the backward. On the device a CPU outer chunk still takes its compute-dtype shard (what
its gathers read; the runtime's stage-3 CPU chunks keep it there): the layer chunks share
prefetch buffers of one layer, an outer chunk (an embedding is larger than a layer) has its own.

The MIP (`planner.mip`) gets one binary per outer chunk; `outer_terms` writes the same linear
terms for fixed decisions (`evaluate_stage`) and for the solver's variables.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from planner.analytic import model_state_bytes
from planner.plan import OUTER_NAMES
from planner.shapes import DTYPE_BYTES, ModelShape

__all__ = ["OUTER_NAMES", "OuterChunk", "build_outer_chunks", "device_categories", "outer_flags",
           "outer_terms", "scaled"]


@dataclass(frozen=True, kw_only=True)
class OuterChunk:
    """One outer chunk of a stage, per rank: bytes and seconds of its two placements."""

    name: str
    """'embedding' or 'head' (`OUTER_NAMES`)."""
    num_params: float
    """Parameters of the chunk on this rank's tensor-parallel shard (before ZeRO sharding)."""
    parameters_bytes: float
    """Compute-dtype parameter shard (on the device either way)."""
    gradients_bytes: float
    """fp32 gradient shard (on the device when persistent)."""
    optimizer_bytes: float
    """fp32 moments (+ the fp32 master in bf16) (on the device when persistent)."""
    host_bytes: float
    """Host bytes as a CPU chunk."""
    link_bytes: float
    """Host-link bytes per microbatch as a CPU chunk."""
    cpu_optimizer_s: float
    """CPU AdamW seconds per step as a CPU chunk (overlapped with the backward)."""
    device_optimizer_s: float
    """Device AdamW seconds per step when persistent."""

    @property
    def device_bytes(self) -> float:
        """Device bytes when persistent."""
        return self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def shard_bytes(self) -> float:
        """Device bytes as a CPU chunk: its compute-dtype shard."""
        return self.parameters_bytes


BYTE_FIELDS = ("parameters_bytes", "gradients_bytes", "optimizer_bytes", "host_bytes", "link_bytes")


def scaled(chunk: OuterChunk, unit: float) -> OuterChunk:
    """The chunk with its bytes divided by `unit` (the MIP works in GiB)."""
    return replace(chunk, **{f: getattr(chunk, f) / unit for f in BYTE_FIELDS})


def stage_outer_params(shape: ModelShape, pp: int, stage: int, stage_total: float,
                       layer_total: float) -> list[tuple[str, float]]:
    """(name, parameters) of a stage's outer chunks: what it holds beyond its decoder layers,
    the embedding (first stage) and the rest (last stage: final norm + head)."""
    embedding = float(shape.vocab_size * shape.hidden_size) if stage == 0 else 0.0
    rest = stage_total - layer_total - embedding
    out = [("embedding", embedding)] if embedding else []
    if stage == pp - 1 and rest > 0:
        out.append(("head", rest))
    return out


def build_outer_chunks(shape: ModelShape, dtype: str, *, pp: int, stage: int, stage_total: float,
                       layer_total: float, group: int, tp: int,
                       optimizer_s: Callable[[float, bool], float]) -> tuple[OuterChunk, ...]:
    """A ZeRO-3 stage's outer chunks over a shard group of `group` ranks, 1/tp of each per
    rank (`stage_total`, `layer_total`: the whole stage's parameters and its decoder layers');
    `optimizer_s(params, on_cpu)` prices an update of `params` parameters."""
    b = DTYPE_BYTES[dtype]
    chunks = []
    for name, params in stage_outer_params(shape, pp, stage, stage_total, layer_total):
        states = model_state_bytes(params / tp, dtype, 3, group)
        shard = params / tp / group
        chunks.append(OuterChunk(
            name=name, num_params=params / tp, parameters_bytes=states["parameters"], gradients_bytes=states["gradients"],
            optimizer_bytes=states["optimizer"], host_bytes=sum(states.values()),
            link_bytes=3 * b * shard, cpu_optimizer_s=optimizer_s(shard, True),
            device_optimizer_s=optimizer_s(shard, False)))
    return tuple(chunks)


@dataclass(frozen=True)
class OuterTerms:
    """The outer chunks' share of a stage's numbers (floats, or pulp expressions)."""

    device: Any
    host: Any
    link: Any
    cpu_optimizer_s: Any
    device_optimizer_s: Any


def outer_terms(chunks: Sequence[OuterChunk], on_cpu: Sequence[Any]) -> OuterTerms:
    """Device bytes, host bytes, link bytes per microbatch and optimizer seconds of `chunks`
    placed by `on_cpu` (bools, or the MIP's binaries)."""
    pairs = list(zip(chunks, on_cpu))
    return OuterTerms(
        device=sum((c.device_bytes * (1 - x) + c.shard_bytes * x for c, x in pairs), 0.0),
        host=sum((c.host_bytes * x for c, x in pairs), 0.0),
        link=sum((c.link_bytes * x for c, x in pairs), 0.0),
        cpu_optimizer_s=sum((c.cpu_optimizer_s * x for c, x in pairs), 0.0),
        device_optimizer_s=sum((c.device_optimizer_s * (1 - x) for c, x in pairs), 0.0))


def outer_flags(chunks: Sequence[OuterChunk], cpu_names: Sequence[str]) -> tuple[bool, ...]:
    """Placement of `chunks` under a plan's `model_states.cpu_outer`."""
    return tuple(c.name in cpu_names for c in chunks)


def device_categories(chunks: Sequence[OuterChunk], on_cpu: Sequence[bool]) -> dict[str, float]:
    """Device bytes of the outer chunks by category: states of the persistent ones; the
    compute shards of CPU ones count as buffers (as the layer chunks' prefetch buffers)."""
    out = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0, "buffers": 0.0}
    for chunk, cpu in zip(chunks, on_cpu):
        if cpu:
            out["buffers"] += chunk.shard_bytes
            continue
        out["parameters"] += chunk.parameters_bytes
        out["gradients"] += chunk.gradients_bytes
        out["optimizer"] += chunk.optimizer_bytes
    return out
