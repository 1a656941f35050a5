"""Sharded, resumable checkpoints in torch.distributed.checkpoint (DCP) format.

`checkpoints/step_NNNNNNN/` is one DCP checkpoint that every rank of the job writes together:

    .metadata        DCP's index (rank 0): every key, its full shape, which file holds which block
    __{r}_0.distcp   rank r's bytes: only what rank r holds
    meta.json        step, model shape, parallel layout (rank 0; read and checked before loading)

Keys: `model.<name>` is parameter `<name>` of the unmodified model with its real shape;
`optim.<name>.exp_avg` / `optim.<name>.exp_avg_sq` are its AdamW moments; `optim.step` counts
AdamW steps; `rng.rank<r>.torch` / `rng.rank<r>.python` are rank r's RNG states (rank-local).
Pipeline stages write their own layers' keys into the same checkpoint.

Why per parameter: ZeRO shards each flat chunk buffer evenly over the dp x sp group, so a rank
holds an arbitrary contiguous range of a parameter's row-major flattening, not the rows a
DTensor `Shard(0)` would give it. Instead of moving bytes to fit DTensor, a rank describes its
range as a few rectangular blocks of the parameter (`flat_range_blocks`; at most 3 for a
matrix) and DCP stores them as chunks of that parameter (`FlatShard` and the two planners
below, which only add those blocks to DCP's default plans). Each rank writes and reads exactly
the bytes it holds, without communication, and the result is an ordinary DCP checkpoint of
full-shape named tensors: `load_full_model_state` (or any DCP reader) loads it into one
process without a process group. Non-ZeRO states save their tensors as they are.

Atomicity: ranks write into `step_NNNNNNN.partial/`; DCP writes `.metadata` only once every
rank's files are written and fsync'd; rank 0 then renames the directory to `step_NNNNNNN`,
replaces the `latest` pointer (temporary file + rename) and keeps the last KEEP_LAST. A crash
at any moment leaves the previous checkpoint loadable; should `latest` name a directory that
is gone (a crash while a step was being saved again), the newest complete one is used. The
schedule and the data order are pure functions of the step: the step is all that is kept of them.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner, DefaultSavePlanner, create_default_local_load_plan,
    create_default_local_save_plan)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (
    LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

LATEST = "latest"
KEEP_LAST = 3
META = "meta.json"
_COMPLETE = re.compile(r"step_\d{7}")  # not `.partial` / `.old`

Block = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) of a rectangular block of a tensor."""


