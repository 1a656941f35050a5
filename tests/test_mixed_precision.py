"""bf16 mixed precision: the runtime (single process and ZeRO 0-3 on 2 gloo ranks) against a
plain PyTorch reference of the same recipe, written out here: bf16 parameters for compute,
fp32 masters updated by torch.optim.AdamW, each microbatch's bf16 gradients accumulated in
fp32, the loss in fp32, no autocast.

Tolerances. One process runs the reference's operations in the reference's order: equal to
fp32 rounding (`EXACT`). Two ranks sum the same fp32 gradients in another order (per rank,
then across ranks), which moves an fp32 master by an ulp now and then; rounded to bf16
(8 bits of mantissa) such a flip changes a compute weight by 2^-8 relative, and the next
step's loss and norm feel it: `DP_TOL` bounds losses and norms, 2.5 `DP_TOL` the masters'
relative L2 distance (measured: 1.3e-5 loss, 9e-5 norm, 1.5e-3 masters). Adam moves an element whose gradient is mere rounding noise by up to lr in
either direction, so a few elements may differ by up to 2 lr per step: the bound on every
element. Reducing in bf16 rounds every gradient to bf16 once more before the sum, and
sequence parallelism splits a weight gradient's sum over tokens into per-rank bf16 matmul
outputs, each rounded to bf16: both within `BF16_REDUCE_TOL` for losses and norms (measured
1.1e-4) and 2 `BF16_REDUCE_TOL` for the masters (measured 8e-3 bf16 reduce, 1.1e-2 sp=2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_JOB, merge
from disttrain.data import build_batches
from disttrain.device import Device
from disttrain.engine import build_runtime
from disttrain.model import build_model
from disttrain.optim import build_optimizer
from disttrain.parallel.spawn import spawn_ranks
from disttrain.spec import job_from_dict
from planner.plan import LayerActivationPlan, ModelStatePlan, ParallelPlan, Plan

EXACT = 1e-6
DP_TOL = 2e-3
BF16_REDUCE_TOL = 1e-2
STEPS, LR, SEQ = 3, 3e-3, 32
SPEC = merge(TINY_JOB, {"model": {"dtype": "bf16"}, "data": {"kind": "synthetic"},
                        "train": {"seq_len": SEQ, "micro_batch_size": 1, "global_batch_size": 4,
                                  "steps": STEPS, "lr": LR, "min_lr": LR, "warmup_steps": 0,
                                  "grad_clip": 1.0, "weight_decay": 0.1}})
POLICIES = {"keep": LayerActivationPlan(keep_all=True),
            "swap": LayerActivationPlan(swap_fraction=1.0, tier="cpu"),
            "recompute": LayerActivationPlan(swap_fraction=0.0)}


def _batches(job):
    return build_batches("synthetic", None, vocab_size=job.shape.vocab_size, seq_len=SEQ,
                         micro_batch_size=1, seed=job.spec.train.seed)


def reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Plain bf16 mixed precision in one process over the whole global batch."""
    job = job_from_dict(SPEC)
    tr = job.spec.train
    model = build_model(job.shape, seed=tr.seed)
    masters = {n: torch.nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    model = copy.deepcopy(model).to(torch.bfloat16)
    opt = build_optimizer(list(masters.values()), lr=LR, weight_decay=tr.weight_decay)
    batches, losses, norms = _batches(job), [], []
    for step in range(STEPS):
        total = 0.0
        for index in range(tr.global_batch_size):
            tokens, targets = batches.get(step, index)
            logits = model(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()) / 4
            loss.backward()
            total += loss.item()
            for name, param in model.named_parameters():
                master = masters[name]
                if master.grad is None:
                    master.grad = param.grad.float()
                else:
                    master.grad += param.grad
                param.grad = None
        norms.append(float(torch.nn.utils.clip_grad_norm_(masters.values(), tr.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(masters[name])
        losses.append(total)
    return losses, norms, {n: m.detach().clone() for n, m in masters.items()}


def _plan(job, *, dp: int, zero_stage: int, policy: str = "keep", sp: int = 1) -> Plan:
    layer_bytes = job.shape.layer_params() * 2
    return Plan(model=job.shape.to_dict(), dtype="bf16", seq_len=SEQ, micro_batch_size=1,
                global_batch_size=4, parallel=ParallelPlan(dp=dp // sp, sp=sp,
                                                           zero_stage=zero_stage),
                model_states=ModelStatePlan(chunk_size_bytes=layer_bytes),
                activations=(POLICIES[policy],) * job.shape.num_layers)


def run(rank: int, world: int, configs: list[tuple], device_kind: str = "cpu") -> dict:
    """Train STEPS steps per (zero_stage, policy, grad_reduce_dtype[, sp]); losses, norms,
    masters. With sp the world is sequence-parallel (Ulysses) instead of data-parallel."""
    out = {}
    for config in configs:
        stage, policy, reduce, sp = (*config, 1)[:4]
        job = job_from_dict(merge(SPEC, {"train": {"grad_reduce_dtype": reduce}}))
        runtime = build_runtime(job, _plan(job, dp=world, zero_stage=stage, policy=policy,
                                           sp=sp), rank=rank, device=Device(device_kind, rank))
        batches, losses, norms = _batches(job), [], []
        for step in range(STEPS):
            loss, norm = runtime.train_step(step, batches, LR)
            losses.append(loss)
            norms.append(norm)
        states = runtime.states
        if hasattr(states, "full_state_dict"):
            masters = states.full_state_dict()
        else:
            masters = {k[len("model."):]: v.clone() for k, v in states.state_dict().items()
                       if k.startswith("model.")}
        assert all(p.dtype == torch.bfloat16 for p in runtime.model.parameters())
        assert all(m.dtype == torch.float32 for m in masters.values())
        runtime.close()
        out[config] = (losses, norms, {k: v.cpu() for k, v in masters.items()})
    return out


def _check(result, ref, tol: float, master_tol: float | None = None) -> None:
    losses, norms, masters = result
    ref_losses, ref_norms, ref_masters = ref
    assert losses == pytest.approx(ref_losses, rel=tol)
    assert norms == pytest.approx(ref_norms, rel=tol)
    assert masters.keys() == ref_masters.keys()
    for name, value in masters.items():
        diff = value - ref_masters[name]
        assert diff.norm() <= (master_tol or tol) * ref_masters[name].norm(), name
        assert diff.abs().max() <= 2 * LR * STEPS, name


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_single_process_matches_plain_bf16(policy, ref):
    result = run(0, 1, [(0, policy, "fp32")])[(0, policy, "fp32")]
    _check(result, ref, EXACT)


@pytest.mark.slow
def test_zero_stages_on_two_ranks_match_plain_bf16(ref):
    configs = ([(stage, "keep", "fp32") for stage in range(4)] + [(3, "recompute", "bf16")]
               + [(1, "keep", "bf16")]  # the bf16 copy a stage-1 reduction sends
               + [(2, "swap", "fp32", 2)])  # Ulysses sp=2
    results = spawn_ranks(run, 2, configs)
    for config in configs:
        split = config[2] == "bf16" or len(config) > 3
        tol = BF16_REDUCE_TOL if split else DP_TOL
        for rank_result in results:
            _check(rank_result[config], ref, tol, master_tol=(2 if split else 2.5) * tol)
        assert results[0][config][0] == results[1][config][0]  # one loss on every rank


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zero3_bf16_on_a_gpu_matches_plain_bf16(ref):
    """ZeRO-3 in one process on CUDA: gathers and gradient copies on the side stream, bf16
    matmuls of the GPU (rounded unlike the CPU's: the split tolerance)."""
    result = run(0, 1, [(3, "keep", "fp32")], device_kind="cuda")[(3, "keep", "fp32")]
    _check(result, ref, BF16_REDUCE_TOL, master_tol=2 * BF16_REDUCE_TOL)
