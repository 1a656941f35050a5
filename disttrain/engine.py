"""Assemble what one rank runs from a plan, in one fixed order (as torchtitan does):

    build model (seeded, identical on every rank; model.hf: its weights loaded)
      -> tensor parallel (keep this rank's shard of every parameter)
      -> sequence parallel (replace each layer's attention core)
      -> activation policy (wrap each decoder layer: keep / swap / token-wise recompute)
      -> pipeline split (this rank's stage module)
      -> model states (torch AdamW on one rank, chunked ZeRO over dp x sp otherwise)

and run one optimizer step's forward and backward over this rank's share of the global batch.

`model.dtype: bf16` is mixed precision without autocast: the model states turn the parameters
into bf16 compute copies of fp32 masters (their AdamW runs on the masters), so every layer
computes, saves and passes on bf16; RMSNorm statistics, the attention's log-sum-exp, RoPE
angles and the loss run in fp32 inside the model. Gradients are reduced in
`train.grad_reduce_dtype` and accumulated in fp32.

What the plan says about this rank's CPU chunks and activation stores is worked out in
runtime_setup.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from disttrain.data import Batches
from disttrain.data.packing import IGNORE, DocumentBatches
from disttrain.device import CPU, Device
from disttrain.model.documents import documents_scope
from disttrain.model import Llama, build_model
from disttrain.optim import TorchAdamWStates
from disttrain.parallel.dims import ParallelDims, ParallelGroups, build_groups
from disttrain.parallel.pipeline import PipelineConfig, PipelineRunner
from disttrain.parallel.sequence import apply_sequence_parallel, sequence_positions, shard_sequence
from disttrain.parallel.sp_core import SequenceParallelCore
from disttrain.parallel.tensor import (TensorParallel, apply_tensor_parallel,
                                       tp_checkpoint_state, tp_replicated_names,
                                       vocab_parallel_lm_loss)
from disttrain.parallel.zero import ZeroConfig, ZeroModelStates
from disttrain.runtime_setup import (_apply_activations, _chunk_numel,  # noqa: F401
                                     _first_chunk_ids, _local_cpu_chunks, store_budgets)
from disttrain.spec import Job, SpecError
from disttrain.tiling import apply_mlp_tiling, chunked_lm_loss
from offload import ActivationRuntime
from offload.host_memory import keep_freed_host_memory, memory_bound, return_freed_host_memory
from planner.plan import Plan

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lm_loss(model: Llama, tokens_BS: torch.Tensor, targets_BS: torch.Tensor,
            positions_S: torch.Tensor | None = None, *, loss_chunk_tokens: int = 0,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy over the given tokens, computed in fp32 ('mean' over them, or
    the 'sum' over tokens whose target is not IGNORE); with `loss_chunk_tokens` the logits
    exist only a chunk of tokens at a time."""
    tp = getattr(model, "tensor_parallel", None)
    if tp is not None:  # sharded hidden states, vocabulary-parallel head and loss
        assert reduction == "mean", "tp > 1 with packed documents is refused in build_runtime"
        return vocab_parallel_lm_loss(tp, model.hidden_states(tokens_BS, positions_S),
                                      model.output_weight, targets_BS, loss_chunk_tokens)
    if loss_chunk_tokens:
        hidden = model.hidden_states(tokens_BS, positions_S)
        return chunked_lm_loss(hidden, model.output_weight, targets_BS, loss_chunk_tokens,
                               reduction=reduction)
    logits = model(tokens_BS, positions_S)
    return F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten(),
                           ignore_index=IGNORE, reduction=reduction)