def flat_range_blocks(shape: tuple[int, ...], start: int, stop: int) -> list[Block]:
    """Blocks that tile elements [start, stop) of the row-major flattening of a tensor of
    `shape` exactly, in flat order; each block is itself contiguous in that order."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner  # rows touched

    def part_of_row(row: int, begin: int, end: int) -> list[Block]:
        return [((row, *o), (1, *s)) for o, s in flat_range_blocks(shape[1:], begin, end)]

    if first == last:
        return part_of_row(first, start - first * inner, stop - first * inner)
    head = part_of_row(first, start % inner, inner) if start % inner else []
    tail = part_of_row(last, 0, stop % inner) if stop % inner else []
    rows_from, rows_to = first + bool(head), last + 1 - bool(tail)
    body = [((rows_from, *(0,) * (len(shape) - 1)), (rows_to - rows_from, *shape[1:]))] \
        if rows_to > rows_from else []
    return head + body + tail


@dataclass
class FlatShard:
    """This rank's part of a named tensor of `shape`: elements [start, start + local.numel())
    of its row-major flattening, held in `local` (1-D; saved from and loaded into in place).
    Under tensor parallelism `shape` is a block of a larger tensor, `full_shape`, at offsets
    `origin` (the rank's tp shard); the checkpoint key then has the full shape."""

    shape: tuple[int, ...]
    start: int
    local: torch.Tensor
    origin: tuple[int, ...] = ()
    full_shape: tuple[int, ...] | None = None
    _pieces: dict[tuple[int, ...], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def global_shape(self) -> tuple[int, ...]:
        """Shape of the checkpoint key."""
        return self.shape if self.full_shape is None else self.full_shape

    @property
    def pieces(self) -> dict[tuple[int, ...], torch.Tensor]:
        """{block offsets in the key's tensor: the view of `local` shaped as that block}."""
        if self._pieces is None:
            self._pieces, pos = {}, 0
            stop = self.start + self.local.numel()
            origin = self.origin or (0,) * len(self.shape)
            for offsets, sizes in flat_range_blocks(self.shape, self.start, stop):
                count = math.prod(sizes)
                key = tuple(o + g for o, g in zip(offsets, origin))
                self._pieces[key] = self.local[pos:pos + count].view(sizes)
                pos += count
        return self._pieces


def packed_shards(slots: list[tuple[str, tuple[int, ...], int]], first: int,
                  buffers: dict[str, torch.Tensor]) -> dict[str, FlatShard]:
    """FlatShards of tensors packed end to end in a flat buffer (a ZeRO chunk): `slots` lists
    (name, shape, offset in the buffer); this rank holds elements [first, first + n) of the
    buffer in each of `buffers` ({key pattern such as 'model.{}': held 1-D shard of n}).
    Tensors this rank holds no element of are left out."""
    out = {}
    for name, shape, offset in slots:
        for pattern, shard in buffers.items():
            begin = max(offset, first)
            end = min(offset + math.prod(shape), first + shard.numel())
            if begin < end:
                out[pattern.format(name)] = FlatShard(shape, begin - offset,
                                                      shard[begin - first:end - first])
    return out


class _SavePlanner(DefaultSavePlanner):
    """DCP's default save plan, plus one write item per block of every FlatShard."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        plain = {k: v for k, v in self.state_dict.items() if not isinstance(v, FlatShard)}
        items = list(create_default_local_save_plan(plain, self.is_coordinator).items)
        for key, shard in self.state_dict.items():
            if not isinstance(shard, FlatShard):
                continue
            for offsets, piece in shard.pieces.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=piece.shape)
                items.append(WriteItem(
                    index=MetadataIndex(key, offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=chunk, properties=TensorProperties.create_from_tensor(piece),
                        size=torch.Size(shard.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        value = self.state_dict[index.fqn]
        if isinstance(value, FlatShard):
            return value.pieces[tuple(index.offset)]
        return super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load plan, plus reads into the blocks of every FlatShard."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict  # no meta-device set-up
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        plain = {k: v for k, v in self.state_dict.items() if not isinstance(v, FlatShard)}
        items = list(create_default_local_load_plan(plain, self.metadata, True).items)
        stored = self.metadata.state_dict_metadata
        for key, shard in self.state_dict.items():
            if not isinstance(shard, FlatShard):
                continue
            md = stored.get(key)
            if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != shard.global_shape:
                raise ValueError(f"checkpoint: {key} is {getattr(md, 'size', 'missing')}, "
                                 f"expected {shard.global_shape}")
            chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=p.shape)
                      for o, p in shard.pieces.items()]
            items += create_read_items_for_chunk_list(key, md, chunks)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        value = self.state_dict[index.fqn]
        if isinstance(value, FlatShard):
            return value.pieces[tuple(index.offset)]
        return super().lookup_tensor(index)


def _run_dcp(fn: Callable, state: dict, *, no_dist: bool = False, **kwargs: Any) -> None:
    """dcp.save / dcp.load on every rank (or in this process alone), raising what failed
    rather than DCP's CheckpointException (a BaseException that wraps every rank's error)."""
    no_dist = no_dist or not dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            fn(state, no_dist=no_dist, **kwargs)
        except CheckpointException as exc:
            rank = 0 if no_dist else dist.get_rank()
            failure, _ = exc.failures.get(rank) or exc.failures[min(exc.failures)]
            raise failure from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _complete(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and _COMPLETE.fullmatch(p.name))


def save_checkpoint(ckpt_dir: Path, *, step: int, state: dict, meta: dict, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint `step` (optimizer steps done): every rank of the job calls this with
    its model states' `state_dict()`; `barrier` synchronises them."""
    step_dir = ckpt_dir / f"step_{step:07d}"
    partial = step_dir.with_name(step_dir.name + ".partial")
    if rank == 0:
        if partial.exists():  # left by a crash
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        atomic_write_bytes(partial / META, json.dumps({"step": step, "meta": meta}).encode())
    barrier()
    rng = {f"rng.rank{rank}.torch": torch.get_rng_state(),
           f"rng.rank{rank}.python": random.getstate()}
    _run_dcp(dcp.save, {**state, **rng}, storage_writer=FileSystemWriter(partial),
             planner=_SavePlanner())  # returns once .metadata is written: every rank is done
    if rank == 0:
        _fsync_dir(partial)
        if step_dir.exists():  # the step is saved again (a resume from an older checkpoint)
            old = step_dir.with_name(step_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(step_dir, old)
        os.replace(partial, step_dir)
        _fsync_dir(ckpt_dir)
        atomic_write_bytes(ckpt_dir / LATEST, step_dir.name.encode())
        for path in _complete(ckpt_dir)[:-KEEP_LAST]:
            if path != step_dir:
                shutil.rmtree(path)
        for path in [*ckpt_dir.glob("step_*.partial"), *ckpt_dir.glob("step_*.old")]:
            shutil.rmtree(path)
    barrier()
    return step_dir


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The directory `latest` points at (else the newest complete one), or None."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        path = ckpt_dir / pointer.read_text().strip()
        if path.is_dir():
            return path
    complete = _complete(ckpt_dir)
    return complete[-1] if complete else None


def read_checkpoint_meta(step_dir: Path) -> dict:
    """{'step', 'meta'} of a checkpoint, without reading its tensors."""
    path = step_dir / META
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {step_dir} has no {META}: it is not a complete "
                                f"checkpoint of this version of disttrain")
    return json.loads(path.read_text())


def checkpoint_step(step_dir: Path) -> int:
    """The step a checkpoint was written after."""
    return read_checkpoint_meta(step_dir)["step"]


def rank_files(step_dir: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that `rank` wrote (rank 0 also DCP's index and meta.json)."""
    files = sorted(step_dir.glob(f"__{rank}_*.distcp"))
    return files + [step_dir / ".metadata", step_dir / META] if rank == 0 else files


def load_checkpoint(step_dir: Path, state: dict, *, rank: int = 0) -> dict:
    """Load this rank's part of a checkpoint into `state` (the model states' `state_dict()`,
    loaded in place) and restore this rank's RNG states; every rank of the job calls this.
    Returns the checkpoint's {'step', 'meta'}."""
    info = read_checkpoint_meta(step_dir)
    keys = {"torch": f"rng.rank{rank}.torch", "python": f"rng.rank{rank}.python"}
    reader = FileSystemReader(step_dir)
    # a resume on more ranks than wrote the checkpoint: the new ranks keep their own RNG
    # (training draws no random numbers; the data order is a function of the step)
    has_rng = keys["torch"] in reader.read_metadata().state_dict_metadata
    full = dict(state)
    if has_rng:
        full.update({keys["torch"]: torch.empty_like(torch.get_rng_state()), keys["python"]: None})
    _run_dcp(dcp.load, full, storage_reader=reader, planner=_LoadPlanner())
    state.update({key: full[key] for key in state})
    if has_rng:
        torch.set_rng_state(full[keys["torch"]])
        random.setstate(full[keys["python"]])
    return info


def _load_tensors(step_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint whose key starts with `prefix`, full, in this process."""
    reader = FileSystemReader(step_dir)
    stored = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in stored.items()
             if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    _run_dcp(dcp.load, state, storage_reader=reader, planner=_LoadPlanner(), no_dist=True)
    return state


def load_full_model_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of the model, full and by name (as the unmodified model's
    `named_parameters()`), whatever ranks wrote the checkpoint; no process group needed."""
    return {key.removeprefix("model."): value
            for key, value in _load_tensors(step_dir, "model.").items()}


def load_full_optimizer_state(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {'exp_avg', 'exp_avg_sq'}}, full, as `load_full_model_state`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(step_dir, "optim.").items():
        name, _, moment = key.removeprefix("optim.").rpartition(".")
        if name:  # not optim.step
            out.setdefault(name, {})[moment] = value
    return out
