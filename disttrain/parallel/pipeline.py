"""Pipeline parallelism: one optimizer step's 1F1B (or interleaved 1F1B) schedule over the pp
process group, run over stage modules cut from the unmodified model (the layer ranges per stage
and the stage modules are in pipeline_stages.py; their names are importable from here too).

The schedule itself is `torch.distributed.pipelining` (it runs on gloo and on nccl); this
file decides what each stage computes and keeps the step's numerics identical to
single-process training: the step loss is the mean of the microbatch losses, and each
microbatch's loss is divided by the number of microbatches *before* its backward, so
gradients accumulate into `.grad` exactly as in single-process gradient accumulation
(no rescaling of `.grad` after the fact, which would corrupt gradients reduced or offloaded
by per-parameter hooks during the backward, and gradients accumulated before the step).

Stages only ever exchange the hidden states (and their gradients). RoPE cos/sin are computed
on every stage from the absolute `positions` given to `PipelineRunner.step`, so a
sequence-parallel rank that holds a shard of the sequence passes its own positions.
Decoder layers are called as `layer(x, cos, sin)` and nothing else is assumed of them, so
layers wrapped by a memory policy or with a replaced attention core work unchanged.

Tied embeddings: the first stage owns `embed`, the last stage keeps its own copy of the same
(identically initialised) weight for the head; after the backward the two gradients are
summed by an all-reduce over the pp group (middle stages contribute zeros), so both copies
receive the full gradient and stay equal under the same optimizer. This needs the tied
gradient to still be in `.grad` after the schedule: ZeRO leaves it there (`deferred_grads`)
and reduces it after the step; other hooks that consume it make `step` raise instead.

With `loss_chunk_tokens` the last stage returns the final-normed hidden states and the loss
runs the output head over token chunks (`disttrain.tiling.chunked_lm_loss`): no full
(tokens x vocab) logits on the last stage, as the plan's `tiling.loss_chunk_tokens` says.

Shape legend: B batch, S sequence (local shard under sequence parallelism), H hidden, V vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from disttrain.parallel.dims import ParallelGroups
from disttrain.parallel.pipeline_stages import (LayerRange, StageModule,  # noqa: F401
                                                _union, build_stage_module, split_stages)
from disttrain.tiling import chunked_lm_loss
from planner.plan import ParallelPlan

SCHEDULE_VIRTUAL_STAGES = {"1f1b": 1, "interleaved-1f1b": 2}
"""Supported schedules and the number of (virtual) stages each pp rank holds."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_microbatch_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one microbatch in fp32 (as `trainer.lm_loss`)."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How one pipeline runs a step."""

    num_microbatches: int
    """Microbatches per optimizer step; the local batch must divide evenly."""
    schedule: str = "1f1b"
    """'1f1b' or 'interleaved-1f1b' (two virtual stages per pp rank)."""
    stages: tuple[tuple[int, int], ...] = ()
    """Half-open layer ranges of all pp * virtual stages; empty: `split_stages`."""

    def __post_init__(self) -> None:
        if self.num_microbatches < 1:
            raise ValueError(f"parallel.num_microbatches: must be >= 1, "
                             f"got {self.num_microbatches}")
        if self.schedule not in SCHEDULE_VIRTUAL_STAGES:
            raise ValueError(f"parallel.schedule: must be one of "
                             f"{tuple(SCHEDULE_VIRTUAL_STAGES)}, got {self.schedule!r}")

    @property
    def virtual_stages(self) -> int:
        return SCHEDULE_VIRTUAL_STAGES[self.schedule]

    @classmethod
    def from_plan(cls, parallel: ParallelPlan) -> "PipelineConfig":
        """The pipeline part of a plan (its `stages` are per stage, in layer order)."""
        return cls(num_microbatches=parallel.num_microbatches, schedule=parallel.schedule,
                   stages=tuple(tuple(s) for s in parallel.stages))


@functools.cache
def _counting_stage() -> type:
    """`PipelineStage` with a byte counter, defined on first use: importing
    torch.distributed.pipelining pulls in torch._dynamo, sympy and DTensor (~80 MiB of RSS
    per process, measured), which a run without a pipeline should not pay."""
    from torch.distributed.pipelining import PipelineStage

    class _CountingStage(PipelineStage):
        """A PipelineStage that adds the bytes of every activation/gradient it sends to a
        shared counter (the P2P ops the schedule posts; the one-time shape metadata of the
        first step is not counted)."""

        def __init__(self, *args, counter: dict[str, int], **kwargs):
            super().__init__(*args, **kwargs)
            self._counter = counter

        def _count(self, ops: list[dist.P2POp], kind: str) -> list[dist.P2POp]:
            self._counter[kind] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return ops

        def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
            return self._count(super().get_fwd_send_ops(fwd_chunk_id), "activations")

        def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
            return self._count(super().get_bwd_send_ops(bwd_chunk_id), "gradients")

    return _CountingStage


class PipelineRunner:
    """Runs one optimizer step's forward and backward of this pp rank's stage(s).

    Gradients are accumulated into the local stage parameters (`self.module`); zeroing
    them and the optimizer step stay with the caller. Composes with dp/sp: all pipeline
    communication uses `groups.pp`, the group of ranks sharing this rank's (dp, sp)
    coordinates, so each (dp, sp) slice runs its own pipeline on its own data.
    """

    def __init__(self, model: nn.Module, groups: ParallelGroups, config: PipelineConfig, *,
                 loss_fn: LossFn = lm_microbatch_loss, loss_chunk_tokens: int = 0):
        pp = groups.dims.pp
        if pp < 2 or groups.pp is None:
            raise ValueError(f"parallel.pp: a pipeline needs pp >= 2, got {pp}")
        num_stages = pp * config.virtual_stages
        stages = config.stages or split_stages(len(model.layers), num_stages)
        if len(stages) != num_stages:
            raise ValueError(f"parallel.stages: schedule {config.schedule!r} with pp={pp} needs "
                             f"{num_stages} ranges, got {len(stages)}")
        self.config, self.group, self.pp, self.pp_rank = config, groups.pp, pp, groups.pp_rank
        self.tied = model.head is None
        self._tied_meta = (tuple(model.embed.weight.shape), model.embed.weight.dtype)
        self.bytes_sent = {"activations": 0, "gradients": 0, "tied_grad_allreduce": 0}
        """Bytes this rank sent in the last step, by kind (the cost model's check)."""
        self._counter = {"activations": 0, "gradients": 0}
        # Loop placement: rank r holds stages r, r + pp, ... (what the schedules expect).
        indices = [v * pp + self.pp_rank for v in range(config.virtual_stages)]
        self.stage_modules = [build_stage_module(model, i, stages) for i in indices]
        self.module = _union(self.stage_modules)
        """All local stage parameters under the full model's names (optimizer, ZeRO)."""
        device = next(model.parameters()).device
        pipe_stages = [_counting_stage()(m, i, num_stages, device, group=self.group,
                                      counter=self._counter)
                       for m, i in zip(self.stage_modules, indices)]
        num_micro = config.num_microbatches
        last = next((m for m in self.stage_modules if m.is_last), None)
        if loss_chunk_tokens > 0 and last is not None and last.tensor_parallel is None:
            # (under tp the given loss_fn tiles the vocabulary-parallel head itself)
            last.loss_chunk_tokens = loss_chunk_tokens

            def loss_fn(hidden_BSH: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
                return chunked_lm_loss(hidden_BSH, last.output_weight, targets_BS,
                                       loss_chunk_tokens)

        def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if self.loss_scale is not None:  # packed documents: summed, valid-token scaled
                if loss_chunk_tokens > 0 and last is not None:
                    return chunked_lm_loss(output, last.output_weight, target,
                                           loss_chunk_tokens, reduction="sum") * self.loss_scale
                return F.cross_entropy(output.float().flatten(0, 1), target.flatten(),
                                       reduction="sum") * self.loss_scale
            return loss_fn(output, target) / num_micro

        self.loss_scale: float | None = None
        """Set per step with packed documents: each microbatch's loss is its summed token
        losses times this (the engine's valid-token normalisation)."""

        from torch.distributed.pipelining import Schedule1F1B, ScheduleInterleaved1F1B

        if config.schedule == "1f1b":
            self.schedule = Schedule1F1B(pipe_stages[0], num_micro, loss_fn=scaled_loss,
                                         scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(pipe_stages, num_micro,
                                                    loss_fn=scaled_loss, scale_grads=False)
        self.has_first = any(m.is_first for m in self.stage_modules)
        self.has_last = any(m.is_last for m in self.stage_modules)

    def step(self, tokens_BS: torch.Tensor | None, targets_BS: torch.Tensor | None,
             positions_S: torch.Tensor | None = None, *,
             documents: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
             loss_scale: float | None = None) -> float:
        """Forward and backward of one step; returns the step loss (mean of the microbatch
        losses) on every rank of the pipeline. The first stage needs `tokens_BS`, the last
        `targets_BS` (others may pass None); every stage needs the same sequence length and,
        under sequence parallelism, this rank's absolute `positions_S`.

        Packed documents: `documents` gives each microbatch's (positions_S, doc_ids) and
        `loss_scale` replaces the mean: the step loss is the sum over microbatches of
        (summed token losses x loss_scale), IGNORE targets skipped."""
        if documents is not None:
            if len(documents) != self.config.num_microbatches:
                raise ValueError(f"documents: need one entry per microbatch "
                                 f"({self.config.num_microbatches}), got {len(documents)}")
            positions_S = documents[0][0]
        for module in self.stage_modules:
            module.documents, module._next_microbatch = documents, 0
        self.loss_scale = loss_scale
        needed = {"tokens_BS": (self.has_first, tokens_BS),
                  "targets_BS": (self.has_last, targets_BS)}
        for name, (required, value) in needed.items():
            if required and value is None:
                raise ValueError(f"{name}: required on pp rank {self.pp_rank}")
            if required and value.shape[0] % self.config.num_microbatches:
                raise ValueError(f"{name}: batch {value.shape[0]} is not divisible by "
                                 f"num_microbatches={self.config.num_microbatches}")
        if positions_S is None:
            reference = tokens_BS if tokens_BS is not None else targets_BS
            if reference is None:
                raise ValueError(f"positions_S: required on pp rank {self.pp_rank} when it "
                                 f"gets neither tokens nor targets")
            positions_S = torch.arange(reference.shape[1])
        for module in self.stage_modules:
            module.positions_S = positions_S
        for kind in self._counter:
            self._counter[kind] = 0
        losses: list[torch.Tensor] = []
        args = (tokens_BS,) if self.has_first else ()
        target = targets_BS if self.has_last else None
        tied_before = self._tied_grad_snapshot() if self.tied else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        self.bytes_sent.update(self._counter)
        self.bytes_sent["tied_grad_allreduce"] = (self._sync_tied_grad(tied_before)
                                                  if self.tied else 0)
        loss = torch.zeros((), dtype=torch.float64)
        if self.has_last:
            loss = torch.stack([item.detach().double() for item in losses]).sum()
        dist.broadcast(loss, group=self.group, group_src=self.pp - 1)
        return float(loss)

    def _tied_owner(self) -> StageModule | None:
        return next((m for m in self.stage_modules if m.embed is not None), None)

    def _tied_grad_snapshot(self) -> torch.Tensor | None:
        """The tied weight's gradient accumulated before this step (already summed over
        the stages by earlier steps), so only this step's contribution is exchanged."""
        owner = self._tied_owner()
        if owner is None or owner.embed.weight.grad is None:
            return None
        return owner.embed.weight.grad.clone()

    def _sync_tied_grad(self, before: torch.Tensor | None) -> int:
        """Sum this step's tied embedding/head gradient of the first and the last stage over
        the pp group (middle ranks add zeros); returns the bytes this rank contributed."""
        owner = self._tied_owner()
        if owner is not None:
            weight = owner.embed.weight
            if weight.grad is None:  # the embedding and the head always produce one
                raise RuntimeError("tied embeddings: the embedding/head gradient was taken "
                                   "out of .grad during the backward (by a gradient hook, "
                                   "e.g. ZeRO); it must be summed over the pp group first")
            delta = weight.grad if before is None else weight.grad - before
        else:
            shape, dtype = self._tied_meta
            delta = torch.zeros(shape, dtype=dtype)
        dist.all_reduce(delta, group=self.group)
        if owner is not None and before is not None:
            owner.embed.weight.grad.copy_(before + delta)
        return delta.numel() * delta.element_size()
