"""The plan a run executes: loaded from `--plan plan.json`, or made by the planner, and checked
against the job so a plan written for another model or cluster is refused up front."""

from __future__ import annotations

import logging
from pathlib import Path

from disttrain.spec import Job, SpecError
from planner.collectives import param_gather_overlap
from planner.plan import LayerActivationPlan, ModelStatePlan, ParallelPlan, Plan


def fixed_plan(job: Job, world_size: int) -> Plan:
    """The plan that keeps every activation and honours the spec's fixed values, resolving
    `auto` trivially (sequence and pipeline degree 1, data parallel over all ranks, ZeRO-3 when
    there is more than one rank, one sequence per microbatch when train.micro_batch_size is
    auto). Used with `--no-planner` and by tests."""
    par, tr = job.spec.parallel, job.spec.train
    micro_batch = 1 if tr.micro_batch_size == "auto" else tr.micro_batch_size
    sp = 1 if par.sp == "auto" else par.sp
    pp = 1 if par.pp == "auto" else par.pp
    tp = 1 if par.tp == "auto" else par.tp
    dp = world_size // (sp * pp * tp) if par.dp == "auto" else par.dp
    zero = (3 if world_size > 1 else 0) if par.zero_stage == "auto" else par.zero_stage
    accum = tr.global_batch_size // (micro_batch * dp)
    micro = accum if par.num_microbatches == "auto" else par.num_microbatches
    return Plan(
        model=job.shape.to_dict(), dtype=job.dtype, seq_len=tr.seq_len,
        micro_batch_size=micro_batch, global_batch_size=tr.global_batch_size,
        parallel=ParallelPlan(dp=dp, sp=sp, sp_kind="ulysses" if par.sp_kind == "auto"
                              else par.sp_kind, pp=pp, tp=tp, num_microbatches=micro,
                              schedule="1f1b" if pp > 1 else "none", zero_stage=zero,
                              tp_overlap_chunks=1 if par.tp_overlap_chunks == "auto"
                              else par.tp_overlap_chunks,
                              overlap_param_gather=param_gather_overlap(
                                  job.hardware, None if par.overlap_param_gather == "auto"
                                  else par.overlap_param_gather)),
        model_states=ModelStatePlan(),
        activations=tuple(LayerActivationPlan(keep_all=True)
                          for _ in range(job.shape.num_layers)))


def check_plan(job: Job, plan: Plan, world_size: int, where: str = "plan") -> Plan:
    """Refuse a plan that does not fit this job (one-line SpecError naming what differs)."""
    if not plan.feasible:
        raise SpecError(f"{where}: the plan is infeasible (see its 'rejected' reasons); "
                        f"nothing to run")
    if plan.model != job.shape.to_dict():
        raise SpecError(f"{where}: written for another model shape than model.* of the spec")
    if plan.parallel.world_size != world_size:
        raise SpecError(f"{where}: dp*sp*pp*tp = {plan.parallel.world_size} but this run has "
                        f"{world_size} ranks")
    if job.spec.parallel.tp not in ("auto", plan.parallel.tp):
        raise SpecError(f"{where}: planned for tp {plan.parallel.tp}, the spec fixes parallel.tp "
                        f"= {job.spec.parallel.tp}")
    if job.spec.parallel.tp_overlap_chunks not in ("auto", plan.parallel.tp_overlap_chunks):
        raise SpecError(f"{where}: planned for tp_overlap_chunks "
                        f"{plan.parallel.tp_overlap_chunks}, the spec fixes "
                        f"parallel.tp_overlap_chunks = {job.spec.parallel.tp_overlap_chunks}")
    if job.spec.parallel.overlap_param_gather not in ("auto", plan.parallel.overlap_param_gather):
        raise SpecError(f"{where}: planned with overlap_param_gather "
                        f"{plan.parallel.overlap_param_gather}, the spec fixes "
                        f"parallel.overlap_param_gather = "
                        f"{job.spec.parallel.overlap_param_gather}")
    if plan.activations and len(plan.activations) != job.shape.num_layers:
        raise SpecError(f"{where}: {len(plan.activations)} activation entries for "
                        f"{job.shape.num_layers} layers")
    if plan.seq_len != job.spec.train.seq_len:
        raise SpecError(f"{where}: planned for seq_len {plan.seq_len}, the spec trains "
                        f"{job.spec.train.seq_len}")
    _check_batch(job, plan, where)
    return plan


def _check_batch(job: Job, plan: Plan, where: str) -> None:
    """The plan's batch sizes are the ones the run uses (data, gradient accumulation, loss
    scaling, pipeline microbatches): they must be the spec's, the micro-batch size only when
    the spec fixes it (auto: the plan's choice)."""
    tr, par = job.spec.train, plan.parallel
    if plan.global_batch_size != tr.global_batch_size:
        raise SpecError(f"{where}: planned for global_batch_size {plan.global_batch_size}, the "
                        f"spec trains {tr.global_batch_size}")
    if tr.micro_batch_size not in ("auto", plan.micro_batch_size):
        raise SpecError(f"{where}: planned for micro_batch_size {plan.micro_batch_size}, the "
                        f"spec fixes train.micro_batch_size = {tr.micro_batch_size}")
    if plan.micro_batch_size < 1 or plan.global_batch_size % (plan.micro_batch_size * par.dp):
        raise SpecError(f"{where}: global_batch_size {plan.global_batch_size} is not a multiple "
                        f"of micro_batch_size x dp ({plan.micro_batch_size} x {par.dp})")


def resolve_plan(job: Job, world_size: int, plan_path: str | Path | None = None,
                 use_planner: bool = True) -> Plan:
    kernel = job.hardware.attention_kernel
    if kernel is not None:   # pricing only: the run is correct, its steps faster than planned
        logging.getLogger(__name__).warning(
            "cluster.attention_kernel: %s prices the attention core of another software stack; "
            "this run calls torch SDPA (FlashAttention-2-class on Ampere), so its steps will be "
            "faster than the plan predicts", kernel)
    if plan_path is not None:
        path = Path(plan_path)
        if not path.is_file():
            raise SpecError(f"--plan: {path} does not exist")
        try:
            plan = Plan.load(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise SpecError(f"--plan: {path}: {exc}") from None
        return check_plan(job, plan, world_size, where=f"--plan {path}")
    if not use_planner:
        return fixed_plan(job, world_size)
    from planner.search import plan_job

    return check_plan(job, plan_job(job.plan_request()), world_size, where="planner")
