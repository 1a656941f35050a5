"""Chunked, sharded model states: ZeRO stages 0-3 over the dp x sp group, with CPU chunks.

Each chunk (see chunks.py) keeps, on every rank of the sharding group, an fp32 master shard,
its fp32 AdamW moments and an fp32 gradient shard; the model's parameters are views into the
chunk's full flat buffer in the compute dtype (`ZeroConfig.compute_dtype`: fp32, or bf16 for
mixed precision). Stage 3 gathers a chunk before the first unit that uses it runs (forward and
backward, with the next unit's chunks prefetched asynchronously) and frees it after; gradients
are reduce-scattered as soon as a whole chunk's gradients exist. Stages 0-2 keep the full
parameters and differ in what is sharded (nothing; optimizer; optimizer and gradients);
stages 0-1 accumulate full gradients and reduce each chunk once per step, started during the
last microbatch's backward as soon as the chunk's gradient is final (grad_reduce.py).

Mixed precision (FSDP2 MixedPrecisionPolicy / DeepSpeed bf16; docs/design.md, "Model states
and mixed precision"): compute-dtype gradients are reduced in `reduce_dtype` and accumulated
in fp32; AdamW updates the fp32 master, then its value is cast into the compute parameters
(stages 0-2: the full buffer, re-gathered; stage 3: the compute shard gathers read).
Chunks listed as CPU chunks keep master, moments and gradient shard in host memory; on a CPU
machine that is the same memory, so the placement is tracked and reported as bytes by place.
Told the step's learning rate before its backward (`begin_step`), a CPU chunk's AdamW update
runs on a worker thread (cpu_optim.py) as soon as its gradient shard is final, overlapped with
the rest of the backward; `step` then updates the other chunks and waits for those.
On CUDA the collectives run on a side stream (shards.py) overlapping the compute.
With `overlap_param_gather` stages 0-2 leave each chunk's post-update all-gather running after
`step` and wait for it in a forward pre-hook (Megatron's `overlap_param_gather`); whatever
reads parameters or masters outside a forward first waits for all of them (`wait_params`).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import nn

from disttrain.parallel.chunks import execution_units, pack_chunks
from disttrain.parallel.cpu_optim import EarlyCpuUpdates, adamw_
from disttrain.parallel.grad_reduce import StepReductions, TpReplicatedGrads
from disttrain.parallel.shards import FP32, ChunkShards as _Chunk, SideStream as _SideStream
from disttrain.parallel.shards import ZeroConfig
from disttrain.parallel.zero_state import ZeroStateMixin

__all__ = ["ZeroConfig", "ZeroModelStates"]


class ZeroModelStates(ZeroStateMixin):
    """Owns the model's parameters, gradients and optimizer state for one rank."""

    def __init__(self, model: nn.Module, config: ZeroConfig, *,
                 group: dist.ProcessGroup | None = None, extra_norm_group=None,
                 tp_replicated: tuple | None = None):
        """`tp_replicated`: (the TensorParallel, the parameters every tp rank holds whole):
        their gradients are summed over tp once per step (`TpReplicatedGrads`)."""
        self.model, self.config, self.group = model, config, group
        self.extra_norm_group = extra_norm_group  # e.g. the pp group: grad norm spans stages
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        shard_size = 1 if config.stage == 0 else self.world
        shard_rank = 0 if config.stage == 0 else self.rank
        layouts = pack_chunks(model, chunk_numel=config.chunk_numel, group_size=shard_size)
        bad = [c for c in config.cpu_chunks if not 0 <= c < len(layouts)]
        if bad:
            raise ValueError(f"model_states.cpu_chunks: chunk {bad[0]} does not exist "
                             f"(the model packs into {len(layouts)} chunks)")
        self.chunks = [_Chunk(layout, shard_size, shard_rank, layout.index in config.cpu_chunks,
                              config.stage, config.compute_dtype) for layout in layouts]
        self._side = _SideStream(self.chunks[0].full.device)
        self._tp = (TpReplicatedGrads(*tp_replicated, self.chunks, shard_rank)
                    if tp_replicated is not None and tp_replicated[1] else None)
        self._chunk_of = {id(s.param): c for c in self.chunks for s in c.layout.slots}
        self.units = execution_units(model)
        self.unit_chunks = [[c for c in self.chunks if u in c.layout.units]
                            for u in range(len(self.units))]
        self.step_count = 0
        self.peak_gathered_bytes = 0
        self.comm_bytes = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
        self._early = EarlyCpuUpdates()
        self._reductions = StepReductions(stage=config.stage, group=group, world=self.world,
                                          reduce_dtype=config.reduce_dtype, side=self._side,
                                          comm_bytes=self.comm_bytes)
        self._optimizer_stats: dict = {}
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._on_grad)
                       for c in self.chunks for s in c.layout.slots]
        if config.stage == 3:
            self._install_gather_hooks()
            for chunk in self.chunks:
                self._release(chunk)
        elif config.overlap_param_gather:
            self._install_gather_hooks(wait_only=True)

    # ---- gather / release (stage 3) -------------------------------------------------------
    @property
    def _keeps_full(self) -> bool:
        """Stages 0-2 keep every chunk's full parameters; stage 3 gathers them when used."""
        return self.config.stage < 3

    def _gather(self, chunk: _Chunk, async_op: bool = False) -> None:
        """Fill the chunk's full compute-dtype buffer from the shards: stage 3 from the
        persistent compute shard, stages 0-2 (after an update) from the fp32 master, cast."""
        if chunk.gathered or chunk.work is not None:
            return
        chunk.full.untyped_storage().resize_(chunk.full_bytes)  # on the compute stream
        source = chunk.shard if chunk.shard is not None else chunk.master
        with self._side.after_compute():
            source = source.to(chunk.full.device, chunk.full.dtype)  # no copy when it is
            if source.numel() == chunk.full.numel():  # unsharded: a copy (or the same tensor)
                if source.data_ptr() != chunk.full.data_ptr():
                    chunk.full.copy_(source)
            else:
                chunk.work = (dist.all_gather_single(chunk.full, source, group=self.group,
                                                     async_op=True), source)
                self.comm_bytes["all_gather"] += (source.numel() * source.element_size()
                                                  * (self.world - 1))
            chunk.event = self._side.event()
        chunk.gathered = True
        if not async_op:
            self._wait(chunk)
        self._track_peak()

    def _wait(self, chunk: _Chunk) -> None:
        if chunk.work is not None:
            chunk.work[0].wait()
            chunk.work = None  # the gather's source (a cast copy) may go now
        self._side.wait(chunk.event)
        chunk.event = None

    def _release(self, chunk: _Chunk) -> None:
        if self._keeps_full or not chunk.gathered:
            return
        self._wait(chunk)
        chunk.full.untyped_storage().resize_(0)
        chunk.gathered = False

    def _ensure(self, unit: int, prefetch: int | None) -> None:
        """Gather `unit`'s chunks (and start gathering `prefetch`'s). In the backward
        (prefetch < unit) only chunks some forward still owes gradients to: one whose
        gradients were already reduced and released (the head's, before the final norm's
        backward) is not needed again, and gathering it would leave it gathered until the
        next forward."""
        backward = prefetch is not None and prefetch < unit
        for chunk in self.unit_chunks[unit]:
            if backward and not chunk.backwards_owed:
                continue
            self._gather(chunk)
            self._wait(chunk)
            if not backward and unit == min(chunk.layout.units) and torch.is_grad_enabled():
                chunk.backwards_owed += 1  # once per forward, at the chunk's first unit
        if not self.config.prefetch and prefetch is not None:
            prefetch = -1  # gather each unit's chunks only when it runs
        if prefetch is not None and 0 <= prefetch < len(self.units) and not (
                backward and isinstance(self.units[prefetch], nn.Embedding)):
            for chunk in self.unit_chunks[prefetch]:
                if not backward or chunk.backwards_owed:
                    self._gather(chunk, async_op=True)

    def _install_gather_hooks(self, wait_only: bool = False) -> None:
        """Stage 3: gather / prefetch / release around each unit. `wait_only` (stages 0-2 with
        `overlap_param_gather`): only wait for the unit's pending post-update gathers."""
        last = len(self.units) - 1
        for index, unit in enumerate(self.units):
            module = unit if isinstance(unit, nn.Module) else getattr(self.model, "norm", None)
            if module is None:
                continue
            self._hooks.append(module.register_forward_pre_hook(
                (lambda m, a, i=index: self._wait_unit(i)) if wait_only
                else (lambda m, a, i=index: self._ensure(i, i + 1))))
            if wait_only:
                continue
            if not isinstance(module, nn.Embedding):  # its backward never reads the weight
                self._hooks.append(module.register_full_backward_pre_hook(
                    lambda m, g, i=index: self._ensure(i, i - 1)))
            if index != last:
                self._hooks.append(module.register_forward_hook(
                    lambda m, a, o, i=index: self._release_after_forward(i)))

    def _wait_unit(self, unit: int) -> None:
        for chunk in self.unit_chunks[unit]:
            self._wait(chunk)

    def _release_after_forward(self, unit: int) -> None:
        for chunk in self.unit_chunks[unit]:
            if max(chunk.layout.units) <= unit:
                self._release(chunk)

    # ---- gradients ---------------------------------------------------------------------------
    def _on_grad(self, param: torch.Tensor) -> None:
        chunk = self._chunk_of[id(param)]
        if self._early.started(chunk.layout.index) or self._reductions.launched(chunk):
            raise RuntimeError(f"ZeRO: chunk {chunk.layout.index} got a gradient after its "
                               f"optimizer update or its step's gradient reduction started: the "
                               f"step ran more backward passes than begin_step's num_microbatches")
        chunk.pending -= 1
        if chunk.pending == 0:
            self._reduce_chunk(chunk)

    def _reduce_chunk(self, chunk: _Chunk) -> None:
        """A chunk's gradients of this microbatch are complete: stages 0-1 add them to the
        full local gradient (and on the step's last microbatch start its reduction,
        grad_reduce.py); stages 2-3 reduce-scatter them into the shard now."""
        if chunk.full_grad is not None:  # fp32 accumulation of compute-dtype gradients
            for slot in chunk.layout.slots:
                chunk.full_grad[slot.offset:slot.offset + slot.numel] += slot.param.grad.flatten()
                slot.param.grad = None
            self._reductions.accumulated(chunk)
        else:
            with self._side.after_compute():
                flat = torch.zeros(chunk.layout.numel, dtype=self.config.reduce_dtype,
                                   device=chunk.full.device)
                for slot in chunk.layout.slots:
                    flat[slot.offset:slot.offset + slot.numel].copy_(slot.param.grad.flatten())
                    self._side.keep(slot.param.grad)
                    slot.param.grad = None
                if self.group is not None:
                    part = torch.empty(chunk.grad.numel(), dtype=flat.dtype, device=flat.device)
                    dist.reduce_scatter_single(part, flat, group=self.group)
                    self.comm_bytes["reduce_scatter"] += (part.numel() * part.element_size()
                                                          * (self.world - 1))
                    flat = part.to(FP32).div_(self.world)
                chunk.grad += flat.to(chunk.grad.device, FP32)
        chunk.pending = len(chunk.layout.slots)
        chunk.backwards_owed = max(0, chunk.backwards_owed - 1)
        self._release(chunk)
        if self._early.reduced(chunk.layout.index) and chunk.full_grad is None:
            self._grad_final(chunk)  # stages 2-3: its last microbatch's shard is in

    def finish_backward(self) -> None:
        """End of a step's backward (all microbatches): reduce what is still local.

        A parameter without a gradient in this step would leave its chunk pending: it is
        reduced with zeros for the missing gradients. Stage 0 all-reduces the full gradients,
        stage 1 reduce-scatters them (once per step, as the cost model assumes): each chunk's
        reduction started during the last microbatch's backward when `begin_step` announced
        the step (grad_reduce.py), the others start now; all are waited for here. Every
        gradient shard is then final: CPU chunks not yet updating start now (`begin_step`)."""
        for chunk in self.chunks:
            if chunk.pending != len(chunk.layout.slots):
                for slot in chunk.layout.slots:
                    if slot.param.grad is None:
                        slot.param.grad = torch.zeros_like(slot.param)
                self._reduce_chunk(chunk)
            chunk.backwards_owed = 0  # every backward of the step has run
        if self.config.stage <= 1:
            self._reductions.finish(self.chunks, self._grad_final)
        else:
            for chunk in self.chunks:
                self._grad_final(chunk)
        if self._tp is not None:
            self._tp.step_done()
        self._side.join()  # the gradient shards are read next (norm, update)

    def _grad_final(self, chunk: _Chunk) -> None:
        """`chunk`'s gradient shard will not change before the step (but for its tp-replicated
        elements, summed over tp now, once): a CPU chunk of an announced step starts its
        update on the worker thread (once)."""
        if self._tp is not None:
            self._tp.reduce(chunk, self._side)
        if chunk.on_cpu:
            step = self.step_count + 1
            self._early.start(chunk.layout.index, lambda lr: self._update(chunk, lr, step))

    # ---- optimizer ---------------------------------------------------------------------------
    def begin_step(self, lr: float, *, num_microbatches: int, grad_clip: float = 0.0) -> None:
        """Announce the next step before its backward: its learning rate, the backward passes
        (microbatches) each chunk gets, and the clipping norm `clip_grad_norm` will use.
        Stages 0-1 then reduce each chunk's gradient during the last microbatch's backward;
        CPU chunks update as soon as their gradient shard is final. Not when clipping: the
        update needs the global norm first, so that step updates every chunk in `step`."""
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches: must be >= 1, got {num_microbatches}")
        self._reductions.announce(num_microbatches)
        clipping = grad_clip > 0 and math.isfinite(grad_clip)
        overlap = self.config.overlap_cpu_optimizer and not clipping
        self._early.announced = (lr, num_microbatches) if overlap else None

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradient (as torch.nn.utils.clip_grad_norm_), then clip.
        Only reads the shards, so CPU chunks may be updating meanwhile (they read them too)."""
        sumsq = torch.zeros(1, dtype=torch.float64, device=self.chunks[0].full.device)
        for chunk in self.chunks:  # a CPU chunk's shard may live off the compute device
            sumsq += chunk.grad.double().pow(2).sum().to(sumsq.device)
            if self._tp is not None:   # replicated over tp: counted on tp rank 0 only
                sumsq -= self._tp.duplicate_sumsq(chunk).to(sumsq.device)
        if self.group is not None and self.config.stage > 0:
            dist.all_reduce(sumsq, group=self.group)
        if self.extra_norm_group is not None:
            dist.all_reduce(sumsq, group=self.extra_norm_group)
        norm = math.sqrt(sumsq.item())
        if max_norm > 0 and math.isfinite(max_norm):
            if self._early.started():
                raise RuntimeError("ZeRO: clipping after CPU chunks started their update "
                                   "(begin_step was told grad_clip=0)")
            coef = min(max_norm / (norm + 1e-6), 1.0)
            for chunk in self.chunks:
                chunk.grad.mul_(coef)
        return norm

    def step(self, lr: float) -> None:
        """AdamW on every shard (same update as torch.optim.AdamW), then refresh parameters.
        CPU chunks already updating (`begin_step`) are waited for after the others."""
        if self._early.started() and self._early.announced[0] != lr:
            raise RuntimeError(f"ZeRO: step(lr={lr}), but begin_step announced "
                               f"lr={self._early.announced[0]}")
        self.wait_params()  # a chunk no forward used may still be gathering into its master
        self.step_count += 1
        seconds = {True: 0.0, False: 0.0}  # on_cpu -> seconds of updates run here
        for chunk in self.chunks:
            if not self._early.started(chunk.layout.index):
                start = time.perf_counter()
                self._update(chunk, lr, self.step_count)
                seconds[chunk.on_cpu] += time.perf_counter() - start
        self._optimizer_stats = self._early.finish(sync_cpu_s=seconds[True],
                                                   device_s=seconds[False])
        for chunk in self.chunks:
            (chunk.full_grad if chunk.full_grad is not None else chunk.grad).zero_()
        self._regather()

    def _regather(self) -> None:
        """Stages 0-2: refresh the full parameters from the masters (`overlap_param_gather`:
        waited for before each chunk's first use, `_install_gather_hooks`)."""
        if self._keeps_full:
            for chunk in self.chunks:
                chunk.gathered = False
                self._gather(chunk, async_op=self.config.overlap_param_gather)

    def wait_params(self) -> None:
        """Wait for every pending gather: parameters and masters may then be read or written."""
        for chunk in self.chunks:
            self._wait(chunk)

    def _update(self, chunk: _Chunk, lr: float, step: int) -> None:
        """AdamW on the fp32 master shard; stage 3 then refreshes its compute-dtype shard
        (stages 0-2 refresh the full parameters in `step`)."""
        adamw_(chunk.master, chunk.grad, chunk.exp_avg, chunk.exp_avg_sq, chunk.decay, lr=lr,
               step=step, betas=self.config.betas, eps=self.config.eps,
               weight_decay=self.config.weight_decay)
        if chunk.shard is not None and chunk.shard is not chunk.master:
            chunk.shard.copy_(chunk.master)

    def optimizer_stats(self) -> dict:
        """The last step's optimizer seconds, overlapped and exposed (`EarlyCpuUpdates.finish`)."""
        return dict(self._optimizer_stats)

    # ---- accounting (bytes and the state dicts: zero_state.py) ------------------------
    def _track_peak(self) -> None:
        gathered = sum(c.full_bytes for c in self.chunks if c.gathered)
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, gathered)

    def remove_hooks(self) -> None:
        self.wait_params()  # no hook will wait for them any more
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