@dataclass
class Runtime:
    job: Job
    plan: Plan
    groups: ParallelGroups
    model: nn.Module
    """The full model (pp == 1) or this rank's pipeline stage."""
    states: TorchAdamWStates | ZeroModelStates
    accum_steps: int
    """Microbatches this rank runs per optimizer step."""
    pipeline: PipelineRunner | None = None
    """The 1F1B runner when pp > 1."""
    sp_core: SequenceParallelCore | None = None
    """The sequence-parallel attention core shared by every layer when sp > 1."""
    activations: ActivationRuntime | None = None
    """The activation policy's runtime (stores, per-layer measurements), when one is applied."""
    copy_engine: str | None = None
    """Which copy engine the stores use (C++ or the Python fallback), for the run log."""
    tensor_parallel: TensorParallel | None = None
    """The tp group and its communication counter when tp > 1."""

    def activation_stats(self) -> dict | None:
        """Per-layer measured bytes and tokens of the last step, or None (keep-all)."""
        return None if self.activations is None else self.activations.step_metrics()

    def close(self) -> None:
        """Release stores (NVMe files are removed)."""
        if self.activations is not None:
            self.activations.close()

    @property
    def device(self) -> torch.device:
        """Where this rank's parameters (and so its batches) live."""
        return next(self.model.parameters()).device

    @property
    def dims(self) -> ParallelDims:
        return self.groups.dims

    def _microbatch(self, batches: Batches, step: int, micro: int):
        """This rank's (tokens, targets, positions) of microbatch `micro`: data-parallel rank
        r takes global microbatch micro * dp + r; sequence-parallel ranks take their shard.
        Packed documents add a fourth item: the document ids of the whole (unsharded) row."""
        if isinstance(batches, DocumentBatches):
            return self._document_microbatch(batches, step, micro)
        tokens, targets = (t.to(self.device) for t in
                           batches.get(step, micro * self.dims.dp + self.groups.dp_rank))
        if self.dims.sp == 1:
            return tokens, targets, None
        return shard_sequence(tokens, targets, self.groups.sp_rank, self.dims.sp,
                              self.plan.parallel.sp_kind)

    def _document_microbatch(self, batches: DocumentBatches, step: int, micro: int):
        """(tokens, targets, positions) on this rank's device; the document ids stay on the
        host (the cores read the document bounds from them)."""
        packed = batches.get_packed(step, micro * self.dims.dp + self.groups.dp_rank)
        tokens, targets, positions = (t.to(self.device) for t in
                                      (packed.tokens, packed.targets, packed.positions))
        if self.dims.sp == 1:
            return tokens, targets, positions, packed.doc_ids
        index = sequence_positions(tokens.shape[1], self.groups.sp_rank, self.dims.sp,
                                   self.plan.parallel.sp_kind).to(self.device)
        return tokens[:, index], targets[:, index], positions[index], packed.doc_ids

    def _valid_token_scale(self, parts: list) -> tuple[float, int]:
        """(loss scale, global valid tokens): each rank's summed token losses times the scale,
        averaged over dp x sp as gradients are, give the mean over the valid tokens of the
        whole global batch. One all-reduce of the count per step."""
        count = torch.tensor([sum(int((p[1] != IGNORE).sum()) for p in parts)],
                             dtype=torch.float64, device=self.device)
        if self.groups.dp_sp is not None:
            dist.all_reduce(count, group=self.groups.dp_sp)
        total = int(count.item())
        return self.dims.dp * self.dims.sp / max(total, 1), total

    def communication_bytes(self) -> dict[str, int]:
        """Bytes this rank sent in the last step, by collective kind (reset on read)."""
        out: dict[str, int] = {}
        if self.sp_core is not None:
            out.update({f"sp_{k}": v for k, v in self.sp_core.reset_comm_bytes().items()})
        if self.pipeline is not None:
            out.update({f"pp_{k}": v for k, v in self.pipeline.bytes_sent.items()})
        tp = self.tensor_parallel
        if tp is not None:
            out.update({f"tp_{k}": v for k, v in tp.reset_comm_bytes().items()})
        comm = getattr(self.states, "comm_bytes", None)
        if comm is not None:
            out.update({f"zero_{k}": v for k, v in comm.items()})
            for key in comm:
                comm[key] = 0
        return out

    def checkpoint_state(self) -> dict:
        """The model states' `state_dict()` under full-shape keys: a tensor-parallel rank's
        shards become blocks of the whole parameters (a tp2 checkpoint loads at tp1)."""
        tp = self.tensor_parallel
        state = self.states.state_dict()
        return state if tp is None else tp_checkpoint_state(state, tp)

    def forward_backward(self, step: int, batches: Batches) -> float:
        """Forward and backward of every microbatch of `step` on this rank; returns the step's
        loss (mean over the whole global batch, the same value on every rank)."""
        dims, groups = self.dims, self.groups
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if isinstance(batches, DocumentBatches):
            total += self._document_forward_backward(step, batches)
        elif self.pipeline is not None:
            parts = [self._microbatch(batches, step, m) for m in range(self.accum_steps)]
            tokens = torch.cat([p[0] for p in parts])
            targets = torch.cat([p[1] for p in parts])
            total += self.pipeline.step(tokens, targets, parts[0][2])
        for micro in range(self.accum_steps if self.pipeline is None
                           and not isinstance(batches, DocumentBatches) else 0):
            tokens, targets, positions = self._microbatch(batches, step, micro)
            loss = lm_loss(self.model, tokens, targets, positions,
                           loss_chunk_tokens=self.plan.tiling.loss_chunk_tokens)
            loss = loss / self.accum_steps
            loss.backward()
            total += loss.detach().double()
        self.states.finish_backward()
        if groups.dp_sp is not None:
            dist.all_reduce(total, group=groups.dp_sp)
            total /= dims.dp * dims.sp
        return total.item()

    def _document_forward_backward(self, step: int, batches: DocumentBatches) -> float:
        """Packed documents: every core masks across documents, the loss is the mean over
        the valid tokens of the global batch (a rank with none contributes zero)."""
        parts = [self._microbatch(batches, step, m) for m in range(self.accum_steps)]
        scale, _ = self._valid_token_scale(parts)
        if self.pipeline is not None:
            return self.pipeline.step(
                torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                documents=[(p[2], p[3]) for p in parts], loss_scale=scale)
        total = 0.0
        for tokens, targets, positions, doc_ids in parts:
            with documents_scope(doc_ids):
                loss = lm_loss(self.model, tokens, targets, positions, reduction="sum",
                               loss_chunk_tokens=self.plan.tiling.loss_chunk_tokens) * scale
            loss.backward()
            total += float(loss.detach())
        return total

    @torch.no_grad()
    def eval_loss(self, batches: DocumentBatches, step: int = 0) -> float:
        """Mean loss over the valid tokens of global batch `step` of `batches` (forward only;
        the same value on every rank)."""
        if self.pipeline is not None:
            raise SpecError("train.eval_every: validation is not supported with parallel.pp > 1")
        parts = [self._microbatch(batches, step, m) for m in range(self.accum_steps)]
        scale, _ = self._valid_token_scale(parts)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for tokens, targets, positions, doc_ids in parts:
            with documents_scope(doc_ids):
                total += float(lm_loss(self.model, tokens, targets, positions,
                                       reduction="sum") * scale)
        if self.groups.dp_sp is not None:
            dist.all_reduce(total, group=self.groups.dp_sp)
        return total.item() / (self.dims.dp * self.dims.sp)

    def train_step(self, step: int, batches: Batches, lr: float) -> tuple[float, float]:
        """One optimizer step (0-based `step`) at learning rate `lr`: forward and backward,
        gradient clipping to `train.grad_clip`, update. Returns (loss, gradient norm)."""
        grad_clip = self.job.spec.train.grad_clip
        if isinstance(self.states, ZeroModelStates):  # CPU chunks may update during the backward
            self.states.begin_step(lr, num_microbatches=self.accum_steps, grad_clip=grad_clip)
        loss = self.forward_backward(step, batches)
        grad_norm = self.states.clip_grad_norm(grad_clip)
        self.states.step(lr)
        return loss, grad_norm

    def optimizer_stats(self) -> dict | None:
        """Seconds of the last step's optimizer work, overlapped and exposed (ZeRO only)."""
        if isinstance(self.states, ZeroModelStates):
            return self.states.optimizer_stats()
        return None

    def optimizer_note(self) -> str | None:
        """Why CPU chunks' optimizer step will not overlap the backward, when it could have."""
        states, grad_clip = self.states, self.job.spec.train.grad_clip
        if (isinstance(states, ZeroModelStates) and states.config.cpu_chunks
                and states.config.overlap_cpu_optimizer and grad_clip > 0):
            return (f"CPU chunks' optimizer step runs after the backward, not overlapped with "
                    f"it: train.grad_clip = {grad_clip} needs the global gradient norm before "
                    f"any update (set it to 0 to overlap)")
        return None


