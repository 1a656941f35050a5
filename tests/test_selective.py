"""Op-level selective checkpointing (torchtitan's "selective op" AC, `planner.selective`,
`offload.selective`): trains exactly like plain PyTorch alone and beside the other policies,
runs the attention core once and reruns exactly the matmuls the planner prices, holds exactly
the bytes the planner predicts, and the stage MIP chooses it as brute force does."""

from __future__ import annotations

import collections
import itertools
import json
import random

import pytest
import torch

from test_offload_equivalence import (BATCH, FLASH_BWD, FLASH_FWD, GPT, SEQ, TINY,
                                      assert_matches, train)
from disttrain.model import build_model
from disttrain.planning import resolve_plan
from disttrain.spec import SpecError
from offload.policy import apply_activation_policy
from offload.selective import MATMUL_OPS
from planner.costmodel import Candidate, CostParams, LayerCost, layer_cost
from planner.hardware import CLUSTER_PRESETS
from planner.mip import StageProblem, _layer_traffic, evaluate_stage, solve_stage
from planner.plan import LayerActivationPlan as Layer
from planner.selective import recomputed_matmuls, saved_matmuls, selective_bytes_per_token

SEL = Layer(selective=True)
POLICIES = {
    "selective": [SEL, SEL],
    "selective_beside_recompute": [SEL, Layer(swap_fraction=0.0)],
    "keep_then_selective": [Layer(keep_all=True), SEL],
    "swap_then_selective": [Layer(swap_fraction=1.0, swap_attention_output=True), SEL],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _stores(plans, tmp_path):
    if not any(p.swap_fraction or p.swap_input or p.swap_attention_output for p in plans):
        return {}
    from offload.engine import CopyEngineConfig, create_engine
    from offload.stores import CpuStore, CpuStoreConfig
    return {"cpu": CpuStore(CpuStoreConfig(budget_bytes=64 << 20),
                            create_engine(CopyEngineConfig(backend="python")))}


def _matmuls(counts) -> int:
    return sum(counts[op] for op in MATMUL_OPS)


@pytest.mark.parametrize("policy,shape", [(p, "llama") for p in sorted(POLICIES)]
                         + [("selective", "gpt")])
def test_selective_matches_plain_pytorch_core_once_matmuls_as_priced(policy, shape, tmp_path):
    plans = POLICIES[policy]
    shape = TINY if shape == "llama" else GPT
    ref = train(build_model(shape, seed=0), shape, count_ops=True)
    model = build_model(shape, seed=0)
    with apply_activation_policy(model, plans, stores=_stores(plans, tmp_path)) as runtime:
        history = train(model, shape, count_ops=True, runtime=runtime)
        names = [n for n, _ in model.named_parameters()]
        keys = set(model.state_dict())
    assert names == [n for n, _ in build_model(shape, seed=0).named_parameters()]
    assert keys == set(build_model(shape, seed=0).state_dict())
    assert_matches(history, ref)
    rerun = sum(len(recomputed_matmuls(shape)) for p in plans if p.selective)
    others = [p for p in plans if not p.selective and not p.keep_all]
    for (_, _, counts, metrics), (_, _, ref_counts, _) in zip(history, ref):
        assert counts[FLASH_FWD] == len(plans) and counts[FLASH_BWD] == len(plans)
        if not others:  # token-wise recompute layers rerun their own matmuls on top
            assert _matmuls(counts) == _matmuls(ref_counts) + rerun
        for plan, layer in zip(plans, metrics["layers"]):
            assert layer["policy"]["selective"] == plan.selective


def _planned_resident(shape, dtype: str, act: Layer) -> float:
    hw = CLUSTER_PRESETS["8xh100-80g"]
    cand = Candidate(dp=1, sp=1, sp_kind="ulysses", pp=1, num_microbatches=1, zero_stage=0)
    lc = layer_cost(shape, dtype, hw, cand, seq_len=SEQ, micro_batch_size=BATCH,
                    params=CostParams())
    return _layer_traffic(lc, act)[1]


@pytest.mark.parametrize("dtype,variant", [("fp32", "llama"), ("bf16", "llama"),
                                           ("fp32", "gpt"), ("fp32", "qkv_bias"),
                                           ("bf16", "qwen3")])
def test_selective_bytes_equal_the_planners(dtype, variant):
    """The runtime's measured bytes per selective layer (input, kept matmul outputs found by
    the policy itself, attention output + lse) equal the planner's LayerCost exactly."""
    shape = {"llama": TINY, "gpt": GPT, "qkv_bias": TINY.replace(qkv_bias=True),
             "qwen3": TINY.replace(head_dim=48, qk_norm=True)}[variant]
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = build_model(shape, seed=0, dtype=torch_dtype)
    plans = [SEL] * shape.num_layers
    tokens = torch.randint(0, shape.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with apply_activation_policy(model, plans) as runtime:
        model(tokens).float().sum().backward()
        metrics = runtime.step_metrics()
    # torchtitan's counting: q, v, gate, down kept (k, o, up rerun); GeLU: q, v, up kept
    assert saved_matmuls(shape) == ([0, 2, 4, 6] if shape.mlp == "swiglu" else [0, 2, 4])
    assert recomputed_matmuls(shape) == ([1, 3, 5] if shape.mlp == "swiglu" else [1, 3])
    predicted = _planned_resident(shape, dtype, SEL)
    assert predicted == selective_bytes_per_token(shape, dtype) * BATCH * SEQ
    for layer in metrics["layers"]:
        assert layer["bytes_kept"] == predicted, (layer["layer"], layer["bytes_kept"], predicted)
    assert metrics["peak_resident_bytes"] == predicted * shape.num_layers
    with apply_activation_policy(model, plans) as runtime:  # released after the backward
        model(tokens).float().sum().backward()
        assert runtime._resident == 0


def test_bad_selective_values_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^activations\.selective:"):
        Layer(selective=True, keep_all=True)
    with pytest.raises(ValueError, match=r"^activations\.selective:"):
        Layer(selective=True, swap_fraction=0.5)
    with pytest.raises(ValueError, match=r"^activations\.selective: must be true or false"):
        Layer(selective="yes")
    from conftest import TINY_JOB, merge
    from disttrain.spec import job_from_dict
    from planner.plan import ParallelPlan, Plan
    job = job_from_dict(merge(TINY_JOB, {"train": {"seq_len": SEQ}}))
    plan = Plan(model=job.shape.to_dict(), dtype="fp32", seq_len=SEQ, micro_batch_size=1,
                global_batch_size=1, parallel=ParallelPlan(), activations=(SEL,) * 2).to_dict()
    plan["activations"][1]["keep_all"] = True
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(SpecError) as info:
        resolve_plan(job, 1, path)
    assert "activations.selective:" in str(info.value) and "\n" not in str(info.value)


# -- the stage MIP ---------------------------------------------------------------------------
GIB = 2**30


def _problem(seed: int) -> StageProblem:
    rng = random.Random(seed)
    layers = []
    for _ in range(2):
        tl = rng.uniform(4, 12) * GIB
        io, ao = rng.uniform(0.5, 1.5) * GIB, rng.uniform(0.5, 1.5) * GIB
        recompute = rng.uniform(0.2, 1)
        layers.append(LayerCost(
            tokens=1024, input_bytes=io, attention_output_bytes=ao, token_local_bytes=tl,
            mlp_bytes=tl / 2, plain_bytes=tl + io + ao, forward_s=rng.uniform(0.5, 2),
            backward_s=rng.uniform(1, 4), recompute_s=recompute,
            selective_bytes=io + ao + rng.uniform(0.2, 0.6) * tl,
            selective_recompute_s=recompute * rng.uniform(0.2, 0.6)))
    plain = sum(lc.plain_bytes for lc in layers)
    return StageProblem(
        layers=tuple(layers), inflight=rng.choice([1, 2]), slots=rng.choice([2, 3]),
        device_capacity_bytes=rng.uniform(0.4, 1.2) * plain * 2, fixed_device_bytes=GIB,
        working_base_bytes=rng.uniform(0, 1) * GIB, host_capacity_bytes=rng.uniform(5, 40) * GIB,
        nvme_capacity_bytes=0.0, host_link_bw=rng.uniform(1, 4) * GIB, nvme_read_bw=GIB,
        nvme_write_bw=GIB, allow_nvme=False, token_chunks=2)


def _options():
    yield Layer(keep_all=True)
    yield SEL
    for n, swap_in, swap_ao in itertools.product(range(3), (False, True), (False, True)):
        yield Layer(swap_fraction=n / 2, swap_input=swap_in, swap_attention_output=swap_ao)


def test_stage_mip_matches_brute_force_with_selective():
    chosen = collections.Counter()
    for seed in range(6):
        problem = _problem(seed)
        for only in (False, True):
            p = StageProblem(**{**problem.__dict__, "selective_only": only,
                                "allow_keep": not only})
            evals = [evaluate_stage(p, acts, 0, 0) for acts in itertools.product(_options(), repeat=2)]
            best = min((e.objective_s for e in evals if e.feasible), default=None)
            if best is None:
                continue
            solution = solve_stage(p, gap_rel=0.0)
            assert solution.evaluation.feasible, solution.evaluation.violations
            assert solution.evaluation.objective_s == pytest.approx(best, rel=1e-6, abs=1e-7)
            assert not only or all(a.selective for a in solution.activations)
            chosen.update("selective" if a.selective else "keep" if a.keep_all else "other"
                          for a in solution.activations if not only)
    assert chosen["selective"] and (chosen["keep"] or chosen["other"]), chosen


def test_selective_is_refused_where_it_cannot_run():
    """Not offered (0 bytes) with tensor parallelism or a tiled MLP; the runtime refuses a
    tiled MLP with a one-line error naming the field."""
    from disttrain.tiling import apply_mlp_tiling
    from planner.costmodel import tiled_layer_cost
    hw = CLUSTER_PRESETS["8xh100-80g"]
    args = dict(seq_len=SEQ, micro_batch_size=BATCH, params=CostParams())
    one, two = (layer_cost(TINY, "bf16", hw, Candidate(dp=1, sp=1, sp_kind="ulysses", pp=1,
                                                       num_microbatches=1, zero_stage=0, tp=tp),
                           **args) for tp in (1, 2))
    assert one.selective_bytes > 0 and one.selective_recompute_s > 0
    assert two.selective_bytes == 0
    assert tiled_layer_cost(one, TINY, "bf16", 16).selective_bytes == 0
    model = build_model(TINY, seed=0)
    apply_mlp_tiling(model, 16)
    with apply_activation_policy(model, [SEL] * 2):
        with pytest.raises(ValueError, match=r"^activations\[0\]\.selective: not with tiling"):
            model(torch.zeros(1, SEQ, dtype=torch.long)).sum().backward()
