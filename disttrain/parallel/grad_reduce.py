"""ZeRO stages 0-1: each chunk's once-per-step gradient reduction, launched as soon as the
chunk's accumulated gradient is final (its last microbatch's backward reached it), so that it
runs beside the rest of that backward: PyTorch DDP's bucketed all-reduce (Li et al., VLDB
2020) and Megatron's `overlap_grad_reduce`, with one bucket per ZeRO chunk.

Stage 0 all-reduces the chunk's full fp32 gradient (in `reduce_dtype`), stage 1
reduce-scatters it into this rank's gradient shard. A chunk is final when it has been reduced
locally as many times as `begin_step` announced microbatches; chunks never final during the
backward (no announcement, or a parameter without a gradient) are launched by `finish`. Every
collective is issued with `async_op=True`: on CUDA inside the side stream (shards.py
`SideStream`), on CPU/gloo on gloo's worker thread; `finish` waits for them in launch order,
which is the same on every rank of the group (the same chunks become final in the same
backward order), and then divides by the group size. The bytes are those of the blocking
version: one collective per chunk and step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from disttrain.parallel.shards import ChunkShards, SideStream


class StepReductions:
    """One rank's stage 0-1 gradient reductions of the current step."""

    def __init__(self, *, stage: int, group: dist.ProcessGroup | None, world: int,
                 reduce_dtype: torch.dtype, side: SideStream, comm_bytes: dict[str, int]):
        self.stage, self.group, self.world = stage, group, world
        self.reduce_dtype, self.side, self.comm_bytes = reduce_dtype, side, comm_bytes
        self.microbatches: int | None = None
        """Backward passes each chunk gets this step (`begin_step`); None: not announced."""
        self._count: dict[int, int] = {}
        self._launched: dict[int, tuple] = {}  # chunk index -> (work, finish, keep-alive)
        self.early_launches = 0
        """Chunks of the last step whose reduction started during the backward."""

    def announce(self, num_microbatches: int) -> None:
        self.microbatches, self.early_launches = num_microbatches, 0

    def launched(self, chunk: ChunkShards) -> bool:
        return chunk.layout.index in self._launched

    def accumulated(self, chunk: ChunkShards) -> None:
        """`chunk`'s gradients of one microbatch were added to its full gradient: on the
        announced step's last one, start its reduction."""
        index = chunk.layout.index
        self._count[index] = self._count.get(index, 0) + 1
        if self.microbatches is not None and self._count[index] == self.microbatches:
            self._launch(chunk)
            self.early_launches += 1

    def _launch(self, chunk: ChunkShards) -> None:
        if self.group is None or self.launched(chunk):
            self._launched.setdefault(chunk.layout.index, (None, None, None))
            return
        with self.side.after_compute():  # CUDA: after the accumulation on the compute stream
            sent = chunk.full_grad.to(self.reduce_dtype)  # the same tensor in fp32
            if self.stage == 0:
                work = dist.all_reduce(sent, group=self.group, async_op=True)
                self.comm_bytes["all_reduce"] += (2 * sent.numel() * sent.element_size()
                                                  * (self.world - 1) // self.world)
                part = sent
            else:
                part = torch.empty(chunk.grad.numel(), dtype=sent.dtype, device=sent.device)
                work = dist.reduce_scatter_single(part, sent, group=self.group, async_op=True)
                self.comm_bytes["reduce_scatter"] += (part.numel() * part.element_size()
                                                      * (self.world - 1))

        def finish() -> None:
            if part.data_ptr() != chunk.grad.data_ptr():  # fp32 stage 0 reduced in place
                chunk.grad.copy_(part)
            chunk.grad.div_(self.world)

        self._launched[chunk.layout.index] = (work, finish, sent)

    def finish(self, chunks: list[ChunkShards], final: Callable[[ChunkShards], None]) -> None:
        """End of the step's backward: launch the chunks not launched yet (in chunk order),
        wait for every reduction in launch order, then call `final(chunk)` on each chunk (its
        gradient shard is in). On CUDA the waits and divisions are queued on the side stream,
        which the compute stream joins before `final` (a CPU chunk's update thread reads the
        shard on the default stream)."""
        for chunk in chunks:
            self._launch(chunk)
        with self.side.after_compute():
            for work, finish, _ in self._launched.values():
                if work is not None:
                    work.wait()
                    finish()
        self.side.join()
        by_index = {chunk.layout.index: chunk for chunk in chunks}
        for index in self._launched:
            final(by_index[index])
        self._launched.clear()
        self._count.clear()
        self.microbatches = None


class TpReplicatedGrads:
    """Gradients of parameters every tensor-parallel rank holds whole (Qwen3's q/k norm
    weights, `disttrain.parallel.tensor.TP_REPLICATED`): each tp rank's backward gives the
    part from its own heads, the gradient is their sum over the tp group. Summed once per step
    on this rank's gradient shard, when the chunk's shard is final (after its dp x sp
    reduction: the sums commute) and before its update and the norm: one fp32 all-reduce per
    chunk that holds such elements. Megatron-core does the same for its sequence-parallel and
    qk-layernorm weights (one all-reduce over tp of their gradients per step, after the
    data-parallel reduction, in `finalize_model_grads`); the norm counts them once (tp rank
    0), as Megatron's does (docs/design.md, "Replicated q/k norm weights")."""

    def __init__(self, tp, params, chunks: list[ChunkShards], shard_rank: int):
        self.tp = tp
        ids = {id(p) for p in params}
        self.spans: dict[int, list[tuple[int, int]]] = {}
        """Chunk index -> [start, stop) ranges of replicated elements in its gradient shard."""
        for chunk in chunks:
            n = chunk.grad.numel()
            first = shard_rank * n
            spans = []
            for slot in chunk.layout.slots:
                if id(slot.param) in ids:
                    lo, hi = max(slot.offset, first), min(slot.offset + slot.numel, first + n)
                    if lo < hi:
                        spans.append((lo - first, hi - first))
            if spans:
                self.spans[chunk.layout.index] = spans
        self._done: set[int] = set()

    def reduce(self, chunk: ChunkShards, side: SideStream) -> None:
        """Sum `chunk`'s replicated gradient elements of this rank's shard over tp (at most
        once a step: `step_done` re-arms it)."""
        spans = self.spans.get(chunk.layout.index)
        if not spans or chunk.layout.index in self._done:
            return
        self._done.add(chunk.layout.index)
        with side.after_compute():
            flat = torch.cat([chunk.grad[a:b] for a, b in spans]).to(chunk.full.device)
            dist.all_reduce(flat, group=self.tp.group)
            self.tp._count_collective("all_reduce", flat)
            flat = flat.to(chunk.grad.device)
            pos = 0
            for a, b in spans:
                chunk.grad[a:b].copy_(flat[pos:pos + b - a])
                pos += b - a

    def step_done(self) -> None:
        missed = set(self.spans) - self._done
        assert not missed, f"chunks {sorted(missed)}: replicated gradients not summed over tp"
        self._done.clear()

    def duplicate_sumsq(self, chunk: ChunkShards) -> torch.Tensor:
        """What the gradient norm leaves out of `chunk`'s shard on this rank (fp64): its
        replicated elements' squares on tp ranks other than 0 (each holds the same sum)."""
        out = torch.zeros((), dtype=torch.float64, device=chunk.grad.device)
        if self.tp.rank != 0:
            for a, b in self.spans.get(chunk.layout.index, ()):
                out += chunk.grad[a:b].double().pow(2).sum()
        return out