def build_runtime(job: Job, plan: Plan, *, rank: int = 0, overlap_cpu_optimizer: bool = True,
                  device: Device = CPU) -> Runtime:
    """What `rank` runs under `plan`; `overlap_cpu_optimizer=False` updates CPU chunks after
    the backward instead of during it (`ZeroConfig.overlap_cpu_optimizer`, for comparison)."""
    par = plan.parallel
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(dp=par.dp, sp=par.sp, pp=par.pp, tp=par.tp, world_size=world)
    groups = build_groups(dims, rank)
    tr = job.spec.train
    if not torch.cuda.is_available():  # host memory is the device memory: give freed blocks
        if memory_bound(plan):         # back when memory binds, else keep them for the next step
            return_freed_host_memory()
        else:
            keep_freed_host_memory()
    torch.manual_seed(tr.seed)
    # fp32 on the rank's device: the model states make the bf16 compute copies
    model = build_model(job.shape, seed=tr.seed, device=device.torch_device)
    if job.hf is not None:  # model.hf: start from its weights (every rank reads them)
        from disttrain.model.hf import load_hf_weights

        load_hf_weights(model, job.hf.path)
    if par.tp > 1:
        if job.spec.data.kind == "documents":
            raise SpecError("parallel.tp: not yet supported with data.kind documents (the "
                            "vocabulary-parallel loss has no ignored targets yet)")
    try:
        tp = apply_tensor_parallel(model, groups.tp, par.tp_overlap_chunks,
                                   par.tp_column_backward)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    sp_core = apply_sequence_parallel(model, groups.sp, par.sp_kind) if par.sp > 1 else None
    if plan.tiling.mlp_chunk_tokens:
        apply_mlp_tiling(model, plan.tiling.mlp_chunk_tokens)
    activations, copy_engine = None, None
    if plan.activations and not all(a.keep_all for a in plan.activations):
        activations, copy_engine = _apply_activations(job, plan, model, rank)
    first_chunk_ids = _first_chunk_ids(model, plan)  # before the split: needs every layer
    pipeline = None
    if par.pp > 1:
        if job.shape.tie_embeddings:
            field = ("model.hf: config.json tie_word_embeddings" if job.hf is not None
                     else "model.tie_embeddings")
            raise SpecError(f"{field}: not supported with parallel.pp > 1 (the tied gradient "
                            f"would have to be summed across stages inside ZeRO)")

        def tp_loss(hidden, targets):  # the last stage's vocabulary-parallel head and loss
            return vocab_parallel_lm_loss(tp, hidden, pipeline.module.head.weight, targets,
                                          plan.tiling.loss_chunk_tokens)
        pipeline = PipelineRunner(model, groups, PipelineConfig.from_plan(par),
                                  loss_chunk_tokens=plan.tiling.loss_chunk_tokens,
                                  **({"loss_fn": tp_loss} if tp is not None else {}))
        model = pipeline.module  # this rank's stage(s); the other stages' layers are freed
    compute_dtype = TORCH_DTYPES[job.dtype]
    if plan.model_states.optimizer_on != "device":
        raise SpecError(f"plan.model_states.optimizer_on: only 'device' runs (each chunk "
                        f"updates where its master lives: cpu_chunks on the host), got "
                        f"{plan.model_states.optimizer_on!r}")
    ms = plan.model_states
    if world == 1 and par.zero_stage == 0 and not ms.cpu_chunks and not ms.cpu_outer:
        states = TorchAdamWStates(model, lr=tr.lr, weight_decay=tr.weight_decay,
                                  compute_dtype=compute_dtype, betas=tr.adam_betas,
                                  eps=tr.adam_eps)
    else:
        config = ZeroConfig(stage=par.zero_stage, chunk_numel=_chunk_numel(plan),
                            cpu_chunks=_local_cpu_chunks(model, plan, first_chunk_ids),
                            weight_decay=tr.weight_decay, betas=tr.adam_betas,
                            eps=tr.adam_eps,
                            overlap_cpu_optimizer=overlap_cpu_optimizer,
                            compute_dtype=compute_dtype,
                            reduce_dtype=TORCH_DTYPES[tr.grad_reduce_dtype]
                            if compute_dtype != torch.float32 else torch.float32,
                            prefetch=0 if plan.model_states.num_prefetch_buffers == 1 else 1,
                            overlap_param_gather=par.overlap_param_gather)
        replicated = ((tp, [p for n, p in model.named_parameters()
                            if n in tp_replicated_names(model)]) if tp is not None else None)
        states = ZeroModelStates(model, config, group=groups.dp_sp,  # norm spans pp and tp
                                 extra_norm_group=groups.pp_tp, tp_replicated=replicated)
    # the plan's batch sizes (micro_batch_size: the planner's choice under auto)
    accum = plan.global_batch_size // (plan.micro_batch_size * par.dp)
    if pipeline is not None and accum != par.num_microbatches:
        raise SpecError(f"parallel.num_microbatches: must be global_batch_size / "
                        f"(micro_batch_size x dp) = {accum} with a pipeline, got "
                        f"{par.num_microbatches}")
    return Runtime(job=job, plan=plan, groups=groups, model=model, states=states,
                   accum_steps=accum, pipeline=pipeline, sp_core=sp_core,
                   activations=activations, copy_engine=copy_engine, tensor_parallel=tp)
