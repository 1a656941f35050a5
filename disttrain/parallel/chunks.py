"""Packing parameters into chunks, in execution order (PatrickStar / ProTrain style).

A chunk is a flat buffer holding whole parameters of consecutive execution units (embedding,
each decoder layer, final norm + head), padded so it splits evenly over the sharding group.
Pure bookkeeping: no communication here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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


def execution_units(model: nn.Module) -> list[nn.Module | list[nn.Parameter]]:
    """The model's parameters grouped by when they are used: embedding, each layer, the rest.

    Returns modules for the first units and, last, the list of remaining parameters (final norm
    and output head; with tied embeddings the head is the embedding, already in unit 0).
    """
    embed = getattr(model, "embed", None)  # absent on a middle pipeline stage
    units: list = ([embed] if embed is not None else []) + list(model.layers)
    seen = {id(p) for u in units for p in u.parameters()}
    tail = [p for p in model.parameters() if id(p) not in seen]
    return units + [tail]


def pack_chunks(model: nn.Module, *, chunk_numel: int, group_size: int) -> list[ChunkLayout]:
    """Pack parameters in execution order into chunks of about `chunk_numel` elements.

    A parameter is never split; one larger than `chunk_numel` gets a chunk of its own.
    `chunk_numel` <= 0 means one chunk per execution unit.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    chunks: list[ChunkLayout] = []
    current: ChunkLayout | None = None
    placed: set[int] = set()
    for unit_index, unit in enumerate(execution_units(model)):
        params = list(unit.parameters()) if isinstance(unit, nn.Module) else unit
        if chunk_numel <= 0 and current is not None and current.slots:
            current = None  # one chunk per unit
        for p in params:
            if id(p) in placed:
                continue
            placed.add(id(p))
            full = current is not None and chunk_numel > 0 and current.numel + p.numel() > chunk_numel
            if current is None or (full and current.slots):
                current = ChunkLayout(index=len(chunks))
                chunks.append(current)
            current.slots.append(ParamSlot(name=names[id(p)], param=p, offset=current.numel,
                                           decay=p.dim() >= 2))
            current.numel += p.numel()
            current.units.add(unit_index)
    for chunk in chunks:
        chunk.numel = -(-chunk.numel // group_size) * group_size
    # units that use a chunk packed under another unit (tied head): record the use
    if getattr(model, "embed", None) is not None and getattr(model, "head", 1) is None:
        tail_unit = len(execution_units(model)) - 1
        for chunk in chunks:
            if any(s.param is model.embed.weight for s in chunk.slots):
                chunk.units.add(tail_unit)
    return chunks


def decay_mask(chunk: ChunkLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1.0 where weight decay applies, per element of the chunk's flat buffer (padding: 0)."""
    mask = torch.zeros(chunk.numel, dtype=dtype)
    for slot in chunk.slots:
        if slot.decay:
            mask[slot.offset:slot.offset + slot.numel] = 1.0
    return mask
