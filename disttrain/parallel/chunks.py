"""Packing parameters into chunks, in execution order (PatrickStar / ProTrain style).

A chunk is a flat buffer holding whole parameters of consecutive execution units (embedding,
each decoder layer, final norm + head), padded so it splits evenly over the sharding group.
Decoder-layer parameters never share a chunk with the embedding, final norm or head: the
decoder-layer chunks are the plan's chunks (`planner.plan.ModelStatePlan`), numbered from 0 in
execution order over the whole model, packing restarting at each pipeline stage; the others
(the outer chunks) are named 'embedding' or 'head' in the plan (`outer_chunk_name`).
Pure bookkeeping: no communication here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ParamSlot:
    name: str
    param: nn.Parameter
    offset: int
    """Start of the parameter inside its chunk's flat buffer (elements)."""
    decay: bool
    """Whether AdamW weight decay applies (not to 1-D norm weights)."""

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class ChunkLayout:
    index: int
    slots: list[ParamSlot] = field(default_factory=list)
    numel: int = 0
    """Padded size in elements (a multiple of the sharding group size)."""
    units: set[int] = field(default_factory=set)
    """Indices of the execution units whose parameters live here."""
    layers: set[int] = field(default_factory=set)
    """Global indices of the decoder layers whose parameters live here (empty: embedding,
    final norm or head)."""


def execution_units(model: nn.Module) -> list[nn.Module | list[nn.Parameter]]:
    """The model's parameters grouped by when they are used: embedding, learned positions (GPT
    shapes), each layer, the rest.

    Returns modules for the first units and, last, the list of remaining parameters (final norm
    and output head; with tied embeddings the head is the embedding, already in unit 0).
    """
    units: list = embedding_units(model) + list(model.layers)
    seen = {id(p) for u in units for p in u.parameters()}
    tail = [p for p in model.parameters() if id(p) not in seen]
    return units + [tail]


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The units before the decoder layers: the token embedding and the learned position
    embedding, those of them `model` holds (a middle pipeline stage holds neither)."""
    return [m for m in (getattr(model, "embed", None), getattr(model, "pos_embed", None))
            if m is not None]


def layer_indices(model: nn.Module) -> list[int]:
    """Global index of each decoder layer of `model.layers`, in execution order (a pipeline
    stage's layers keep their index in the full model)."""
    return [int(name) for name, _ in model.layers.named_children()]


def _pack(units: list[tuple[int | None, list[tuple[str, nn.Parameter]]]], chunk_numel: int
          ) -> list[ChunkLayout]:
    """Pack (decoder layer index or None, named parameters) units, in order, into chunks.

    A new chunk starts where a unit begins when `chunk_numel` <= 0, where decoder-layer and
    other parameters meet, and where the decoder layers are not consecutive (the two virtual
    stages of an interleaved pipeline rank)."""
    chunks: list[ChunkLayout] = []
    current: ChunkLayout | None = None
    placed: set[int] = set()
    previous_layer: int | None = None
    for unit_index, (layer, params) in enumerate(units):
        boundary = (chunk_numel <= 0 or (layer is None) != (previous_layer is None)
                    or (layer is not None and layer != previous_layer + 1))
        if boundary and current is not None and current.slots:
            current = None
        previous_layer = layer
        for name, p in params:
            if id(p) in placed:
                continue
            placed.add(id(p))
            full = current is not None and chunk_numel > 0 and current.numel + p.numel() > chunk_numel
            if current is None or (full and current.slots):
                current = ChunkLayout(index=len(chunks))
                chunks.append(current)
            current.slots.append(ParamSlot(name=name, param=p, offset=current.numel,
                                           decay=p.dim() >= 2))
            current.numel += p.numel()
            current.units.add(unit_index)
            if layer is not None:
                current.layers.add(layer)
    return chunks


def pack_chunks(model: nn.Module, *, chunk_numel: int, group_size: int) -> list[ChunkLayout]:
    """Pack parameters in execution order into chunks of about `chunk_numel` elements.

    A parameter is never split; one larger than `chunk_numel` gets a chunk of its own.
    `chunk_numel` <= 0 means one chunk per execution unit.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    units = execution_units(model)
    first_layer_unit = len(embedding_units(model))
    layers = layer_indices(model)
    tagged = []
    for unit_index, unit in enumerate(units):
        params = list(unit.parameters()) if isinstance(unit, nn.Module) else unit
        position = unit_index - first_layer_unit
        layer = layers[position] if 0 <= position < len(layers) else None
        tagged.append((layer, [(names[id(p)], p) for p in params]))
    chunks = _pack(tagged, chunk_numel)
    for chunk in chunks:
        chunk.numel = -(-chunk.numel // group_size) * group_size
    # units that use a chunk packed under another unit (tied head): record the use
    if getattr(model, "embed", None) is not None and getattr(model, "head", 1) is None:
        tail_unit = len(units) - 1
        for chunk in chunks:
            if any(s.param is model.embed.weight for s in chunk.slots):
                chunk.units.add(tail_unit)
    return chunks


def num_layer_chunks(layers: list[nn.Module], chunk_numel: int) -> int:
    """How many chunks consecutive decoder layers `layers` pack into (one pipeline stage)."""
    return len(_pack([(i, list(layer.named_parameters())) for i, layer in enumerate(layers)],
                     chunk_numel))


def plan_chunk_ids(chunks: list[ChunkLayout], first_ids: dict[int, int]) -> dict[int, int]:
    """{chunk index: the plan's id} for the decoder-layer chunks of one rank's packing.

    `first_ids` maps the first decoder layer of each layer range (pipeline stage) to the plan
    id of its first chunk; ids then count up in execution order within the range."""
    out: dict[int, int] = {}
    previous: ChunkLayout | None = None
    for chunk in chunks:
        if not chunk.layers:
            continue
        if previous is None or min(chunk.layers) > max(previous.layers) + 1:
            start = min(chunk.layers)
            if start not in first_ids:
                raise ValueError(f"decoder layer {start} starts a chunk range but is not the "
                                 f"first layer of a pipeline stage {sorted(first_ids)}")
            out[chunk.index] = first_ids[start]
        else:
            out[chunk.index] = out[previous.index] + 1
        previous = chunk
    return out


def outer_chunk_name(model: nn.Module, chunk: ChunkLayout) -> str:
    """The plan's name of a chunk holding no decoder layer (`ModelStatePlan.cpu_outer`):
    'embedding' when it holds the input embedding (tied: also the head), else 'head' (the
    final norm and output head; a head larger than a chunk may pack into two chunks)."""
    if chunk.layers:
        raise ValueError(f"chunk {chunk.index} holds decoder layers {sorted(chunk.layers)}")
    embed = getattr(model, "embed", None)
    weights = {id(p) for p in embed.parameters()} if embed is not None else set()
    return "embedding" if any(id(s.param) in weights for s in chunk.slots) else "head"


def decay_ranges(chunk: ChunkLayout, start: int, stop: int) -> list[tuple[int, int]]:
    """Element ranges, relative to `start`, of the chunk's slice [start, stop) (one rank's
    shard) where AdamW weight decay applies (the >= 2-D parameters; never the padding)."""
    out = []
    for slot in chunk.slots:
        first, last = max(start, slot.offset), min(stop, slot.offset + slot.numel)
        if slot.decay and first < last:
            out.append((first - start, last - start))
    return out
